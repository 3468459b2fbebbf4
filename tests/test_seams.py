"""Where two features meet (issue 24): each behaviour a user hit, written as an invariant.

A refusal names the argument and leaves the model bit-identical; a converted model predicts
bit-identically or refuses.
"""

from __future__ import annotations

import pytest
import torch
from conftest import adam_strategy, blob_stream, mlp, quiet_evaluator, train_tsn

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


def _memory_strategy(net: torch.nn.Module, epochs: int, memory: int) -> TSNStrategy:
    """TSN with memory task inference, Adam 1e-2, minibatch 16."""
    return TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=epochs,
        task_inference="memory",
        memory_size=memory,
        evaluator=quiet_evaluator(),
    )


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
    strategy = _memory_strategy(mlp(6, 16, 4), epochs=2, memory=20)
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
    strategy = _memory_strategy(mlp(6, 32, 10), epochs=3, memory=10)
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


def _stream_with_bad_validation_row(value: float):
    from avalanche_tsn.datasets import TensorTaskDataset, task_stream

    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for task in range(2):
        centres = 2.0 * torch.randn(3, 12, generator=g)
        y = torch.arange(96) // 32  # sorted by class, as the stream orders its samples
        x = centres[y] + 0.5 * torch.randn(96, 12, generator=g)
        if task == 1:
            # the first row ValidationSplitPlugin holds out of the second experience
            held_out = torch.randperm(96, generator=torch.Generator().manual_seed(1))[0]
            x[held_out, 0] = value
        train.append(TensorTaskDataset(x, y))
        test.append(TensorTaskDataset(x[::3].clone(), y[::3]))
    return task_stream(train, test, task_labels=True)


# 6: one inf in a held-out validation row failed calibration after the task was frozen
def test_a_non_finite_calibration_row_is_refused_before_the_task_trains() -> None:
    from conftest import adam_strategy

    bm = _stream_with_bad_validation_row(float("inf"))
    strategy = adam_strategy(mlp())
    strategy.train(bm.train_stream[0], eval_streams=[])
    x = torch.randn(8, 12)
    out0 = strategy.tsn_model(x, 0)
    with pytest.raises(ValueError, match="task 1: the calibration data .* non-finite"):
        strategy.train(bm.train_stream[1], eval_streams=[])
    model = strategy.tsn_model
    assert model.trained_tasks() == [0] and not model.is_trained(1)
    assert torch.equal(model(x, 0), out0)
    # the task can be abandoned, then trained from clean data
    assert strategy.abandon_task() == 1
    clean = _stream_with_bad_validation_row(0.0)
    strategy.train(clean.train_stream[1], eval_streams=[])
    assert model.trained_tasks() == [0, 1] and torch.equal(model(x, 0), out0)
    assert strategy.quantized_accuracy(clean.test_stream[1], 8)[1] > 0.5


def _tiny_pair(make, dim: int = 12, **kwargs):
    """A trained strategy, its export, and its tiny form loaded from the export."""
    import io

    from avalanche_tsn import load_compressed

    strategy, bm = train_tsn(make(), dim=dim, **kwargs)
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    tiny = load_compressed(buf, make(), dequantize=False)
    return strategy, bm, tiny


# 1: to_tiny on a tiny model gave silently wrong outputs
def test_converting_a_tiny_model_again_is_refused_and_changes_nothing() -> None:
    from avalanche_tsn import to_tiny
    from avalanche_tsn.tiny import TinyTSN

    strategy, _, tiny = _tiny_pair(mlp)
    assert isinstance(tiny, TinyTSN)
    x = torch.randn(9, 12)
    labels = torch.arange(9) % 3
    before = [tiny(x, t) for t in range(3)], tiny(x, labels), _state(tiny)
    with pytest.raises(TypeError, match="to_tiny needs a full TSNModel"):
        to_tiny(tiny)
    assert all(torch.equal(tiny(x, t), before[0][t]) for t in range(3))
    assert torch.equal(tiny(x, labels), before[1]) and _same(_state(tiny), before[2])
    # and the tiny form predicts what the full model does
    model = strategy.tsn_model.eval()
    assert all(torch.equal(tiny(x, t), model(x, t)) for t in range(3))


