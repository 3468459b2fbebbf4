"""Tensor-gathered minibatches: the same samples, order and random stream as Avalanche's."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils.data_loader import (
    SingleDatasetDataLoader,
    TaskBalancedDataLoader,
)
from avalanche.training import Naive
from avalanche.training.plugins import ReplayPlugin
from conftest import blob_stream, mlp, quiet_evaluator
from torch.utils.data import TensorDataset

from avalanche_tsn import TSNStrategy
from avalanche_tsn.batches import gather_from_tensors, tensor_batches, tensor_view
from avalanche_tsn.datasets import TensorTaskDataset
from avalanche_tsn.plugins import TensorBatchesPlugin
from avalanche_tsn.plugins._common import strategy_batches


def split_stream():
    """One dataset split by class, ids from zero per experience (a target remapping)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(120) % 6
    x = torch.randn(120, 12, generator=g) + y[:, None].float()
    yt = torch.arange(60) % 6
    xt = torch.randn(60, 12, generator=g) + yt[:, None].float()
    return nc_benchmark(
        TensorDataset(x, y),
        TensorTaskDataset(xt, yt),
        n_experiences=3,
        task_labels=True,
        shuffle=True,
        seed=3,
        class_ids_from_zero_in_each_exp=True,
    )


def _same_batches(a, b) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert len(u) == len(v)
        for p, q in zip(u, v, strict=True):
            assert p.dtype == q.dtype and torch.equal(p, q)


def _epoch(loader, fast: bool):
    torch.manual_seed(5)
    if fast:
        loader = gather_from_tensors(loader)
        assert loader is not None
    batches = [list(b) for b in loader]
    return batches, torch.rand(3)  # the random stream after the epoch


@pytest.mark.parametrize("stream", [blob_stream, split_stream])
def test_training_and_eval_loaders_match_avalanche(stream) -> None:
    bm = stream()
    for i, exp in enumerate(bm.train_stream):
        data = exp.dataset.train()
        data = data.subset(list(range(0, len(data), 2)) + list(range(1, len(data), 4)))

        def make(data=data):
            return TaskBalancedDataLoader(
                data, oversample_small_groups=True, batch_size=7, shuffle=True
            )

        slow, after_slow = _epoch(make(), False)
        fast, after_fast = _epoch(make(), True)
        _same_batches(slow, fast)
        assert torch.equal(after_slow, after_fast)
        test = bm.test_stream[i].dataset.eval()
        slow_eval = [list(b) for b in SingleDatasetDataLoader(test, batch_size=9)]
        loader = gather_from_tensors(SingleDatasetDataLoader(test, batch_size=9))
        assert loader is not None
        _same_batches(slow_eval, [list(b) for b in loader])


def test_input_transforms_keep_avalanches_loader() -> None:
    exp = blob_stream().train_stream[0]
    doubled = exp.dataset.replace_current_transform_group(lambda x: 2 * x)
    assert tensor_view(exp.dataset) is not None
    assert tensor_view(doubled) is None
    assert tensor_batches(doubled, 8) is None
    loader = SingleDatasetDataLoader(doubled, batch_size=8)
    assert gather_from_tensors(loader) is None
    x = next(iter(loader))[0]
    assert torch.equal(x, 2 * next(iter(SingleDatasetDataLoader(exp.dataset, batch_size=8)))[0])


def test_other_leaf_datasets_keep_avalanches_loader() -> None:
    class Rows(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.targets = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.targets[i]

    y = torch.arange(20) % 2
    bm = nc_benchmark(
        Rows(torch.randn(20, 4), y),
        Rows(torch.randn(20, 4), y),
        n_experiences=1,
        task_labels=True,
    )
    assert tensor_view(bm.train_stream[0].dataset) is None


def test_sequential_batches_match_a_dataloader() -> None:
    data = split_stream().train_stream[1].dataset.eval()
    from torch.utils.data import DataLoader

    slow = [list(b) for b in DataLoader(data, batch_size=5, collate_fn=data.collate_fn)]
    _same_batches(slow, list(tensor_batches(data, 5)))


def _train(strategy_factory, fast: bool):
    torch.manual_seed(0)
    bm = blob_stream(n_tasks=3)
    strategy, model = strategy_factory(fast)
    for exp in bm.train_stream:
        strategy.train(exp)
    results = strategy.eval(bm.test_stream)
    return model, results, bm


def test_tsn_results_identical_with_and_without_tensor_batches() -> None:
    def factory(fast):
        net = mlp()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        strategy = TSNStrategy(
            model=net,
            optimizer=opt,
            train_mb_size=16,
            train_epochs=2,
            sparsity=0.5,
            evaluator=quiet_evaluator(),
            tensor_batches=fast,
        )
        assert any(isinstance(p, TensorBatchesPlugin) for p in strategy.plugins) == fast
        return strategy, strategy.model

    slow_model, slow_res, bm = _train(factory, False)
    fast_model, fast_res, _ = _train(factory, True)
    assert slow_res == fast_res
    x = bm.test_stream[0].dataset.eval()[0][0][None]
    for t in range(3):
        assert torch.equal(slow_model(x, t), fast_model(x, t))


def test_replay_loader_is_served_from_tensors_identically() -> None:
    def factory(fast):
        net = mlp()
        plugins = [ReplayPlugin(mem_size=20)] + ([TensorBatchesPlugin()] if fast else [])
        strategy = Naive(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
            train_mb_size=8,
            train_epochs=1,
            plugins=plugins,
            evaluator=quiet_evaluator(),
        )
        return strategy, net

    slow_model, slow_res, _ = _train(factory, False)
    fast_model, fast_res, _ = _train(factory, True)
    assert slow_res == fast_res
    for p, q in zip(slow_model.parameters(), fast_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_validation_batches_come_from_tensors() -> None:
    bm = blob_stream()
    net = mlp()
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        evaluator=quiet_evaluator(),
    )
    strategy.mbatch = None
    data = bm.train_stream[0].dataset.eval()
    batches = list(strategy_batches(strategy, data, 10))
    assert tensor_view(data) is not None and len(batches) == -(-len(data) // 10)
    view = tensor_view(data)
    assert torch.equal(torch.cat([x for x, _ in batches]), view.x[view.rows])


def test_tensor_batches_must_be_a_bool() -> None:
    net = mlp()
    with pytest.raises(TypeError, match="tensor_batches must be a bool"):
        TSNStrategy(
            model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), tensor_batches=1
        )
