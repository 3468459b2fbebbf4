"""WSN and Ada-QPacknet as recipes on TinySubNets' stages (see :mod:`avalanche_tsn.stages`).

Each is :class:`~avalanche_tsn.strategy.TSNStrategy` with a different list of stages and
settings; users import them as ``avalanche_tsn.WSNStrategy`` and
``avalanche_tsn.AdaQPacknetStrategy``.

**WSN** (Kang et al., "Forget-free Continual Learning with Winning Subnetworks", ICML 2022).
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

**Ada-QPacknet** (Pietron et al., ECAI 2023, arXiv:2308.07939): see
:mod:`avalanche_tsn.adaqpacknet` for the algorithm and its differences from the authors' code.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from avalanche_tsn.adaqpacknet import AdaQCapacity, adaq_capacity
from avalanche_tsn.capacity import WSNCapacity, wsn_capacity
from avalanche_tsn.plugins import ActivationCalibrationPlugin, ValidationSplitPlugin
from avalanche_tsn.plugins.adaqpacknet import HalvingQuantizationPlugin, MaskSearchPlugin
from avalanche_tsn.stages import StageSpec
from avalanche_tsn.strategy import TSNSettings, TSNStrategy, reject_arguments

__all__ = ["WSNStrategy", "AdaQPacknetStrategy"]

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


_ADAQ_ABSENT = ("sparsity", "prune", "quantize", "quant_heads", "task_matching", "new_bank_below")


class AdaQPacknetStrategy(TSNStrategy):
    """Ada-QPacknet: searched per-layer magnitude pruning, then one bit-width per task.

    Takes TSNStrategy's and Avalanche's arguments except those of TSN's own stages.

    :param model: the user's module (see :class:`TSNStrategy`).
    :param optimizer: an optimizer over the model's parameters (candidates use a fresh one
        of the same class and settings).
    :param population_size: search candidates per task (the code's 2), at least 1.
    :param search_epochs: epochs each candidate trains (the code's 30; 1 by default here).
    :param prune_low: smallest per-layer prune fraction drawn (the code's 0.4), in [0, 1).
    :param prune_high: largest one (the code's 0.7), in [``prune_low``, 1).
    :param accuracy_weight: weight of the accuracy in the fitness (the code's 0.8); the
        pruned fraction, weighted by layer size, has the rest.
    :param start_bits: first bit-width tried (the code's 64 clusters: 6), in 1..16.
    :param quant_max_drop: largest validation-accuracy drop of a bit-width (the code's 2
        percentage points: 0.02), in [0, 1).
    :param validation_fraction: fraction of each experience held out for the search and the
        bit-width, in (0, 1).
    :param kwargs: the rest of :class:`TSNStrategy`'s and Avalanche's arguments.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        population_size: int = 2,
        search_epochs: int = 1,
        prune_low: float = 0.4,
        prune_high: float = 0.7,
        accuracy_weight: float = 0.8,
        start_bits: int = 6,
        quant_max_drop: float = 0.02,
        validation_fraction: float = 0.1,
        **kwargs,
    ) -> None:
        reject_arguments(
            kwargs, _ADAQ_ABSENT, "AdaQPacknetStrategy has its own pruning and quantization"
        )
        # Each stage checks its own arguments (before any work: nothing is built yet).
        self.search_plugin = MaskSearchPlugin(
            population_size, search_epochs, prune_low, prune_high, accuracy_weight
        )
        self.quantization_plugin = HalvingQuantizationPlugin(start_bits, quant_max_drop)
        super().__init__(
            model=model,
            optimizer=optimizer,
            prune=False,
            quantize=False,
            quant_heads=False,
            validation_fraction=validation_fraction,
            **kwargs,
        )

    def recipe(self, s: TSNSettings) -> list[StageSpec]:
        """TSN's stages with its pruning and quantization replaced by Ada-QPacknet's.

        The search runs after mask learning (which opens the task it gives a mask to) on the
        validation split, and activation calibration last, on the final weights.

        :param s: the strategy's settings.
        """
        drop = self.quantization_plugin.max_drop  # what the split is read against
        split = StageSpec(
            ValidationSplitPlugin,
            True,
            lambda: ValidationSplitPlugin(s.validation_fraction, allowance=drop),
        )
        stages = [
            split if spec.plugin is ValidationSplitPlugin else spec for spec in super().recipe(s)
        ]
        at = next(i for i, spec in enumerate(stages) if spec.plugin is ActivationCalibrationPlugin)
        search, halving = self.search_plugin, self.quantization_plugin
        return [
            *stages[:at],
            StageSpec(MaskSearchPlugin, True, lambda: search),
            StageSpec(HalvingQuantizationPlugin, True, lambda: halving),
            *stages[at:],
        ]

    def adaq_capacity(self) -> AdaQCapacity:
        """Capacity as Ada-QPacknet counts it (bits used per 32-bit weight slot)."""
        return adaq_capacity(self.tsn_model)


# Avalanche re-wraps every strategy's __init__ to accept positional arguments; these are
# keyword-only like TSNStrategy.
for _cls in (WSNStrategy, AdaQPacknetStrategy):
    _cls.__init__ = _cls.__init__.__wrapped__  # type: ignore[method-assign]
del _cls
