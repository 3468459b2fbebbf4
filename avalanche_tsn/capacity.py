"""Capacity of a TinySubNets model: the memory inference needs, against the dense model.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), "Capacity" and appendix Table 1: per
task, its own weights at its bit-width, its codebooks (``2^b`` float32 centroids per layer)
and its Huffman-coded mask; heads and per-task biases and normalisation on their own lines.
Masks are stored as one ownership map for all tasks (Huffman-coded owner ids) plus, per task,
a Huffman-coded bitmap of which *earlier* tasks' weights it shares; that is exactly enough to
rebuild every task mask, and far smaller than independent full-layer masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from avalanche.models import MultiHeadClassifier

from avalanche_tsn.huffman import MAX_SYMBOL, encoded_bits, pair_symbols
from avalanche_tsn.layers import FREE, TaskBatchNorm
from avalanche_tsn.model import TSNModel, calibrated, require_full

__all__ = [
    "TaskCapacity",
    "CapacityReport",
    "capacity_report",
    "shared_bitmap",
    "owner_symbols",
    "owner_pairs",
    "FLOAT_BITS",
    "WSNCapacity",
    "wsn_capacity",
    "WSN_GROUP",
]

#: Tasks whose masks WSN packs into one integer per weight before Huffman coding.
WSN_GROUP = 7

FLOAT_BITS = 32


@dataclass(frozen=True)
class TaskCapacity:
    """Bits one task adds to the model."""

    task: int
    bank: int
    own_weights: int
    shared_weights: int
    bits: int
    weight_bits: int
    codebook_bits: int
    mask_bits: int
    head_bits: int
    norm_bits: int
    #: calibrated activation ranges (two float32 per masked layer), 0 if not calibrated
    activation_bits: int = 0

    @property
    def total_bits(self) -> int:
        """Everything this task adds."""
        return (
            self.weight_bits
            + self.codebook_bits
            + self.mask_bits
            + self.head_bits
            + self.norm_bits
            + self.activation_bits
        )


@dataclass(frozen=True)
class CapacityReport:
    """The whole model's capacity, per task and in total."""

    tasks: tuple[TaskCapacity, ...]
    ownership_bits: int
    total_bits: int
    dense_bits: int
    backbone_dense_bits: int
    banks: int = 1
    memory_bits: int = 0
    #: fraction of each maskable layer's weights that no task owns, per bank
    free_fractions: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def min_free_fraction(self) -> float:
        """The smallest free fraction of any layer in the newest bank (1.0 with no layer)."""
        return min((f[-1] for f in self.free_fractions.values()), default=1.0)

    @property
    def percent_with_memory(self) -> float:
        """100 * (total_bits + memory_bits) / dense_bits: capacity with the task memory."""
        return 100.0 * (self.total_bits + self.memory_bits) / self.dense_bits

    @property
    def percent(self) -> float:
        """100 * total_bits / dense_bits."""
        return 100.0 * self.total_bits / self.dense_bits

    def backbone_split(self) -> dict[str, float]:
        """The paper's Table 1 split: weights, codebooks, masks as % of the dense backbone."""
        d = self.backbone_dense_bits
        return {
            "weights": 100.0 * sum(t.weight_bits for t in self.tasks) / d,
            "codebooks": 100.0 * sum(t.codebook_bits for t in self.tasks) / d,
            "masks": 100.0 * (sum(t.mask_bits for t in self.tasks) + self.ownership_bits) / d,
        }

    def table(self) -> str:
        """A plain-text table (per task, then totals)."""
        head = f"{'task':>5} {'bank':>4} {'own':>8} {'shared':>8} {'bits':>4} {'weights':>10} "
        head += f"{'codebooks':>10} {'masks':>9} {'heads':>9} {'norm/bias':>9} {'act':>5} "
        head += f"{'total':>10}"
        lines = [head]
        for t in self.tasks:
            lines.append(
                f"{t.task:>5} {t.bank:>4} {t.own_weights:>8} {t.shared_weights:>8} {t.bits:>4} "
                f"{t.weight_bits:>10} {t.codebook_bits:>10} {t.mask_bits:>9} {t.head_bits:>9} "
                f"{t.norm_bits:>9} {t.activation_bits:>5} {t.total_bits:>10}"
            )
        split = self.backbone_split()
        lines += [
            f"ownership maps ({self.banks} bank{'s' if self.banks > 1 else ''}): "
            f"{self.ownership_bits} bits",
            f"total: {self.total_bits} bits = {self.percent:.2f}% of the dense float32 model "
            f"({self.dense_bits} bits)",
            "backbone split (% of dense backbone): "
            + ", ".join(f"{k} {v:.2f}%" for k, v in split.items()),
        ]
        if self.free_fractions:
            lines.append(
                "free weights (newest bank): "
                + ", ".join(f"{n} {100 * f[-1]:.1f}%" for n, f in self.free_fractions.items())
            )
        if self.memory_bits:
            lines.append(
                f"task memory (training only, not in total): {self.memory_bits} bits; "
                f"with it {self.percent_with_memory:.2f}% of the dense model"
            )
        return "\n".join(lines)


