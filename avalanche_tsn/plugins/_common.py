"""What the TSN plugins share: the strategy's model, its current task, its minibatches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from avalanche_tsn._avalanche import unpack_minibatch
from avalanche_tsn.batches import tensor_batches
from avalanche_tsn.distributed import is_distributed
from avalanche_tsn.distributed_training import DistributedTrainingMixin
from avalanche_tsn.model import TSNModel, require_full
from avalanche_tsn.plugins.batches import TensorBatchesPlugin
from avalanche_tsn.streams import experience_task_labels

__all__ = ["tsn_model", "current_task", "strategy_batches", "first_inputs"]


def tsn_model(strategy) -> TSNModel:
    """The strategy's :class:`TSNModel`, or a TypeError naming what it is.

    :param strategy: an Avalanche strategy.
    """
    model = strategy.model
    if not isinstance(model, TSNModel):
        raise TypeError(
            f"TSN plugins need strategy.model to be a TSNModel, got {type(model).__name__}; "
            "use TSNStrategy or wrap the model with TSNModel"
        )
    require_full(model, "training with the TSN plugins")
    if is_distributed() and not isinstance(strategy, DistributedTrainingMixin):
        raise TypeError(
            "the TSN plugins under torch.distributed need a TSN strategy (TSNStrategy, "
            f"WSNStrategy, AdaQPacknetStrategy), which keeps every rank's model the same; "
            f"got {type(strategy).__name__}"
        )
    return model


def current_task(strategy) -> int:
    """Task label of the strategy's current experience (from the experience or its data).

    :param strategy: an Avalanche strategy.
    """
    labels = experience_task_labels(strategy.experience)
    if len(labels) != 1:
        raise ValueError(f"the current experience has task labels {labels}; TSN needs one")
    return labels[0]


def strategy_batches(strategy, data, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Inputs and targets of ``data`` in minibatches, read the way the strategy reads them.

    The strategy's own ``_unpack_minibatch``, ``mb_x`` and ``mb_y`` are used, so strategies
    whose minibatches are dictionaries (or anything else) work; ``strategy.mbatch`` is put
    back afterwards.

    :param strategy: an Avalanche strategy.
    :param data: an Avalanche dataset.
    :param batch_size: samples per minibatch.
    """
    # the tensor fast path only where the strategy uses it for its own loaders too
    fast = any(isinstance(p, TensorBatchesPlugin) for p in strategy.plugins)
    # A private generator: a loader draws its seed from it, so these reads leave the global
    # random stream (and so training) the same whichever path serves them.
    loader = (tensor_batches(data, batch_size) if fast else None) or DataLoader(
        data,
        batch_size=batch_size,
        collate_fn=getattr(data, "collate_fn", None),
        generator=torch.Generator(),
    )
    saved = strategy.mbatch
    try:
        for batch in loader:
            strategy.mbatch = batch
            unpack_minibatch(strategy)
            yield strategy.mb_x, strategy.mb_y
    finally:
        strategy.mbatch = saved


def first_inputs(strategy, data, n: int) -> object | None:
    """The inputs of ``data``'s first ``n`` samples, read as :func:`strategy_batches` reads
    them (on the strategy's device), or None if ``data`` is empty.

    :param strategy: an Avalanche strategy.
    :param data: an Avalanche dataset.
    :param n: how many samples.
    """
    if len(data) == 0:
        return None
    batches = strategy_batches(strategy, data, n)
    try:
        return next(batches)[0]
    finally:
        batches.close()  # puts strategy.mbatch back now, not when the generator is collected
