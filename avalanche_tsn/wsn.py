"""WSN (Kang et al., "Forget-free Continual Learning with Winning Subnetworks", ICML 2022).

WSN is TinySubNets' first stage alone: a score per weight, one score tensor shared by all
tasks and never re-initialised, each task's mask the top of ``|scores|`` per layer with a
straight-through gradient, weights used by earlier tasks frozen, float32 weights. It is built
here from the same parts as :class:`~avalanche_tsn.strategy.TSNStrategy` with its pruning,
quantization and task-matching stages switched off, and counted both as this package counts
capacity and with WSN's own formula (:func:`~avalanche_tsn.capacity.wsn_capacity`).

Deliberate differences from WSN's public code (see ``shared/papers/peers-notes.md``):

- ``sparsity`` is the fraction of each layer a mask leaves out (WSN's ``c`` is the kept
  fraction: ``c = 1 - sparsity``);
- BatchNorm keeps per-task frozen statistics (WSN uses batch statistics at test time, so a
  sample's output depends on its minibatch);
- biases, when a layer has them, are kept per task;
- a task's mask is taken from its final scores (WSN's code takes it from the
  best-validation-loss epoch; use Avalanche's early stopping for that).

TSNStrategy keeps one score tensor for all tasks and never re-initialises it, as WSN does
(its Table 3 shows re-initialising is worse), so the two agree on that.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from avalanche_tsn.capacity import WSNCapacity, wsn_capacity
from avalanche_tsn.strategy import TSNStrategy, reject_arguments

__all__ = ["WSNStrategy"]

_ABSENT = ("prune", "quantize", "quant_heads", "task_matching")


class WSNStrategy(TSNStrategy):
    """WSN: mask learning with weight sharing, nothing pruned or quantized after training.

    Takes TSNStrategy's arguments except those of the stages WSN does not have.

    :param model: the user's module (see :class:`TSNStrategy`).
    :param optimizer: an optimizer over the model's parameters.
    :param sparsity: fraction of each maskable layer a task's mask leaves out, in [0, 1)
        (WSN's ``c = 1 - sparsity``); a float or one value per task.
    :param kwargs: the rest of :class:`TSNStrategy`'s and Avalanche's arguments.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        sparsity: float | list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        reject_arguments(
            kwargs, _ABSENT, "WSNStrategy has no pruning, quantization or task-matching stage"
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            sparsity=sparsity,
            prune=False,
            quantize=False,
            quant_heads=False,
            **kwargs,
        )

    def wsn_capacity(self) -> WSNCapacity:
        """Capacity as WSN counts it (float32 used weights, 7-task Huffman-coded masks)."""
        return wsn_capacity(self.tsn_model)


# Avalanche re-wraps every strategy's __init__ to accept positional arguments; WSNStrategy is
# keyword-only like TSNStrategy.
WSNStrategy.__init__ = WSNStrategy.__init__.__wrapped__  # type: ignore[method-assign]
