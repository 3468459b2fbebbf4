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

from avalanche_tsn.model import TSNModel
from avalanche_tsn.quantization import accuracy_at_least
from avalanche_tsn.validation import check_choice

__all__ = ["PruneRecord", "greedy_prune", "task_sparsity", "check_search", "SEARCHES"]


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
    #: validation passes the search made (one that stops early counts too)
    evaluations: int = 0


SEARCHES = ("joint", "layerwise", "bisect")


def check_search(value: object) -> str:
    """Validate a pruning search name.

    :param value: ``"joint"``, ``"layerwise"`` or ``"bisect"``.
    """
    return check_choice(value, "prune_search", SEARCHES)


def task_sparsity(model: TSNModel, slot: int) -> float:
    """Fraction of the maskable weights that the task in ``slot`` does not read.

    :param model: the TSN model.
    :param slot: a trained task's slot.
    """
    kept = sum(int(layer.task_mask(slot).sum()) for _, layer in model.masked_layers())
    total = sum(layer.weight.numel() for _, layer in model.masked_layers())
    return 1.0 - kept / total


def _own_count(model: TSNModel, slot: int) -> int:
    return sum(int(layer.own_mask(slot).sum()) for _, layer in model.masked_layers())


def _set_slot(layer, slot: int, idx: torch.Tensor, owned: bool) -> None:
    if owned:
        layer.reclaim(slot, idx)
    else:
        layer.release(slot, idx)


@torch.no_grad()
def greedy_prune(
    model: TSNModel,
    task_label: int,
    evaluate: Callable[[], float],
    *,
    iterations: int,
    step: float,
    max_drop: float,
    search: str = "joint",
) -> PruneRecord:
    """Prune ``task_label``'s own weights greedily, layer by layer.

    Each pass proposes to drop the smallest-magnitude ``step`` of every layer's own weights
    and keeps a drop if the validation accuracy stays within ``max_drop`` of the unpruned
    accuracy. ``search="layerwise"`` (the paper's loop) tries the layers one at a time: one
    validation pass per layer and pass. ``search="joint"`` first tries what every pass would
    drop if all were accepted, all layers at once (one pass; accepted, it ends the search
    with the most any search can drop), then what one pass fewer would, and so on down to
    one pass: the first accepted is where the passes start (the state they reach when they
    accept every layer, in one accepted validation pass instead of one each). Each pass
    then tries all layers at once and, when the drop is too large, splits them in halves and
    tries each (group testing; the layers ordered by the share of their own squared
    magnitude the drop removes, so that the likely rejected ones share halves; the first
    pass starts from the halves, its whole drop having been rejected on the way down): about
    ``2 r log(layers / r)`` tries when ``r`` layers cannot be pruned further; once most of a
    pass's layers resolved so far were rejected on their own, the rest are tried one by one
    (fewer tries than halving when most fail); a layer whose drop is rejected on its own is
    not tried again in later passes.
    ``search="bisect"`` drops the same fraction of every layer's own weights and bisects
    that fraction between none and the most the other searches can drop
    (``1 - (1 - step) ** iterations``, tried first) to a resolution of that most over
    ``2 ** iterations``: at most ``iterations + 2`` validation passes (the unpruned one
    included) whatever the backbone, but it cannot prune one layer more than another.

    Only the task's own weights that no later task reads are candidates (selected by index,
    so no value of another task can be picked); non-finite own weights raise ``ValueError``
    before anything changes.
    If anything raises midway (``evaluate`` included), the task's mask and ownership are put
    back as they were.

    :param model: the TSN model; the task must be trained (frozen).
    :param task_label: the task to prune.
    :param evaluate: validation accuracy of the model as it is; if it takes an argument it
        is given the accuracy to reach and may stop early below it.
    :param iterations: passes over the layers.
    :param step: fraction of a layer's own weights dropped per attempt, in (0, 1).
    :param max_drop: largest accepted drop below the unpruned accuracy.
    :param search: ``"joint"``, ``"layerwise"`` or ``"bisect"``.
    """
    slot = model.slot_of(task_label)
    if slot is None or not model.is_trained(task_label):
        raise ValueError(f"task {task_label} is not trained; prune it after training")
    layers = [layer for _, layer in model.masked_layers()]
    for name, layer in model.masked_layers():
        if not bool(torch.isfinite(layer.own_values(slot)).all()):
            raise ValueError(f"task {task_label} owns non-finite weights in {name}; not pruned")
    saved = [layer.slot_state(slot) for layer in layers]
    check_search(search)
    try:
        return _prune(model, task_label, slot, evaluate, iterations, step, max_drop, search)
    except BaseException:
        for layer, state in zip(layers, saved, strict=True):
            layer.restore_slot_state(slot, state)
        raise


