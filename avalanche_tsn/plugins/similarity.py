"""Task-similarity stage of TinySubNets as an Avalanche plugin: task memory and banks.

Wires Avalanche callbacks to :mod:`avalanche_tsn.similarity` (Zurek et al.,
arXiv:2412.10869, 2024, step 5).
"""

from __future__ import annotations

import logging

import torch
from avalanche.training.plugins import SupervisedPlugin

from avalanche_tsn.plugins._common import current_task, strategy_batches, tsn_model
from avalanche_tsn.similarity import (
    DEFAULT_KL_THRESHOLD,
    check_threshold,
    choose_bank,
    task_divergence,
)
from avalanche_tsn.stages import stage_context
from avalanche_tsn.validation import check_int

__all__ = ["TaskSimilarityPlugin"]

log = logging.getLogger(__name__)


class TaskSimilarityPlugin(SupervisedPlugin, supports_distributed=True):
    """Keeps a memory per task and sends a task unlike all earlier ones to a new bank.

    Before a task trains, its divergence from every earlier task is measured; the bank is
    handed to the mask-learning stage through the strategy's
    :class:`~avalanche_tsn.stages.StageContext`. After it trains, its memory
    samples are stored in the model (so checkpoints keep them).

    :param memory_size: samples kept per task, at least 2.
    :param kl_threshold: largest divergence at which a task shares its closest task's bank,
        a float >= 0 (``float("inf")``: never open a bank, only measure).
    :param seed: seed of the memory sampling.
    """

    def __init__(
        self, memory_size: int = 100, kl_threshold: float = DEFAULT_KL_THRESHOLD, seed: int = 0
    ) -> None:
        super().__init__()
        # Divergences and the "memory" task inference fit statistics to a task's memory:
        # one sample has no spread, so a single-sample memory would fail only at the first
        # evaluation, after all training.
        self.memory_size = check_int(
            memory_size, "memory_size (task matching or memory task inference)", 2
        )
        self.kl_threshold = check_threshold(kl_threshold)
        self.seed = seed
        #: divergence of each task from each earlier task, by task label
        self.divergences: dict[int, dict[int, float]] = {}
        self._pending: torch.Tensor | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        model = tsn_model(strategy)
        label = current_task(strategy)
        data = strategy.experience.dataset.eval()
        g = torch.Generator().manual_seed(self.seed + label)
        idx = torch.randperm(len(data), generator=g)[: self.memory_size].tolist()
        x = torch.cat([x for x, _ in strategy_batches(strategy, data.subset(idx), len(idx))])
        earlier = [t for t in model.trained_tasks() if len(model.memory(t)) >= 2]
        if len(earlier) < len(model.trained_tasks()):
            # (trained without task matching, or loaded from an export without the memory)
            log.warning(
                "task %d: tasks %s keep no memory and are not compared with it",
                label,
                sorted(set(model.trained_tasks()) - set(earlier)),
            )
        divergences = {t: task_divergence(model, x, t) for t in earlier}
        banks = {t: model.bank_of(t) for t in earlier}
        bank = choose_bank(divergences, banks, self.kl_threshold, model.n_banks)
        stage_context(strategy).bank = bank
        self.divergences[label] = divergences
        self._pending = x
        log.info("task %d: divergences %s -> bank %d", label, divergences, bank)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self._pending is not None:
            tsn_model(strategy).store_memory(current_task(strategy), self._pending)
            self._pending = None
