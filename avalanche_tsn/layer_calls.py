"""Weights read outside their layer's forward: found before they can change a trained task.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) gives each task its own subnetwork inside
each masked layer's forward: a trained task's frozen values are selected there, while the
layer's ``weight`` parameter holds what the task in training learns. A model that reads
``fc.weight`` itself (``F.linear(x, fc.weight)``, a cosine classifier's normalised weight)
instead of calling ``fc`` bypasses that selection, so every trained task's outputs would move
as later tasks train; a per-task normalisation read as ``F.batch_norm(x, ..., bn.weight,
bn.bias)`` alike. Two checks find it:

- in the first training step of a task, :class:`LayerCalls` notes which routed modules ran
  (each counts its own forwards, ``routed_calls``) and :func:`check_direct_reads` refuses one
  that did not run although its parameters have a gradient, before the optimizer steps;
- before a new task opens, :func:`check_frozen_outputs` runs each trained task with every
  parameter, and the live statistics of every per-task BatchNorm (``F.batch_norm(x,
  bn.running_mean, bn.running_var)`` reads them without a parameter), set to NaN: a read that
  only evaluation makes moves its outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from avalanche_tsn.model import TSNModel
from avalanche_tsn.routing import TaskRouted

__all__ = ["LayerCalls", "check_direct_reads", "routed_modules", "check_frozen_outputs"]

log = logging.getLogger(__name__)


def routed_modules(net: nn.Module) -> list[tuple[str, TaskRouted]]:
    """The modules of ``net`` that run each task with its own parameters (masked layers and
    per-task normalisations), with their names.

    :param net: the wrapped model (a :class:`~avalanche_tsn.model.TSNModel`'s ``net``).
    """
    return [(name, m) for name, m in net.named_modules() if isinstance(m, TaskRouted)]


class LayerCalls:
    """Which of ``layers`` have run their forward since this was made.

    :param layers: the routed modules, with their names (see :func:`routed_modules`).
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
                    f"so a direct read of {where}.{kind} (F.linear, F.conv2d or F.batch_norm "
                    "on it, a normalised weight) would change trained tasks' outputs as later "
                    "tasks train. Call the layer "
                    f"instead ({where}(x)). Task {task_label} was not trained and trained "
                    "tasks are unchanged."
                )


@torch.no_grad()
def check_frozen_outputs(model: TSNModel, x: object) -> None:
    """Raise a TypeError if a trained task's outputs on ``x`` depend on what the next task
    trains: the model's parameters and its normalisations' live statistics.

    Every value a trained task computes with is a frozen buffer (its weights, biases,
    normalisation and head); the parameters and live statistics belong to the task in
    training. So with all of them set to NaN for one forward (and put back bit for bit), each
    trained task's outputs must be what they were; a model that reads them outside TSN's
    routing in any branch of its forward (an evaluation-only path included) fails here.
    Called before a new task opens, so nothing has changed yet. A forward that is not
    deterministic (noise at evaluation) cannot be checked this way and is passed over, with a
    debug line.

    :param model: the TSN model.
    :param x: a few inputs, on the model's device (None: nothing to check with).
    """
    labels = model.trained_tasks()
    if not labels or x is None:
        return
    training = model.training
    model.eval()
    try:
        _compare_with_nan_parameters(model, x, labels)
    finally:
        model.train(training)


def _compare_with_nan_parameters(model: TSNModel, x: object, labels: list[int]) -> None:
    first = [model(x, t) for t in labels]
    if not all(torch.equal(a, model(x, t)) for a, t in zip(first, labels, strict=True)):
        log.debug("the model's evaluation forward is not deterministic: not checked")
        return
    live = [b for m in model.norm_layers() for b in m.live_statistics()]
    params = [*model.parameters(), *live]
    saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.fill_(float("nan"))
        probed = [model(x, t) for t in labels]
    finally:
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
    for t, a, b in zip(labels, first, probed, strict=True):
        if not torch.equal(a, b):
            raise TypeError(
                f"trained task {t}'s outputs depend on the model's parameters or its "
                "normalisations' live statistics, which the next task trains: the model "
                "reads a layer's weight (or a BatchNorm's running_mean and running_var) "
                "outside the layer's forward (in an evaluation-only branch, beside a call of "
                "the layer, or from a tensor derived from it). Call the layer instead. The "
                "next task was not started; trained tasks are unchanged."
            )
