"""Which optimizer parameter group each parameter TinySubNets adds belongs to.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) adds a score tensor to every maskable
layer, and each task of a multi-head model gets a new head while the trained ones are frozen
(their weights become buffers). Avalanche places a new parameter by the groups of the
parameters next to it in the module tree; with weights and biases in different groups (no
weight decay on biases) it finds no unique group for a layer's scores, and once the first
head is frozen it no longer sees which group the heads were in. Here the scores join the
group of their layer's weight, and any other new parameter the group its nearest enclosing
module's parameters were in, as remembered from every earlier experience.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

__all__ = ["record_groups", "place_new_parameters", "ParamGroupsMixin"]

#: a module path whose parameters were in several groups
MIXED = -1


def _where(optimizer: Optimizer) -> dict[int, int]:
    return {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}


def record_groups(optimizer: Optimizer, model: nn.Module, seen: dict[str, int]) -> None:
    """Remember the group of every module path whose parameters are all in one group.

    :param optimizer: the strategy's optimizer.
    :param model: the strategy's model.
    :param seen: module path -> group (or :data:`MIXED`), updated in place.
    """
    where = _where(optimizer)
    for name, p in model.named_parameters():
        group = where.get(id(p))
        if group is None:
            continue
        parts = name.split(".")
        for k in range(len(parts)):
            path = ".".join(parts[:k])
            seen[path] = group if seen.get(path, group) == group else MIXED


def place_new_parameters(optimizer: Optimizer, model: nn.Module, seen: dict[str, int]) -> list:
    """Add each parameter of ``model`` that no group holds to the group it belongs in.

    A layer's ``scores`` go where its ``weight`` is; any other parameter goes to the group of
    the nearest enclosing module path with one group (see :func:`record_groups`). A parameter
    with no such path is left to Avalanche.

    :param optimizer: the strategy's optimizer.
    :param model: the strategy's model.
    :param seen: module path -> group, as :func:`record_groups` keeps it.
    :return: the names of the parameters placed.
    """
    record_groups(optimizer, model, seen)
    where = _where(optimizer)
    placed = []
    for name, p in model.named_parameters():
        if id(p) in where:
            continue
        path, _, leaf = name.rpartition(".")
        group = None
        if leaf == "scores":
            weight = getattr(model.get_submodule(path), "weight", None)
            group = None if weight is None else where.get(id(weight))
        parts = path.split(".") if path else []
        for k in range(len(parts), -1, -1):
            if group is not None:
                break
            found = seen.get(".".join(parts[:k]))
            group = found if found is not None and found != MIXED else None
        if group is None:
            continue
        optimizer.param_groups[group]["params"].append(p)
        where[id(p)] = group
        placed.append(name)
    return placed


class ParamGroupsMixin:
    """For a strategy: before Avalanche updates the optimizer, TSN's parameters are placed."""

    optimizer: Optimizer
    model: nn.Module

    def _init_param_groups(self) -> None:
        self._groups_seen: dict[str, int] = {}

    def make_optimizer(self, **kwargs) -> None:
        """Place TSN's new parameters in their groups, then let Avalanche update the rest.

        :param kwargs: Avalanche's ``make_optimizer`` arguments.
        """
        place_new_parameters(self.optimizer, self.model, self._groups_seen)
        super().make_optimizer(**kwargs)  # type: ignore[misc]