def owner_symbols(owner: np.ndarray, n_tasks: int) -> np.ndarray:
    """The Huffman symbols of an ownership map: pairs of ``owner + 1`` when they fit.

    :param owner: a layer's ownership map (:data:`FREE` or a trained task's slot), flat.
    :param n_tasks: number of trained tasks (owner ids are below it).
    """
    alphabet = n_tasks + 1
    values = np.asarray(owner, dtype=np.int64).ravel() + 1
    return pair_symbols(values, alphabet) if owner_pairs(n_tasks) else values


def owner_pairs(n_tasks: int) -> bool:
    """Whether ownership maps of ``n_tasks`` trained tasks are coded in pairs of weights.

    :param n_tasks: number of trained tasks.
    """
    return (n_tasks + 1) ** 2 - 1 <= MAX_SYMBOL


def shared_bitmap(owner: torch.Tensor, mask: torch.Tensor, slot: int) -> torch.Tensor:
    """Which weights owned by earlier slots the task in ``slot`` reads, in flat order.

    :param owner: a layer's ownership map.
    :param mask: the task's mask for that layer.
    :param slot: the task's slot.
    """
    earlier = (owner != FREE) & (owner < slot)
    return mask.flatten()[earlier.flatten()]


def _params_bits(module: torch.nn.Module) -> int:
    # Trained heads hold their weights as buffers: count every floating-point tensor.
    return FLOAT_BITS * sum(
        t.numel() for t in module.state_dict().values() if t.is_floating_point()
    )


def _head_bits(model: TSNModel, label: int, slot: int) -> int:
    # Quantized head weights cost their codes and one codebook; the rest stays float32.
    total = sum(_params_bits(h) for h in model.head_modules(label))
    b = int(model.head_bits[slot]) if len(model.head_bits) > slot else 0
    if b:
        n = sum(w.numel() for w in model.head_weights(label))
        total += n * (b - FLOAT_BITS) + (2**b) * FLOAT_BITS
    return total


def _activation_bits(model: TSNModel, slot: int) -> int:
    if slot >= len(model.act_range):
        return 0
    return 2 * FLOAT_BITS * int(calibrated(model.act_range[slot]).sum())


