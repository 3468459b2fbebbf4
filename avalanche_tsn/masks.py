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

__all__ = ["keep_count", "topk_mask", "ste_mask", "check_sparsity"]


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


class _TopKStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, abs_scores: Tensor, keep: int) -> Tensor:  # type: ignore[override]
        flat = abs_scores.flatten()
        # kthvalue is a linear-time selection; an exact top-k costs more and training
        # masks only need the threshold (ties are measure-zero for float scores).
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
        return (abs_scores >= threshold).to(abs_scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def ste_mask(scores: Tensor, keep: int) -> Tensor:
    """Float 0/1 mask of the top ``keep`` ``|scores|`` whose gradient reaches ``scores``.

    :param scores: the layer's scores (a leaf parameter).
    :param keep: how many entries the mask keeps.
    """
    return _TopKStraightThrough.apply(scores.abs(), keep)
