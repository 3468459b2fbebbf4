"""Top-k task masks with a straight-through gradient to the scores.

TinySubNets (Zurek et al., "TinySubNets: An efficient and low capacity continual learning
strategy", arXiv:2412.10869, 2024) learns each task's subnetwork as WSN does (Kang et al.,
"Forget-free Continual Learning with Winning Subnetworks", ICML 2022): every weight has a
real-valued score, a task keeps the top ``1 - sparsity`` fraction of ``|score|`` in each
layer, and the non-differentiable top-k passes its gradient straight through to the scores.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from avalanche_tsn.validation import check_float

__all__ = [
    "keep_count",
    "topk_mask",
    "topk_threshold",
    "live_weight",
    "LiveWorkspace",
    "FusedPasses",
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
    return check_float(value, name, 0, 1, high_open=True)


def keep_count(numel: int, sparsity: float) -> int:
    """Number of weights a mask keeps in a layer of ``numel`` weights.

    :param numel: number of weights in the layer.
    :param sparsity: the fraction left out, in [0, 1).
    """
    return max(1, int(round((1.0 - sparsity) * numel)))


def _kth_largest(values: Tensor, keep: int) -> Tensor:
    """The ``keep``-th largest entry of a flat tensor (a 0-dim tensor on its device)."""
    k = values.numel() - keep  # 0-based rank from the smallest
    if values.device.type == "cpu":
        # numpy's introselect is about 10x faster than torch.kthvalue on the CPU.
        array = values.numpy()
        return torch.tensor(np.partition(array, k)[k], dtype=values.dtype)
    return torch.kthvalue(values, k + 1).values


def topk_mask(scores: Tensor, keep: int) -> Tensor:
    """Exact boolean mask of the ``keep`` largest ``|scores|``; ties go to the lowest indices.

    :param scores: the layer's scores.
    :param keep: how many entries the mask keeps.
    """
    flat = scores.detach().abs().flatten()
    threshold = _kth_largest(flat, keep)
    mask = flat > threshold
    tied = (flat == threshold).nonzero().squeeze(1)
    mask[tied[: keep - int(mask.sum())]] = True
    return mask.view_as(scores)


def topk_threshold(scores: Tensor, keep: int) -> Tensor:
    """The ``keep``-th largest ``|scores|`` (a 0-dim tensor on the scores' device).

    :param scores: the layer's scores.
    :param keep: how many entries a mask keeps.
    """
    return _kth_largest(scores.detach().abs().flatten(), keep)


def _at_least(values: Tensor, threshold: Tensor) -> Tensor:
    """``(values >= threshold)`` as 0/1 floats, written over ``values`` (one pass).

    A float mask: on the CPU a bool mask costs 5x to 30x more to apply (a bool-to-float
    multiply, or a ``torch.where``).
    """
    return torch.ge(values, threshold, out=values)


class LiveWorkspace:
    """Weight-sized buffers that one layer's live forward reuses from step to step.

    On the CPU a fresh weight-sized tensor costs several times the arithmetic done in it
    (page faults), so the mask and the effective weight are written into the same two buffers
    every step. They are handed out again only once nothing can still read them: the graph
    that used them is gone, or its backward has run (a second backward is refused). A forward
    that finds them in use (two forwards before one backward, another thread) gets fresh
    tensors instead.
    """

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.out: Tensor | None = None
        self._ctx: weakref.ref | None = None
        self._thread = threading.get_ident()

    def take(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """The two buffers, shaped like ``like``, or None if they may still be read.

        :param like: the weight the buffers are for.
        """
        if not self._free():
            return None
        return self._buffer("mask", like), self._buffer("out", like)

    def take_out(self, like: Tensor) -> Tensor | None:
        """The effective weight's buffer alone (the compiled passes keep no mask), or None.

        :param like: the weight the buffer is for.
        """
        return self._buffer("out", like) if self._free() else None

    def _free(self) -> bool:
        ctx = None if self._ctx is None else self._ctx()
        return (ctx is None or ctx.used) and threading.get_ident() == self._thread

    def _buffer(self, name: str, like: Tensor) -> Tensor:
        buffer = getattr(self, name)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
            like.shape,
            like.dtype,
            like.device,
        ):
            buffer = torch.empty_like(like)
            setattr(self, name, buffer)
        return buffer

    def lend(self, ctx) -> None:
        """Record the graph node that reads the buffers until its backward has run.

        :param ctx: the autograd context of the forward that took them.
        """
        self._ctx = weakref.ref(ctx)


class _LiveWeight(torch.autograd.Function):
    """The live mask over the weights, with a straight-through gradient to the scores.

    Trained tasks never run through this function: they read their own frozen weights. The
    caller makes ``weight`` hold the frozen values wherever an earlier task owns a weight.

    Weight-sized temporaries are avoided (see :class:`LiveWorkspace`): the backward also
    reuses the incoming gradient (only the effective weight's consumer produced it) and the
    saved mask, so a second backward through the same graph is refused. With ``fused`` (the
    compiled passes of :mod:`avalanche_tsn.kernels`) no mask is kept: the backward recomputes
    it from the scores, which autograd's version check guarantees are those the forward read.
    """

    @staticmethod
    def forward(ctx, weight, scores, threshold, workspace, fused):  # type: ignore[override]
        ctx.used = False
        ctx.fused = None
        mask = None
        if fused is not None:
            # the compiled passes keep no mask: the backward recomputes it from the scores
            out = None if workspace is None else workspace.take_out(weight)
            lent = out is not None
            out = torch.empty_like(weight) if out is None else out
            if fused.forward(weight, scores, threshold, out):
                ctx.fused = fused
        if ctx.fused is None:
            buffers = None if workspace is None else workspace.take(weight)
            lent = buffers is not None
            if buffers is None:
                mask = _at_least(scores.abs().to(weight.dtype), threshold)
                out = weight * mask
            else:
                mask, out = buffers
                _at_least(torch.abs(scores, out=mask), threshold)
                torch.mul(weight, mask, out=out)
        if lent:
            workspace.lend(ctx)
            out = out.detach()  # a new tensor object over the buffer, for autograd to own
        ctx.save_for_backward(weight, scores, threshold, mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError(
                "a second backward through a TSN live weight (retain_graph=True) is not "
                "supported; run the forward again"
            )
        weight, scores, threshold, mask = ctx.saved_tensors
        ctx.used = True
        if not (grad.is_contiguous() or grad.is_contiguous(memory_format=_layout(grad))):
            # e.g. broadcast from a sum (stride 0): one element per location before writing
            grad = grad.contiguous()
        if ctx.fused is not None and all(ctx.needs_input_grad[:2]) and grad.is_contiguous():
            grad_scores = ctx.fused.backward(grad, weight, scores, threshold)
            if grad_scores is not None:
                return grad, grad_scores, None, None, None
        if mask is None:  # the compiled forward kept none; the scores are those it read
            mask = _at_least(scores.abs().to(weight.dtype), threshold)
        grad_scores = grad * weight if ctx.needs_input_grad[1] else None
        grad_weight = grad.mul_(mask) if ctx.needs_input_grad[0] else None
        if grad_scores is not None:
            # Straight through the top-k (as WSN): d mask / d |score| = 1, times sign(score).
            grad_scores.mul_(torch.sign(scores, out=mask))
        return grad_weight, grad_scores, None, None, None


def _layout(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 else torch.contiguous_format


class FusedPasses(Protocol):
    """One forward and one backward pass for the live weight (the compiled kernels)."""

    def forward(self, weight: Tensor, scores: Tensor, threshold: Tensor, out: Tensor) -> bool:
        """Write ``weight * (|scores| >= threshold)`` into ``out`` (False: not run)."""
        ...

    def backward(
        self, grad: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor
    ) -> Tensor | None:
        """The scores' gradient; ``grad`` becomes the weight's, in place (None: not run)."""
        ...


def live_weight(
    weight: Tensor,
    scores: Tensor,
    threshold: Tensor,
    workspace: LiveWorkspace | None = None,
    fused: FusedPasses | None = None,
) -> Tensor:
    """The live mask (``|scores| >= threshold``) over the weights, straight through to scores.

    :param weight: the weights (frozen values where earlier tasks own them).
    :param scores: the layer's scores.
    :param threshold: the mask threshold, from :func:`topk_threshold`.
    :param workspace: buffers reused from step to step (None: fresh tensors every time).
    :param fused: compiled passes that do the forward's and the backward's elementwise work
        in one pass each, with the same values (None, or where they do not run: eager ops).
    """
    return _LiveWeight.apply(weight, scores, threshold, workspace, fused)


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
