"""Where two features meet (issue 24): each behaviour a user hit, written as an invariant.

A refusal names the argument and leaves the model bit-identical; a converted model predicts
bit-identically or refuses.
"""

from __future__ import annotations

import pytest
import torch
from conftest import mlp, quiet_evaluator, train_tsn

from avalanche_tsn import TSNStrategy
from avalanche_tsn.validation import check_bool, check_float, check_int, check_shape


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_tsn(tasks=2)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validators_raise_type_errors_for_types_and_value_errors_for_values() -> None:
    assert check_int(3, "n", 1, 5) == 3
    for bad in (3.0, 8.5, "8", True, None):
        with pytest.raises(TypeError, match="n must be an int in 1..5"):
            check_int(bad, "n", 1, 5)
    with pytest.raises(ValueError, match="n must be an int in 1..5, got 6"):
        check_int(6, "n", 1, 5)
    assert check_float(1, "f", 0, 1) == 1.0
    with pytest.raises(ValueError, match=r"f must be a float in \(0, 1\)"):
        check_float(1.0, "f", 0, 1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match="f must be"):
        check_float(float("nan"), "f")
    with pytest.raises(TypeError, match="f must be"):
        check_float("0.5", "f")
    with pytest.raises(TypeError, match="flag must be a bool"):
        check_bool(1, "flag")
    assert check_shape(torch.Size([1, 8, 8]), "s") == (1, 8, 8)
    with pytest.raises(TypeError, match="s must be"):
        check_shape((1, 8.5, 8), "s")
    with pytest.raises(ValueError, match="s must be"):
        check_shape((), "s")


# 9: compute_report(act_bits=8.5), act_bits="8", input_shape=(1, 8.5, 8) were truncated
@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"act_bits": 8.5}, TypeError),
        ({"act_bits": "8"}, TypeError),
        ({"act_bits": True}, TypeError),
        ({"act_bits": 0}, ValueError),
        ({"input_shape": (1, 8.5)}, TypeError),
        ({"input_shape": "12"}, TypeError),
        ({"input_shape": (0,)}, ValueError),
    ],
)
def test_compute_report_refuses_what_it_would_have_truncated(trained, kwargs, error) -> None:
    strategy, _ = trained
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        strategy.compute_report(**kwargs)
    assert strategy.compute_report(act_bits=8).tasks[0].act_bits == 8


@pytest.mark.parametrize("bits", [8.5, "8", 8.0])
def test_quantized_accuracy_refuses_non_int_bits(trained, bits) -> None:
    strategy, bm = trained
    with pytest.raises(TypeError, match="act_bits"):
        strategy.quantized_accuracy(bm.test_stream, bits)


# 7: task_inference="memory" with memory_size=1 was accepted and failed after all training
@pytest.mark.parametrize("kwargs", [{"task_inference": "memory"}, {"task_matching": True}])
def test_a_single_sample_memory_is_refused_up_front(kwargs) -> None:
    net = mlp()
    before = _state(net)
    with pytest.raises(ValueError, match=r"memory_size .* must be an int >= 2, got 1"):
        TSNStrategy(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            memory_size=1,
            **kwargs,
        )
    with pytest.raises(TypeError, match="memory_size"):
        TSNStrategy(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            memory_size=2.0,
            **kwargs,
        )
    assert _same(_state(net), before)


def _ci_dataset(n: int = 240, classes: int = 4, dim: int = 6):
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    x = centres[y] + 0.5 * torch.randn(n, dim, generator=g)
    return _make_taskaware_tensor_classification_dataset(x, y)


def _builders():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.scenarios.validation_scenario import (
        benchmark_with_validation_stream,
    )

    def ci():
        return class_incremental_benchmark(
            {"train": _ci_dataset(), "test": _ci_dataset(120)}, num_experiences=2
        )

    def with_validation():
        from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

        bm = class_incremental_benchmark(
            {"train": _ci_dataset(), "test": _ci_dataset(120)}, num_experiences=2
        )
        return benchmark_with_validation_stream(bm, validation_size=0.2)

    def from_datasets():
        from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

        base = class_incremental_benchmark(
            {"train": _ci_dataset(), "test": _ci_dataset(120)}, num_experiences=2
        )
        return benchmark_from_datasets(
            train=[e.dataset for e in base.train_stream],
            test=[e.dataset for e in base.test_stream],
        )

    return {
        "class_incremental": ci,
        "with_validation": with_validation,
        "from_datasets": from_datasets,
    }


# 11: task inference failed on Avalanche 0.6's own class-incremental builders
@pytest.mark.parametrize("builder", ["class_incremental", "with_validation", "from_datasets"])
def test_task_inference_trains_on_every_avalanche_06_builder(builder) -> None:
    from avalanche_tsn.streams import relabelled

    bm = _builders()[builder]()
    first = bm.train_stream[0]
    copy = relabelled(first, 7)
    assert copy.task_labels == [7] and set(copy.dataset.targets_task_labels) == {7}
    assert set(first.dataset.targets_task_labels) == {0}  # the caller's is untouched
    assert len(copy.dataset) == len(first.dataset)
    net = mlp(6, 16, 4)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=2,
        task_inference="memory",
        memory_size=20,
        evaluator=quiet_evaluator(),
    )
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    assert strategy.tsn_model.trained_tasks() == [0, 1]
    probe = bm.test_stream[0].dataset.eval()[0][0][None]
    before = strategy.tsn_model(probe, 0)
    results = strategy.eval(bm.test_stream)
    assert any("Top1_Acc_Stream" in k for k in results)
    assert torch.equal(strategy.tsn_model(probe, 0), before)


# 8: quantized_accuracy routed a class-incremental experience by its own label 0
def test_quantized_accuracy_routes_class_incremental_experiences_by_their_slot() -> None:
    from conftest import fast_benchmark

    bm = fast_benchmark(task_labels=False)
    net = mlp(6, 32, 10)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=3,
        task_inference="memory",
        memory_size=10,
        evaluator=quiet_evaluator(),
    )
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp, eval_streams=[])
    before = _state(strategy.tsn_model)
    acc = strategy.quantized_accuracy(bm.test_stream[1], None)
    assert list(acc) == [1] and acc[1] > 0.5  # the slot trained on its classes, not slot 0
    both = strategy.quantized_accuracy(list(bm.test_stream)[:2], 8)
    assert list(both) == [0, 1] and min(both.values()) > 0.5
    with pytest.raises(ValueError, match="experience 2 holds classes"):
        strategy.quantized_accuracy(bm.test_stream[2], None)
    assert _same(_state(strategy.tsn_model), before)