# 2: compute_report on a tiny model counted 0 MACs
def test_compute_report_of_a_tiny_model_equals_the_full_models() -> None:
    from conftest import SmallConvNet

    from avalanche_tsn.compute import compute_report

    for make, dim in ((mlp, 12), (SmallConvNet, 16)):
        strategy, _, tiny = _tiny_pair(make, dim=dim)
        for bits in (None, 8):
            full = compute_report(strategy.tsn_model, (dim,), bits)
            small = compute_report(tiny, (dim,), bits)
            assert small == full and all(t.macs > 0 for t in small.tasks)


# 3: quantized activations on a tiny model ran in float, silently
def test_quantized_activations_on_a_tiny_model_match_the_full_model() -> None:
    from avalanche_tsn.activations import quantized_activations, task_accuracy

    strategy, bm, tiny = _tiny_pair(mlp)
    model = strategy.tsn_model.eval()
    x = torch.randn(9, 12)
    labels = torch.arange(9) % 3
    with quantized_activations(model, 4):
        want = [model(x, t) for t in range(3)], model(x, labels)
    with quantized_activations(tiny, 4):
        got = [tiny(x, t) for t in range(3)], tiny(x, labels)
    assert all(torch.equal(g, w) for g, w in zip(got[0], want[0], strict=True))
    assert torch.equal(got[1], want[1])
    assert not torch.equal(got[0][0], tiny(x, 0))  # 4 bits do change the outputs
    data = bm.test_stream[1].dataset.eval()
    batches = [(torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(data.targets))]
    assert task_accuracy(tiny, 1, batches, 6) == task_accuracy(model, 1, batches, 6)


# 4: training after to_tiny failed with AttributeError inside a plugin
def test_a_tiny_model_refuses_training_with_a_type_error() -> None:
    from avalanche_tsn.capacity import capacity_report

    strategy, bm, tiny = _tiny_pair(mlp)
    before = _state(tiny)
    with pytest.raises(TypeError, match="TSNStrategy needs a full TSNModel"):
        TSNStrategy(model=tiny, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))
    with pytest.raises(TypeError, match="cannot train"):
        tiny.train()
    with pytest.raises(TypeError, match="task life cycle"):
        tiny.begin_task(5, 0.5)
    with pytest.raises(TypeError, match="capacity_report needs a full TSNModel"):
        capacity_report(tiny)
    strategy.model = tiny  # a user who swaps it into a strategy
    with pytest.raises(TypeError, match="a TinyTSN cannot train"):
        strategy.train(blob_for_more_tasks(), eval_streams=[])
    assert _same(_state(tiny), before) and not tiny.training


def blob_for_more_tasks():
    from conftest import blob_stream

    return blob_stream(n_tasks=4, seed=3).train_stream[3]


