"""Validation passes that rerun only the stages a search's try changed.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) prunes and quantizes every task greedily,
with a validation pass over the same held-out samples for each try. A pruning try changes a
few layers' masks; every stage of a sequential network before the first changed one
computes, for each minibatch, what it computed in the last complete pass. A
:class:`PrefixCache` keeps each minibatch's input to the network's stages from that pass and
resumes the next pass at the first changed stage: the same operations on the same values, so
the same outputs, bit for bit, for fewer forwards.

Stages come from the backbone: an ``nn.Sequential`` is its own stages; a backbone that
declares ``staged_forward()`` (the package's models do) gives its stages and head. Any other
backbone runs whole passes, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from avalanche_tsn.model import TSNModel
from avalanche_tsn.validation import check_int

__all__ = ["PrefixCache", "staged_forward", "model_cache", "BUDGET"]

#: Bytes of stage inputs a cache keeps between passes (the earliest, largest stages go
#: first); a pass under way also holds the inputs it replaces, up to twice that.
BUDGET = 512 * 2**20

Stage = Callable[[Tensor], Tensor]


def _defined_in(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def staged_forward(net: nn.Module, task_label: int) -> tuple[list[Stage], Stage] | None:
    """``net``'s forward as stages run in order and a head, or None if it does not say.

    :param net: a backbone (a TSN model's wrapped network).
    :param task_label: the label the head is given.
    :return: ``(stages, head)`` with ``net(x, task_label)`` (or ``net(x)``) equal to
        ``head(stage_n(...stage_1(x)))``, or None.
    """
    cls = type(net)
    if _defined_in(cls, "forward") is nn.Sequential:
        return list(net), lambda h: h
    declared = getattr(net, "staged_forward", None)
    # a subclass that overrides forward without its staged form is not trusted with it
    if declared is None or _defined_in(cls, "forward") is not _defined_in(cls, "staged_forward"):
        return None
    stages, head = declared(task_label)
    return list(stages), head


def _state(stage: Stage) -> list[Tensor]:
    if not isinstance(stage, nn.Module):
        return []
    return [*stage.parameters(), *stage.buffers()]


def _version(t: object) -> int | None:
    if not isinstance(t, Tensor):  # (a stage that hands on a tuple, say: not stored)
        return None
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return None


def _intact(stored: list[tuple[Any, int | None]]) -> bool:
    return all(v is not None and _version(t) == v for t, v in stored)


def _nbytes(stored: list[tuple[Any, int | None]]) -> int:
    return sum(t.nbytes for t, _ in stored if isinstance(t, Tensor))


def _same(now: list[Tensor], then: list[Tensor]) -> bool:
    # NaN differs from itself: a stage holding one always runs again (never wrongly reused)
    return len(now) == len(then) and all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(now, then, strict=True)
    )


class PrefixCache:
    """Each minibatch's stage inputs from the last complete pass, to resume later passes.

    A pass is :meth:`begin`, :meth:`forward` for its minibatches in order, and, when it read
    them all, :meth:`commit`; a pass stopped early leaves the stored inputs as they were.
    Whatever else the stages' outputs depend on (a TSN model's route: the task whose
    subnetwork runs) must be the same for every pass, or set by ``before``.

    :param stages: the network's stages, in order.
    :param head: what turns the last stage's output into the model's output.
    :param n_batches: minibatches of a complete pass.
    :param before: called before each minibatch's forward (the model's routing, say).
    :param budget: bytes of stored inputs at most (0: every pass runs every stage).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        head: Stage,
        n_batches: int,
        before: Callable[[], None] | None = None,
        budget: int | None = None,
    ) -> None:
        self._n = check_int(n_batches, "n_batches", 1)
        self._budget = BUDGET if budget is None else check_int(budget, "budget", 0)
        self._stages = list(stages)
        self._before = before
        self._head = head
        # only a stage with state can change: inputs are stored in front of those (and in
        # front of the head, index len(stages))
        self._points = [i for i, s in enumerate(self._stages) if _state(s)]
        self._points.append(len(self._stages))
        # per point: each minibatch's input and its version when stored (a write into it,
        # by a stage or anyone else, makes the point unusable)
        self._inputs: dict[int, list[tuple[Tensor, int | None]]] = {}
        self._dropped: set[int] = set()
        # minibatches whose samples changed since their inputs were stored (see forget), and
        # the last point up to which their stored inputs were computed again since (-1: none)
        self._stale: dict[int, int] = {}
        self._snapshots: list[list[Tensor]] | None = None
        self._start = 0
        self._read = 0
        self._pending: dict[int, list[tuple[Any, int | None]]] = {}
        #: stages run by the passes so far (what a whole pass each time would multiply)
        self.stage_runs = 0

    @property
    def stored_points(self) -> list[int]:
        """The stages (``len(stages)``: the head) whose inputs are stored, in order."""
        return sorted(self._inputs)

    @property
    def held_bytes(self) -> int:
        """Bytes of stage inputs held now: stored, and gathered by the pass under way."""
        return sum(_nbytes(v) for v in (*self._inputs.values(), *self._pending.values()))

    def _first_changed(self) -> int:
        if self._snapshots is None:
            return 0
        for i, (stage, then) in enumerate(zip(self._stages, self._snapshots, strict=True)):
            if not _same(_state(stage), then):
                return i
        return len(self._stages)

    def begin(self) -> int:
        """Start a pass: it resumes at the last stored input before the first changed stage.

        :return: the stage the pass starts at.
        """
        changed = self._first_changed()
        usable = [p for p in self._inputs if p <= changed and _intact(self._inputs[p])]
        self._start = max(usable, default=0)
        self._pending = {p: [] for p in self._points if p > self._start and p not in self._dropped}
        self._read = 0
        return self._start

    def forget(self, indices: Iterable[int]) -> None:
        """The samples of minibatches ``indices`` changed: their stored inputs are not used.

        Each of them runs from its new input, its inputs stored again as passes compute them
        (those before a pass's first changed stage at once, the others when a complete pass
        is kept); the other minibatches' inputs still serve (a minibatch's stage outputs
        depend on its own samples, in their places, and the stages' state).

        :param indices: positions of the changed minibatches in a pass.
        """
        indices = set(indices)
        if any(type(i) is not int for i in indices):
            raise TypeError(f"minibatch indices must be ints, got {sorted(map(repr, indices))}")
        if any(not 0 <= i < self._n for i in indices):
            raise ValueError(f"minibatch indices must lie in [0, {self._n}), got {indices}")
        self._stale.update((i, -1) for i in indices)

    def forward(self, index: int, x: Tensor) -> Tensor:
        """The model's output for minibatch ``index`` of the pass, whose input is ``x``.

        :param index: the minibatch's position in the pass.
        :param x: its input.
        """
        if self._before is not None:
            self._before()
        self._read += 1
        valid = self._stale.get(index)
        first = self._start if valid is None else self._resume(index, min(valid, self._start))
        h = x if first == 0 else self._inputs[first][index][0]
        end = len(self._stages)
        for i in range(first, end + 1):
            if valid is not None and valid < i <= self._start and i in self._inputs:
                # stages before the pass's first changed one are as when the inputs were
                # stored: what it computes there is what a complete pass would store
                self._inputs[i][index] = (h, _version(h))
            if i in self._pending:
                self._pending[i].append((h, _version(h)))
            if i < end:
                h = self._stages[i](h)
                self.stage_runs += 1
        if valid is not None:
            self._stale[index] = max(valid, self._start)
        if self._read == 1:
            self._fit_budget()
        return self._head(h)

    def _resume(self, index: int, last: int) -> int:
        # the latest point up to ``last`` whose stored input of minibatch ``index`` is intact
        points = [p for p in self._inputs if p <= last]
        for p in sorted(points, reverse=True):
            t, v = self._inputs[p][index]
            if v is not None and _version(t) == v:
                return p
        return 0

    def _fit_budget(self) -> None:
        # From the first minibatch's sizes: the latest points that fit the budget once the
        # pass is kept are gathered, the others not at all (the copies they replace are kept
        # until then: a try that is put back resumes from them).
        held = sum(_nbytes(v) for p, v in self._inputs.items() if p not in self._pending)
        for point in sorted(self._pending, reverse=True):
            size = _nbytes(self._pending[point]) * self._n
            if held + size > self._budget:
                del self._pending[point]
                self._inputs.pop(point, None)  # (an older copy: stale once this pass commits)
                self._dropped.add(point)
            else:
                held += size

    def commit(self) -> None:
        """The pass read every minibatch: its stage inputs and the stages' state are kept."""
        if self._read != self._n:
            raise RuntimeError("commit() after a pass that did not read every minibatch")
        if self._snapshots is None:
            self._snapshots = [[] for _ in self._stages]
        for i in range(self._start, len(self._stages)):
            self._snapshots[i] = [t.detach().clone() for t in _state(self._stages[i])]
        # every minibatch was read: the changed ones are stored again up to the pass's start
        # (as they were read) and beyond it (below), as all the others
        self._stale = {}
        for point, stored in self._pending.items():
            if _intact(stored):
                self._inputs[point] = stored
            else:  # a stage wrote into its input: that input cannot be replayed
                self._inputs.pop(point, None)
                self._dropped.add(point)
        self._pending = {}
        # over the budget, the earliest points go first: they are the largest and save least
        while sum(_nbytes(v) for v in self._inputs.values()) > self._budget:
            point = min(self._inputs)
            del self._inputs[point]
            self._dropped.add(point)


def model_cache(model: nn.Module, task_label: int, n_batches: int) -> PrefixCache | None:
    """A cache for passes of a TSN ``model`` as a trained ``task_label``, or None.

    None for another model, a task not trained (its live subnetwork), or a backbone without
    stages.

    :param model: the model the passes run (a :class:`~avalanche_tsn.model.TSNModel`).
    :param task_label: the task whose subnetwork runs.
    :param n_batches: minibatches of a complete pass.
    """
    # only a trained task: its forward depends on tensors alone (the live subnetwork's also
    # on its sparsity, an int no tensor comparison sees)
    if not isinstance(model, TSNModel) or model.task_table.frozen_slot(task_label) is None:
        return None
    split = staged_forward(model.net, task_label)
    if split is None:
        return None
    stages, head = split
    # the route is the model's, set as its own forward sets it, before every minibatch
    return PrefixCache(stages, head, n_batches, before=lambda: model.route_task(task_label))