def _candidates(model: TSNModel, layer, slot: int, later: list[int]) -> torch.Tensor:
    """Flat indices of the weights ``slot`` owns that no later task of its bank reads."""
    candidates = layer.own_mask(slot)
    for s in later:
        if layer.bank_of_slot(s) == layer.bank_of_slot(slot):
            # a weight a later task reads must stay frozen, so it stays owned
            candidates &= ~layer.task_mask(s)
    return candidates.flatten().nonzero().squeeze(1)


def _prune(model, task_label, slot, evaluate, iterations, step, max_drop, search) -> PruneRecord:
    if search == "bisect":
        return _bisect(model, task_label, slot, evaluate, iterations, step, max_drop)
    sparsity_before, own_before = task_sparsity(model, slot), _own_count(model, slot)
    later = list(range(slot + 1, len(model.task_table)))
    layers = [layer for _, layer in model.masked_layers()]
    baseline = evaluate()
    evaluations = 1
    accuracy = baseline

    def plan(layer, levels: int = 1) -> tuple[torch.Tensor, float] | None:
        # the drop of ``levels`` more accepted passes of the layer, and the share of its own
        # squared magnitude it takes (one level: ``step`` of its remaining own weights)
        own_idx = _candidates(model, layer, slot, later)
        n_drop = _most(len(own_idx), step, levels)
        if n_drop == 0:
            return None
        own = layer.bank_weights[layer.bank_of_slot(slot)].flatten()[own_idx].abs()
        pick = torch.topk(own, n_drop, largest=False).indices
        energy = own.double().square()
        return own_idx[pick], float(energy[pick].sum() / energy.sum().clamp_min(1e-30))

    def attempt(group: list, plans: dict) -> bool:
        nonlocal evaluations, accuracy
        drops = [(layer, plans[layer][0]) for layer in group if plans[layer] is not None]
        if not drops:
            return False
        for layer, idx in drops:
            _set_slot(layer, slot, idx, owned=False)
        acc = accuracy_at_least(evaluate, baseline - max_drop)
        evaluations += 1
        if baseline - acc > max_drop:
            for layer, idx in drops:
                _set_slot(layer, slot, idx, owned=True)
            return False
        accuracy = acc
        return True

    open_layers = list(layers)
    descended = search == "joint" and iterations > 1
    start = _descend(layers, plan, attempt, iterations) if descended else 0
    for p in range(start, iterations):
        kept_any = False
        if search == "layerwise":
            for layer in layers:
                kept_any |= attempt([layer], {layer: plan(layer)})
        else:
            # One plan per layer and pass: a layer's drop changes only once it is accepted,
            # and an accepted group is not tried again in the pass. Least damaging drops first
            # (the share of the layer's own squared magnitude they remove): the layers likely
            # to be rejected end up together in the later halves, so group testing splits
            # fewer groups.
            plans = {layer: plan(layer) for layer in open_layers}
            group = sorted(open_layers, key=lambda x: 0.0 if plans[x] is None else plans[x][1])
            pending = [group]
            if descended and p == start:
                # every layer at this pass's drop is the try rejected last on the way down
                half = len(group) // 2
                pending = [group[half:], group[:half]] if half else []
                open_layers = open_layers if half else []
            kept, retired = _group_test(pending, plans, attempt)
            kept_any |= kept
            # A layer whose next drop is too much is done: more of its weights would only
            # cost more accuracy (the layerwise loop tries it again every pass).
            open_layers = [layer for layer in open_layers if all(layer is not r for r in retired)]
        if not kept_any:
            break
    return _record(
        model, task_label, slot, sparsity_before, own_before, baseline, accuracy, evaluations
    )


