"""Long runs on real data (Fashion-MNIST from Debian's dataset-fashion-mnist): ``pytest -m slow``.

They are left out of the default suite; each skips when the data is not on this machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_tsn import TSNStrategy, load_compressed
from avalanche_tsn.datasets import permuted_fashion_mnist, split_fashion_mnist
from avalanche_tsn.models import MultiHeadMLP

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (FASHION / "train-images-idx3-ubyte.gz").exists(),
        reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
    ),
]


def _run(benchmark, tasks: int, n_classes: int) -> tuple[TSNStrategy, dict]:
    torch.manual_seed(0)
    model = MultiHeadMLP(784, (100, 100), n_classes=n_classes)
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_mb_size=128,
        train_epochs=1,
        eval_mb_size=1024,
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            loggers=[],
        ),
        eval_every=0,
    )
    for exp in list(benchmark.train_stream)[:tasks]:
        strategy.train(exp, eval_streams=[benchmark.test_stream[:tasks]])
    return strategy, strategy.eval(benchmark.test_stream[:tasks])


def _check_export(strategy, benchmark, tasks, n_classes):
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    loaded = load_compressed(buf, MultiHeadMLP(784, (100, 100), n_classes=n_classes))
    live = strategy.model.eval()
    with torch.no_grad():
        for t in range(tasks):
            x = torch.stack([benchmark.test_stream[t].dataset[i][0] for i in range(256)])
            assert torch.equal(loaded(x, t), live(x, t))


def test_permuted_fashion_mnist_full_pipeline():
    tasks = 5
    bm = permuted_fashion_mnist(tasks, seed=0)
    strategy, res = _run(bm, tasks, 10)
    accs = [
        res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"] for t in range(tasks)
    ]
    assert res["StreamBWT/eval_phase/test_stream"] == 0.0
    assert min(accs) > 0.7, accs
    assert strategy.capacity_report().percent < 40.0
    _check_export(strategy, bm, tasks, 10)


def test_split_fashion_mnist_full_pipeline():
    tasks = 5
    bm = split_fashion_mnist(seed=0)
    strategy, res = _run(bm, tasks, 2)
    accs = [
        res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"] for t in range(tasks)
    ]
    assert res["StreamBWT/eval_phase/test_stream"] == 0.0
    assert min(accs) > 0.8, accs
    _check_export(strategy, bm, tasks, 2)