# 5: task inference on a tiny single-head model raised IndexError
@pytest.mark.parametrize("method", ["memory", "entropy"])
def test_task_inference_on_a_tiny_model_matches_the_full_model(method) -> None:
    from conftest import fast_benchmark

    from avalanche_tsn import to_tiny

    bm = fast_benchmark(task_labels=False)
    net = mlp(6, 32, 10)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=2,
        task_inference=method,
        memory_size=10,
        evaluator=quiet_evaluator(),
    )
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp, eval_streams=[])
    x = torch.randn(16, 6)
    want = strategy.infer(x)
    model = strategy.tsn_model
    tiny = to_tiny(model)
    assert tiny is model and tiny.task_inference == method
    got = strategy.infer(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(tiny(x), want[0])


def _rare_class_stream():
    """504 rows, class 2 only 4 of them; a target transform relabels class 2 as class 0."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )

    from avalanche_tsn.datasets import TensorTaskDataset

    g = torch.Generator().manual_seed(0)
    y = torch.zeros(504, dtype=torch.long)
    y[250:] = 1
    y[[3, 130, 300, 480]] = 2
    x = torch.randn(504, 6, generator=g) + 3.0 * y[:, None].float()

    def merge(t):
        return 0 if int(t) == 2 else int(t)

    # a leaf the fast path reads (TensorTaskDataset): only the transform can stop it
    data = _make_taskaware_classification_dataset(
        TensorTaskDataset(x, y), task_labels=0, target_transform=merge
    )
    return benchmark_from_datasets(train=[data], test=[data]), data


# 10: the tensor fast path trained with the untransformed labels of a target transform
def test_a_target_transform_keeps_avalanches_loader() -> None:
    from avalanche_tsn.batches import tensor_batches, tensor_view

    bm, data = _rare_class_stream()
    assert tensor_view(data) is None and tensor_batches(data, 64) is None
    seen = set()

    class Targets(__import__("avalanche").core.SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):
            seen.update(strategy.mb_y.tolist())

    for fast in (True, False):
        seen.clear()
        net = mlp(6, 16, 3)
        strategy = TSNStrategy(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            train_mb_size=64,
            train_epochs=1,
            tensor_batches=fast,
            plugins=[Targets()],
            evaluator=quiet_evaluator(),
        )
        strategy.train(bm.train_stream[0], eval_streams=[])
        assert 2 not in seen and seen == {0, 1}  # the transformed labels, every batch


def test_tensor_batches_false_keeps_avalanches_loader_for_the_stages_reads() -> None:
    from avalanche_tsn.plugins._common import strategy_batches

    bm, _ = _rare_class_stream()
    data = bm.train_stream[0].dataset.eval()
    for fast in (True, False):
        net = mlp(6, 16, 3)
        strategy = TSNStrategy(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            tensor_batches=fast,
            evaluator=quiet_evaluator(),
        )
        ys = torch.cat([y for _, y in strategy_batches(strategy, data, 100)])
        assert int((ys == 2).sum()) == 0 and len(ys) == 504


# 6 (the validation rule): every argument of the strategy, a wrong type -> TypeError, a value
# out of range -> ValueError, both naming it, and the user's model is left untouched
@pytest.mark.parametrize(
    "name, wrong_type, wrong_value",
    [
        ("sparsity", "0.5", 1.0),
        ("validation_fraction", "0.1", 0.0),
        ("prune_iterations", 2.0, 0),
        ("prune_step", None, 1.0),
        ("prune_max_drop", "x", -0.1),
        ("prune_search", 3, "greedy"),
        ("quant_min_bits", 2.5, 0),
        ("quant_max_bits", "8", 17),
        ("quant_max_drop", [0.1], 1.0),
        ("quant_heads", 1, None),
        ("kl_threshold", "inf", float("nan")),
        ("memory_size", 10.0, 1),
        ("new_bank_below", "0.2", 1.0),
        ("task_matching", 0, None),
        ("calibrate_activations", "yes", None),
        ("task_inference", 1, "oracle"),
        ("tensor_batches", 1, None),
        # accepted as anything before 0.8.1 ("no" turned pruning on; 0.5 epochs failed mid-task)
        ("prune", "no", None),
        ("quantize", 0, None),
        ("train_mb_size", 8.0, 0),
        ("train_epochs", 0.5, 0),
        ("eval_mb_size", "64", 0),
        ("eval_every", None, -2),
    ],
)
def test_each_argument_refuses_a_type_with_type_error_and_a_value_with_value_error(
    name, wrong_type, wrong_value
):
    extra = {"task_matching": True} if name == "memory_size" else {}
    for value, error in ((wrong_type, TypeError), (wrong_value, ValueError)):
        if value is None and error is ValueError:
            continue  # a flag has no out-of-range value
        model = mlp()
        with pytest.raises(error, match=name):
            TSNStrategy(
                model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                evaluator=quiet_evaluator(),
                **extra,
                **{name: value},
            )
        assert type(model[0]) is torch.nn.Linear  # nothing was wrapped


def test_avalanche_class_mappings_are_checked_exactly_without_reading_every_sample(monkeypatch):
    """A class remapping (Avalanche's ``partial(lookup, mapping)``) is applied to every
    leaf target at once and compared with the stored targets; only a sample of items is read
    through ``__getitem__``. A user's target transform still has every item compared."""
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )
    from avalanche.benchmarks.utils.classification_dataset import (
        _taskaware_classification_subset as classification_subset,
    )

    from avalanche_tsn import batches
    from avalanche_tsn.datasets import TensorTaskDataset

    _, data = _rare_class_stream()
    g = torch.Generator().manual_seed(1)
    leaf = TensorTaskDataset(torch.randn(504, 6, generator=g), torch.arange(504) % 3)
    plain = _make_taskaware_classification_dataset(leaf, task_labels=0)
    mapped = classification_subset(plain, list(range(0, 504, 2)), class_mapping=[2, 0, 1])
    reads = []
    real = batches._same

    def counting(slow, fast):
        reads.append(len(slow[0]))
        return real(slow, fast)

    monkeypatch.setattr(batches, "_same", counting)
    view = batches.tensor_view(mapped)
    assert view is not None and reads == [batches._CHECKED]
    assert torch.equal(view.y, torch.tensor([[2, 0, 1][i % 3] for i in range(0, 504, 2)]))
    assert [int(mapped[i][1]) for i in range(len(mapped))] == view.y.tolist()
    reads.clear()
    assert batches.tensor_view(data) is None and reads == [504]  # the user's transform


def test_task_labels_that_are_not_integers_one_per_sample_are_refused() -> None:
    strategy, _ = train_tsn(tasks=2)
    model = strategy.model.eval()
    x = torch.randn(4, 12)
    labels = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        expected = model(x, labels)
        for bad, error in (
            (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError),  # would be truncated to ints
            (torch.tensor([True, False, True, False]), TypeError),
            (True, TypeError),
            (1.0, TypeError),
            ("0", TypeError),
            (torch.tensor([0, 1]), ValueError),  # would silently drop two samples
            (torch.zeros(4, 1, dtype=torch.long), ValueError),
        ):
            with pytest.raises(error, match="task_labels must be an int, an integer tensor"):
                model(x, bad)
        assert torch.equal(model(x, labels), expected)
        assert torch.equal(model(x, torch.tensor(1)), model(x, 1))
        assert torch.equal(model(x, labels.to(torch.int32)), expected)


def test_a_tiny_model_cast_to_double_matches_the_full_model_cast_alike() -> None:
    import copy

    from avalanche_tsn import to_tiny

    strategy, _ = train_tsn(tasks=2)
    assert any(int(b) for _, layer in strategy.tsn_model.masked_layers() for b in layer.task_bits)
    full = copy.deepcopy(strategy.tsn_model).double().eval()
    tiny = to_tiny(copy.deepcopy(strategy.tsn_model)).double().eval()
    x = torch.randn(6, 12, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        out = tiny(x, labels)
        assert out.dtype == torch.float64
        assert torch.equal(out, full(x, labels))


# 7 (this session's API fuzz): a path of the wrong type failed deep in the writer with an
# AttributeError; an empty label tensor with an empty minibatch, with "only one element tensors"
def test_export_and_load_refuse_a_path_of_the_wrong_type_before_any_work(tmp_path) -> None:
    from avalanche_tsn.export import export_model, load_compressed

    strategy, _ = train_tsn(tasks=2)
    with pytest.raises(TypeError, match="path must be a file path .* write method, got int"):
        export_model(strategy.tsn_model, 123)
    with pytest.raises(TypeError, match="path must be a file path .* write method, got int"):
        strategy.export(123)
    fresh = mlp()
    with pytest.raises(TypeError, match="path must be a file path .* read method, got list"):
        load_compressed([b"TSN"], fresh)
    assert type(fresh[0]) is torch.nn.Linear  # not wrapped
    assert export_model(strategy.tsn_model, tmp_path / "m.tsn") > 0  # a PathLike is a path


def test_an_empty_label_tensor_is_refused_naming_the_int_to_pass() -> None:
    strategy, _ = train_tsn(tasks=2)
    model = strategy.tsn_model.eval()
    assert model(torch.zeros(0, 12), 1).shape == (0, 3)
    with pytest.raises(ValueError, match="task_labels is an empty tensor.*as an int"):
        model(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long))


# 8 (eighth session): a model in another precision failed inside the first training step
# (its task already open) with a dtype mismatch or numpy's "unsupported ScalarType BFloat16",
# where Naive trains it; a model cast after a task failed at the next task alike.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_in_another_precision_is_refused_before_it_is_wrapped(dtype) -> None:
    net = mlp().to(dtype)
    before = _state(net)
    with pytest.raises(TypeError, match=rf"model parameter 0.weight is {dtype}.*model.float\(\)"):
        TSNStrategy(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            evaluator=quiet_evaluator(),
        )
    assert type(net[0]) is torch.nn.Linear  # not wrapped
    assert _same(before, _state(net))


def test_a_model_cast_after_a_task_is_refused_before_the_next_opens_and_float_resumes() -> None:
    strategy, bm = train_tsn(tasks=2)
    model = strategy.tsn_model.eval()
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = model(x, 0)
    model.double()
    state = _state(model)
    stream = blob_stream(n_tasks=3)
    with pytest.raises(TypeError, match="model parameter .* is torch.float64"):
        strategy.train(stream.train_stream[2])
    assert _same(state, _state(model))
    assert model.open_task() is None and model.trained_tasks() == [0, 1]
    assert strategy.experience is None  # refused before Avalanche's loop took the experience
    with pytest.raises(TypeError, match="is torch.float64"):  # the model's own transition too
        model.begin_task(2, 0.5)
    model.float()  # float32 -> float64 -> float32 is exact
    strategy.train(stream.train_stream[2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, 0), expected)


def test_training_under_autocast_keeps_the_stored_values_float32_and_old_tasks_bit_identical():
    stream = blob_stream(n_tasks=3)
    strategy = adam_strategy(mlp())
    model = strategy.tsn_model
    x = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(8)])
    seen = []
    for exp in stream.train_stream:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            strategy.train(exp)
        model.eval()
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(x, 0)
            seen.append((low, model(x, 0)))
    assert seen[0][0].dtype == torch.bfloat16 and seen[0][1].dtype == torch.float32
    assert all(torch.equal(a, seen[0][0]) and torch.equal(b, seen[0][1]) for a, b in seen)
    assert all(
        v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()
    )
    assert strategy.eval(stream.test_stream)  # evaluation outside autocast runs too


