"""Validation inputs in the memory layout that the CPU's convolutions read fastest.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) prunes and quantizes every task with
repeated validation passes over the same held-out samples. On the CPU a convolutional
network's forward over channels-last images (NHWC strides, oneDNN's own layout) runs about
1.3-1.7x faster than over PyTorch's default NCHW strides (BENCHMARKS.md, issue 28), with the
same values up to floating-point reassociation. A layout is only an order of strides: every
module sees the same logical tensor, and the layout carries from layer to layer. A model that
cannot take it (a ``view`` that needs NCHW strides) or whose outputs differ keeps its layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["channels_last_batches", "layout_key"]

log = logging.getLogger(__name__)


def _agree(a: object, b: object) -> bool:
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    scale = float(a.detach().abs().max()) if a.numel() else 0.0
    # reassociation moves logits by ~1e-7 of their size; a layout-dependent model, by O(1)
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)))


def _nhwc(x: Tensor) -> Tensor:
    """A copy of ``x`` with NHWC strides (written out: for one channel, ``contiguous`` would
    keep NCHW strides, and the convolutions would keep their default layout)."""
    n, c, h, w = x.shape
    out = torch.empty_strided(x.shape, (h * w * c, 1, w * c, c), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def channels_last_batches(
    batches: Sequence[tuple[Tensor, Tensor]],
    model: nn.Module,
    run: Callable[[Tensor], object],
    known: bool | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], bool]:
    """``batches`` with channels-last image inputs where that is on the CPU, useful and safe.

    Images are 4-D inputs on the CPU, and only a model with a convolution gains from them;
    ``run`` (the forward the passes will make) is tried on the first minibatch in both
    layouts, and the new layout is kept only if it runs and gives the same outputs. Other
    inputs, inputs on other devices and models without a convolution keep their batches.

    :param batches: inputs and targets, minibatch by minibatch (not empty).
    :param model: the model the passes run.
    :param run: the forward of a validation pass, ``run(inputs) -> outputs``.
    :param known: what an earlier call decided for the same model and input shape (see
        :func:`layout_key`): then it is applied without a trial.
    :return: the minibatches to read, and whether their inputs are now channels-last.
    """
    first = batches[0][0]
    if first.dim() != 4 or first.device.type != "cpu":
        return list(batches), False
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return list(batches), False
    if known is not None:
        return ([(_nhwc(x), y) for x, y in batches], True) if known else (list(batches), False)
    moved = [(_nhwc(x), y) for x, y in batches]
    try:
        same = _agree(run(moved[0][0]), run(first.contiguous()))
    except Exception as err:  # e.g. x.view(n, -1) after a convolution: only a speed-up is lost
        log.info("validation passes keep NCHW inputs: the model refused NHWC (%r)", err)
        return list(batches), False
    if not same:
        log.info("validation passes keep NCHW inputs: the model's outputs depend on the layout")
        return list(batches), False
    log.debug("validation passes read NHWC inputs")
    return moved, True


def layout_key(model: nn.Module, x: Tensor) -> tuple:
    """What :func:`channels_last_batches`'s decision depends on: the model, the kinds of its
    modules, and the inputs' sample shape, dtype and device (not the weights' values, nor how
    many heads a multi-head model has grown).

    :param model: the model the passes run.
    :param x: a minibatch of its inputs.
    """
    modules = frozenset(type(m) for m in model.modules())
    return id(model), modules, tuple(x.shape[1:]), x.dtype, x.device
