"""Every use of Avalanche internals, in one place: supporting a new Avalanche is this file.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) runs inside Avalanche 0.6's strategies;
the tensor fast path reads how an Avalanche dataset nests (flat-data nodes, their indices,
children and transform groups) and swaps a loader's PyTorch-loader factory, and the stages
read minibatches and losses the way the strategy does. None of that is public API, which is
why ``avalanche-lib`` is pinned exactly. :func:`self_check` tries each use on a small
dataset, loader and strategy, and names the one that changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import avalanche
import torch
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.benchmarks.utils.classification_dataset import lookup as class_lookup
from avalanche.benchmarks.utils.data import _FlatDataWithTransform as FlatData
from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader
from avalanche.models.packnet import PackNetModule
from avalanche.training import Naive
from torch import Tensor

__all__ = [
    "FlatData",
    "MultiDatasetDataLoader",
    "PackNetModule",
    "class_lookup",
    "flat_data",
    "data_attributes",
    "transform_groups",
    "current_group",
    "node_indices",
    "node_children",
    "node_cumulative_sizes",
    "loader_pin_memory",
    "with_loader_factory",
    "has_loader_factory",
    "unpack_minibatch",
    "criterion",
    "self_check",
]


def flat_data(dataset: Any) -> FlatData | None:
    """The flat-data tree under an Avalanche dataset, or None for anything else."""
    flat = getattr(dataset, "_flat_data", None)
    return flat if isinstance(flat, FlatData) else None


def data_attributes(dataset: Any) -> dict[str, Any] | None:
    """An Avalanche dataset's data attributes by name (``targets``...), or None."""
    return getattr(dataset, "_data_attributes", None)


def transform_groups(node: FlatData) -> tuple[Any, Any]:
    """A node's frozen and regular transform groups (each may be None), in applied order."""
    return node._frozen_transform_groups, node._transform_groups


def current_group(node: FlatData) -> str:
    """The transform group a node reads in (``train``, ``eval``...)."""
    return node._transform_groups.current_group


def node_indices(node: FlatData) -> Any:
    """A node's index map into its children (None: the identity)."""
    return node._indices


def node_children(node: FlatData) -> list[Any]:
    """A node's child datasets, concatenated in order."""
    return node._datasets


def node_cumulative_sizes(node: FlatData) -> Any:
    """Where each child starts in a node's concatenation."""
    return node._cumulative_sizes


def loader_pin_memory(loader: MultiDatasetDataLoader) -> bool:
    """Whether an Avalanche loader pins memory."""
    return bool(loader.loader_kwargs.get("pin_memory", False))


_FACTORY_CLASSES: dict[type, type] = {}


def _factory_class(cls: type) -> type:
    """``cls`` with its per-epoch PyTorch loader built by the instance's ``make``."""
    if cls not in _FACTORY_CLASSES:

        def _make_pytorch_loader(self, datasets: Any, batch_sampler: Any) -> Any:
            return self.make(datasets, batch_sampler)

        _FACTORY_CLASSES[cls] = type(
            f"Gathering{cls.__name__}", (cls,), {"_make_pytorch_loader": _make_pytorch_loader}
        )
    return _FACTORY_CLASSES[cls]


def with_loader_factory(
    loader: MultiDatasetDataLoader, make: Callable[..., Any]
) -> MultiDatasetDataLoader:
    """A copy of ``loader`` (same datasets, samplers and settings, its own class kept as a base)
    whose per-epoch PyTorch loader is ``make(datasets, batch_sampler)``.

    :param loader: an Avalanche loader (left as it is).
    :param make: builds the PyTorch loader of an epoch from Avalanche's batch sampler.
    """
    gathering = copy.copy(loader)
    gathering.__class__ = _factory_class(type(loader))
    gathering.make = make
    return gathering


def has_loader_factory(loader: Any) -> bool:
    """Whether ``loader`` was made by :func:`with_loader_factory`."""
    return type(loader) in _FACTORY_CLASSES.values()


def unpack_minibatch(strategy: Any) -> None:
    """Move ``strategy.mbatch`` to the strategy's device, the strategy's own way."""
    strategy._unpack_minibatch()


def criterion(strategy: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The strategy's loss function (``criterion`` given at construction)."""
    return strategy._criterion


def self_check() -> None:
    """Try every use above on Avalanche as installed; raise naming the first that changed."""
    version = getattr(avalanche, "__version__", "?")

    def fail(what: str, err: BaseException) -> RuntimeError:
        return RuntimeError(
            f"Avalanche {version} changed {what} ({err!r}); avalanche_tsn/_avalanche.py "
            "adapts avalanche-tsn to Avalanche internals: update it for this release"
        )

    x, y = torch.randn(8, 3), torch.arange(8) % 2
    data = _make_taskaware_tensor_classification_dataset(x, y).subset([1, 2, 3])
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("the flat-data tree of a dataset", lambda: flat_data(data) or _missing()),
        ("data attributes", lambda: data_attributes(data)["targets"]),
        ("transform groups", lambda: transform_groups(flat_data(data))),
        ("the current transform group", lambda: current_group(flat_data(data))),
        ("a node's indices", lambda: node_indices(flat_data(data))),
        ("a node's children", lambda: list(node_children(flat_data(data)))),
        ("a node's cumulative sizes", lambda: list(node_cumulative_sizes(flat_data(data)))),
    ]
    for what, check in checks:
        try:
            check()
        except Exception as err:  # noqa: BLE001 -- any failure means the internals moved
            raise fail(what, err) from err
    loader = MultiDatasetDataLoader([data], [2])
    for what, name in (
        ("the loader's settings", "loader_kwargs"),
        ("the loader's PyTorch-loader factory", "_make_pytorch_loader"),
    ):
        if not hasattr(loader, name):
            raise fail(what, AttributeError(name))
    try:  # the factory is what each epoch's iteration calls
        built = with_loader_factory(loader, lambda datasets, sampler: [["probe"]])
        if next(iter(built)) != ["probe"]:
            raise AssertionError("the factory's loader was not iterated")
    except Exception as err:  # noqa: BLE001 -- any failure means the internals moved
        raise fail("how a loader builds each epoch's PyTorch loader", err) from err
    model = torch.nn.Linear(3, 2)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for what, name in (
        ("how a strategy unpacks a minibatch", "_unpack_minibatch"),
        ("where a strategy keeps its loss", "_criterion"),
    ):
        if not hasattr(strategy, name):
            raise fail(what, AttributeError(name))


def _missing() -> None:
    raise AttributeError("_flat_data")
