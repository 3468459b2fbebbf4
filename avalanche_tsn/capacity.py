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

from avalanche_tsn.encoding import ModelEncoding, owner_pairs, owner_symbols
from avalanche_tsn.huffman import encoded_bits
from avalanche_tsn.layers import FREE
from avalanche_tsn.model import TSNModel, require_full
from avalanche_tsn.tasks import calibrated

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
    #: the task router's float32 buffers (class-incremental inference), not in total_bits
    router_bits: int = 0
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
        if self.router_bits:
            lines.append(f"task router (inference, not in total): {self.router_bits} bits")
        return "\n".join(lines)


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


def _dense_bits(model: TSNModel) -> tuple[int, int, int]:
    """Bits of the dense float32 model, of its backbone, and per-task bias and norm bits."""
    layers = [layer for _, layer in model.masked_layers()]
    backbone = sum(layer.weight.numel() for layer in layers)
    bias_per_task = sum(layer.bias.numel() for layer in layers if layer.bias is not None)
    norm_per_task = sum(m.terms_per_task() for m in model.norm_layers())
    all_heads = sum(_params_bits(h) for h in model.classifier_heads())
    dense = FLOAT_BITS * (backbone + bias_per_task + norm_per_task) + all_heads
    return dense, FLOAT_BITS * backbone, FLOAT_BITS * (bias_per_task + norm_per_task)


def _task_row(model: TSNModel, enc: ModelEncoding, slot: int, norm_bits: int) -> TaskCapacity:
    parts = [layer.tasks[slot] for layer in enc.layers]
    label = enc.labels[slot]
    return TaskCapacity(
        task=label,
        bank=enc.banks[slot],
        own_weights=sum(p.n_own for p in parts),
        shared_weights=sum(p.n_shared for p in parts),
        bits=max((p.bits for p in parts), default=0) or FLOAT_BITS,
        weight_bits=sum(p.n_own * (p.bits or FLOAT_BITS) for p in parts),
        codebook_bits=sum((2**p.bits) * FLOAT_BITS for p in parts if p.bits),
        mask_bits=sum(p.mask_code_bits() for p in parts),
        head_bits=_head_bits(model, label, slot),
        norm_bits=norm_bits,
        activation_bits=_activation_bits(model, slot),
    )


@torch.no_grad()
def capacity_report(model: TSNModel) -> CapacityReport:
    """Measure the capacity of ``model`` as it is now (trained tasks only).

    The sizes are those of its :class:`~avalanche_tsn.encoding.ModelEncoding`, the object
    the export writes; Huffman codes are sized from symbol counts, without encoding.

    :param model: the TSN model.
    """
    require_full(model, "capacity_report")
    enc = ModelEncoding.of(model)
    dense, backbone, norm_bits = _dense_bits(model)
    rows = tuple(_task_row(model, enc, slot, norm_bits) for slot in range(len(enc.labels)))
    ownership = enc.ownership_bits()
    return CapacityReport(
        rows,
        ownership,
        sum(r.total_bits for r in rows) + ownership,
        dense,
        backbone,
        banks=model.n_banks,
        memory_bits=model.memory_bits(),
        router_bits=model.task_router.bits(),
        # from the encoding's counts where it has the bank (a bank no trained task uses
        # yet is not encoded)
        free_fractions={
            name: tuple(
                part.free_fraction(b) if b < len(part.owners) else layer.free_fraction(b)
                for b in range(layer.n_banks)
            )
            for (name, layer), part in zip(model.masked_layers(), enc.layers, strict=True)
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
