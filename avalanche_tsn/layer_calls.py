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

A buffer of the user's own module that the model updates itself (a running statistic of its
own) is not kept per task either. :class:`BufferWatch` finds those a task's training changed;
:func:`check_changed_buffers` puts them back and refuses the model if trained tasks read
them, and later checks before a task set them to NaN too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from avalanche_tsn.model import TSNModel
from avalanche_tsn.routing import TaskRouted

__all__ = [
    "LayerCalls",
    "check_direct_reads",
    "routed_modules",
    "check_frozen_outputs",
    "user_buffers",
    "BufferWatch",
    "check_changed_buffers",
]

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


def user_buffers(net: nn.Module) -> dict[str, Tensor]:
    """The floating-point buffers of the user's own modules in ``net``, by name: not those of
    TSN's routed layers, which TSN keeps per task.

    :param net: the wrapped model (a :class:`~avalanche_tsn.model.TSNModel`'s ``net``).
    """
    found: dict[str, Tensor] = {}
    for where, module in net.named_modules():
        if isinstance(module, TaskRouted):
            continue
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                found[f"{where}.{name}" if where else name] = b
    return found


class BufferWatch:
    """The user's floating-point buffers (:func:`user_buffers`) as they were when this was
    made, to find those the model changes itself while a task trains.

    :param net: the wrapped model.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self._saved = {n: b.detach().clone() for n, b in user_buffers(net).items()}

    def changed(self) -> list[str]:
        """The buffers whose values differ from those saved (NaN equal to NaN)."""
        now = user_buffers(self.net)
        return [
            n
            for n, old in self._saved.items()
            if n in now
            and not (
                now[n].shape == old.shape
                and torch.allclose(now[n], old, rtol=0, atol=0, equal_nan=True)
            )
        ]

    @torch.no_grad()
    def put_back(self, names: Iterable[str]) -> None:
        """Give ``names`` their saved values again.

        :param names: buffer names, as :meth:`changed` gives them.
        """
        now = user_buffers(self.net)
        for n in names:
            now[n].copy_(self._saved[n])


@torch.no_grad()
def check_frozen_outputs(model: TSNModel, x: object, buffers: Sequence[str] = ()) -> None:
    """Raise a TypeError if a trained task's outputs on ``x`` depend on what the next task
    trains: the model's parameters, its normalisations' live statistics and ``buffers``.

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
    :param buffers: buffers of the user's modules (:func:`user_buffers`' names) that the model
        changed itself while an earlier task trained.
    """
    labels = model.trained_tasks()
    if not labels or x is None:
        return
    live = [b for m in model.norm_layers() for b in m.live_statistics()]
    mine = user_buffers(model.net)
    tensors = [*model.parameters(), *live, *(mine[n] for n in buffers if n in mine)]
    moved = _moved_by_nan(model, x, labels, tensors)
    if moved is not None:
        raise TypeError(
            f"trained task {moved}'s outputs depend on the model's parameters, its "
            "normalisations' live statistics or a buffer it updates itself "
            f"({', '.join(buffers) or 'none found so far'}), which the next task changes: "
            "the model reads a layer's weight (or a BatchNorm's running_mean and running_var) "
            "outside the layer's forward (in an evaluation-only branch, beside a call of the "
            "layer, or from a tensor derived from it), or a running statistic of its own. "
            "Call the layer instead, or keep such a buffer constant after the first task. The "
            "next task was not started; trained tasks are unchanged."
        )


@torch.no_grad()
def check_changed_buffers(
    model: TSNModel, x: object, watch: BufferWatch, changed: list[str], task: int
) -> None:
    """Raise a TypeError, with ``changed`` put back as trained tasks knew them, if trained
    tasks read those buffers of the user's modules, which changed while ``task`` trained.

    Called when ``task`` has trained and before it is frozen: a buffer the model updates
    itself (a running statistic of its own) is not kept per task, so trained tasks that read
    it would move.

    :param model: the TSN model.
    :param x: a few inputs, on the model's device (None: nothing to check with).
    :param watch: the user's buffers as they were when ``task`` opened.
    :param changed: the buffers that changed since (:meth:`BufferWatch.changed`).
    :param task: the task just trained (not frozen yet).
    """
    labels = model.trained_tasks()
    if not changed or not labels or x is None:
        return
    mine = user_buffers(model.net)
    new = {n: mine[n].detach().clone() for n in changed}
    watch.put_back(changed)  # as the trained tasks knew them
    moved = _moved_by_nan(model, x, labels, [mine[n] for n in changed])
    if moved is not None:
        raise TypeError(
            f"the model changed its buffers {', '.join(changed)} while task {task} trained, "
            f"and trained task {moved}'s outputs depend on them: TSN keeps per task what it "
            "converts (masked layers, normalisations, heads), not a running statistic the "
            "model keeps itself. Keep such a buffer constant after the first task, or use a "
            "BatchNorm. The buffers are put back as trained tasks knew them; trained tasks "
            f"are unchanged and task {task} was not kept (train it again or call "
            "strategy.abandon_task())."
        )
    for n, value in new.items():
        mine[n].copy_(value)


def _moved_by_nan(
    model: TSNModel, x: object, labels: list[int], tensors: Sequence[Tensor]
) -> int | None:
    """The first trained task whose outputs on ``x`` move with ``tensors`` set to NaN (each put
    back bit for bit), or None (also when the evaluation forward is not deterministic)."""
    training = model.training
    model.eval()
    try:
        first = [model(x, t) for t in labels]
        if not all(torch.equal(a, model(x, t)) for a, t in zip(first, labels, strict=True)):
            log.debug("the model's evaluation forward is not deterministic: not checked")
            return None
        saved = [t.detach().clone() for t in tensors]
        try:
            for t in tensors:
                t.fill_(float("nan"))
            probed = [model(x, t) for t in labels]
        finally:
            for t, value in zip(tensors, saved, strict=True):
                t.copy_(value)
    finally:
        model.train(training)
    return next(
        (t for t, a, b in zip(labels, first, probed, strict=True) if not torch.equal(a, b)), None
    )