@torch.no_grad()
def capacity_report(model: TSNModel) -> CapacityReport:
    """Measure the capacity of ``model`` as it is now (trained tasks only).

    :param model: the TSN model.
    """
    require_full(model, "capacity_report")
    layers = [layer for _, layer in model.masked_layers()]
    norms = [m for m in model.net.modules() if isinstance(m, TaskBatchNorm)]
    heads = [m for m in model.net.modules() if isinstance(m, MultiHeadClassifier)]
    backbone = sum(layer.weight.numel() for layer in layers)
    bias_per_task = sum(layer.bias.numel() for layer in layers if layer.bias is not None)
    norm_per_task = sum(m.num_features * (4 if m.weight is not None else 2) for m in norms)
    all_heads = sum(_params_bits(h) for h in heads)
    dense = FLOAT_BITS * (backbone + bias_per_task + norm_per_task) + all_heads

    rows = []
    trained = model.trained_tasks()
    owners = [
        [layer.bank_owner(b).cpu().numpy().ravel() for b in range(layer.n_banks)]
        for layer in layers
    ]
    # Per layer and bank, once: weights owned per slot, and an ownership key on which "owned
    # by an earlier slot than s" is one comparison (free weights sort last).
    n_slots = len(model.task_table)
    counts = [
        [np.bincount(o.astype(np.int64) - FREE, minlength=n_slots - FREE) for o in bank]
        for bank in owners
    ]
    owned = [[c[-FREE:] for c in bank] for bank in counts]
    keys = [
        [np.where(o == FREE, np.iinfo(o.dtype).max, o).astype(o.dtype) for o in bank]
        for bank in owners
    ]
    for label in trained:
        slot = model.slot_of(label)
        own = shared = weight_bits = codebook_bits = mask_bits = 0
        bits = 0
        for i, layer in enumerate(layers):
            bank = layer.bank_of_slot(slot)
            n_own = int(owned[i][bank][slot])
            b = int(layer.task_bits[slot]) if len(layer.task_bits) > slot else 0
            bits = max(bits, b)
            own += n_own
            weight_bits += n_own * (b if b else FLOAT_BITS)
            codebook_bits += (2**b) * FLOAT_BITS if b else 0
            # A task's mask is its own weights plus the earlier tasks' weights it shares (the
            # export checks it): the shared bitmap is the mask over earlier-owned weights.
            # Sizes from symbol counts: exactly what the export writes, without encoding.
            mask = np.unpackbits(layer.task_masks[slot].cpu().numpy(), bitorder="little")
            bitmap = mask[: keys[i][bank].size][keys[i][bank] < slot].view(bool)
            shared += int(np.count_nonzero(bitmap))
            if bitmap.size:
                mask_bits += encoded_bits(np.bincount(np.packbits(bitmap), minlength=256))
        head_bits = _head_bits(model, label, slot)
        rows.append(
            TaskCapacity(
                task=label,
                bank=model.bank_of(label),
                own_weights=own,
                shared_weights=shared,
                bits=bits or FLOAT_BITS,
                weight_bits=weight_bits,
                codebook_bits=codebook_bits,
                mask_bits=mask_bits,
                head_bits=head_bits,
                norm_bits=FLOAT_BITS * (bias_per_task + norm_per_task),
                activation_bits=_activation_bits(model, slot),
            )
        )
    n_banks = max((model.bank_of(t) for t in trained), default=-1) + 1
    ownership = sum(
        encoded_bits(np.bincount(owner_symbols(bank_owners[b], len(trained))))
        for bank_owners in owners
        for b in range(n_banks)
    )
    total = sum(r.total_bits for r in rows) + ownership
    return CapacityReport(
        tuple(rows),
        ownership,
        total,
        dense,
        FLOAT_BITS * backbone,
        banks=model.n_banks,
        memory_bits=model.memory_bits(),
        # the same as each layer's free_fraction(bank), from the counts made above
        free_fractions={
            name: tuple(float(c[0]) / max(int(c.sum()), 1) for c in bank)
            for (name, _), bank in zip(model.masked_layers(), counts, strict=True)
        },
    )


@dataclass(frozen=True)
class WSNCapacity:
    """Capacity as WSN counts it (Kang et al., ICML 2022, Section 4.3).

    Every weight some task uses is a float32; the masks are stored per group of
    :data:`WSN_GROUP` tasks as one integer per weight (bit ``b``: task ``7g + b`` uses it),
    Huffman-coded per layer. Heads are not counted, as in the paper.
    """

    used_weights: int
    weights: int
    tasks: int
    mask_bits: int

    @property
    def percent(self) -> float:
        """100 * (32 * used weights + mask bits) / (32 * weights)."""
        return (
            100.0 * (FLOAT_BITS * self.used_weights + self.mask_bits) / (FLOAT_BITS * self.weights)
        )

    @property
    def compression(self) -> float:
        """The paper's alpha: 1 - mask bits / (tasks * weights), 0 with no task."""
        return 1.0 - self.mask_bits / (self.tasks * self.weights) if self.tasks else 0.0

    @property
    def paper_formula(self) -> float:
        """The paper's CAP in %: (1 - S) + (1 - alpha) * T / 32, S the unused fraction."""
        unused = 1.0 - self.used_weights / self.weights
        return 100.0 * ((1.0 - unused) + (1.0 - self.compression) * self.tasks / FLOAT_BITS)


@torch.no_grad()
def wsn_capacity(model: TSNModel) -> WSNCapacity:
    """Measure ``model``'s trained tasks as WSN stores and counts them.

    :param model: the TSN model (trained by :class:`~avalanche_tsn.wsn.WSNStrategy` or any
        TSN strategy: only its masks are read).
    """
    slots = [model.slot_of(t) for t in model.trained_tasks()]
    used = weights = mask_bits = 0
    for _, layer in model.masked_layers():
        n = layer.weight.numel()
        weights += n
        masks = [
            np.unpackbits(layer.task_masks[s].cpu().numpy(), bitorder="little")[:n] for s in slots
        ]
        if masks:
            used += int(np.count_nonzero(np.bitwise_or.reduce(masks)))
        for start in range(0, len(masks), WSN_GROUP):
            group = np.zeros(n, dtype=np.int64)
            for b, m in enumerate(masks[start : start + WSN_GROUP]):
                group |= m.astype(np.int64) << b
            mask_bits += encoded_bits(np.bincount(group))
    return WSNCapacity(used, weights, len(slots), mask_bits)