class _TwoNames(torch.nn.Module):
    """One hidden layer registered as ``b`` and ``c`` and called twice (weight sharing)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(12, 16)
        self.b = torch.nn.Linear(16, 16)
        if tied:  # two layers holding one weight tensor
            self.c = torch.nn.Linear(16, 16)
            self.c.weight = self.b.weight
        else:
            self.c = self.b
        self.o = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.o(torch.relu(self.c(h)))


def _predictions(model, bm) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model(torch.stack([exp.dataset[i][0] for i in range(8)]), t)
            for t, exp in enumerate(bm.test_stream)
        ]


# 9 (eighth session): a layer registered under two names was converted under the first only;
# the second kept the plain layer, which the optimizer trained, and task 0's outputs changed
def test_a_layer_registered_under_two_names_is_one_tsn_layer_everywhere(tmp_path) -> None:
    import copy

    from avalanche_tsn import to_tiny
    from avalanche_tsn.export import export_model, load_compressed
    from avalanche_tsn.model import TSNModel

    bm = blob_stream(n_tasks=3)
    net = _TwoNames()
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
    )
    assert net.c is net.b and type(net.b).__name__ == "TSNLinear"
    model = strategy.tsn_model
    seen = []
    for exp in bm.train_stream:
        strategy.train(exp)
        seen.append(_predictions(model.eval(), bm)[0])
    assert all(torch.equal(seen[0], s) for s in seen)
    assert [name for name, _ in model.masked_layers()] == ["a", "b", "o"]
    expected = _predictions(model, bm)
    export_model(model, tmp_path / "m.tsn")
    copies = [
        load_compressed(tmp_path / "m.tsn", _TwoNames()),
        load_compressed(tmp_path / "m.tsn", _TwoNames(), dequantize=False),
        to_tiny(copy.deepcopy(model)),
    ]
    fresh = TSNModel(_TwoNames())
    fresh.load_state_dict(model.state_dict())
    for other in [*copies, fresh]:
        assert other.net.c is other.net.b
        assert all(map(torch.equal, _predictions(other.eval(), bm), expected))


def test_tied_weights_of_two_layers_are_refused_before_anything_changes() -> None:
    net = _TwoNames(tied=True)
    before = _state(net)
    with pytest.raises(TypeError, match="b.weight and c.weight are one tensor .*untie them"):
        TSNStrategy(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    assert type(net.b) is torch.nn.Linear and net.c.weight is net.b.weight
    assert _same(before, _state(net))


# to_tiny of a model that is one layer left the full layer in place: it ran unrouted
def test_a_one_layer_model_converts_to_a_tiny_model_that_predicts_the_same() -> None:
    import copy

    from avalanche_tsn import to_tiny

    strategy, bm = train_tsn(model=torch.nn.Linear(12, 3), tasks=2)
    model = strategy.tsn_model.eval()
    tiny = to_tiny(copy.deepcopy(model))
    assert type(tiny.net).__name__ == "CodedLayer"
    assert all(map(torch.equal, _predictions(tiny, bm), _predictions(model, bm)))


# eighth session: weight_norm, spectral_norm and torch's pruning failed mid-task with "Trying
# to backward through the graph a second time"; hooks on a converted layer were dropped
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune", "old_weight_norm"])
def test_a_layer_whose_weight_is_computed_is_refused_before_anything_changes(kind) -> None:
    from torch.nn.utils import parametrizations, prune

    net = mlp()
    if kind == "weight_norm":
        parametrizations.weight_norm(net[0])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(net[0])
    elif kind == "prune":
        prune.l1_unstructured(net[0], "weight", 0.3)
    else:
        torch.nn.utils.weight_norm(net[0])
    before = _state(net)
    expected = "is parametrized" if kind in ("weight_norm", "spectral_norm") else "holds param"
    with pytest.raises(TypeError, match=rf"^0 \(.*Linear\) {expected}"):
        TSNStrategy(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    assert not any(type(m).__name__.startswith("TSN") for m in net.modules())
    assert _same(before, _state(net))


def test_hooks_registered_before_wrapping_run_on_the_tsn_layer_and_their_handles_remove_them():
    net = mlp()
    seen: list[tuple[int, ...]] = []
    handle = net[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    net[2].register_forward_pre_hook(lambda m, args: (args[0] * 1.0,))
    grads: list[int] = []
    net[2].register_full_backward_hook(lambda m, gi, go: grads.append(len(go)))
    bm = blob_stream(n_tasks=2)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        evaluator=quiet_evaluator(),
    )
    assert type(net[0]).__name__ == "TSNLinear"
    strategy.train(bm.train_stream[0])
    assert seen and all(shape[1:] == (16,) for shape in seen) and grads
    handle.remove()
    n = len(seen)
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = strategy.tsn_model.eval()(x, 0)
    strategy.train(bm.train_stream[1])
    assert len(seen) == n
    with torch.no_grad():
        assert torch.equal(strategy.tsn_model.eval()(x, 0), expected)


class _Doubled(torch.nn.Linear):
    """A linear layer with a forward of its own, which TSN's layer would not compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _StdConv(torch.nn.Conv2d):
    """A convolution standardising its weight in ``_conv_forward``."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean()) / (weight.std() + 1e-5)
        return super()._conv_forward(x, weight, bias)


# eighth session: a Linear subclass with a forward of its own was converted, its forward lost
@pytest.mark.parametrize("where", ["child", "root", "conv"])
def test_a_layer_subclass_computing_otherwise_is_refused_and_a_plain_subclass_converts(where):
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    from avalanche_tsn.model import TSNModel

    if where == "child":
        net, method = torch.nn.Sequential(torch.nn.Linear(12, 16), _Doubled(16, 3)), "forward"
    elif where == "root":
        net, method = _Doubled(12, 3), "forward"
    else:
        net, method = torch.nn.Sequential(_StdConv(1, 2, 3)), "_conv_forward"
    before = _state(net)
    with pytest.raises(TypeError, match=rf"overrides (Linear|Conv2d)\.{method}; TSN replaces"):
        TSNModel(net)
    assert _same(before, _state(net))
    assert not any(type(m).__name__.startswith("TSN") for m in net.modules())
    plain = torch.nn.Sequential(NonDynamicallyQuantizableLinear(12, 3))  # computes as Linear
    assert type(TSNModel(plain).net[0]).__name__ == "TSNLinear"
