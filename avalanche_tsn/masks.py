"""Top-k task masks with a straight-through gradient to the scores.

TinySubNets (Zurek et al., "TinySubNets: An efficient and low capacity continual learning
strategy", arXiv:2412.10869, 2024) learns each task's subnetwork as WSN does (Kang et al.,
"Forget-free Continual Learning with Winning Subnetworks", ICML 2022): every weight has a
real-valued score, a task keeps the top ``1 - sparsity`` fraction of ``|score|`` in each
layer, and the non-differentiable top-k passes its gradient straight through to the scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "keep_count",
    "topk_mask",
    "topk_threshold",
    "live_weight",
    "check_sparsity",
    "pack_mask",
    "unpack_mask",
    "packed_size",
]


def check_sparsity(value: object, name: str = "sparsity") -> float:
    """Validate one sparsity value and return it as a float.

    :param value: the fraction of a layer that a mask leaves out, in [0, 1).
    :param name: the argument name used in the error message.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (0 keeps every weight), got {value}")
    return value


def keep_count(numel: int, sparsity: float) -> int:
    """Number of weights a mask keeps in a layer of ``numel`` weights.

    :param numel: number of weights in the layer.
    :param sparsity: the fraction left out, in [0, 1).
    """
    return max(1, int(round((1.0 - sparsity) * numel)))


def topk_mask(scores: Tensor, keep: int) -> Tensor:
    """Exact boolean mask of the ``keep`` largest ``|scores|`` (ties broken by ``topk``).

    :param scores: the layer's scores.
    :param keep: how many entries the mask keeps.
    """
    flat = scores.detach().abs().flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


def topk_threshold(scores: Tensor, keep: int) -> Tensor:
    """The ``keep``-th largest ``|scores|`` (a 0-dim tensor on the scores' device).

    :param scores: the layer's scores.
    :param keep: how many entries a mask keeps.
    """
    flat = scores.detach().abs().flatten()
    # kthvalue is a linear-time selection, cheaper than a full top-k.
    return torch.kthvalue(flat, flat.numel() - keep + 1).values


def _at_least(values: Tensor, threshold: Tensor) -> Tensor:
    """``(values >= threshold)`` as 0/1 floats of ``values``' dtype.

    Bool masks are slow on the CPU (a bool-to-float multiply or a ``torch.where`` costs 5x to
    30x a float multiply); ``sign(v - t) + 1`` clamped to [0, 1] is 1 exactly where
    ``v >= t`` (float subtraction is 0 only for equal operands).
    """
    return (values - threshold).sign_().add_(1.0).clamp_(0.0, 1.0)


class _LiveWeight(torch.autograd.Function):
    """The live subnetwork's weights: frozen values by selection, trained ones by the mask.

    Where an earlier task owns a weight, its frozen value is scattered in (selection), so
    nothing the optimizer does to ``weight`` there is ever read, and the gradient there is 0.
    Trained tasks never run through this function: they read their own frozen weights.
    """

    @staticmethod
    def forward(ctx, weight, scores, threshold, owned_idx, owned_vals, free):  # type: ignore[override]
        mask = _at_least(scores.abs(), threshold).to(weight.dtype)
        if owned_idx is None:
            combined, trainable = weight, mask
        else:
            combined = weight.flatten().scatter(0, owned_idx, owned_vals).view_as(weight)
            trainable = mask * free
        ctx.save_for_backward(combined, scores, trainable)
        return combined * mask

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        combined, scores, trainable = ctx.saved_tensors
        grad_weight = grad * trainable if ctx.needs_input_grad[0] else None
        # Straight through the top-k (as WSN): d mask / d |score| = 1.
        grad_scores = grad * combined * scores.sign() if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None, None, None, None


def live_weight(
    weight: Tensor,
    scores: Tensor,
    threshold: Tensor,
    owned: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """The live mask (``|scores| >= threshold``) over the weights, frozen ones selected.

    :param weight: the optimizer's weights.
    :param scores: the layer's scores.
    :param threshold: the mask threshold, from :func:`topk_threshold`.
    :param owned: where earlier tasks own weights, as flat indices, their frozen values and a
        0/1 float tensor of the free weights; None if no weight is owned. The frozen values
        replace ``weight``'s there and get no gradient.
    """
    if owned is None:
        return _LiveWeight.apply(weight, scores, threshold, None, None, None)
    return _LiveWeight.apply(weight, scores, threshold, *owned)


def packed_size(numel: int) -> int:
    """Bytes that :func:`pack_mask` needs for a mask of ``numel`` entries.

    :param numel: number of entries.
    """
    return (numel + 7) // 8


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a boolean mask into bytes (1 bit per entry, little-endian bit order), flat.

    :param mask: a boolean tensor.
    """
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_mask`: the boolean mask of ``shape``.

    :param packed: the packed bytes.
    :param shape: the mask's shape.
    """
    n = 1
    for d in shape:
        n *= d
    bits = (packed.view(-1, 1) >> _shifts(packed.device)) & 1
    return bits.flatten()[:n].view(tuple(shape)).bool()
