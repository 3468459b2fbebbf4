"""Minibatches gathered from whole tensors, for Avalanche datasets that hold tensors.

Avalanche reads a minibatch one sample at a time (``__getitem__`` through every nesting level
of the dataset, then ``collate``): on small models this is most of a continual-learning run
(issue 15 measured 50-56% on permuted Fashion-MNIST). When a dataset's inputs are rows of
tensors with no input transform, a minibatch is ``x[rows[indices]]`` and its targets and
task labels come from the dataset's own attributes; this module finds that form, checks it
against the slow path, and serves Avalanche's loaders with it. Avalanche's samplers still
choose the indices (so the samples, their order and the random stream are those of the
loader it replaces); only the fetch changes. Anything else (input transforms, other leaf
datasets, extra fields) keeps Avalanche's loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.utils.transforms import TupleTransform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from avalanche_tsn._avalanche import (
    FlatData,
    MultiDatasetDataLoader,
    class_lookup,
    current_group,
    data_attributes,
    flat_data,
    has_loader_factory,
    loader_pin_memory,
    node_children,
    node_cumulative_sizes,
    node_indices,
    transform_groups,
    with_loader_factory,
)
from avalanche_tsn.datasets import TensorTaskDataset

__all__ = ["TensorView", "tensor_view", "tensor_batches", "gather_from_tensors"]

logger = logging.getLogger(__name__)

#: samples compared with Avalanche's own ``__getitem__`` before a view is trusted
_CHECKED = 16


@dataclass(frozen=True)
class TensorView:
    """A dataset as tensors: sample ``i`` is ``(x[rows[i]], y[i], t[i])``."""

    x: Tensor
    rows: Tensor
    y: Tensor
    t: Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, indices: Tensor) -> list[Tensor]:
        """The minibatch of ``indices``, as Avalanche's default collate would build it.

        :param indices: sample indices (int64).
        """
        return [
            _take(self.x, _take(self.rows, indices)),
            _take(self.y, indices),
            _take(self.t, indices),
        ]


def _take(values: Tensor, indices: Tensor) -> Tensor:
    """``values[indices]`` along the first dimension (``indices`` non-negative).

    ``index_select``, not ``values[indices]``: advanced indexing costs about 3x more on the
    CPU (128 rows of 784 floats: 32 us against 10 us, more from a cold cache).
    """
    return torch.index_select(values, 0, indices.to(values.device))


def _input_untouched(transforms: Any) -> bool:
    """True if a transform group leaves the input (element 0) as it is."""
    if transforms is None:
        return True
    return isinstance(transforms, TupleTransform) and (
        not transforms.transforms or transforms.transforms[0] is None
    )


def _target_maps(transforms: Any) -> list[Sequence[int]] | None:
    """The class mappings a transform group applies to targets, or None if it does more.

    ``[]``: targets and task labels untouched; ``[m]``: Avalanche's class remapping
    (``partial(lookup, m)`` on the target, as its benchmarks build it); None: any other
    transform of the target or of a later field (the user's ``target_transform``).
    """
    if transforms is None or all(t is None for t in transforms.transforms[1:]):
        return []
    target, *rest = transforms.transforms[1:]
    if any(t is not None for t in rest):
        return None
    if (
        isinstance(target, partial)
        and target.func is class_lookup
        and len(target.args) == 1
        and not target.keywords
        and isinstance(target.args[0], list | tuple)
    ):
        return [target.args[0]]
    return None


def _group_transforms(groups: Any, group: str) -> Any:
    """The transform ``groups`` apply in ``group`` (Avalanche's ``DefaultTransformGroups``
    keep theirs as a defaultdict's default, which ``get`` does not see)."""
    if groups is None:
        return None
    table = groups.transform_groups
    if group in table:
        return table[group]
    factory = getattr(table, "default_factory", None)
    return factory() if factory is not None else None


def _leaf_targets(leaf: Any) -> Tensor:
    return leaf.targets if type(leaf) is TensorTaskDataset else leaf.tensors[1]


def _leaf_tensor(leaf: Any) -> Tensor | None:
    if type(leaf) is TensorTaskDataset:
        return leaf.x
    if type(leaf) is TensorDataset and len(leaf.tensors) == 2:
        return leaf.tensors[0]
    return None


def _resolve(
    node: Any, idx: np.ndarray, pos: np.ndarray, group: str, out: list, maps: tuple = ()
) -> bool:
    """Map ``node``'s samples ``idx`` (at ``pos`` in the dataset) to (leaf tensor, leaf rows,
    positions, leaf targets, class mappings in the order they apply) pieces in ``out``; False
    if some level is not a tensor read. A level that transforms targets otherwise than by a
    class mapping adds ``None`` to ``out``."""
    if not isinstance(node, FlatData):
        return False
    own: list[Sequence[int]] = []
    # a level applies its frozen group, then its group, to what its children give
    for groups in transform_groups(node):
        transforms = _group_transforms(groups, group)
        if not _input_untouched(transforms):
            return False
        level = _target_maps(transforms)
        if level is None:
            out.append(None)
        else:
            own += level
    maps = (*own, *maps)
    indices = node_indices(node)
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)[idx]
    children = node_children(node)
    if len(children) == 1:
        which = np.zeros(len(idx), dtype=np.int64)
    else:
        cumulative = np.asarray(node_cumulative_sizes(node), dtype=np.int64)
        which = np.searchsorted(cumulative, idx, side="right")
        idx = idx - np.concatenate([[0], cumulative])[which]
    for k in np.unique(which):
        pick = which == k
        child = children[int(k)]
        if isinstance(child, FlatData):
            if not _resolve(child, idx[pick], pos[pick], group, out, maps):
                return False
        else:
            x = _leaf_tensor(child)
            if x is None:
                return False
            out.append((x, idx[pick], pos[pick], _leaf_targets(child), maps))
    return True


def _mapped_targets(pieces: list, n: int) -> Tensor | None:
    """Every sample's target as Avalanche's ``__getitem__`` makes it: each leaf's target
    through the class mappings above it; None if one cannot be computed so."""
    out = torch.empty(n, dtype=torch.long)
    try:
        for _, rows, at, targets, maps in pieces:
            t = torch.as_tensor(targets)[torch.from_numpy(rows)]
            for mapping in maps:
                t = torch.as_tensor(mapping)[t]
            out[torch.from_numpy(at)] = t
    except (IndexError, TypeError, RuntimeError, ValueError):
        return None
    return out


def _fields(dataset: Any) -> tuple[Tensor, Tensor] | None:
    """Targets and task labels, if they are the only fields Avalanche adds to a sample."""
    attributes = data_attributes(dataset)
    if attributes is None:
        return None
    in_item = [name for name, a in attributes.items() if a.use_in_getitem]
    if in_item != ["targets_task_labels"] or "targets" not in attributes:
        return None
    return (
        torch.as_tensor(list(dataset.targets), dtype=torch.long),
        torch.as_tensor(list(dataset.targets_task_labels), dtype=torch.long),
    )


def _same(a: Sequence[Any], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(
        isinstance(u, Tensor) and u.dtype == v.dtype and torch.equal(u, v)
        for u, v in zip(a, b, strict=False)
    )


def tensor_view(dataset: Any) -> TensorView | None:
    """The :class:`TensorView` of an Avalanche dataset, or None if it has none.

    A view exists when every leaf dataset is a :class:`TensorTaskDataset` or a two-tensor
    ``TensorDataset`` and no level transforms inputs in the dataset's current group. Its
    targets are the dataset's stored ``targets``: where levels remap classes the way
    Avalanche's benchmarks do (``partial(lookup, mapping)``), every leaf target is mapped
    (vectorised) and must equal the stored one; a view is then checked against Avalanche's
    collated ``__getitem__`` (dtypes included) on some samples spread over the dataset, or on
    every sample when a level transforms targets any other way (a user's
    ``target_transform``, which the stored targets need not follow).

    :param dataset: an Avalanche dataset.
    """
    flat = flat_data(dataset)
    if flat is None or len(dataset) == 0:
        return None
    fields = _fields(dataset)
    if fields is None:
        return None
    n = len(dataset)
    pieces: list = []
    try:
        everything = np.arange(n)
        ok = _resolve(flat, everything, everything, current_group(flat), pieces)
    except (AttributeError, IndexError, TypeError, ValueError):
        ok = False  # another Avalanche layout: the slow path stays
    # A target transform other than Avalanche's class mapping (the user's) may or may not be
    # reflected in the stored ``targets`` the view serves: every sample is compared then.
    targets_transformed = any(p is None for p in pieces)
    pieces = [p for p in pieces if p is not None]
    if not ok or not pieces:
        return None
    tensors = list({id(x): x for x, *_ in pieces}.values())
    if len(tensors) == 1:
        x, base = tensors[0], {id(tensors[0]): 0}
    else:
        if len({(t.shape[1:], t.dtype, t.device) for t in tensors}) != 1:
            return None
        x = torch.cat(tensors)
        starts = np.cumsum([0] + [len(t) for t in tensors[:-1]])
        base = {id(t): int(s) for t, s in zip(tensors, starts, strict=True)}
    rows = np.empty(n, dtype=np.int64)
    for leaf, leaf_rows, at, *_ in pieces:
        rows[at] = leaf_rows + base[id(leaf)]
    view = TensorView(x, torch.from_numpy(rows), *fields)
    if not targets_transformed:
        # class mappings: every target is computed (vectorised) and must be the stored one
        mapped = _mapped_targets(pieces, n)
        targets_transformed = mapped is None or not torch.equal(mapped, view.y)
    probe = (
        np.arange(n)
        if targets_transformed
        else np.unique(np.linspace(0, n - 1, _CHECKED).astype(np.int64))
    )
    collate = getattr(dataset, "collate_fn", None) or default_collate
    slow = collate([dataset[int(i)] for i in probe])
    if not _same(slow, view.gather(torch.from_numpy(probe))):
        logger.debug("tensor view of %s differs from its samples: Avalanche's loader kept", dataset)
        return None
    return view


class _Gathered(Dataset):
    """Concatenated views, fetched a whole minibatch at a time (``__getitems__``)."""

    def __init__(self, views: list[TensorView]) -> None:
        self.views = views
        self.starts = torch.tensor(np.cumsum([0] + [len(v) for v in views]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> list[Tensor]:
        return [part[0] for part in self.__getitems__([i])]

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if len(self.views) == 1:
            return self.views[0].gather(idx)
        which = torch.searchsorted(self.starts, idx, right=True) - 1
        parts = []
        for k in which.unique().tolist():
            pick = which == k
            parts.append((pick, self.views[k].gather(idx[pick] - self.starts[k])))
        out = [torch.empty((len(idx),) + p.shape[1:], dtype=p.dtype) for p in parts[0][1]]
        for pick, fields in parts:
            for o, f in zip(out, fields, strict=True):
                o[pick] = f
        return out


def _as_is(batch: list[Tensor]) -> list[Tensor]:
    return batch


def tensor_batches(dataset: Any, batch_size: int) -> Iterator[list[Tensor]] | None:
    """Sequential minibatches of a tensor-backed dataset (None if it has no view).

    The same minibatches as ``DataLoader(dataset, batch_size)`` with the dataset's collate.

    :param dataset: an Avalanche dataset.
    :param batch_size: samples per minibatch.
    """
    view = tensor_view(dataset)
    if view is None:
        return None
    order = torch.arange(len(view))
    return (view.gather(order[i : i + batch_size]) for i in range(0, len(view), batch_size))


def gather_from_tensors(loader: Any) -> Any:
    """An Avalanche loader that fetches tensor-backed datasets by indexing whole tensors.

    Works on Avalanche's ``MultiDatasetDataLoader`` family (the training, evaluation and
    replay loaders): a copy of ``loader`` (left as it is) with its samplers, so it yields the
    same samples in the same order. Datasets without a :class:`TensorView` keep Avalanche's
    fetch.

    :param loader: the strategy's ``dataloader``.
    :return: the gathering loader (``loader`` itself if it gathers already), or None.
    """
    # (an FFCV-ready loader never calls the PyTorch builder replaced here)
    if has_loader_factory(loader):
        return loader
    if not isinstance(loader, MultiDatasetDataLoader):
        return None
    views = [tensor_view(d) for d in loader.datasets]
    if any(v is None for v in views):
        return None
    pin = loader_pin_memory(loader)

    def make(datasets: list, batch_sampler: Any) -> DataLoader:
        # The batch sampler is Avalanche's; one dataset fetch per minibatch replaces
        # per-sample reads and collate (no workers: indexing a tensor needs none).
        return DataLoader(
            _Gathered(views), batch_sampler=batch_sampler, collate_fn=_as_is, pin_memory=pin
        )

    return with_loader_factory(loader, make)
