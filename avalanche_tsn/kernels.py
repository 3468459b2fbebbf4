"""The live subnetwork's per-step weight, eager or compiled by ``torch.compile``.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) trains each task's mask as scores with a
straight-through gradient (as WSN): every training step of a masked layer computes the mask
``|scores| >= threshold``, the effective weight ``weight * mask`` and, in the backward, the
weight's gradient ``grad * mask`` and the scores' ``grad * weight * sign(scores)``. Eagerly
that is seven passes over the weight (a kernel each on a GPU). :func:`fused_forward` and
:func:`fused_backward` are the same work as pure functions, which Inductor compiles into one
pass each (C++ on the CPU, Triton on CUDA); the eager autograd function
(:func:`avalanche_tsn.masks.live_weight`) runs them with detached tensors, so the values are
the eager path's bit for bit and the compiled graphs hold no backward of their own.
:func:`live_weight_ste` is the estimator written as one differentiable function (``m + (a -
a.detach())``, which is ``m`` in value and has ``d/ds = sign(s)``): the reference the
tests hold both paths to.

:class:`LiveKernel` is the choice a model makes once (``"eager"``, ``"compiled"``, or
``"auto"``: compiled on CUDA and, on the CPU, for layers of 524,288 weights or more, where
one pass beats seven; smaller CPU layers run faster eagerly, see BENCHMARKS.md); a compiled
kernel that fails to build falls back to eager with a warning. Trained tasks never run
through either: their frozen weights are selected, never computed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from avalanche_tsn.masks import LiveWorkspace, live_weight
from avalanche_tsn.validation import check_choice

__all__ = [
    "KERNELS",
    "live_weight_ste",
    "fused_forward",
    "fused_backward",
    "CPU_AUTO_MIN_WEIGHTS",
    "LiveKernel",
    "check_kernel",
    "train_weight",
    "KernelUser",
    "KernelChoice",
]

log = logging.getLogger(__name__)

#: the training kernels a strategy may ask for
KERNELS = ("auto", "eager", "compiled")


def check_kernel(value: object) -> str:
    """``value`` if it is one of :data:`KERNELS`, else a ValueError naming them.

    :param value: the requested kernel.
    """
    return check_choice(value, "train_kernel", KERNELS)


def live_weight_ste(weight: Tensor, scores: Tensor, threshold: Tensor) -> Tensor:
    """``weight * (|scores| >= threshold)``, straight through to the scores, as pure tensor ops.

    :param weight: the weights (frozen values where earlier tasks own them).
    :param scores: the layer's scores.
    :param threshold: the mask threshold (a 0-dim tensor).
    """
    a = scores.abs()
    mask = (a >= threshold).to(weight.dtype)
    # (a - a.detach()) is exactly 0: the value is weight * mask, the gradient reaches scores
    return weight * (mask + (a - a.detach()))


def fused_forward(weight: Tensor, scores: Tensor, threshold: Tensor, out: Tensor) -> None:
    """Write the effective weight ``weight * (|scores| >= threshold)`` into ``out``.

    The forward of :func:`avalanche_tsn.masks.live_weight` as one pure function, for
    ``torch.compile`` to make one pass of it (eagerly: three, and a stored mask).

    :param weight: the weights, flat.
    :param scores: the layer's scores, flat.
    :param threshold: the mask threshold (a 0-dim tensor).
    :param out: written: the effective weight.
    """
    out.copy_(weight * (scores.abs() >= threshold).to(weight.dtype))


def fused_backward(grad: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor) -> Tensor:
    """The scores' straight-through gradient; ``grad`` becomes the weight's (``grad * mask``).

    The backward of :func:`avalanche_tsn.masks.live_weight` as one pure function (eagerly:
    four passes and a new tensor); the mask is recomputed from the scores the forward read.

    :param grad: the effective weight's gradient, flat; overwritten.
    :param weight: the weights, flat.
    :param scores: the layer's scores, flat.
    :param threshold: the mask threshold (a 0-dim tensor).
    """
    grad_scores = grad * weight * torch.sign(scores)
    grad.mul_((scores.abs() >= threshold).to(grad.dtype))
    return grad_scores


_COMPILED: list[tuple[Callable[..., None], Callable[..., Tensor]]] = []


def _compiled() -> tuple[Callable[..., None], Callable[..., Tensor]]:
    if not _COMPILED:
        # Symbolic sizes over flat views: one graph each for every layer and every task;
        # static shapes would compile once per layer size and, past dynamo's cache limit (8
        # graphs), silently run eagerly. No autograd inside: the caller's autograd.Function
        # runs them with detached tensors: inference graphs, nothing saved for a backward.
        _COMPILED.append(
            (
                torch.compile(fused_forward, dynamic=True, fullgraph=True),
                torch.compile(fused_backward, dynamic=True, fullgraph=True),
            )
        )
    return _COMPILED[0]


#: on the CPU, ``"auto"`` compiles layers of at least this many weights (measured: smaller
#: layers run faster eagerly, a compiled call's fixed cost outweighing the passes it saves)
CPU_AUTO_MIN_WEIGHTS = 1 << 19


class LiveKernel:
    """Which path a model's masked layers train with, and what compiling cost.

    :param kind: ``"auto"``, ``"eager"`` or ``"compiled"``.
    :param device: the model's device (``"auto"`` compiles every layer on CUDA and, on the
        CPU, layers of :data:`CPU_AUTO_MIN_WEIGHTS` weights or more).
    """

    def __init__(self, kind: str = "eager", device: torch.device | str = "cpu") -> None:
        kind = check_kernel(kind)
        self.requested = kind
        device = torch.device(device)
        #: the path that runs: "eager" or "compiled" (for layers of min_weights or more)
        self.active = "eager" if kind == "eager" else "compiled"
        #: layers with fewer weights train eagerly
        self.min_weights = CPU_AUTO_MIN_WEIGHTS if kind == "auto" and device.type != "cuda" else 0
        #: seconds of the first calls (where compilation happens) per (dtype, device)
        self.compile_seconds: dict[tuple, float] = {}
        #: why a compiled kernel fell back to eager (None if it did not)
        self.fallback: str | None = None
        self._ready: set[tuple] = set()
        log.info(
            "TSN training kernel: %s (asked %s, device %s)", self.describe(), kind, device.type
        )

    @property
    def compiled(self) -> bool:
        """Whether the compiled path runs (for layers of :attr:`min_weights` or more)."""
        return self.active == "compiled"

    def describe(self) -> str:
        """The path that runs, in words."""
        if self.compiled and self.min_weights:
            return f"compiled for layers of {self.min_weights} weights or more, eager below"
        return self.active

    def fuses(self, weight: Tensor) -> bool:
        """Whether ``weight``'s layer trains through the compiled passes.

        :param weight: the layer's weights.
        """
        return self.compiled and weight.numel() >= self.min_weights and weight.is_contiguous()

    def _run(self, which: int, *tensors: Tensor) -> tuple[bool, Tensor | None]:
        # tensors[1] is the weight or the scores: the layer's dtype and device either way
        key = (tensors[1].dtype, tensors[1].device)
        # views, never copies: the passes write into out and grad
        flat = [t.detach().view(-1) if t.dim() else t.detach() for t in tensors]
        if (key, which) in self._ready:
            return True, _compiled()[which](*flat)
        start = time.perf_counter()
        try:
            result = _compiled()[which](*flat)
        except Exception as err:  # no compiler, no backend: train eagerly instead
            self.active = "eager"
            self.fallback = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("TSN training kernel: compiling failed (%s); eager", self.fallback)
            return False, None
        seconds = time.perf_counter() - start
        self._ready.add((key, which))
        self.compile_seconds[key] = self.compile_seconds.get(key, 0.0) + seconds
        log.info(
            "TSN training kernel: compiled the %s pass for %s weights on %s in %.1f s",
            ("forward", "backward")[which],
            str(key[0]).removeprefix("torch."),
            key[1],
            seconds,
        )
        return True, result

    def forward(self, weight: Tensor, scores: Tensor, threshold: Tensor, out: Tensor) -> bool:
        """Write the effective weight in one compiled pass (False: fell back, nothing written).

        :param weight: the weights.
        :param scores: the layer's scores.
        :param threshold: the mask threshold.
        :param out: the effective weight's buffer, shaped like ``weight``.
        """
        return self.compiled and self._run(0, weight, scores, threshold, out)[0]

    def backward(
        self, grad: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor
    ) -> Tensor | None:
        """The scores' gradient in one compiled pass; ``grad`` becomes the weight's (None:
        fell back, nothing written).

        :param grad: the effective weight's gradient (contiguous).
        :param weight: the weights.
        :param scores: the layer's scores.
        :param threshold: the mask threshold.
        """
        if not self.compiled:
            return None
        done, grad_scores = self._run(1, grad, weight, scores, threshold)
        return grad_scores.view(grad.shape) if done and grad_scores is not None else None


def train_weight(
    kernel: LiveKernel | None,
    weight: Tensor,
    scores: Tensor,
    threshold: Tensor,
    workspace: LiveWorkspace | None,
) -> Tensor:
    """The live effective weight of a training step: compiled where ``kernel`` fuses the
    layer, else eager.

    :param kernel: the model's kernel (None: eager).
    :param weight: the weights (frozen values where earlier tasks own them).
    :param scores: the layer's scores.
    :param threshold: the mask threshold.
    :param workspace: the eager path's reused buffers.
    """
    fused = kernel if kernel is not None and kernel.fuses(weight) else None
    return live_weight(weight, scores, threshold, workspace, fused)


class KernelUser:
    """A masked layer's reference to its model's kernel (a class default: eager)."""

    #: the model's kernel choice, if compiled (a layer pickled before 0.6 reads this default)
    kernel: LiveKernel | None = None

    def use_kernel(self, kernel: LiveKernel | None) -> None:
        """Train the live subnetwork through ``kernel`` (None: eager).

        :param kernel: the model's kernel choice.
        """
        self.kernel = kernel


class KernelChoice:
    """The model's side (an ``nn.Module``): one :class:`LiveKernel` for every masked layer."""

    kernel: LiveKernel | None = None

    def use_kernel(self, kind: str, device: torch.device | str) -> LiveKernel:
        """Train the live subnetwork of every masked layer with the ``kind`` kernel.

        Trained tasks are unaffected: they select their frozen weights whatever trains.

        :param kind: ``"auto"`` (compiled on CUDA; on the CPU for layers of
            :data:`CPU_AUTO_MIN_WEIGHTS` weights or more), ``"eager"`` or
            ``"compiled"`` (``torch.compile``; eager, with a warning, where it cannot build).
        :param device: where the model trains.
        """
        kernel = LiveKernel(kind, device)
        for layer in self.modules():  # type: ignore[attr-defined]
            if isinstance(layer, KernelUser):
                layer.use_kernel(kernel if kernel.compiled else None)
        self.kernel = kernel
        return kernel
