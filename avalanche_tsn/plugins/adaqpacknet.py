"""Ada-QPacknet's stages as Avalanche plugins: the per-task search and the bit-width halving.

Ada-QPacknet (Pietron et al., ECAI 2023); the plugins only wire Avalanche's callbacks to
:mod:`avalanche_tsn.adaqpacknet`.
"""

from __future__ import annotations

import logging

import torch
from avalanche.training.plugins import SupervisedPlugin

from avalanche_tsn._avalanche import criterion
from avalanche_tsn.adaqpacknet import (
    Candidate,
    halving_bits,
    optimizer_like,
    prune_free_weights,
    search_fractions,
)
from avalanche_tsn.plugins._common import current_task, strategy_batches, tsn_model
from avalanche_tsn.plugins.compression import validation_accuracy
from avalanche_tsn.quantization import check_bits, quantize_task
from avalanche_tsn.validation import check_float, check_int

__all__ = ["MaskSearchPlugin", "HalvingQuantizationPlugin"]

log = logging.getLogger(__name__)


class MaskSearchPlugin(SupervisedPlugin, supports_distributed=True):
    """Before a task trains: search per-layer prune fractions, then fix the task's mask.

    :param population: candidates per task.
    :param epochs: epochs each candidate trains on a copy of the model.
    :param low: smallest prune fraction drawn.
    :param high: largest prune fraction drawn.
    :param accuracy_weight: the accuracy's weight in the fitness.
    :param seed: seed of the draws and of the candidates' data order.
    """

    def __init__(
        self,
        population: int = 2,
        epochs: int = 1,
        low: float = 0.4,
        high: float = 0.7,
        accuracy_weight: float = 0.8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.population = check_int(population, "population_size", 1)
        self.epochs = check_int(epochs, "search_epochs", 1)
        self.low = check_float(low, "prune_low", 0, 1, high_open=True)
        self.high = check_float(high, "prune_high", 0, 1, high_open=True)
        if self.high < self.low:
            raise ValueError(f"prune_high ({high}) must be at least prune_low ({low})")
        self.accuracy_weight = check_float(accuracy_weight, "accuracy_weight", 0, 1, high_open=True)
        self.seed = seed
        #: per task label: the candidates tried and the one used
        self.searches: dict[int, tuple[Candidate, list[Candidate]]] = {}

    def before_training_exp(self, strategy, **kwargs) -> None:
        model = tsn_model(strategy)
        label = current_task(strategy)
        g = torch.Generator().manual_seed(self.seed + label)
        data = strategy.adapted_dataset

        def train(trial) -> None:
            optimizer = optimizer_like(strategy.optimizer, trial.parameters())
            trial.train()
            for _ in range(self.epochs):
                order = torch.randperm(len(data), generator=g).tolist()
                for x, y in strategy_batches(strategy, data.subset(order), strategy.train_mb_size):
                    optimizer.zero_grad()
                    criterion(strategy)(trial(x, label), y).backward()
                    optimizer.step()

        best, tried = search_fractions(
            model,
            train,
            lambda trial: validation_accuracy(strategy, label, model=trial),
            population=self.population,
            low=self.low,
            high=self.high,
            accuracy_weight=self.accuracy_weight,
            generator=g,
        )
        self.searches[label] = (best, tried)
        kept = prune_free_weights(model, best.fractions)
        log.info(
            "task %d: fractions %s (fitness %.4f of %d candidates), %.1f%% of free weights kept",
            label,
            ", ".join(f"{f:.2f}" for f in best.fractions),
            best.fitness,
            len(tried),
            100 * kept,
        )


class HalvingQuantizationPlugin(SupervisedPlugin, supports_distributed=True):
    """After a task is frozen: one bit-width for all its layers, halving the codebook.

    :param start_bits: first bit-width tried, in 1..16.
    :param max_drop: largest accepted validation-accuracy drop, in [0, 1).
    """

    def __init__(self, start_bits: int = 6, max_drop: float = 0.02) -> None:
        super().__init__()
        self.start_bits = check_bits(start_bits, "start_bits")
        self.max_drop = check_float(max_drop, "quant_max_drop", 0, 1, high_open=True)
        #: bit-width of each task (0: kept in float32)
        self.bits: dict[int, int] = {}

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = tsn_model(strategy)
        label = current_task(strategy)
        slot = model.slot_of(label)
        layers = [layer for _, layer in model.masked_layers()]
        own = [layer.own_values(slot).clone() for layer in layers]

        def restore() -> None:
            for layer, values in zip(layers, own, strict=True):
                layer.set_own_values(slot, values)
                layer.set_codebook(slot, values.new_zeros(0), 0)

        self.bits[label] = halving_bits(
            lambda b: quantize_task(model, slot, b),
            restore,
            lambda floor=None: validation_accuracy(strategy, label, floor),
            validation_accuracy(strategy, label),
            start_bits=self.start_bits,
            max_drop=self.max_drop,
        )
        log.info("task %d quantized at %s bits", label, self.bits[label] or "32 (float)")
