"""The compact encoding of a trained TinySubNets model, written once.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), "Capacity" and step 5: per masked layer,
one ownership map per backbone copy (bank), and per task the weights it owns (at its
bit-width, as codes into its codebook), a bitmap of which *earlier* tasks' weights it shares,
and its bias; per task its normalisation terms, head codebook and activation ranges.

:class:`ModelEncoding` is that object. The capacity report is its size in bits
(:mod:`avalanche_tsn.capacity`), :func:`~avalanche_tsn.export.export_model` writes it,
:func:`~avalanche_tsn.export.load_compressed` reads it back into one, and the tiny runtime
(:mod:`avalanche_tsn.tiny`) executes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from avalanche_tsn.huffman import MAX_SYMBOL, encoded_bits, pair_symbols
from avalanche_tsn.layers import FREE, MaskedLayer
from avalanche_tsn.model import TSNModel

__all__ = [
    "TaskPart",
    "LayerPart",
    "ModelEncoding",
    "indices_by_owner",
    "mask_bits_of",
    "owner_pairs",
    "owner_symbols",
]


def owner_pairs(n_tasks: int) -> bool:
    """Whether ownership maps of ``n_tasks`` trained tasks are coded in pairs of weights.

    :param n_tasks: number of trained tasks.
    """
    return (n_tasks + 1) ** 2 - 1 <= MAX_SYMBOL


def owner_symbols(owner: np.ndarray, n_tasks: int) -> np.ndarray:
    """The Huffman symbols of an ownership map: pairs of ``owner + 1`` when they fit.

    :param owner: a layer's ownership map (:data:`FREE` or a trained task's slot), flat.
    :param n_tasks: number of trained tasks (owner ids are below it).
    """
    alphabet = n_tasks + 1
    values = np.asarray(owner, dtype=np.int64).ravel() + 1
    return pair_symbols(values, alphabet) if owner_pairs(n_tasks) else values


def mask_bits_of(packed: np.ndarray) -> np.ndarray:
    """Little-endian unpacking of a layer's bit-packed task mask (as its buffer stores it).

    :param packed: the packed mask bytes.
    """
    return np.unpackbits(packed, bitorder="little").view(bool)


def indices_by_owner(
    owner: np.ndarray, n_slots: int, counts: np.ndarray | None = None
) -> list[np.ndarray]:
    """Flat indices of the weights each slot owns, in increasing order (one stable sort).

    :param owner: a flat ownership map (a slot or FREE per weight).
    :param n_slots: the slots asked for, ``0..n_slots-1``.
    :param counts: the free count, then each slot's count, if known already.
    """
    order = np.argsort(owner.astype(np.int16), kind="stable")  # int16: a radix sort
    if counts is None:
        counts = np.bincount(owner.astype(np.int64) + 1, minlength=n_slots + 1)
    return np.split(order[counts[0] :], np.cumsum(counts[1:n_slots]))[:n_slots]


@dataclass(frozen=True)
class TaskPart:
    """One trained task's part of one masked layer.

    Its own positions and values are read on first use: the capacity report needs only
    their count.

    :param bank: the backbone copy the task reads.
    :param n_own: how many weights it owns.
    :param shared_bits: over the weights of its bank that earlier tasks own (in flat
        order), which it reads: bit-packed (``np.packbits``), as it is stored.
    :param n_earlier: weights of its bank that earlier tasks own (the bitmap's length).
    :param n_shared: how many of them it reads.
    :param bits: the bit-width of its codebook, 0 if its weights stay float32.
    :param centroids: its codebook (``2^bits`` values), empty if ``bits`` is 0.
    :param bias: its bias, or None.
    :param read_own: gives the flat indices of the weights it owns, increasing.
    :param read_values: gives its own weights from its own positions (float32, in ``own``
        order; centroid values if quantized).
    """

    bank: int
    n_own: int
    shared_bits: np.ndarray
    n_earlier: int
    n_shared: int
    bits: int
    centroids: Tensor
    bias: Tensor | None
    read_own: Callable[[], np.ndarray] = field(repr=False, compare=False)
    read_values: Callable[[np.ndarray], Tensor] = field(repr=False, compare=False)

    @cached_property
    def own(self) -> np.ndarray:
        """Flat indices of the weights the task owns, increasing."""
        own = self.read_own()
        if own.size != self.n_own:
            raise ValueError(f"own weights: {own.size} found, {self.n_own} expected")
        return own

    @cached_property
    def values(self) -> Tensor:
        """The task's own weights, float32, in :attr:`own` order."""
        return self.read_values(self.own)

    @property
    def shared(self) -> np.ndarray:
        """The shared bitmap, unpacked (bool, one per earlier-owned weight)."""
        return np.unpackbits(self.shared_bits)[: self.n_earlier].view(bool)

    def mask_code_bits(self) -> int:
        """Bits of the Huffman-coded shared bitmap (0 when no earlier task owns a weight)."""
        if not self.n_earlier:
            return 0
        return encoded_bits(np.bincount(self.shared_bits, minlength=256))


@dataclass(frozen=True)
class LayerPart:
    """One masked layer: the banks' ownership maps and each trained task's part.

    :param name: the layer's name in the model.
    :param shape: its weight's shape.
    :param owners: each bank's flat ownership map (a slot or FREE per weight).
    :param tasks: each slot's part, in slot order.
    :param free: each bank's count of weights no trained task owns.
    """

    name: str
    shape: tuple[int, ...]
    owners: list[np.ndarray]
    tasks: list[TaskPart]
    free: list[int]

    def free_fraction(self, bank: int) -> float:
        """Fraction of ``bank``'s weights that no trained task owns.

        :param bank: a bank of the encoding.
        """
        return self.free[bank] / max(self.numel, 1)

    @property
    def numel(self) -> int:
        """Weights of the layer."""
        return int(np.prod(self.shape))

    def earlier(self, slot: int) -> np.ndarray:
        """Which weights of ``slot``'s bank an earlier slot owns (flat, bool).

        :param slot: a slot of the layer.
        """
        owner = self.owners[self.tasks[slot].bank]
        return (owner != FREE) & (owner < slot)

    def mask(self, slot: int) -> np.ndarray:
        """The weights the task in ``slot`` reads: its own and the earlier ones it shares.

        :param slot: a slot of the layer.
        """
        part = self.tasks[slot]
        mask = np.zeros(self.numel, dtype=bool)
        mask[self.earlier(slot)] = part.shared
        mask[part.own] = True
        return mask

    def bank_weights(self) -> np.ndarray:
        """Every bank's weights, ``[banks, numel]``: owned ones from the tasks, free ones 0."""
        weights = np.zeros((len(self.owners), self.numel), dtype=np.float32)
        for part in self.tasks:
            weights[part.bank][part.own] = part.values.numpy()
        return weights


def _layer_part(name: str, layer: MaskedLayer, slots: list[int], n_banks: int) -> LayerPart:
    owners = [layer.bank_owner(b).cpu().numpy().ravel() for b in range(n_banks)]
    # The int16 maps seen as uint16: FREE becomes the largest key, so "owned by an earlier
    # slot than s" is one comparison, and one bincount gives every slot's count.
    keys = [o.astype(np.int16, copy=False).view(np.uint16) for o in owners]
    tallies = [np.bincount(k, minlength=1 << 16) for k in keys]
    counts = [np.concatenate([t[-1:], t[: len(slots)]]) for t in tallies]  # free, then slots
    own_idx: dict[int, list[np.ndarray]] = {}  # one sort per bank, when first asked for

    def mask_of(slot: int, bank: int) -> np.ndarray:
        return mask_bits_of(layer.task_masks[slot].cpu().numpy())[: owners[bank].size]

    def reader(bank: int, slot: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if bank not in own_idx:
                own_idx[bank] = indices_by_owner(owners[bank], len(slots), counts[bank])
            idx = own_idx[bank][slot]
            # the own bits of the packed mask (kept packed: one full-layer array per task)
            packed = layer.task_masks[slot].cpu().numpy()
            if not ((packed[idx >> 3] >> (idx & 7).astype(np.uint8)) & 1).all():
                raise RuntimeError(f"{name}: task mask is not own plus shared weights")
            return idx

        return read

    tasks = []
    for slot in slots:
        bank = layer.bank_of_slot(slot)
        mask = mask_of(slot, bank)
        shared = mask[keys[bank] < slot]
        n_own, n_shared = int(counts[bank][slot + 1]), int(np.count_nonzero(shared))
        # mask = own + shared (and nothing else): the counts and the own entries tell
        if int(np.count_nonzero(mask)) != n_own + n_shared:
            raise RuntimeError(f"{name}: task mask is not own plus shared weights")
        b = int(layer.task_bits[slot])
        book = layer.task_centroids[slot, : 2**b].detach().cpu().float() if b else torch.zeros(0)
        bias = None if layer.task_bias is None else layer.task_bias[slot].detach().cpu()
        read_own = reader(bank, slot)
        flat = layer.bank_weights[bank].detach().cpu().flatten()
        tasks.append(
            TaskPart(
                bank,
                n_own,
                np.packbits(shared),
                shared.size,
                n_shared,
                b,
                book,
                bias,
                read_own,
                lambda own, w=flat: w[torch.from_numpy(own)].float(),
            )
        )
    free = [int(c[0]) for c in counts]
    return LayerPart(name, tuple(layer.weight.shape), owners, tasks, free)


@dataclass(frozen=True)
class ModelEncoding:
    """The trained tasks of a TSN model as they are stored (see the module docstring).

    :param labels: the trained tasks' labels, in slot order.
    :param banks: each task's bank.
    :param sparsity: each task's sparsity.
    :param layers: every masked layer, in module order.
    :param norms: per normalisation layer, each task's frozen terms: (mean, var[, weight,
        bias]) of a BatchNorm, (weight[, bias]) of a LayerNorm or GroupNorm.
    :param head_bits: each task's head bit-width (0: float32 heads).
    :param head_centroids: each task's head codebook (empty if not quantized).
    :param act_range: each task's activation ranges, ``[tasks, masked layers, 2]``.
    """

    labels: list[int]
    banks: list[int]
    sparsity: list[float]
    layers: list[LayerPart]
    norms: list[list[tuple[Tensor, ...]]]
    head_bits: list[int]
    head_centroids: list[Tensor]
    act_range: Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, model: TSNModel) -> ModelEncoding:
        """Encode the trained tasks of a full TSN model (a task in training is left out).

        :param model: the model.
        """
        labels = model.trained_tasks()
        # Trained tasks hold slots 0..k-1; a task in training (or interrupted) is left out.
        slots = [model.slot_of(t) for t in labels]  # type: ignore[misc]
        banks = [model.bank_of(t) for t in labels]
        n_banks = max(banks, default=-1) + 1
        table = model.task_table
        books = [table.head_codebook(s) for s in slots]
        norms = []
        for norm in model.norm_layers():
            norms.append([tuple(t.detach().cpu() for t in norm.slot_terms(s)) for s in slots])
        return cls(
            labels=labels,
            banks=banks,
            sparsity=[table.sparsity_of(s) for s in slots],
            layers=[
                _layer_part(name, layer, slots, n_banks)  # type: ignore[arg-type]
                for name, layer in model.masked_layers()
            ],
            norms=norms,
            head_bits=[b for _, b in books],
            head_centroids=[c.detach().cpu().float() for c, _ in books],
            act_range=table.act_range[: len(slots)].detach().cpu(),
        )

    def ownership_bits(self) -> int:
        """Bits of the Huffman-coded ownership maps of every layer and bank."""
        n = len(self.labels)
        return sum(
            encoded_bits(np.bincount(owner_symbols(owner, n)))
            for layer in self.layers
            for owner in layer.owners
        )
