"""Ada-QPacknet (Pietron et al., ECAI 2023, arXiv:2308.07939) on TinySubNets' machinery.

Per task: a small search over per-layer prune fractions (each candidate prunes the free
weights by magnitude, trains briefly on a copy of the model, and is scored by validation
accuracy and sparsity together), then the task trains with the best candidate's mask (every
weight of earlier tasks, frozen, plus its own kept weights), then k-means quantization with one
bit-width per task, found by halving the codebook while the validation accuracy drop stays
under a threshold. Earlier tasks stay bit-identical (the same frozen buffers as TSN).

Read from the paper's abstract and the authors' public code (``shared/papers/peers-notes.md``).
Deliberate differences from that code:

- the best candidate is used (the code appends one dict object per candidate and ends up
  with the last candidate's fractions whatever the fitness);
- candidates keep the current free weights (the code re-initialises the task's weights from
  U(-1, 1) on each candidate copy, which the real model's retraining does not do);
- only the task's own weights are quantized (the code clusters every weight of the layer,
  zeros and earlier tasks' included, which changes earlier tasks);
- each weight belongs to one task (PackNet's ownership): the code's 32-bit slot that several
  tasks fill with b-bit codes is counted (:func:`adaq_capacity`: bits used per slot) but not
  physically shared, as its own checkpoints do not share them either;
- heads are one per task, in float32 (the code uses one shared output layer).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from avalanche_tsn.capacity import FLOAT_BITS
from avalanche_tsn.layers import FREE
from avalanche_tsn.model import TSNModel
from avalanche_tsn.quantization import accuracy_at_least

__all__ = [
    "Candidate",
    "sample_fractions",
    "prune_free_weights",
    "fitness",
    "search_fractions",
    "halving_bits",
    "AdaQCapacity",
    "adaq_capacity",
    "optimizer_like",
]


@dataclass(frozen=True)
class Candidate:
    """One search candidate: a prune fraction per layer, its accuracy and fitness."""

    fractions: tuple[float, ...]
    accuracy: float
    fitness: float


def sample_fractions(
    n_layers: int, low: float, high: float, generator: torch.Generator
) -> tuple[float, ...]:
    """Per-layer prune fractions drawn uniformly from ``[low, high]``.

    :param n_layers: number of maskable layers.
    :param low: smallest fraction.
    :param high: largest fraction.
    :param generator: the random generator.
    """
    draws = torch.rand(n_layers, generator=generator, dtype=torch.float64)
    return tuple(float(low + (high - low) * d) for d in draws)


@torch.no_grad()
def prune_free_weights(model: TSNModel, fractions: Iterable[float]) -> float:
    """Give the open task the mask: every owned weight plus the largest free weights.

    In each layer of the loaded bank the ``fraction`` of free weights with the smallest
    magnitude is left out; the mask is fixed through the scores (1 inside, 0 outside), which
    are not trained. Returns the fraction of free weights kept over all layers.

    :param model: a TSN model with a task open.
    :param fractions: prune fraction of each maskable layer, in module order.
    """
    kept = free_total = 0
    layers = [layer for _, layer in model.masked_layers()]
    fractions = list(fractions)
    if len(fractions) != len(layers):
        raise ValueError(f"need {len(layers)} prune fractions, got {len(fractions)}")
    for layer, fraction in zip(layers, fractions, strict=True):
        owned = layer.owner != FREE
        free_idx = (~owned).flatten().nonzero().squeeze(1)
        n_keep = len(free_idx) - int(round(fraction * len(free_idx)))
        mask = owned.flatten().clone()
        if n_keep > 0:
            magnitude = layer.weight.detach().flatten()[free_idx].abs()
            mask[free_idx[torch.topk(magnitude, n_keep).indices]] = True
        layer.fix_live_mask(mask.view_as(layer.weight))
        kept += max(n_keep, 0)
        free_total += len(free_idx)
    return kept / free_total if free_total else 0.0


def fitness(
    accuracy: float, fractions: Iterable[float], sizes: Iterable[int], weight: float
) -> float:
    """``weight * accuracy + (1 - weight) * (pruned fraction, weighted by layer size)``.

    :param accuracy: validation accuracy, in [0, 1].
    :param fractions: prune fraction of each layer.
    :param sizes: number of weights of each layer.
    :param weight: the accuracy's weight (the code's 0.8).
    """
    fractions, sizes = list(fractions), list(sizes)
    pruned = sum(f * n for f, n in zip(fractions, sizes, strict=True)) / sum(sizes)
    return weight * accuracy + (1.0 - weight) * pruned


def search_fractions(
    model: TSNModel,
    train: Callable[[TSNModel], None],
    evaluate: Callable[[TSNModel], float],
    *,
    population: int,
    low: float,
    high: float,
    accuracy_weight: float,
    generator: torch.Generator,
) -> tuple[Candidate, list[Candidate]]:
    """Try ``population`` candidates on copies of ``model``; return the best and all of them.

    :param model: the TSN model, with the task open (it is not changed).
    :param train: trains a copy briefly (the candidate's mask already set).
    :param evaluate: validation accuracy of a copy.
    :param population: number of candidates.
    :param low: smallest prune fraction.
    :param high: largest prune fraction.
    :param accuracy_weight: the accuracy's weight in the fitness.
    :param generator: draws the fractions.
    """
    sizes = [layer.weight.numel() for _, layer in model.masked_layers()]
    candidates = []
    for _ in range(population):
        fractions = sample_fractions(len(sizes), low, high, generator)
        trial = copy.deepcopy(model)
        prune_free_weights(trial, fractions)
        train(trial)
        acc = evaluate(trial)
        candidates.append(
            Candidate(fractions, acc, fitness(acc, fractions, sizes, accuracy_weight))
        )
        del trial
    return max(candidates, key=lambda c: c.fitness), candidates


def halving_bits(
    quantize: Callable[[int], None],
    restore: Callable[[], None],
    evaluate: Callable[..., float],
    baseline: float,
    *,
    start_bits: int,
    max_drop: float,
) -> int:
    """Largest codebook halving whose accuracy drop stays under ``max_drop``: the bit-width.

    Tries ``start_bits``, then one bit fewer at a time, and keeps the last width whose drop
    is below ``max_drop``; 0 (float32, not quantized) if even ``start_bits`` is not. Leaves
    the model quantized at that width.

    :param quantize: quantizes the model's task at a bit-width (from its float values).
    :param restore: puts the float values back.
    :param evaluate: validation accuracy of the model as it is (may take a floor).
    :param baseline: validation accuracy before quantization.
    :param start_bits: the first width (the code's 64 clusters: 6 bits).
    :param max_drop: largest accepted drop (the code's 2 percentage points: 0.02).
    """
    accepted = 0
    try:
        for bits in range(start_bits, 0, -1):
            restore()
            quantize(bits)
            if baseline - accuracy_at_least(evaluate, baseline - max_drop) < max_drop:
                accepted = bits
            else:
                break
        restore()
        if accepted:
            quantize(accepted)
    except BaseException:
        restore()
        raise
    return accepted


@dataclass(frozen=True)
class AdaQCapacity:
    """Capacity as Ada-QPacknet counts it: bits used per 32-bit weight slot."""

    bits_used: int
    weights: int

    @property
    def percent(self) -> float:
        """100 * bits used / (32 * weights)."""
        return 100.0 * self.bits_used / (FLOAT_BITS * self.weights)


@torch.no_grad()
def adaq_capacity(model: TSNModel) -> AdaQCapacity:
    """Bits the trained tasks' own weights take (their bit-width each, 32 if not quantized).

    :param model: the TSN model.
    """
    used = weights = 0
    for _, layer in model.masked_layers():
        weights += layer.weight.numel()
        for label in model.trained_tasks():
            slot = model.slot_of(label)
            b = int(layer.task_bits[slot]) or FLOAT_BITS
            used += b * int(layer.own_mask(slot).sum())
    return AdaQCapacity(used, weights)


def optimizer_like(optimizer: Optimizer, params: Iterable[nn.Parameter]) -> Optimizer:
    """A fresh optimizer of the same class and settings over ``params``.

    :param optimizer: the user's optimizer (its first group's settings are used).
    :param params: the parameters to optimize.
    """
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return type(optimizer)([p for p in params if p.requires_grad], **settings)
