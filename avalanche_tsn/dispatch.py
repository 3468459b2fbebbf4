"""A TinySubNets model's forward: each sample runs with its task's subnetwork.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 6. The model reads the route from
its task table (a trained task's frozen slot, else the live subnetwork) and tells each routed
module by a call (:class:`~avalanche_tsn.routing.TaskRouted`); a minibatch that mixes tasks
runs the network once, sorted by task. Without task labels it returns every known task's
output (Avalanche's contract) or, with ``task_inference`` and no task in training, the
inferred task's.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from avalanche_tsn.inference import infer_tasks
from avalanche_tsn.routing import FREE
from avalanche_tsn.tasks import TaskTable

__all__ = ["TaskDispatchMixin"]


class TaskDispatchMixin:
    """The forward of :class:`~avalanche_tsn.model.TSNModel`."""

    # the model's (see TSNModel)
    task_table: TaskTable
    net: nn.Module
    known_train_tasks_labels: set[int]
    task_inference: str | None
    _pass_labels: bool
    # (and its _routed(): the masked layers and normalisations, in order)

    def route_task(self, task_label: int) -> None:
        """Run the next forwards of the masked layers and normalisations as ``task_label``.

        What :meth:`forward_single_task` does first; for callers that run the network's
        stages themselves (:mod:`avalanche_tsn.prefix`).

        :param task_label: a task label (a trained task's frozen slot, else the live one).
        """
        slot = self.task_table.frozen_slot(task_label)
        active = FREE if slot is None else slot
        for module in self._routed():
            module.route(active)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        self.route_task(task_label)
        if self._pass_labels:
            return self.net(x, task_label)
        return self.net(x)

    def forward_all_tasks(self, x: Tensor) -> dict[int, Tensor]:
        """Every known task's output for ``x``: the trained tasks and the one in training.

        Tasks not trained yet and not in training are left out (their output would only be
        the live subnetwork's, as for the task in training).

        :param x: the inputs.
        """
        return {t: self.forward_single_task(x, t) for t in sorted(self.known_train_tasks_labels)}

    def forward(  # type: ignore[override]
        self, x: Tensor, task_labels: Tensor | int | None = None
    ) -> Tensor | dict[int, Tensor]:
        """Outputs of ``x``: each sample run as its task (``task_labels``: a tensor or an int).

        With ``task_labels=None`` it returns every known task's output (see
        :meth:`forward_all_tasks`), as Avalanche's multi-task models do, or, when
        ``task_inference`` is set, a task is trained and none is in training, the output of
        each sample's inferred task (while a task trains, plugins such as LwF rely on the
        dict; before the first task there is no task to infer, and tools that summarise a
        model, or a periodic evaluation's metrics, still call it).

        :param x: the inputs.
        :param task_labels: one task label per sample, an int for all, or None.
        """
        # a plain attribute (no Module bookkeeping): the compute report's default shape
        self.__dict__["sample_shape"] = tuple(x.shape[1:])
        # (getattr: a model pickled whole before 0.3 has no such attribute)
        method = getattr(self, "task_inference", None)
        if task_labels is None and method is not None:
            table = self.task_table
            if table.open_task() is None and table.trained_tasks():
                return infer_tasks(self, x, method)[0]
        if task_labels is None:
            # Avalanche's contract (LwF relies on it): every known task's output, as a dict.
            return self.forward_all_tasks(x)
        if isinstance(task_labels, numbers.Integral) and not isinstance(task_labels, bool):
            return self.forward_single_task(x, int(task_labels))
        labels = _checked_labels(task_labels, x)
        if labels.dim() == 0:
            return self.forward_single_task(x, int(labels))
        first = labels[:1]
        if len(first) == 0:  # (the heads' widths differ: no task, no output shape)
            raise ValueError(
                "task_labels is an empty tensor, so no task's output can be chosen for the empty "
                "minibatch; pass its task label as an int"
            )
        if bool((labels == first).all()):
            return self.forward_single_task(x, int(first))
        return self._forward_mixed(x, labels)

    def _forward_mixed(self, x: Tensor, labels: Tensor) -> Tensor:
        # One pass of the network over the minibatch sorted by task: each masked layer and
        # normalisation runs each task's rows with that task's parameters, the rest of the
        # network runs once (a pass per task would repeat every module for every task).
        order = torch.argsort(labels, stable=True)
        tasks, counts = torch.unique_consecutive(labels[order], return_counts=True)
        table = self.task_table
        groups = tuple(
            (FREE if (slot := table.frozen_slot(t)) is None else slot, c)
            for t, c in zip(tasks.tolist(), counts.tolist(), strict=True)
        )
        routed = self._routed()
        for module in routed:
            module.route_groups(groups)
        try:
            sorted_labels = labels[order]
            out = self.net(x[order], sorted_labels) if self._pass_labels else self.net(x[order])
        finally:
            for module in routed:
                module.route(FREE)
        result = torch.empty_like(out)
        result[order] = out
        return result


def _checked_labels(task_labels: object, x: object) -> Tensor:
    """``task_labels`` as a long tensor, if it is an integer tensor of one label per sample."""
    allowed = "an int, an integer tensor with one label per sample, or None"
    if not isinstance(task_labels, Tensor):
        raise TypeError(f"task_labels must be {allowed}, got {type(task_labels).__name__}")
    if (
        task_labels.is_floating_point()
        or task_labels.is_complex()
        or task_labels.dtype == torch.bool
    ):
        raise TypeError(f"task_labels must be {allowed}, got a {task_labels.dtype} tensor")
    n = x.shape[0] if isinstance(x, Tensor) else len(task_labels)
    if task_labels.dim() > 1 or (task_labels.dim() == 1 and len(task_labels) != n):
        raise ValueError(
            f"task_labels must be {allowed}: got shape {tuple(task_labels.shape)} for {n} samples"
        )
    return task_labels.to(torch.long)