def _group_test(pending: list[list], plans: dict, attempt: Callable) -> tuple[bool, list]:
    """One pass's group testing: whether any drop was kept, and the layers rejected alone.

    A rejected group is split in halves, the first tried first. Once most of the pass's
    layers resolved so far were rejected on their own (two at least), the rest are tried one
    by one: with more than half the layers failing, splitting costs more tries than it saves
    (Hwang's generalised binary splitting tests one by one there).
    """
    kept_any, good, retired = False, 0, []
    while pending:
        group = pending.pop()
        if attempt(group, plans):
            kept_any, good = True, good + len(group)
        elif len(group) > 1:
            half = len(group) // 2
            pending += [group[half:], group[:half]]  # the first half is tried first
        elif group:
            retired.append(group[0])
            if len(retired) >= 2 and len(retired) > good:
                order = [layer for g in reversed(pending) for layer in g]
                pending = [[layer] for layer in reversed(order)]
    return kept_any, retired


def _descend(layers: list, plan: Callable, attempt: Callable, iterations: int) -> int:
    """Passes every layer takes at once, tried from ``iterations`` down (0: not even one).

    What all the passes would drop if all were accepted is tried first (often it is: one
    pass, and the most any search can drop), then one pass fewer, and so on: the result is
    the state those passes reach when they accept every layer, in one accepted validation
    pass instead of one each (a rejected try usually stops within the split's first
    minibatch; an accepted one reads it all).
    """
    for levels in range(iterations, 0, -1):
        if attempt(layers, {layer: plan(layer, levels) for layer in layers}):
            return levels
    return 0


def _most(n: int, step: float, iterations: int) -> int:
    """Weights out of ``n`` that ``iterations`` accepted drops of ``step`` remove in all."""
    left = n
    for _ in range(iterations):
        left -= int(left * step)
    return n - left


def _record(model, task_label, slot, sparsity_before, own_before, baseline, accuracy, passes):
    return PruneRecord(
        task=int(task_label),
        sparsity_before=sparsity_before,
        sparsity_after=task_sparsity(model, slot),
        own_before=own_before,
        own_after=_own_count(model, slot),
        accuracy_before=baseline,
        accuracy_after=accuracy,
        evaluations=passes,
    )


def _bisect(model, task_label, slot, evaluate, iterations, step, max_drop) -> PruneRecord:
    sparsity_before, own_before = task_sparsity(model, slot), _own_count(model, slot)
    later = list(range(slot + 1, len(model.task_table)))
    layers = [layer for _, layer in model.masked_layers()]
    # Each layer's candidates, smallest magnitude first: a fraction f drops a prefix.
    order = []
    for layer in layers:
        idx = _candidates(model, layer, slot, later)
        values = layer.bank_weights[layer.bank_of_slot(slot)].flatten()[idx].abs()
        order.append(idx[torch.sort(values, stable=True).indices])
    baseline = evaluate()
    accuracy, passes = baseline, 1
    kept, low, high = 0.0, 0.0, 1.0 - (1.0 - step) ** iterations
    trial = high
    for _ in range(iterations + 1):
        drops = [o[int(len(o) * kept) : int(len(o) * trial)] for o in order]
        if any(len(d) for d in drops):
            for layer, idx in zip(layers, drops, strict=True):
                _set_slot(layer, slot, idx, owned=False)
            acc = accuracy_at_least(evaluate, baseline - max_drop)
            passes += 1
            if baseline - acc > max_drop:
                for layer, idx in zip(layers, drops, strict=True):
                    _set_slot(layer, slot, idx, owned=True)
                high = trial
            else:
                accuracy, kept, low = acc, trial, trial
        else:
            low = trial
        if trial == high and kept == high:
            break
        trial = (low + high) / 2
    return _record(model, task_label, slot, sparsity_before, own_before, baseline, accuracy, passes)
