"""The live subnetwork's per-step weight, eager or compiled by ``torch.compile``.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) trains each task's mask as scores with a
straight-through gradient (as WSN): every training step of a masked layer computes the mask
``|scores| >= threshold``, the effective weight ``weight * mask`` and, in the backward, the
weight's gradient ``grad * mask`` and the scores' ``grad * weight * sign(scores)``. Eagerly
that is several passes over the weight (several kernels each on a GPU). Written as one pure
function (:func:`live_weight_ste`: the straight-through estimator as ``m + (a - a.detach())``,
which is ``m`` in value and has ``d/ds = sign(s)``), Inductor fuses the forward into one
kernel and the backward into one.

:class:`LiveKernel` is the choice a model makes once (``"eager"``, ``"compiled"``, or
``"auto"``: compiled on CUDA, eager on the CPU, where measurement found nothing to gain; see
BENCHMARKS.md); a compiled kernel that fails to build falls back to eager with a warning.
Trained tasks never run through either: their frozen weights are selected, never computed.
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


_COMPILED: list[Callable[..., Tensor]] = []


def _compiled() -> Callable[..., Tensor]:
    if not _COMPILED:
        # Symbolic sizes over flat views: one graph for every layer and every task; static
        # shapes would compile once per layer shape and, past dynamo's cache limit (8
        # graphs), silently run eagerly. (Parameters themselves are kept static by dynamo:
        # the caller passes plain views of them.)
        _COMPILED.append(torch.compile(live_weight_ste, dynamic=True, fullgraph=True))
    return _COMPILED[0]


class LiveKernel:
    """Which path a model's masked layers train with, and what compiling cost.

    :param kind: ``"auto"``, ``"eager"`` or ``"compiled"``.
    :param device: the model's device (``"auto"`` compiles on CUDA only).
    """

    def __init__(self, kind: str = "eager", device: torch.device | str = "cpu") -> None:
        kind = check_kernel(kind)
        self.requested = kind
        device = torch.device(device)
        #: the path that runs: "eager" or "compiled"
        self.active = (
            "compiled"
            if kind == "compiled" or (kind == "auto" and device.type == "cuda")
            else "eager"
        )
        #: seconds of each first call (where compilation happens) per (dtype, device)
        self.compile_seconds: dict[tuple, float] = {}
        #: why a compiled kernel fell back to eager (None if it did not)
        self.fallback: str | None = None
        log.info("TSN training kernel: %s (asked %s, device %s)", self.active, kind, device.type)

    @property
    def compiled(self) -> bool:
        """Whether the compiled path runs."""
        return self.active == "compiled"

    def __call__(self, weight: Tensor, scores: Tensor, threshold: Tensor) -> Tensor | None:
        """The live effective weight through the compiled function (None: it fell back).

        :param weight: the weights.
        :param scores: the layer's scores.
        :param threshold: the mask threshold.
        """
        key = (weight.dtype, weight.device)
        flat = (weight.reshape(-1), scores.reshape(-1), threshold)
        if key in self.compile_seconds:
            return _compiled()(*flat).view(weight.shape)
        start = time.perf_counter()
        try:
            out = _compiled()(*flat).view(weight.shape)
        except Exception as err:  # no compiler, no backend: train eagerly instead
            self.active = "eager"
            self.fallback = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("TSN training kernel: compiling failed (%s); eager", self.fallback)
            return None
        self.compile_seconds[key] = time.perf_counter() - start
        log.info(
            "TSN training kernel: compiled for %s weights on %s in %.1f s",
            str(weight.dtype).removeprefix("torch."),
            weight.device,
            self.compile_seconds[key],
        )
        return out


def train_weight(
    kernel: LiveKernel | None,
    weight: Tensor,
    scores: Tensor,
    threshold: Tensor,
    workspace: LiveWorkspace | None,
) -> Tensor:
    """The live effective weight of a training step: compiled where ``kernel`` is, else eager.

    :param kernel: the model's kernel (None: eager).
    :param weight: the weights (frozen values where earlier tasks own them).
    :param scores: the layer's scores.
    :param threshold: the mask threshold.
    :param workspace: the eager path's reused buffers.
    """
    if kernel is not None and kernel.compiled:
        fused = kernel(weight, scores, threshold)
        if fused is not None:
            return fused
    return live_weight(weight, scores, threshold, workspace)


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

        :param kind: ``"auto"`` (compiled on CUDA, eager on the CPU), ``"eager"`` or
            ``"compiled"`` (``torch.compile``; eager, with a warning, where it cannot build).
        :param device: where the model trains.
        """
        kernel = LiveKernel(kind, device)
        for layer in self.modules():  # type: ignore[attr-defined]
            if isinstance(layer, KernelUser):
                layer.use_kernel(kernel if kernel.compiled else None)
        self.kernel = kernel
        return kernel
