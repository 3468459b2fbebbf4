"""Task inference: which trained task a sample belongs to, when no task label is given.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), like WSN and PackNet, needs the task label
at test time. For class-incremental streams the task is inferred from the sample:

- ``"entropy"``: run every trained task's subnetwork on the minibatch and pick, per sample,
  the task whose output distribution has the lowest entropy (the one-shot baseline of SupSup,
  Wortsman et al., NeurIPS 2020, without its gradient over superposed masks);
- ``"router"`` (the default of ``task_inference=True``): a small router fitted after every
  task on the frozen subnetworks' features of the task memory and the new task's data
  (:mod:`avalanche_tsn.router`), its log-posterior over tasks added to each task's log
  confidence in its best class (the largest log-softmax of its output); measured on split
  digits / split Fashion-MNIST without task labels (3 seeds, each a class order), it routes
  96.3% / 80.4% of test samples right,
  against 79.8% / 57.8% for ``"memory"`` (BENCHMARKS.md, "Class-incremental at equal
  memory");
- ``"memory"``: pick the task under whose subnetwork the sample's features (the heads' input)
  lie closest to those of that task's memory samples (the task memory that task matching
  keeps): the distance to the nearest memory sample, divided by the memory's own typical
  nearest-neighbour distance, so that tasks whose feature spaces have different scales
  compare fairly. Measured on split digits (5 tasks; BENCHMARKS.md has the full runs), share
  of test samples whose task is inferred right: 84% this way, 54% dividing by the median
  pairwise distance instead, 74% by cosine similarity, 20% with a diagonal Gaussian per task
  (dead ReLU features have near-zero variance and decide the comparison), 35% for entropy.

Each costs one forward per trained task on the whole minibatch (not per sample); the
router adds one small matrix product. A sample's
prediction is then its inferred task's output, over global class ids (with Avalanche's
multi-head classifiers, a head's units are the class ids its task was trained on). Each
subnetwork is unchanged: inference only chooses among their outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from avalanche_tsn.similarity import TSNModel, feature_module, task_features
from avalanche_tsn.validation import check_choice

__all__ = ["INFERENCE_METHODS", "check_method", "infer_tasks", "memory_statistics"]

INFERENCE_METHODS = ("router", "memory", "entropy")

#: fraction of a memory's spread added to its nearest-neighbour scale (measured on split
#: digits: 0 gives 84.0% task inference, 0.01 84.2%, 0.05 82.0%, 0.1 76.9%)
SPREAD_FLOOR = 0.01

#: logit given to the classes a task's output does not have, when outputs are widened
_ABSENT = -1e9


def check_method(value: object) -> str:
    """Validate a task-inference method name.

    :param value: ``"router"``, ``"memory"`` or ``"entropy"``; ``True`` means ``"router"``.
    """
    if value is True:
        return "router"
    return check_choice(value, "task_inference", INFERENCE_METHODS)


@torch.no_grad()
def memory_statistics(model: TSNModel) -> dict[int, tuple[Tensor, Tensor]]:
    """Each trained task's memory features and their nearest-neighbour distance scale.

    :param model: a TSN model whose trained tasks have memories (at least 2 samples each).
    """
    stats = {}
    for label in model.trained_tasks():
        memory = model.memory(label)
        if len(memory) < 2:
            raise ValueError(
                f"task {label} has fewer than 2 memory samples: the 'memory' method needs a "
                "task memory (memory_size >= 2; a tiny model keeps it with "
                "to_tiny(..., keep_memory=True), an export with export_model(..., "
                "keep_memory=True))"
            )
        device = model.task_table.samples.lengths.device
        feats = task_features(model, label, memory.to(device)).double()
        gaps = torch.cdist(feats, feats)
        off = ~torch.eye(len(feats), dtype=torch.bool, device=feats.device)
        spread = gaps[off].median()
        gaps.fill_diagonal_(math.inf)
        # A memory's typical nearest-neighbour distance; 1% of its spread keeps the scale
        # positive when many memory samples map to the same features (dead ReLUs).
        scale = gaps.min(1).values.median() + SPREAD_FLOOR * spread + 1e-12
        stats[label] = (feats, scale)
    return stats


def _check_router(model: TSNModel, labels: list[int]) -> None:
    fitted = model.task_router.fitted_tasks()
    if sorted(fitted) != sorted(labels):
        raise ValueError(
            f"the task router was fitted for tasks {sorted(fitted)}, the model has trained "
            f"tasks {sorted(labels)}: train with task_inference='router' (the router is fitted "
            "after each task), or infer with 'memory' or 'entropy'"
        )


def _widen(outputs: list[Tensor]) -> Tensor:
    width = max(o.shape[1] for o in outputs)
    return torch.stack([F.pad(o, (0, width - o.shape[1]), value=_ABSENT) for o in outputs])


@torch.no_grad()
def infer_tasks(
    model: TSNModel,
    x: Tensor,
    method: str = "entropy",
    stats: dict[int, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Each sample's inferred task and that task's output.

    :param model: the TSN model (at least one trained task).
    :param x: a minibatch.
    :param method: ``"router"``, ``"memory"`` or ``"entropy"``.
    :param stats: for ``"memory"``, :func:`memory_statistics` (computed if None).
    :return: outputs ``[n, classes]`` (classes: the widest head; a narrower head's missing
        classes get a very low logit) and the task label of each sample.
    """
    check_method(method)
    labels = model.trained_tasks()
    if not labels:
        raise ValueError("no trained task to infer")
    captured: list[Tensor] = []
    hook = None
    if method == "memory":
        stats = memory_statistics(model) if stats is None else stats
    if method == "router":
        _check_router(model, labels)
    if method != "entropy":
        hook = feature_module(model).register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].flatten(1).detach())
        )
    try:
        outputs = _widen([model(x, t) for t in labels])  # [tasks, n, classes]
    finally:
        if hook is not None:
            hook.remove()
    if method == "entropy":
        logp = torch.log_softmax(outputs.double(), dim=2)
        score = (logp.exp() * logp).sum(2)  # minus the entropy: higher is more confident
    elif method == "router":
        fitted = model.task_router.fitted_tasks()
        by_label = dict(zip(labels, captured, strict=True))
        score = model.task_router.scores([by_label[t] for t in fitted]).T  # router's order
        score = score[[fitted.index(t) for t in labels]]
        # The router's log-posterior plus each task's own confidence in its best class: its
        # head, taught by outlier exposure to be unsure on other tasks' samples, is evidence
        # too (measured: BENCHMARKS.md, "Class-incremental at equal memory").
        confidence = torch.log_softmax(outputs.double(), dim=2).max(2).values
        score = torch.log_softmax(score.double(), dim=0) + confidence
    else:
        stats = stats or {}
        scores = []
        for label, feats in zip(labels, captured, strict=True):
            memory, scale = stats[label]
            nearest = torch.cdist(feats.double(), memory.to(feats.device)).min(1).values
            scores.append(-nearest / scale.to(feats.device))
        score = torch.stack(scores)
    best = score.argmax(0)  # first task on ties
    rows = torch.arange(x.shape[0], device=outputs.device)
    tasks = torch.tensor(labels, device=outputs.device)[best]
    return outputs[best, rows], tasks
