"""Validation samples in the order that lets a search's early stop come soonest.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) prunes and quantizes each task greedily,
keeping a step only if the validation accuracy stays within a margin of the unpruned one.
A pass that only needs to know whether a floor is reached stops as soon as too many samples
are wrong (:func:`avalanche_tsn.plugins.compression.validation_accuracy`); how soon depends on
where the wrong ones are. Samples the unpruned model gets wrong or nearly wrong (the smallest
margin of the true class over the best other) are the ones a harmful step turns wrong first,
so they are read first: a rejected step is found after fewer forwards. Later passes learn
which samples the search's steps actually turn wrong: those a pass finds wrong after the
first minibatch are brought into it (:func:`promote`; where the first minibatch holds more
samples than the floor lets be wrong, so that it can decide a rejection; only the
minibatches whose samples changed run again from the input: :func:`moved_batches`), and the
first minibatches are small but hold every sample the unpruned model gets wrong
(:func:`ramp`). The accuracy of a complete pass, and so every decision, does not depend on
the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["margins", "reorder", "ramp", "promote", "moved_batches"]


def ramp(n: int, size: int, lead: int = 0) -> list[int]:
    """Minibatch sizes for ``n`` samples read hardest first: ``lead`` samples and a quarter
    of ``size``, a quarter, then the half left of the first ``size``, then ``size`` (a
    rejected step is mostly found among the first few samples, and a smaller minibatch costs
    about proportionally less; the first three end where a first full minibatch after the
    lead would, and the later ones keep the forwards few).

    :param n: samples.
    :param size: the largest minibatch, at least 1.
    :param lead: samples read before the ramp's first quarter, in the same minibatch (those
        the unpruned model gets wrong, which a step's rejection counts first: the first
        minibatch can then decide it), at least 0.
    """
    sizes: list[int] = []
    quarter = size // 4
    parts = (lead + quarter, quarter, size - 2 * quarter) if quarter else (lead,)
    for part in parts:
        if n > 0 and part > 0:
            sizes.append(min(part, n))
            n -= sizes[-1]
    while n > 0:
        sizes.append(min(size, n))
        n -= sizes[-1]
    return sizes


def margins(outputs: Tensor, targets: Tensor) -> Tensor:
    """Each sample's logit of its true class minus its best other logit (< 0: wrong).

    :param outputs: logits, ``[n, classes]``.
    :param targets: true classes, ``[n]``.
    """
    true = outputs.gather(1, targets[:, None]).squeeze(1)
    others = outputs.scatter(1, targets[:, None], float("-inf")).max(1).values
    return (true - others).float()


def promote(missed: Tensor, front: int, n: int) -> Tensor | None:
    """A new order of the ``n`` samples that brings those a pass got wrong after the first
    ``front`` into them, or None if there are none to bring.

    A step a search rejects turns wrong mostly the same few samples as the steps before it,
    not always the ones the unpruned model found hardest: each wrong sample read after the
    front takes the place of a front sample the pass got right (the last of those first, the
    easiest), so the next rejection is found in the first minibatch. The other samples keep
    their places.

    :param missed: for the samples the pass read, in order, whether it got each wrong.
    :param front: the first minibatch's size.
    :param n: samples in all (``len(missed)`` or more: a pass stopped early read fewer).
    """
    late = missed[front:].nonzero().squeeze(1) + front
    right = (~missed[:front]).nonzero().squeeze(1).flip(0)
    k = min(len(late), len(right))
    if k == 0:
        return None
    order = torch.arange(n, device=missed.device)
    order[late[:k]] = right[:k]
    order[right[:k]] = late[:k]
    return order


def moved_batches(order: Tensor, sizes: Sequence[int]) -> list[int]:
    """The positions of the minibatches (of ``sizes``) that ``order`` gives other samples.

    :param order: a permutation of all the samples, ``[n]``.
    :param sizes: the minibatches' sizes, summing to ``n``.
    """
    moved = (order != torch.arange(len(order), device=order.device)).nonzero().squeeze(1)
    ends = torch.tensor(sizes, device=order.device).cumsum(0)
    return torch.searchsorted(ends, moved, right=True).unique().tolist()


def reorder(
    batches: Sequence[tuple[Tensor, Tensor]],
    features: Sequence[tuple[tuple, dict]] | None,
    order: Tensor,
    sizes: list[int] | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[tuple, dict]] | None]:
    """The samples of ``batches`` in ``order``, in minibatches of ``sizes`` (default: growing
    to the first one's size, see :func:`ramp`).

    :param batches: inputs and targets, minibatch by minibatch.
    :param features: for each minibatch, arguments a module received for it (positional,
        keyword), permuted alike where they are per-sample tensors; None if there are none
        or if they cannot be permuted (then the caller recomputes them).
    :param order: a permutation of all the samples, ``[n]``.
    :param sizes: the new minibatches' sizes (summing to ``n``).
    """
    x = torch.cat([b[0] for b in batches])[order.to(batches[0][0].device)]
    y = torch.cat([b[1] for b in batches])[order.to(batches[0][1].device)]
    size = ramp(len(y), len(batches[0][1])) if sizes is None else sizes
    ordered = list(zip(x.split(size), y.split(size), strict=True))
    if features is None or any(kwargs for _, kwargs in features):
        return ordered, None
    sizes = [len(b[1]) for b in batches]
    columns: list[list[Any]] = []
    for i in range(len(features[0][0])):
        values = [args[i] if len(args) > i else None for args, _ in features]
        if all(
            isinstance(v, Tensor) and v.dim() > 0 and len(v) == n
            for v, n in zip(values, sizes, strict=True)
        ):
            whole = torch.cat(values)
            columns.append(list(whole[order.to(whole.device)].split(size)))
        elif all(not isinstance(v, Tensor) and v == values[0] for v in values):
            columns.append([values[0]] * len(ordered))  # the same int task label, say
        else:
            return ordered, None
    return ordered, [(tuple(c[j] for c in columns), {}) for j in range(len(ordered))]
