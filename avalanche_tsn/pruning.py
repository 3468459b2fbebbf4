"""Post-training greedy pruning of a task's own weights (non-gradient fine-tuning).

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 2: layer by layer, drop the
smallest-magnitude fraction of the weights the task owns and keep the step only if the
validation accuracy stays within a threshold of the unpruned accuracy. A dropped weight leaves
the task's mask and becomes free for later tasks (the reference code keeps it in the mask, so
a later task could overwrite a weight the pruned task still reads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from avalanche_tsn.layers import FREE
from avalanche_tsn.model import TSNModel

__all__ = ["PruneRecord", "greedy_prune", "task_sparsity"]


@dataclass(frozen=True)
class PruneRecord:
    """What pruning did to one task (the paper's appendix Table 2)."""

    task: int
    sparsity_before: float
    sparsity_after: float
    own_before: int
    own_after: int
    accuracy_before: float
    accuracy_after: float


def task_sparsity(model: TSNModel, slot: int) -> float:
    """Fraction of the maskable weights that the task in ``slot`` does not read.

    :param model: the TSN model.
    :param slot: a trained task's slot.
    """
    kept = sum(int(layer.task_masks[slot].sum()) for _, layer in model.masked_layers())
    total = sum(layer.weight.numel() for _, layer in model.masked_layers())
    return 1.0 - kept / total


def _own_count(model: TSNModel, slot: int) -> int:
    return sum(int((layer.owner == slot).sum()) for _, layer in model.masked_layers())


@torch.no_grad()
def greedy_prune(
    model: TSNModel,
    task_label: int,
    evaluate: Callable[[], float],
    *,
    iterations: int,
    step: float,
    max_drop: float,
) -> PruneRecord:
    """Prune ``task_label``'s own weights greedily, layer by layer.

    :param model: the TSN model; the task must be trained (frozen).
    :param task_label: the task to prune.
    :param evaluate: validation accuracy of the model as it is.
    :param iterations: passes over the layers.
    :param step: fraction of a layer's own weights dropped per attempt, in (0, 1).
    :param max_drop: largest accepted drop below the unpruned accuracy.
    """
    slot = model.slot_of(task_label)
    if slot is None or not model.is_trained(task_label):
        raise ValueError(f"task {task_label} is not trained; prune it after training")
    sparsity_before, own_before = task_sparsity(model, slot), _own_count(model, slot)
    baseline = evaluate()
    accuracy = baseline
    for _ in range(iterations):
        kept_any = False
        for _, layer in model.masked_layers():
            own = layer.owner == slot
            n_drop = int(int(own.sum()) * step)
            if n_drop == 0:
                continue
            magnitude = layer.weight.detach().abs().masked_fill(~own, float("inf")).flatten()
            idx = torch.topk(magnitude, n_drop, largest=False).indices
            layer.task_masks[slot].view(-1)[idx] = False
            layer.owner.view(-1)[idx] = FREE
            acc = evaluate()
            if baseline - acc > max_drop:
                layer.task_masks[slot].view(-1)[idx] = True
                layer.owner.view(-1)[idx] = slot
            else:
                kept_any, accuracy = True, acc
        if not kept_any:
            break
    return PruneRecord(
        task=int(task_label),
        sparsity_before=sparsity_before,
        sparsity_after=task_sparsity(model, slot),
        own_before=own_before,
        own_after=_own_count(model, slot),
        accuracy_before=baseline,
        accuracy_after=accuracy,
    )
