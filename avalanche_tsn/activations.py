"""Activation quantization: each masked layer's input in fixed point, calibrated per task.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), appendix: accuracy with weights and
activations quantized (<4b,4b>, <8b,8b>, <16b,16b>). The reference code's ``QuantLayer``
(dynamic fixed point) never runs as shipped; this module does what it describes: per layer,
a power-of-two scale chosen from the range the layer's input takes on calibration data,
``q(x) = clamp(round(x * 2^f), lo, hi) / 2^f`` with ``f = bits - signed - ceil(log2 max|x|)``
fractional bits, unsigned when the input is never negative (after a ReLU) and signed
otherwise. Ranges are per task: each task reads only its own, so calibrating one task never
changes another's outputs, and with activation quantization off (the default) nothing here
runs at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from avalanche_tsn.layers import FREE, MaskedLayer, TSNEmbedding
from avalanche_tsn.model import TSNModel, calibrated
from avalanche_tsn.validation import check_int

__all__ = [
    "check_act_bits",
    "fixed_point",
    "quantize_fixed",
    "calibrate",
    "quantized_activations",
    "task_accuracy",
]


def check_act_bits(value: object, name: str = "act_bits") -> int | None:
    """Validate an activation word length: None (float) or an int in 2..16.

    :param value: the word length.
    :param name: the argument's name, for the error.
    """
    if value is None:
        return None
    return check_int(value, f"{name} (None for float activations)", 2, 16)


def fixed_point(low: float, high: float, bits: int) -> tuple[int, bool]:
    """Fractional bits and signedness of a ``bits``-bit word covering ``[low, high]``.

    :param low: the smallest calibrated value.
    :param high: the largest calibrated value.
    :param bits: the word length.
    """
    signed = low < 0
    top = max(abs(low), abs(high))
    integer = math.ceil(math.log2(top)) if top > 0 else 0
    return bits - int(signed) - integer, signed


def quantize_fixed(x: Tensor, bits: int, frac: int, signed: bool) -> Tensor:
    """``x`` in ``bits``-bit fixed point with ``frac`` fractional bits (saturating).

    :param x: the values.
    :param bits: the word length.
    :param frac: fractional bits (may be negative or exceed ``bits``).
    :param signed: two's complement range (else unsigned).
    """
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale = 2.0**frac
    return torch.clamp(torch.round(x * scale), lo, hi) / scale


@torch.no_grad()
def calibrate(model: TSNModel, task_label: int, inputs: Iterable[Tensor]) -> None:
    """Record the range of every masked layer's input when ``task_label`` runs on ``inputs``.

    Only the task's own row of ``model.act_range`` changes.

    :param model: the TSN model.
    :param task_label: a trained task.
    :param inputs: input minibatches (e.g. the task's validation split).
    """
    slot = model.slot_of(task_label)
    if slot is None or not model.is_trained(task_label):
        raise ValueError(f"task {task_label} is not trained; calibrate it after training")
    layers = [layer for _, layer in model.masked_layers()]
    low = torch.full((len(layers),), math.inf, dtype=torch.float64)
    high = torch.full((len(layers),), -math.inf, dtype=torch.float64)

    def record(i: int):
        def hook(_module, args) -> None:
            x = args[0]
            low[i] = min(float(low[i]), float(x.min()))
            high[i] = max(float(high[i]), float(x.max()))

        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for x in inputs:
            model(x, int(task_label))
            seen += len(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("calibration needs at least one input sample")
    if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
        raise FloatingPointError(f"task {task_label}: non-finite activations in calibration")
    model.task_table.set_act_range(slot, torch.stack([low, high], 1))


def _layer_quantizer(layer: MaskedLayer, index: int, model: TSNModel, bits: int):
    def quantize(x: Tensor, slot: int) -> Tensor:
        if slot == FREE or slot >= len(model.act_range):
            raise ValueError("activation quantization runs trained tasks only")
        ranges = model.act_range[slot, index]
        if not bool(calibrated(ranges)):
            raise ValueError(
                f"the task in slot {slot} has no activation ranges: calibrate it first "
                "(TSNStrategy does after each task)"
            )
        frac, signed = fixed_point(float(ranges[0]), float(ranges[1]), bits)
        return quantize_fixed(x, bits, frac, signed)

    def hook(_module, args):
        return (layer.run_routed(args[0], quantize), *args[1:])

    return hook


@contextmanager
def quantized_activations(model: TSNModel, bits: int | None) -> Iterator[TSNModel]:
    """Within the block, every masked layer's input is quantized to ``bits`` (None: float).

    An embedding's input is token ids, exact as they are: it is left alone.

    :param model: the TSN model; its trained tasks must be calibrated (:func:`calibrate`).
    :param bits: word length in 2..16, or None for float activations (no change).
    """
    check_act_bits(bits, "bits")
    if bits is None:
        yield model
        return
    handles = [
        layer.register_forward_pre_hook(_layer_quantizer(layer, i, model, bits))
        for i, (_, layer) in enumerate(model.masked_layers())
        if not isinstance(layer, TSNEmbedding)
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def task_accuracy(
    model: TSNModel, task_label: int, batches: Iterable[tuple[Tensor, Tensor]], bits: int | None
) -> float:
    """Accuracy of ``task_label`` on ``batches`` with activations at ``bits`` (None: float).

    :param model: the TSN model.
    :param task_label: a trained task.
    :param batches: (inputs, targets) minibatches.
    :param bits: activation word length, or None.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with quantized_activations(model, bits):
            for x, y in batches:
                correct += int((model(x, int(task_label)).argmax(1) == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    if not total:
        raise ValueError("no samples to evaluate")
    return correct / total
