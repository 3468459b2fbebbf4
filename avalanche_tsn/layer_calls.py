"""Weights read outside their layer's forward: found in a task's first training step.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) gives each task its own subnetwork inside
each masked layer's forward: a trained task's frozen values are selected there, while the
layer's ``weight`` parameter holds what the task in training learns. A model that reads
``fc.weight`` itself (``F.linear(x, fc.weight)``, a cosine classifier's normalised weight)
instead of calling ``fc`` bypasses that selection, so every trained task's outputs would move
as later tasks train. :class:`LayerCalls` notes which masked layers run in the first training
step of a task (each layer counts its own forwards, ``routed_calls``);
:func:`check_direct_reads` then refuses a layer that did not run although its parameters have
a gradient, before the optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from avalanche_tsn.routing import TaskRouted

__all__ = ["LayerCalls", "check_direct_reads"]


class LayerCalls:
    """Which of ``layers`` have run their forward since this was made.

    :param layers: the masked layers, with their names.
    """

    def __init__(self, layers: Iterable[tuple[str, TaskRouted]]) -> None:
        self.layers = list(layers)
        self._start = [layer.routed_calls for _, layer in self.layers]

    def ran(self) -> list[bool]:
        """For each layer, in order, whether it ran since this was made."""
        return [
            layer.routed_calls > start
            for (_, layer), start in zip(self.layers, self._start, strict=True)
        ]


def check_direct_reads(calls: LayerCalls, task_label: int) -> None:
    """Raise a TypeError if a layer that did not run has a non-zero gradient.

    Called after the backward of the step ``calls`` watched, before the optimizer steps, so
    nothing the optimizer would change has changed.

    :param calls: what ran in the step.
    :param task_label: the task in training, for the message.
    """
    for (name, layer), ran in zip(calls.layers, calls.ran(), strict=True):
        if ran:
            continue
        for kind in ("weight", "bias"):
            param = getattr(layer, kind, None)
            grad = param.grad if isinstance(param, nn.Parameter) else None
            # an unused layer has no gradient, or zeros where zero_grad keeps the tensors
            if grad is not None and bool(grad.ne(0).any()):
                where = name or "the model"
                raise TypeError(
                    f"the model reads {where}.{kind} without calling {where}: its forward did "
                    "not run in the first training step, yet its parameters have a gradient. "
                    "TSN selects each trained task's frozen values inside the layer's forward, "
                    f"so a direct read (F.linear(x, {where}.weight), a normalised weight) "
                    "would change trained tasks' outputs as later tasks train. Call the layer "
                    f"instead ({where}(x)). Task {task_label} was not trained and trained "
                    "tasks are unchanged."
                )
