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
    "ste_masked_weight",
    "check_sparsity",
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


class _MaskedWeightSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, threshold: Tensor) -> Tensor:  # type: ignore[override]
        mask = scores.abs() >= threshold
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        weight, scores, mask = ctx.saved_tensors
        # Straight through the top-k (as WSN): d mask / d |score| = 1.
        return grad * mask, grad * weight * scores.sign(), None


def ste_masked_weight(weight: Tensor, scores: Tensor, threshold: Tensor) -> Tensor:
    """``weight * (|scores| >= threshold)`` with a straight-through gradient to ``scores``.

    :param weight: the layer's weights.
    :param scores: the layer's scores.
    :param threshold: the mask threshold, from :func:`topk_threshold`.
    """
    return _MaskedWeightSTE.apply(weight, scores, threshold)
