"""Compute of a TinySubNets model per task: multiply-accumulates and bit-operations.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), appendix: the FLOPs a compressed model
needs against the float baseline. The paper does not say how it counted them (the reference
code has no FLOPs code), so this module states what it counts:

- MACs of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers only (maskable layers and heads): one
  per weight the task reads, per output position (1 for a linear layer on a vector, ``L``,
  ``H x W`` or ``D x H x W`` of the output for a convolution), per sample. Biases,
  normalisation, activations, pooling and residual additions are not counted. The dense model
  reads every weight.
- BOPs (bit-operations) = MACs x weight bits x activation bits, each weight at the bit-width
  of the codebook it is stored with (a weight shared from an earlier task: that task's), 32
  for float weights and float activations. Dense BOPs are dense MACs x 32 x 32.

Positions come from one forward of a single sample through the task's path (hooks record the
output size of every layer that runs), so whatever the network does between layers is seen.
An embedding's lookup multiplies nothing: it is not counted, and a model holding one is
probed with token ids (all 0) instead of float zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from avalanche_tsn.capacity import FLOAT_BITS
from avalanche_tsn.layers import MaskedLayer, TSNEmbedding, module_device
from avalanche_tsn.model import TSNModel
from avalanche_tsn.tiny import CodedLayer, CodedLinear
from avalanche_tsn.validation import check_int, check_shape

__all__ = ["LayerCompute", "TaskCompute", "ComputeReport", "compute_report"]


@dataclass(frozen=True)
class LayerCompute:
    """One layer's work for one task and one sample."""

    name: str
    positions: int
    dense_macs: int
    macs: int
    #: sum over the weights the task reads of their bit-widths (32 for float), per position
    weight_bit_sum: int


@dataclass(frozen=True)
class TaskCompute:
    """One task's work per sample, against the dense float model."""

    task: int
    layers: tuple[LayerCompute, ...]
    act_bits: int

    @property
    def dense_macs(self) -> int:
        """MACs of the dense model on this task's path."""
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def macs(self) -> int:
        """MACs of the task's pruned subnetwork."""
        return sum(layer.macs for layer in self.layers)

    @property
    def bops(self) -> int:
        """Bit-operations of the compressed subnetwork (weight bits x activation bits)."""
        return sum(layer.positions * layer.weight_bit_sum for layer in self.layers) * self.act_bits

    @property
    def dense_bops(self) -> int:
        """Bit-operations of the dense float model (32 x 32 per MAC)."""
        return self.dense_macs * FLOAT_BITS * FLOAT_BITS


@dataclass(frozen=True)
class ComputeReport:
    """Per-task compute of the trained tasks, for inputs of ``input_shape``."""

    tasks: tuple[TaskCompute, ...]
    input_shape: tuple[int, ...]

    def table(self) -> str:
        """A Markdown table: MACs and BOPs per task against the dense model."""
        lines = [
            f"Per sample of shape {self.input_shape}; MACs of Linear/Conv weights only.",
            "",
            "| task | dense MACs | subnetwork MACs | % of dense | BOPs (weights x act "
            "bits) | % of dense float BOPs |",
            "|---|---|---|---|---|---|",
        ]
        for t in self.tasks:
            lines.append(
                f"| {t.task} | {t.dense_macs:,} | {t.macs:,} | "
                f"{100 * t.macs / max(t.dense_macs, 1):.2f} | {t.bops:,} (act {t.act_bits}) | "
                f"{100 * t.bops / max(t.dense_bops, 1):.2f} |"
            )
        return "\n".join(lines)


#: the layers whose multiply-accumulates are counted
_COMPUTING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, CodedLayer, CodedLinear)


def _looks_up(module: nn.Module) -> bool:
    return isinstance(module, TSNEmbedding) or (isinstance(module, CodedLayer) and module.lookup)


def _computes(module: nn.Module) -> bool:
    return isinstance(module, _COMPUTING) and not _looks_up(module)


def _probe(model: TSNModel, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One sample of zeros: token ids if the model looks its input up in a table."""
    lookup = any(_looks_up(m) for m in model.modules())
    return torch.zeros((1, *shape), device=device, dtype=torch.long if lookup else None)


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight shape of a float, masked or coded linear or convolution layer."""
    if isinstance(module, CodedLayer):
        return module.shape
    if isinstance(module, CodedLinear):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def _bits_per_weight(layer: MaskedLayer | CodedLayer, slot: int) -> np.ndarray:
    """Bit-width each weight the task in ``slot`` reads is stored at (0 where it reads none)."""
    owner = layer.slot_owner(slot).flatten().cpu().numpy()
    mask = layer.task_mask(slot).flatten().cpu().numpy()
    n_slots = len(layer.task_bits)
    width = layer.task_bits.cpu().numpy().astype(np.int64)
    width = np.where(width == 0, FLOAT_BITS, width)
    bits = np.zeros(owner.shape, dtype=np.int64)
    valid = mask & (owner >= 0) & (owner < n_slots)
    bits[valid] = width[owner[valid]]
    return bits


@torch.no_grad()
def compute_report(
    model: TSNModel, input_shape: tuple[int, ...], act_bits: int | None = None
) -> ComputeReport:
    """MACs and BOPs per sample of every trained task of ``model``.

    :param model: the TSN model (full, or its compressed form from ``to_tiny``).
    :param input_shape: the shape of one input sample (without the batch dimension).
    :param act_bits: activation word length for BOPs (None: float, 32 bits).
    """
    shape = check_shape(input_shape, "input_shape")
    a_bits = FLOAT_BITS if act_bits is None else check_int(act_bits, "act_bits", 1, 32)
    device = module_device(model)
    names = {m: n for n, m in model.net.named_modules()}
    probe = _probe(model, shape, device)
    was_training = model.training
    model.eval()
    tasks = []
    try:
        for label in model.trained_tasks():
            slot = model.slot_of(label)
            seen: list[tuple[nn.Module, int]] = []

            def hook(module, _inputs, output, seen=seen) -> None:
                # output positions of one sample: its outputs per output unit (L, H x W or
                # D x H x W for a convolution, the leading dimensions for a linear layer)
                seen.append((module, output[0].numel() // _weight_shape(module)[0]))

            handles = [m.register_forward_hook(hook) for m in model.net.modules() if _computes(m)]
            try:
                model(probe, label)
            finally:
                for h in handles:
                    h.remove()
            rows = []
            for module, positions in seen:
                numel = math.prod(_weight_shape(module))
                if isinstance(module, MaskedLayer | CodedLayer):
                    bits = _bits_per_weight(module, slot)
                    kept, bit_sum = int(np.count_nonzero(bits)), int(bits.sum())
                else:  # a head: all its weights, at the head's codebook width
                    b = int(model.head_bits[slot]) or FLOAT_BITS
                    kept, bit_sum = numel, numel * b
                rows.append(
                    LayerCompute(
                        names.get(module, type(module).__name__),
                        positions,
                        positions * numel,
                        positions * kept,
                        bit_sum,
                    )
                )
            tasks.append(TaskCompute(int(label), tuple(rows), a_bits))
    finally:
        model.train(was_training)
    return ComputeReport(tuple(tasks), shape)
