"""Adaptive non-linear (k-means) quantization of each task's own weights.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), appendix Algorithms 1 and 2: each layer's
weights that a task owns are clustered by 1-D k-means into ``2^b`` centroids (one codebook per
layer per task) and replaced by their centroid; ``b`` starts small and grows until the
validation accuracy drop is within a threshold. Shared weights of earlier tasks are never
touched (the reference code quantizes them too, which changes earlier tasks).

1-D k-means is solved exactly per Lloyd step on sorted values: clusters are contiguous runs of
the sorted array, so one sort plus prefix sums make every step O(2^b log n).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from avalanche_tsn.validation import check_int

__all__ = [
    "Codebook",
    "kmeans_1d",
    "check_bits",
    "adaptive_bits",
    "quantize_task",
    "quantize_head",
    "store_centroids",
    "codes_of",
    "small_codes_of",
    "accuracy_at_least",
]


def check_bits(value: object, name: str) -> int:
    """Validate a bit-width in 1..16.

    :param value: the bit-width.
    :param name: the argument name used in the error message.
    """
    return check_int(value, name, 1, 16)


@dataclass(frozen=True)
class Codebook:
    """Quantized values of one layer of one task: ``centroids[codes]`` reshaped to ``shape``."""

    codes: Tensor
    centroids: Tensor
    bits: int
    shape: tuple[int, ...]

    def values(self) -> Tensor:
        """The dequantized values."""
        return self.centroids[self.codes].view(self.shape)


@torch.no_grad()
def store_centroids(table: Tensor, slot: int, centroids: Tensor) -> Tensor:
    """Write ``centroids`` into row ``slot`` of ``table`` (zero-padded), widening it if needed.

    :param table: a ``[slots, width]`` table of centroids.
    :param slot: the row.
    :param centroids: the codebook's centroids.
    :return: the table (a new tensor if it had to grow).
    """
    width = centroids.numel()
    if width > table.shape[1]:
        table = torch.cat([table, table.new_zeros((table.shape[0], width - table.shape[1]))], 1)
    table[slot].zero_()
    table[slot, :width] = centroids.to(table)
    return table


@torch.no_grad()
def codes_of(values: Tensor, centroids: Tensor) -> Tensor:
    """Codes of values that are exactly centroid values (inverse of ``centroids[codes]``).

    :param values: quantized values (any shape).
    :param centroids: the codebook's centroids.
    :return: int64 codes, flat, in the order of ``values.flatten()``.
    """
    if values.device.type == "cpu":
        return torch.from_numpy(small_codes_of(values, centroids).astype(np.int64))
    return _searched_codes(values.detach().flatten().float(), centroids.float())


def small_codes_of(values: Tensor, centroids: Tensor) -> np.ndarray:
    """:func:`codes_of` on the CPU as a numpy array of the smallest unsigned type that fits.

    :param values: quantized values (any shape).
    :param centroids: the codebook's centroids.
    """
    flat = values.detach().flatten().float().cpu()
    book = centroids.float().cpu()
    dtype = np.uint8 if len(book) <= 256 else np.uint16
    if 0 < len(book) <= 256:
        # Equal centroids (k-means can leave two) get the code the binary search gives.
        mine = _searched_codes(book, book).numpy()
        found = _hashed_codes(flat.numpy(), book.numpy(), mine)
        if found is not None:
            return found
    return _searched_codes(flat, book).numpy().astype(dtype)


def _searched_codes(flat: Tensor, centroids: Tensor) -> Tensor:
    """Codes of ``flat`` by binary search over the sorted centroids; raises if one is not."""
    ordered, order = torch.sort(centroids)
    pos = torch.searchsorted(ordered, flat).clamp_max(len(ordered) - 1)
    if not torch.equal(ordered[pos], flat):
        raise ValueError("values are not all centroid values: the layer is not quantized")
    return order[pos]


def _hashed_codes(
    values: np.ndarray, centroids: np.ndarray, codes: np.ndarray
) -> np.ndarray | None:
    """``codes[i]`` wherever ``values`` has the bits of ``centroids[i]``, or None.

    A binary search costs about 20 ns a value; a multiplicative hash of the float's bits
    into a table with no collision between the centroids costs a few. None when some value
    is not bit-equal to a centroid (``-0.0`` against ``0.0``: the caller's search decides)
    or no collision-free multiplier is found.
    """
    keys, first = np.unique(centroids.view(np.uint32), return_index=True)
    width = max(4, int(2 * len(keys) ** 2 - 1).bit_length())
    shift = np.uint32(32 - width)
    rng = np.random.default_rng(0)  # fixed: the same codebook gets the same table
    for multiplier in rng.integers(1, 2**32, size=64, dtype=np.uint64) | 1:
        m = np.uint32(multiplier)
        slots = (keys * m) >> shift
        if len(np.unique(slots)) == len(keys):
            break
    else:
        return None
    table_keys = np.zeros(1 << width, dtype=np.uint32)
    table_keys[slots] = keys
    # An empty slot holds a centroid's key, which hashes elsewhere: a value landing there
    # never matches it.
    empty = np.ones(1 << width, dtype=bool)
    empty[slots] = False
    table_keys[empty] = keys[0]
    table_codes = np.zeros(1 << width, dtype=np.uint8)
    table_codes[slots] = codes[first]
    bits = values.view(np.uint32)
    at = (bits * m) >> shift
    if not np.array_equal(table_keys[at], bits):
        return None
    return table_codes[at]


@torch.no_grad()
def kmeans_1d(values: Tensor, bits: int, max_iter: int = 1000) -> Codebook:
    """Cluster ``values`` into at most ``2^bits`` centroids with 1-D k-means (Lloyd).

    :param values: the values to quantize (any shape, float).
    :param bits: bit-width; the codebook has ``2^bits`` entries.
    :param max_iter: cap on Lloyd steps (it usually converges well before).
    """
    check_bits(bits, "bits")
    k = 2**bits
    flat = values.detach().flatten().float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("kmeans_1d needs finite values; got NaN or infinity")
    n = flat.numel()
    if n == 0:
        return Codebook(
            torch.zeros(0, dtype=torch.long, device=flat.device),
            torch.zeros(k, device=flat.device),
            bits,
            tuple(values.shape),
        )
    ordered, order = torch.sort(flat)
    prefix = torch.zeros(n + 1, dtype=torch.float64, device=flat.device)
    prefix[1:] = torch.cumsum(ordered, 0, dtype=torch.float64)
    # Quantile initialisation: every centroid starts inside the data.
    start = ((torch.arange(k, device=flat.device, dtype=torch.float64) + 0.5) * n / k).long()
    centroids = ordered[start.clamp_max(n - 1)].double()
    ends = torch.tensor([n], device=flat.device)
    for _ in range(max_iter):
        mids = ((centroids[1:] + centroids[:-1]) / 2).float()
        bounds = torch.cat([ends.new_zeros(1), torch.searchsorted(ordered, mids), ends])
        counts = bounds[1:] - bounds[:-1]
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    mids = ((centroids[1:] + centroids[:-1]) / 2).float()
    bounds = torch.cat([ends.new_zeros(1), torch.searchsorted(ordered, mids), ends])
    counts = bounds[1:] - bounds[:-1]
    sorted_codes = torch.repeat_interleave(torch.arange(k, device=flat.device), counts)
    codes = torch.empty_like(sorted_codes)
    codes[order] = sorted_codes
    return Codebook(codes, centroids.float(), bits, tuple(values.shape))


def adaptive_bits(
    quantize: Callable[[int], None],
    restore: Callable[[], None],
    evaluate: Callable[[], float],
    baseline: float,
    *,
    min_bits: int,
    max_bits: int,
    max_drop: float,
) -> int:
    """Smallest bit-width in ``min_bits..max_bits`` whose accuracy drop is within ``max_drop``.

    Leaves the model quantized at the chosen width (``max_bits`` if none is within it). If
    anything raises midway, ``restore`` runs before the exception propagates.

    :param quantize: quantizes the model at a bit-width.
    :param restore: undoes ``quantize``.
    :param evaluate: validation accuracy of the model as it is; if it takes an argument it
        is given the accuracy to reach and may stop early below it.
    :param baseline: validation accuracy before quantization.
    :param min_bits: first bit-width tried.
    :param max_bits: last bit-width tried.
    :param max_drop: largest accepted accuracy drop (a fraction, e.g. 0.01).
    """
    try:
        for bits in range(min_bits, max_bits + 1):
            quantize(bits)
            if bits == max_bits:
                return bits
            if baseline - accuracy_at_least(evaluate, baseline - max_drop) <= max_drop:
                return bits
            restore()
    except BaseException:
        restore()
        raise
    raise AssertionError("unreachable")  # the loop always returns at max_bits


def accuracy_at_least(evaluate: Callable[..., float], floor: float) -> float:
    """``evaluate(floor)`` if ``evaluate`` takes an argument (it may stop below the floor).

    :param evaluate: validation accuracy of the model as it is.
    :param floor: the accuracy the caller needs to know it reaches.
    """
    try:
        takes_floor = bool(inspect.signature(evaluate).parameters)
    except (TypeError, ValueError):
        takes_floor = False
    return evaluate(floor) if takes_floor else evaluate()


@torch.no_grad()
def quantize_task(model, slot: int, bits: int) -> dict[str, Codebook]:
    """Quantize the weights the task in ``slot`` owns, layer by layer, in place.

    :param model: a :class:`~avalanche_tsn.model.TSNModel`.
    :param slot: a trained task's slot.
    :param bits: the bit-width.
    """
    books = {}
    for name, layer in model.masked_layers():
        book = kmeans_1d(layer.own_values(slot), bits)
        layer.set_own_values(slot, book.centroids[book.codes])
        layer.set_codebook(slot, book.centroids, bits)
        books[name] = book
    return books


@torch.no_grad()
def quantize_head(model, task_label: int, bits: int) -> Codebook | None:
    """Quantize the weight matrices of ``task_label``'s heads with one codebook, in place.

    Heads belong to their task alone, so quantizing them never touches another task.

    :param model: a :class:`~avalanche_tsn.model.TSNModel`.
    :param task_label: a trained task's label.
    :param bits: the bit-width.
    :return: the codebook, or None if the task has no head.
    """
    weights = model.head_weights(task_label)
    if not weights:
        return None
    book = kmeans_1d(torch.cat([w.detach().flatten() for w in weights]), bits)
    values = book.centroids[book.codes]
    start = 0
    for w in weights:
        w.copy_(values[start : start + w.numel()].view_as(w))
        start += w.numel()
    model.set_head_codebook(model.slot_of(task_label), book.centroids, bits)
    return book
