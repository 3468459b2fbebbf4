"""How a TSN strategy maps experiences and test samples to task slots.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) runs each sample with its task's
subnetwork. With task labels that is the label; on a class-incremental stream (no task
labels) each experience trains as a task of its own, its classes recorded, and evaluation
infers each test sample's task (:mod:`avalanche_tsn.inference`). This mixin holds that
mapping for :class:`~avalanche_tsn.strategy.TSNStrategy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks import CLExperience

from avalanche_tsn.inference import infer_tasks, memory_statistics
from avalanche_tsn.model import TSNModel
from avalanche_tsn.stages import stage_context
from avalanche_tsn.streams import (
    check_stream,
    experience_classes,
    experience_task_labels,
    relabelled,
)

__all__ = ["TaskRoutingMixin"]


class TaskRoutingMixin:
    """Experiences to task slots for training, samples to tasks for evaluation.

    For a strategy with ``tsn_model``, ``task_inference`` and the Avalanche template's
    ``forward`` inputs (``mb_x``, ``mb_task_id``, ``is_training``).
    """

    tsn_model: TSNModel
    task_inference: str | None
    # the Avalanche template's (annotations only: the template defines them)
    is_training: bool
    mb_x: torch.Tensor
    mb_task_id: torch.Tensor
    #: classes of each task trained with task inference (read by the inference metric)
    task_classes: dict[int, list[int]]
    _inference_stats: tuple[tuple, dict] | None

    def _init_routing(self) -> None:
        self.task_classes = {}
        self._inference_stats = None
        #: inside ``train`` (its periodic evaluations included)
        self._in_train = False
        #: the task an evaluated experience runs as without inference (see ``forward``)
        self._eval_as: int | None = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Avalanche's ``train``, remembering that it runs (periodic evaluation reads it)."""
        self._in_train = True
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._in_train = False

    def _before_eval_exp(self, **kwargs: Any) -> None:
        # A periodic evaluation while a task trains: that task cannot be inferred before its
        # router is fitted, so the experience of its classes runs as that task (early stopping
        # reads its accuracy); every other experience is inferred as after training.
        self._eval_as = None
        open_task = self.tsn_model.open_task()
        if (
            self.task_inference is not None
            and open_task is not None
            and getattr(self, "_in_train", False)  # (absent: pickled before 0.8.1)
        ):
            mine = set(experience_classes(self.experience))  # type: ignore[attr-defined]
            others = (set(c) for t, c in self.task_classes.items() if t != open_task)
            # (classes another task also holds, as in a stream whose experiences all hold
            # classes 0 and 1, leave the experience to inference)
            if (
                mine
                and mine <= set(self.task_classes.get(open_task, ()))
                and not any(mine & c for c in others)
            ):
                self._eval_as = open_task
        super()._before_eval_exp(**kwargs)  # type: ignore[misc]

    def _route_training(self, exps: Sequence[CLExperience]) -> list[CLExperience]:
        """Without task labels, each experience relabelled as a task of its own."""
        if self.task_inference is None:
            return list(exps)
        return [relabelled(e, self._slot_label(e, i)) for i, e in enumerate(exps)]

    def _record_classes(self, exps: Sequence[CLExperience]) -> None:
        """Remember each checked experience's classes as its task's (task inference only)."""
        if self.task_inference is not None:
            for e in exps:
                self.task_classes[experience_task_labels(e)[0]] = experience_classes(e)

    def _slot_label(self, experience: CLExperience, position: int) -> int:
        # The experience's index in its stream names its task (the same experience trained
        # again restarts the same task); else the next free label.
        index = getattr(experience, "current_experience", None)
        if isinstance(index, int):
            return index
        taken = set(self.tsn_model.trained_tasks()) | set(self.task_classes)
        label = position
        while label in taken:
            label += 1
        return label

    def _trained_label_of(self, experience: CLExperience) -> int:
        """The task trained on ``experience``'s classes (class-incremental streams)."""
        classes = sorted(experience_classes(experience))
        for label, trained in self.task_classes.items():
            if sorted(trained) == classes and self.tsn_model.is_trained(label):
                return label
        known = {t: sorted(c) for t, c in self.task_classes.items()}
        raise ValueError(
            f"experience {getattr(experience, 'current_experience', '?')} holds classes "
            f"{classes}, which no trained task was trained on as a whole (tasks and their "
            f"classes: {known}); evaluate it with strategy.eval, which infers each sample's task"
        )

    def _evaluated_labels(self, exps: Sequence[CLExperience]) -> list[int]:
        """The trained task each experience is evaluated as: its own label, or with task
        inference the task trained on its classes (not its own label 0)."""
        if self.task_inference is not None:
            return [self._trained_label_of(e) for e in exps]
        return check_stream(exps)

    def forward(self):
        """The model's output for the current minibatch, each sample run as its own task.

        The minibatch's task labels are used whether the experience has task labels or not
        (Avalanche would call the model without them then). With ``task_inference``,
        evaluation infers each sample's task instead (the stage context's ``inferred_tasks``
        keeps them for the task-inference metric), except, in a periodic evaluation while a
        task trains, on the experience of that task's classes, which runs as that task.
        """
        model = self.tsn_model
        if self.task_inference is None or self.is_training or not model.trained_tasks():
            # (before any task is trained there is nothing to infer: the untrained network)
            return model(self.mb_x, self.mb_task_id)
        if getattr(self, "_eval_as", None) is not None:  # (absent: pickled before 0.8.1)
            return model(self.mb_x, self._eval_as)
        outputs, tasks = self.infer(self.mb_x)
        stage_context(self).inferred_tasks = tasks
        return outputs

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and inferred task labels of ``x`` without task labels.

        :param x: a minibatch.
        """
        method = self.task_inference or "entropy"
        stats = None
        if method == "memory":
            # trained tasks' memories never change; a loaded state dict replaces the buffer
            revision = self.tsn_model.task_table.samples.revision()
            key = (tuple(self.tsn_model.trained_tasks()), revision)
            if self._inference_stats is None or self._inference_stats[0] != key:
                self._inference_stats = (key, memory_statistics(self.tsn_model))
            stats = self._inference_stats[1]
        return infer_tasks(self.tsn_model, x, method, stats)
