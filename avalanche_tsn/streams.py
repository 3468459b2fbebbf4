"""Task labels and classes of Avalanche experiences, wherever Avalanche keeps them.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) is task-incremental: each experience is one
task, named by its task label. Avalanche's classic benchmarks put the labels on the experience
(``task_labels``); its newer helpers (``benchmark_from_datasets``, hand-built
``CLExperience`` objects) leave them on the dataset only (``targets_task_labels``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from avalanche.benchmarks import CLExperience, OnlineCLExperience
from avalanche.benchmarks.utils.flat_data import ConstantSequence

__all__ = [
    "experience_task_labels",
    "experience_classes",
    "task_aware",
    "relabelled",
    "check_stream",
]


def _uniques(attribute: Any) -> list[int]:
    uniques = getattr(attribute, "uniques", None)
    values = uniques if uniques is not None else set(attribute)
    return sorted(int(v) for v in values)


def experience_task_labels(experience: CLExperience) -> list[int]:
    """The task labels of an experience: its own, or those of its dataset's samples.

    :param experience: an Avalanche experience.
    :return: the distinct labels, sorted (empty if neither place has any).
    """
    labels = getattr(experience, "task_labels", None)
    if labels is not None:
        return sorted({int(t) for t in labels})
    attribute = getattr(getattr(experience, "dataset", None), "targets_task_labels", None)
    return [] if attribute is None else _uniques(attribute)


def experience_classes(experience: CLExperience) -> list[int]:
    """The classes of an experience: its own list, or those of its dataset's targets.

    :param experience: an Avalanche experience.
    """
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is not None:
        return sorted(int(c) for c in classes)
    targets = getattr(getattr(experience, "dataset", None), "targets", None)
    return [] if targets is None else _uniques(targets)


def task_aware(experience: CLExperience) -> CLExperience:
    """The experience, with ``task_labels`` and ``classes_in_this_experience`` set.

    Avalanche's dynamic modules (``MultiHeadClassifier``, ``MultiTaskModule``) read both from
    the experience. When either is missing, a shallow copy carries them, read from the
    dataset; the caller's experience is never modified.

    :param experience: an Avalanche experience.
    """
    has_labels = getattr(experience, "task_labels", None) is not None
    has_classes = getattr(experience, "classes_in_this_experience", None) is not None
    if has_labels and has_classes:
        return experience
    aware = copy.copy(experience)
    if not has_labels:
        aware.task_labels = experience_task_labels(experience)
    if not has_classes:
        aware.classes_in_this_experience = experience_classes(experience)
    return aware


def relabelled(experience: CLExperience, label: int) -> CLExperience:
    """A shallow copy of ``experience`` whose samples all carry task label ``label``.

    Used to train a class-incremental stream (every experience labelled 0) one task per
    experience; the experience's classes are kept, the caller's experience is not modified.

    :param experience: an Avalanche experience.
    :param label: its new task label.
    """
    data = experience.dataset
    copied = copy.copy(task_aware(experience))
    relabelled_data = data.update_data_attribute(
        "targets_task_labels", ConstantSequence(int(label), len(data))
    )
    overrides: dict[str, Any] = {}
    try:
        copied.dataset = relabelled_data
    except AttributeError:
        # a read-only property (Avalanche 0.6's DatasetExperience and the experiences of
        # class_incremental_benchmark and benchmark_with_validation_stream)
        overrides["dataset"] = relabelled_data
    if "dataset" in overrides or experience_task_labels(copied) != [int(label)]:
        # An experience whose labels come from its benchmark (a read-only property on
        # Avalanche's classic experiences): the copy gets a subclass that answers its own.
        overrides["task_labels"] = [int(label)]
    if overrides:
        copied.__class__ = _relabelled_class(type(copied), tuple(sorted(overrides)))
        object.__setattr__(copied, "_tsn_overrides", overrides)
    return copied


_RELABELLED: dict[tuple[type, tuple[str, ...]], type] = {}


def _relabelled_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose read-only ``names`` answer the copy's own values."""
    if (cls, names) not in _RELABELLED:
        props = {n: property(lambda self, n=n: self._tsn_overrides[n]) for n in names}
        _RELABELLED[cls, names] = type(cls.__name__, (cls,), props)
    return _RELABELLED[cls, names]


def _name(experience: CLExperience) -> str:
    index = getattr(experience, "current_experience", None)
    stream = getattr(getattr(experience, "origin_stream", None), "name", None)
    where = f" of the {stream} stream" if stream else ""
    return f"experience {index}{where}" if index is not None else "an experience"


def check_stream(experiences: Iterable[CLExperience]) -> list[int]:
    """Check that every experience is one task with a label of its own.

    :param experiences: the experiences (e.g. a whole stream).
    :return: their task labels, in order.
    :raises ValueError: naming the first experience that has no single task label, that
        repeats an earlier one's (a stream without task labels labels every experience 0), or
        that is a fragment of an online stream.
    """
    seen: dict[int, str] = {}
    for experience in experiences:
        if isinstance(experience, OnlineCLExperience) and not (
            experience.is_first_subexp and experience.is_last_subexp
        ):
            raise ValueError(
                f"{_name(experience)} is a fragment of an online stream "
                f"({experience.subexp_size} samples, from split_online_stream); TSN learns a "
                "task from its whole experience (trained, then pruned, quantized and frozen), "
                "so train it on the original experiences (the stream the online one was split "
                "from)"
            )
        labels = experience_task_labels(experience)
        if len(labels) != 1:
            found = f"task labels {labels}" if labels else "no task labels"
            raise ValueError(
                f"{_name(experience)} has {found}; TSN is task-incremental and trains one task "
                "per experience, with one task label (e.g. PermutedMNIST(..., "
                "return_task_id=True), SplitMNIST(..., return_task_id=True))"
            )
        label = labels[0]
        if label in seen:
            raise ValueError(
                f"{_name(experience)} has task label {label}, as {seen[label]} does; TSN needs "
                "a distinct task label per experience (a stream without task labels gives "
                "every experience label 0: pass task_inference=True to TSNStrategy to learn "
                "each experience as a task of its own and infer the task of each test sample)"
            )
        seen[label] = _name(experience)
    return list(seen)
