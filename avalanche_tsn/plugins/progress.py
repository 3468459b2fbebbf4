"""One progress bar per experience, for any Avalanche strategy (TinySubNets' examples use it).

Avalanche's ``InteractiveLogger`` draws a bar for every epoch and every evaluated experience
(over a hundred on a five-task stream, before any summary); this plugin draws one bar per
trained experience, advanced once per epoch, and nothing during evaluation. It writes through
``tqdm``, which leaves it out when the output is not a terminal.
"""

from __future__ import annotations

import sys
from typing import TextIO

from avalanche.core import SupervisedPlugin
from tqdm import tqdm

from avalanche_tsn.distributed import is_main_process

__all__ = ["TaskProgressPlugin"]


class TaskProgressPlugin(SupervisedPlugin, supports_distributed=True):
    """A progress bar per training experience, over its epochs.

    :param file: where to draw (standard output by default, in order with printed lines).
    :param disable: True: no bar; None (default): no bar unless ``file`` is a terminal.
    """

    def __init__(self, file: TextIO | None = None, disable: bool | None = None) -> None:
        super().__init__()
        self.file = file
        self.disable = disable
        self._bar: tqdm | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        index = getattr(strategy.experience, "current_experience", "?")
        self._bar = tqdm(
            total=strategy.train_epochs,
            desc=f"experience {index}",
            unit="epoch",
            file=self.file or sys.stdout,
            # under torch.distributed one bar, the main process's
            disable=self.disable if is_main_process() else True,
            leave=True,
        )

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
