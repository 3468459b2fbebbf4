"""Routing a forward to tasks: which task's parameters each row of a minibatch runs with.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 6: a sample of task ``t`` runs with
``t``'s subnetwork. :class:`avalanche_tsn.model.TSNModel` decides the route (from its task
table) and tells each routed module by a call; the modules only compute. One task group loop
serves the maskable layers, the per-task normalisation, the tiny model's coded layers and the
activation quantizers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FREE", "TaskRouted", "run_per_group"]

#: The slot of the live subnetwork (the task in training, or tasks not trained yet); also the
#: ``owner`` value of a weight that no trained task uses.
FREE = -1

#: A minibatch sorted by task: (slot or FREE, rows) per task, in order.
Groups = tuple[tuple[int, int], ...]


def run_per_group(x: Tensor, route: int | Groups, run: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``run(rows, slot)`` on each task's rows of a task-sorted minibatch, concatenated.

    :param x: the minibatch, sorted by task when ``route`` holds groups.
    :param route: one slot for every row, or (slot, rows) per task in order.
    :param run: computes the rows of one slot.
    """
    if isinstance(route, int):
        return run(x, route)
    outs, start = [], 0
    for slot, count in route:
        outs.append(run(x[start : start + count], slot))
        start += count
    return torch.cat(outs)


class TaskRouted(nn.Module):
    """A module whose forward runs each task's rows with that task's parameters.

    The route is set by the model that owns the task table, through :meth:`route` or
    :meth:`route_groups`; it is not part of the state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.route(FREE)

    def route(self, slot: int) -> None:
        """Run every row of the next forwards as the task in ``slot`` (FREE: the live one).

        :param slot: a trained task's slot, or FREE.
        """
        # object.__setattr__: a plain attribute, set on every forward, skips Module's checks
        object.__setattr__(self, "_route", slot)

    def route_groups(self, groups: Sequence[tuple[int, int]]) -> None:
        """Run a task-sorted minibatch: ``(slot or FREE, rows)`` per task, in order.

        :param groups: the tasks' slots and row counts, in the minibatch's order.
        """
        # (the model passes one tuple of int pairs to every module of a forward: kept as is)
        route = groups if isinstance(groups, tuple) else tuple((int(s), int(c)) for s, c in groups)
        object.__setattr__(self, "_route", route)

    @property
    def active_slot(self) -> int:
        """The slot of a one-task route (FREE while a mixed minibatch is routed)."""
        return self._route if isinstance(self._route, int) else FREE

    @property
    def task_groups(self) -> Groups | None:
        """The groups of a mixed-minibatch route, or None for a one-task route."""
        return None if isinstance(self._route, int) else self._route

    @property
    def routed_calls(self) -> int:
        """How many forwards this module has run (a plain count, not in the state dict)."""
        return self.__dict__.get("_routed_calls", 0)

    def run_routed(self, x: Tensor, run: Callable[[Tensor, int], Tensor]) -> Tensor:
        """``run(rows, slot)`` over the current route (see :func:`run_per_group`).

        :param x: the minibatch.
        :param run: computes the rows of one slot.
        """
        # counted in the instance dict (as the route is set): also by layer.forward(x) calls,
        # which forward hooks would miss
        attrs = self.__dict__
        attrs["_routed_calls"] = attrs.get("_routed_calls", 0) + 1
        return run_per_group(x, self._route, run)
