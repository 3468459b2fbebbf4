"""Nothing that happens after a task is learned may change or lose it (issue 9).

Each test drives one path off the happy path (a diverging later task, an exception inside
training, a rejected model, a reload, an exhausted backbone, bad arguments) and asserts that
every trained task's outputs stay ``torch.equal`` to what they were right after it was learned.
"""

from __future__ import annotations

import io
import json
import logging
import random
import struct
import zlib

import pytest
import torch
from avalanche.models import MTSimpleMLP
from avalanche.training.plugins import SupervisedPlugin
from conftest import adam_strategy, blob_stream, mlp, quiet_evaluator
from torch import nn

from avalanche_tsn import TSNModel, TSNStrategy, load_compressed
from avalanche_tsn.export import MAGIC
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.plugins import MaskLearningPlugin
from avalanche_tsn.pruning import greedy_prune
from avalanche_tsn.quantization import kmeans_1d

DIM = 12


class Fault(SupervisedPlugin):
    """Injects one fault into training when armed: a bad input, or an exception in a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None

    def before_forward(self, strategy, **kwargs):
        if self.mode in ("nan_input", "inf_input"):
            x = strategy.mbatch[0].clone()
            x[0, 0] = float("nan") if self.mode == "nan_input" else float("inf")
            strategy.mbatch[0] = x

    def after_update(self, strategy, **kwargs):
        if self.mode == "raise_after_update" and strategy.clock.train_exp_iterations >= 3:
            raise RuntimeError("plugin failure in after_update")

    def after_training_epoch(self, strategy, **kwargs):
        if self.mode == "interrupt":
            raise KeyboardInterrupt


def make(model=None, opt="sgd", lr=0.1, plugins=(), **kw) -> TSNStrategy:
    model = model if model is not None else mlp(DIM)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
        if opt == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    kw.setdefault("prune", False)
    kw.setdefault("quantize", False)
    return TSNStrategy(
        model=model,
        optimizer=optimizer,
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
        plugins=list(plugins),
        **kw,
    )


def inputs(bm) -> list[tuple[torch.Tensor, int]]:
    out = []
    for exp in bm.test_stream:
        out.append((torch.stack([exp.dataset[i][0] for i in range(20)]), exp.task_label))
    return out


@torch.no_grad()
def snapshot(model, data, labels) -> dict[int, torch.Tensor]:
    model.eval()
    return {t: model(x, t) for x, t in data if t in labels}


def assert_unchanged(model, data, recorded: dict[int, torch.Tensor], when: str) -> None:
    now = snapshot(model, data, recorded)
    for t, before in recorded.items():
        assert torch.equal(now[t], before), f"task {t} changed {when}"


def learn(strategy, exp, data, recorded) -> None:
    strategy.train(exp, eval_streams=[])
    label = exp.task_label
    recorded.update(snapshot(strategy.model, data, [label]))


# -- 1. non-finite values ----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan_data", "inf_data", "exploding_lr"])
def test_diverging_later_task_stops_with_a_clear_error_and_can_be_retrained(fault):
    bm = blob_stream(n_tasks=2, dim=DIM)
    data = inputs(bm)
    strategy = make(prune=True, quantize=True)
    exps = list(bm.train_stream)
    recorded: dict[int, torch.Tensor] = {}
    learn(strategy, exps[0], data, recorded)
    faulty = exps[1]
    if fault == "exploding_lr":
        for group in strategy.optimizer.param_groups:
            group["lr"] = 1e30
    else:  # one NaN or infinity in the later task's training data
        value = float("nan") if fault == "nan_data" else float("inf")
        faulty = list(blob_stream(n_tasks=2, dim=DIM, poison={1: value}).train_stream)[1]
    with pytest.raises(FloatingPointError, match=r"task 1: .*loss"):
        strategy.train(faulty, eval_streams=[])
    assert_unchanged(strategy.model, data, recorded, f"after {fault} in task 1")
    assert strategy.tsn_model.open_task() == 1
    # the user can retrain the task, and it learns
    for group in strategy.optimizer.param_groups:
        group["lr"] = 0.1
    learn(strategy, exps[1], data, recorded)
    assert_unchanged(strategy.model, data, {0: recorded[0]}, "after task 1 was retrained")
    acc = strategy.eval(bm.test_stream)
    assert acc["Top1_Acc_Stream/eval_phase/test_stream/Task001"] > 0.6


def first_task_learned():
    """A strategy that learned the first of two tasks: it, the stream, inputs, outputs."""
    strategy = make()
    bm = blob_stream(n_tasks=2, dim=DIM)
    data = inputs(bm)
    recorded: dict[int, torch.Tensor] = {}
    learn(strategy, list(bm.train_stream)[0], data, recorded)
    return strategy, bm, data, recorded


def test_frozen_tasks_select_their_weights_so_non_finite_live_weights_never_leak():
    strategy, bm, data, recorded = first_task_learned()
    with torch.no_grad():
        for _, layer in strategy.tsn_model.masked_layers():
            layer.weight.fill_(float("nan"))  # what a diverging later task leaves behind
            layer.bias.fill_(float("inf"))
            # free entries of a bank keep the live values when the bank is switched
            layer.bank_weights[0][layer.owner == -1] = float("nan")
    assert_unchanged(strategy.model, data, recorded, "with NaN live weights")
    for t, out in snapshot(strategy.model, data, recorded).items():
        assert torch.isfinite(out).all(), f"task {t} reads a non-finite value"


def test_writing_into_what_effective_params_returns_changes_no_trained_task():
    strategy, bm, data, recorded = first_task_learned()
    layers = [layer for _, layer in strategy.tsn_model.masked_layers()]
    for layer in layers:
        weight, bias = layer.effective_params(0)  # cached for the next forward
        weight.fill_(float("nan"))
        bias.fill_(float("nan"))
        layer.live_mask().fill_(True)
    assert_unchanged(strategy.model, data, recorded, "after writing into effective_params")
    for layer in layers:
        assert torch.isfinite(layer.task_bias[0]).all()
        assert int(layer.live_mask().sum()) == layer.live_keep
    learn(strategy, list(bm.train_stream)[1], data, recorded)
    assert_unchanged(strategy.model, data, recorded, "after a later task")


def test_end_of_task_refuses_to_freeze_non_finite_weights():
    strategy = make()
    model = strategy.tsn_model
    model.begin_task(0, 0.5)
    layer = next(layer for _, layer in model.masked_layers())
    with torch.no_grad():
        layer.weight[layer.live_mask()] = float("nan")
    with pytest.raises(FloatingPointError, match="task 0: .*weight"):
        model.end_task(0)
    assert model.trained_tasks() == [] and model.open_task() == 0
    assert all((layer.owner == -1).all() for _, layer in model.masked_layers())


def test_pruning_and_quantization_refuse_non_finite_weights_and_touch_no_other_task():
    strategy = make()
    bm = blob_stream(n_tasks=2, dim=DIM)
    strategy.train(bm.train_stream, eval_streams=[])
    model = strategy.tsn_model
    layer = next(layer for _, layer in model.masked_layers())
    owners = [layer.owner.clone() for _, layer in model.masked_layers()]
    with torch.no_grad():
        layer.bank_weights[0][layer.own_mask(1)] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        greedy_prune(model, 1, lambda: 1.0, iterations=2, step=0.5, max_drop=1.0)
    after = [layer.owner for _, layer in model.masked_layers()]
    assert all(torch.equal(a, b) for a, b in zip(owners, after, strict=True))
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d(torch.tensor([0.0, float("nan"), 1.0]), 2)


@pytest.mark.parametrize("search", ["joint", "bisect"])
def test_failed_pruning_step_puts_the_task_back(search):
    strategy = make()
    bm = blob_stream(n_tasks=2, dim=DIM)
    data = inputs(bm)
    strategy.train(bm.train_stream, eval_streams=[])
    model = strategy.tsn_model
    before = snapshot(model, data, [0, 1])
    calls = iter(range(100))

    def evaluate():
        if next(calls) == 1:  # right after the first weights were dropped
            raise RuntimeError("validation failed midway")
        return 1.0

    owners = [layer.owner.clone() for _, layer in model.masked_layers()]
    with pytest.raises(RuntimeError, match="midway"):
        greedy_prune(model, 1, evaluate, iterations=3, step=0.5, max_drop=1.0, search=search)
    after = [layer.owner for _, layer in model.masked_layers()]
    assert all(torch.equal(a, b) for a, b in zip(owners, after, strict=True))
    assert_unchanged(model, data, before, "after a pruning run that failed midway")


@pytest.mark.parametrize("search", ["joint", "layerwise", "bisect"])
def test_pruning_an_earlier_task_keeps_what_later_tasks_read(search):
    strategy = make()
    bm = blob_stream(n_tasks=2, dim=DIM)
    data = inputs(bm)
    strategy.train(bm.train_stream, eval_streams=[])
    model = strategy.tsn_model
    before = snapshot(model, data, [1])
    record = greedy_prune(
        model, 0, lambda: 1.0, iterations=3, step=0.5, max_drop=1.0, search=search
    )
    assert record.own_after < record.own_before
    for _, layer in model.masked_layers():
        # every weight task 1 reads is still owned by a trained task (frozen)
        assert (layer.owner[layer.task_mask(1)] != -1).all()
    assert_unchanged(model, data, before, "after pruning the task it shares with")


# -- 2. exceptions inside training -------------------------------------------------------


@pytest.mark.parametrize("mode", ["raise_after_update", "interrupt"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_exception_inside_training_moves_no_frozen_task(mode, opt):
    bm = blob_stream(n_tasks=3, dim=DIM)
    data = inputs(bm)
    faults = Fault()
    model = MTSimpleMLP(input_size=DIM, hidden_size=16)
    strategy = make(model, opt=opt, lr=0.1 if opt == "sgd" else 1e-2, plugins=[faults])
    exps = list(bm.train_stream)
    recorded: dict[int, torch.Tensor] = {}
    learn(strategy, exps[0], data, recorded)
    faults.mode = mode
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        strategy.train(exps[1], eval_streams=[])
    faults.mode = None
    assert_unchanged(strategy.model, data, recorded, f"after {mode}")
    # export and the capacity report work with the task left open...
    loaded = load_compressed(io.BytesIO(_export(strategy)), MTSimpleMLP(DIM, 16))
    assert_unchanged(loaded, data, recorded, "in an export made with a task open")
    assert [t.task for t in strategy.capacity_report().tasks] == [0]
    # ...and the interrupted task can be retrained, after which training goes on
    learn(strategy, exps[1], data, recorded)
    learn(strategy, exps[2], data, recorded)
    assert_unchanged(strategy.model, data, recorded, "after retraining and a later task")


class RogueSGD(torch.optim.SGD):
    """An optimizer that, besides its step, moves every parameter it holds, gradient or not."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p) * 0.01)
        return loss


def test_an_optimizer_that_moves_every_parameter_changes_no_trained_task():
    bm = blob_stream(n_tasks=3, dim=DIM)
    data = inputs(bm)
    model = MTSimpleMLP(input_size=DIM, hidden_size=16)
    strategy = TSNStrategy(
        model=model,
        optimizer=RogueSGD(model.parameters(), lr=0.05, momentum=0.9),
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
    )
    recorded: dict[int, torch.Tensor] = {}
    for exp in bm.train_stream:
        learn(strategy, exp, data, recorded)
        assert_unchanged(strategy.model, data, recorded, f"after task {exp.task_label}")


def _task_1_interrupted():
    """Task 0 learned, task 1's training interrupted; returns what the tests need."""
    bm = blob_stream(n_tasks=3, dim=DIM)
    data = inputs(bm)
    faults = Fault()
    strategy = make(plugins=[faults])
    exps = list(bm.train_stream)
    recorded: dict[int, torch.Tensor] = {}
    learn(strategy, exps[0], data, recorded)
    faults.mode = "interrupt"
    with pytest.raises(KeyboardInterrupt):
        strategy.train(exps[1], eval_streams=[])
    faults.mode = None
    return strategy, exps, data, recorded


def test_abandoning_an_interrupted_task():
    strategy, exps, data, recorded = _task_1_interrupted()
    assert strategy.abandon_task() == 1
    assert strategy.tsn_model.open_task() is None
    assert strategy.abandon_task() is None
    assert len(strategy.tsn_model.task_table) == 1
    learn(strategy, exps[2], data, recorded)  # the next task takes slot 1
    assert strategy.tsn_model.slot_of(2) == 1
    assert_unchanged(strategy.model, data, recorded, "after abandoning task 1")


def test_starting_another_task_abandons_the_interrupted_one(caplog):
    strategy, exps, data, recorded = _task_1_interrupted()
    with caplog.at_level(logging.WARNING, logger="avalanche_tsn"):
        learn(strategy, exps[2], data, recorded)
    assert "abandoning it" in caplog.text
    assert strategy.tsn_model.trained_tasks() == [0, 2]
    learn(strategy, exps[1], data, recorded)
    assert strategy.tsn_model.trained_tasks() == [0, 2, 1]
    assert_unchanged(strategy.model, data, recorded, "after tasks trained out of order")
    _ = load_compressed(io.BytesIO(_export(strategy)), mlp(DIM))


# -- 3. rejected models ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        lambda: nn.Bilinear(8, 8, 8),
        lambda: nn.EmbeddingBag(4, 8),
        lambda: nn.Embedding(4, 8, max_norm=1.0),
        lambda: nn.LSTM(8, 8),
        lambda: nn.ConvTranspose1d(8, 8, 1),
        lambda: nn.MultiheadAttention(8, 2),
    ],
    ids=[
        "bilinear",
        "embedding_bag",
        "embedding_max_norm",
        "lstm",
        "conv_transpose1d",
        "attention",
    ],
)
def test_rejected_model_is_left_untouched(bad):
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Sequential(nn.Linear(8, 8)), bad())
    types = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="TSN"):
        TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- 4. reloading ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_model",
    [lambda: MultiHeadMLP(DIM, (16, 16), 3), lambda: MTSimpleMLP(DIM, 16)],
    ids=["MultiHeadMLP", "MTSimpleMLP"],
)
def test_state_dict_loads_into_a_freshly_built_model(make_model):
    bm = blob_stream(n_tasks=3, dim=DIM)
    data = inputs(bm)
    strategy = make(make_model(), prune=True, quantize=True)
    strategy.train(bm.train_stream, eval_streams=[])
    recorded = snapshot(strategy.model, data, [0, 1, 2])
    fresh = TSNModel(make_model())
    fresh.load_state_dict(strategy.model.state_dict())
    assert fresh.trained_tasks() == [0, 1, 2]
    assert_unchanged(fresh, data, recorded, "in a freshly built model")
    assert_mixed_batches(fresh, data, recorded)
    # the reloaded model is protected too: a new strategy trains on without moving them
    bm4 = blob_stream(n_tasks=4, dim=DIM)
    later = make(fresh)
    later.train(list(bm4.train_stream)[3], eval_streams=[])
    assert_unchanged(later.model, data, recorded, "after training a task on the reloaded model")


@pytest.mark.parametrize(
    "make_model",
    [lambda: MultiHeadMLP(DIM, (16, 16), 3, bias=True), lambda: MTSimpleMLP(DIM, 16)],
    ids=["MultiHeadMLP", "MTSimpleMLP"],
)
def test_export_loads_bit_identically_whatever_the_heads_grew_to(make_model):
    bm = blob_stream(n_tasks=3, dim=DIM)
    data = inputs(bm)
    strategy = make(make_model(), prune=True, quantize=True)
    strategy.train(bm.train_stream, eval_streams=[])
    recorded = snapshot(strategy.model, data, [0, 1, 2])
    loaded = load_compressed(io.BytesIO(_export(strategy)), make_model())
    assert_unchanged(loaded, data, recorded, "in the loaded export")
    assert_mixed_batches(loaded, data, recorded)


def assert_mixed_batches(model, data, recorded) -> None:
    """A minibatch mixing every task gives each sample its task's output (up to BLAS order)."""
    x = torch.cat([inp for inp, _ in data])
    labels = torch.cat([torch.full((len(inp),), t) for inp, t in data])
    with torch.no_grad():
        mixed = model(x, labels)
    for (_, t), part in zip(data, mixed.split([len(i) for i, _ in data]), strict=True):
        width = recorded[t].shape[1]
        assert torch.allclose(part[:, :width], recorded[t], rtol=1e-5, atol=1e-6)


def _export(strategy) -> bytes:
    buf = io.BytesIO()
    strategy.export(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported_with_bias() -> bytes:
    torch.manual_seed(0)
    strategy = make(MultiHeadMLP(DIM, (16, 16), 3, bias=True), quantize=True)
    strategy.train(blob_stream(n_tasks=2, dim=DIM).train_stream, eval_streams=[])
    return _export(strategy)


def test_bias_mismatch_is_rejected_before_the_model_changes(exported_with_bias):
    model = MultiHeadMLP(DIM, (16, 16), 3, bias=False)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="bias"):
        load_compressed(io.BytesIO(exported_with_bias), model)
    assert [type(m) for m in model.modules()] == types


def _rewrite(data: bytes, edit_header=None, edit_payload=None) -> bytes:
    """The file with its header or payload edited and a valid checksum."""
    _, version, hlen = struct.unpack_from("<4sHI", data)
    start = struct.calcsize("<4sHI")
    header = json.loads(zlib.decompress(data[start : start + hlen]))
    payload = data[start + hlen : -4]
    if edit_header:
        edit_header(header)
    if edit_payload:
        payload = edit_payload(payload)
    head = zlib.compress(json.dumps(header).encode())
    body = struct.pack("<4sHI", MAGIC, version, len(head)) + head + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _set(path, value):
    def edit(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    "edit_header, edit_payload",
    [
        (_set(["banks"], _DELETE), None),
        (_set(["tasks"], []), None),
        (_set(["banks"], [0, 5]), None),
        (_set(["head_bits"], [0]), None),
        (_set(["layers", 0, "bits"], [3]), None),
        (_set(["layers", 0, "bits"], [99, 99]), None),
        (_set(["layers", 0, "name"], "nowhere"), None),
        (_set(["heads", "classifier"], {"7": {"out": 3, "weights": [], "raw": []}}), None),
        (None, lambda p: p[:-7]),
        (None, lambda p: p + b"\x00" * 9),
        (None, lambda p: b"\xff" * 12 + p[12:]),
        (None, lambda p: p[:40] + bytes(b ^ 0x5A for b in p[40:200]) + p[200:]),
    ],
)
def test_structurally_corrupt_file_with_valid_checksum_raises_value_error(
    exported_with_bias, edit_header, edit_payload
):
    data = _rewrite(exported_with_bias, edit_header, edit_payload)
    model = MultiHeadMLP(DIM, (16, 16), 3, bias=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="corrupt|does not match"):
        load_compressed(io.BytesIO(data), model)
    assert type(model.features[0]) is nn.Linear  # not even wrapped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- 5. capacity exhaustion --------------------------------------------------------------


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 3))


def test_low_free_pool_is_warned_about_and_reported(caplog):
    from avalanche_tsn.metrics import capacity_metrics

    bm = blob_stream(n_tasks=4, dim=DIM)
    strategy = make(_small_net(), sparsity=0.1)
    strategy.evaluator.metrics.extend(capacity_metrics())
    with caplog.at_level(logging.WARNING, logger="avalanche_tsn"):
        strategy.train(bm.train_stream, eval_streams=[])
    assert "few free weights" in caplog.text and "% free" in caplog.text
    report = strategy.capacity_report()
    assert set(report.free_fractions) == {"0", "2", "3"}
    assert report.min_free_fraction() < 0.05
    free = strategy.tsn_model.free_fractions()
    assert all(abs(free[n] - report.free_fractions[n][-1]) < 1e-9 for n in free)
    assert "free weights" in report.table()
    metrics = strategy.evaluator.get_last_metrics()
    assert metrics["Capacity/free_fraction_min"] == pytest.approx(report.min_free_fraction())
    assert "Capacity/FreeFraction/2" in metrics


def test_new_bank_opens_when_the_free_pool_runs_out():
    bm = blob_stream(n_tasks=4, dim=DIM)
    data = inputs(bm)
    strategy = make(_small_net(), sparsity=0.1, new_bank_below=0.05)
    recorded: dict[int, torch.Tensor] = {}
    for exp in bm.train_stream:
        learn(strategy, exp, data, recorded)
        assert_unchanged(strategy.model, data, recorded, f"after task {exp.task_label}")
    model = strategy.tsn_model
    banks = [model.bank_of(t) for t in range(4)]
    assert banks[0] == 0 and max(banks) >= 1 and banks == sorted(banks)
    assert strategy.capacity_report().banks == model.n_banks
    loaded = load_compressed(io.BytesIO(_export(strategy)), _small_net())
    assert_unchanged(loaded, data, recorded, "in the export")


# -- 6. argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"plugins": MaskLearningPlugin()}, TypeError, "plugins"),
        ({"plugins": 3}, TypeError, "plugins"),
        ({"plugins": [3]}, TypeError, "plugins"),
        ({"prune": False, "prune_step": -1}, ValueError, "prune_step"),
        ({"prune": False, "prune_iterations": 0}, ValueError, "prune_iterations"),
        ({"quantize": False, "quant_min_bits": 0}, ValueError, "quant_min_bits"),
        ({"quantize": False, "quant_max_drop": 2.0}, ValueError, "quant_max_drop"),
        ({"prune": False, "quantize": False, "validation_fraction": 5.0}, ValueError, "valid"),
        ({"new_bank_below": 1.5}, ValueError, "new_bank_below"),
        ({"task_matching": False, "kl_threshold": -1.0}, ValueError, "kl_threshold"),
    ],
)
def test_every_argument_is_checked_even_when_its_stage_is_off(kwargs, error, match):
    model = mlp(DIM)
    types = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert [type(m) for m in model.modules()] == types


# -- the whole promise under random faults -----------------------------------------------


FAULTS = [
    "nan_input",
    "inf_input",
    "exploding_lr",
    "raise_after_update",
    "interrupt",
    "checkpoint",
    "export",
]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_faults_never_change_a_learned_task(tmp_path, seed):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    rng = random.Random(seed)
    torch.manual_seed(seed)
    # every fault once, in a random order, then a few drawn at random
    schedule = rng.sample(FAULTS, len(FAULTS)) + [rng.choice(FAULTS) for _ in range(2)]
    n_tasks = len(schedule) + 1
    bm = blob_stream(n_tasks=n_tasks, dim=DIM, seed=seed)
    data = inputs(bm)
    exps = list(bm.train_stream)

    def build():
        faults = Fault()
        model = MTSimpleMLP(DIM, 16)
        return make(model, plugins=[faults], prune=True, quantize=True), faults

    strategy, faults = build()
    recorded: dict[int, torch.Tensor] = {}
    learn(strategy, exps[0], data, recorded)
    for exp, fault in zip(exps[1:], schedule, strict=True):
        if fault in ("nan_input", "inf_input", "raise_after_update", "interrupt"):
            faults.mode = fault
            with pytest.raises((FloatingPointError, RuntimeError, KeyboardInterrupt)):
                strategy.train(exp, eval_streams=[])
            faults.mode = None
        elif fault == "exploding_lr":
            for group in strategy.optimizer.param_groups:
                group["lr"] = 1e30
            with pytest.raises(FloatingPointError):
                strategy.train(exp, eval_streams=[])
            for group in strategy.optimizer.param_groups:
                group["lr"] = 0.1
        assert_unchanged(strategy.model, data, recorded, f"after {fault} in task {exp.task_label}")
        learn(strategy, exp, data, recorded)
        assert_unchanged(strategy.model, data, recorded, f"after task {exp.task_label}")
        if fault == "checkpoint":
            path = str(tmp_path / f"ckpt{exp.task_label}.pkl")
            save_checkpoint(strategy, path)
            fresh, faults = build()
            strategy, start = maybe_load_checkpoint(fresh, path)
            faults = next(p for p in strategy.plugins if isinstance(p, Fault))
            assert start == strategy.clock.train_exp_counter
            assert_unchanged(strategy.model, data, recorded, "after resuming a checkpoint")
        elif fault == "export":
            loaded = load_compressed(io.BytesIO(_export(strategy)), MTSimpleMLP(DIM, 16))
            assert_unchanged(loaded, data, recorded, "in the exported model")
    assert strategy.tsn_model.trained_tasks() == list(range(n_tasks)), schedule


def _momentum_strategy(net: nn.Module) -> TSNStrategy:
    """TSN with SGD 0.1 (momentum 0.9), minibatch 16, 2 epochs."""
    return TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
    )


class _Reads(nn.Module):
    """An MLP whose last layer runs as ``fc(h)``, or, with ``direct``, in training as a cosine
    classifier reading ``fc.weight`` itself; ``spare`` is a layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.fc = nn.Linear(16, 3)
        self.spare = nn.Linear(16, 16)
        self.direct = False
        self.method = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.method:  # the layer's forward called as a method: no hook sees it
            return self.fc.forward(h)
        if self.direct and self.training:  # evaluation calls fc: only the first step sees it
            w = nn.functional.normalize(self.fc.weight, dim=1)
            return 10 * nn.functional.linear(nn.functional.normalize(h), w)
        return self.fc(h)


# eighth session: a model reading a masked layer's weight without calling the layer trained,
# and every trained task's outputs moved with the later tasks (no error)
def test_a_weight_read_outside_its_layer_is_refused_at_the_first_step_and_changes_nothing():
    bm = blob_stream(n_tasks=3)
    net = _Reads()
    strategy = _momentum_strategy(net)
    model = strategy.tsn_model
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    strategy.train(bm.train_stream[0])  # the unused layer is no read: it trains
    with torch.no_grad():
        expected = model.eval()(x, 0)
    weight = net.fc.weight.detach().clone()
    net.direct = True
    with pytest.raises(TypeError, match=r"reads fc.weight without calling fc.*Task 1 was not"):
        strategy.train(bm.train_stream[1])
    assert net.fc.weight.grad is not None  # the backward ran, the optimizer did not step
    assert torch.equal(net.fc.weight, weight)
    net.direct = False
    with torch.no_grad():
        assert torch.equal(model.eval()(x, 0), expected)
    net.method = True  # fc.forward(h) is a call of the layer: it trains
    strategy.train(bm.train_stream[1])  # the task restarts
    strategy.train(bm.train_stream[2])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, 0), expected)


def test_a_direct_read_from_the_first_task_is_refused_too() -> None:
    net = _Reads()
    net.direct = True
    with pytest.raises(TypeError, match="reads fc.weight without calling fc"):
        TSNStrategy(
            model=net,
            optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
            train_mb_size=16,
            evaluator=quiet_evaluator(),
        ).train(blob_stream(n_tasks=1).train_stream[0])


def test_a_layer_that_did_not_run_with_zero_gradients_is_an_unused_layer() -> None:
    from avalanche_tsn.layer_calls import LayerCalls, check_direct_reads

    model = TSNModel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    model.begin_task(0, 0.5)
    model.train()
    used, unused = [layer for _, layer in model.masked_layers()]
    calls = LayerCalls(model.masked_layers())
    used.forward(torch.randn(2, 4)).sum().backward()  # a .forward() call counts too
    assert calls.ran() == [True, False]
    unused.weight.grad = torch.zeros(4, 4)  # zero_grad(set_to_none=False) keeps zeros
    check_direct_reads(calls, 0)
    unused.bias.grad = torch.ones(4)
    with pytest.raises(TypeError, match="reads 1.bias without calling 1"):
        check_direct_reads(calls, 0)


class _FunctionalNorm(nn.Module):
    """Batch normalisation computed with ``F.batch_norm`` from the module's own tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.o = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        h = nn.functional.batch_norm(
            self.a(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training
        )
        return self.o(torch.relu(h))


def test_a_normalisation_computed_from_its_tensors_is_refused_like_a_weight_read() -> None:
    net = _FunctionalNorm()
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        train_mb_size=16,
        evaluator=quiet_evaluator(),
    )
    with pytest.raises(TypeError, match="reads bn.weight without calling bn"):
        strategy.train(blob_stream(n_tasks=1).train_stream[0])


class _EvalRead(nn.Module):
    """Calls its last layer in training, but reads its weight itself in evaluation (or, with
    ``noisy``, adds noise in evaluation: a forward that is not deterministic)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.fc = nn.Linear(16, 3)
        self.read = True
        self.noisy = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.training or not self.read:
            out = self.fc(h)
            return out + torch.randn_like(out) if self.noisy and not self.training else out
        return nn.functional.linear(h, self.fc.weight, self.fc.bias)


def test_an_evaluation_branch_reading_a_weight_is_refused_before_the_next_task_opens() -> None:
    bm = blob_stream(n_tasks=3)
    net = _EvalRead()
    strategy = _momentum_strategy(net)
    model = strategy.tsn_model
    strategy.train(bm.train_stream[0])  # the first step calls fc: not seen there
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="trained task 0's outputs depend on the model's param"):
        strategy.train(bm.train_stream[1])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # parameters put back too
    assert model.open_task() is None
    net.read = False  # fixed: the layer is called in evaluation too
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = model.eval()(x, 0)
    strategy.train(bm.train_stream[1:])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, 0), expected)
    net.noisy = True  # not deterministic: passed over, not refused
    strategy.train(blob_stream(n_tasks=4).train_stream[3])
    assert model.trained_tasks() == [0, 1, 2, 3]


def test_the_evaluation_branch_read_is_refused_inside_one_train_call_over_a_stream() -> None:
    bm = blob_stream(n_tasks=3)
    strategy = adam_strategy(_EvalRead())
    with pytest.raises(TypeError, match="trained task 0's outputs depend"):
        strategy.train(bm.train_stream)  # checked before each experience, not once a call
    assert strategy.tsn_model.trained_tasks() == [0]


class _StatisticsRead(nn.Module):
    """Batch normalisation without affine terms, computed with ``F.batch_norm`` from the
    module's running statistics: no parameter is read, so no gradient shows it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16, affine=False)
        self.o = nn.Linear(16, 3)
        self.call = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bn = self.a(x), self.bn
        if self.call:
            return self.o(torch.relu(bn(h)))
        h = nn.functional.batch_norm(h, bn.running_mean, bn.running_var, training=self.training)
        return self.o(torch.relu(h))


# ninth session: the check before a task set parameters to NaN only, so a read of a per-task
# BatchNorm's live statistics went unseen, and trained tasks moved with the next task's
def test_a_read_of_the_live_statistics_is_refused_before_the_next_task_opens() -> None:
    bm = blob_stream(n_tasks=2)
    net = _StatisticsRead()
    strategy = _momentum_strategy(net)
    model = strategy.tsn_model
    strategy.train(bm.train_stream[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="trained task 0's outputs depend .* live statistics"):
        strategy.train(bm.train_stream[1])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # statistics put back too
    net.call = True  # the layer called: its task's frozen statistics, the check passes
    strategy.train(bm.train_stream[1])
    assert model.trained_tasks() == [0, 1]


class _RunningInputNorm(nn.Module):
    """An input normaliser keeping a running mean of its own (a buffer the model updates
    itself while training, when ``update`` is on); ``read`` uses it, in training and
    evaluation alike."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("steps", torch.zeros(()))  # a float counter nothing reads
        self.update = True
        self.read = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.update:
                self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.mean if self.read else x


def _normalised_mlp() -> nn.Sequential:
    return nn.Sequential(_RunningInputNorm(12), *mlp(12))


# ninth session: a running statistic the model keeps itself is not kept per task, and trained
# tasks moved as later tasks updated it
def test_a_buffer_the_model_updates_itself_is_refused_before_the_next_task() -> None:
    bm = blob_stream(n_tasks=2)
    net = _normalised_mlp()
    strategy = _momentum_strategy(net)
    model = strategy.tsn_model
    strategy.train(bm.train_stream[0])  # no trained task reads it yet: noted, not refused
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"updates itself \(0\.mean, 0\.steps\)"):
        strategy.train(bm.train_stream[1])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert model.open_task() is None


def test_the_buffers_a_model_moves_come_with_a_state_dict_an_export_and_a_rebuilt_strategy():
    bm = blob_stream(n_tasks=2)
    net = _normalised_mlp()
    strategy = _momentum_strategy(net)
    model = strategy.tsn_model
    strategy.train(bm.train_stream[0])
    assert model.task_table.moved_buffers.names() == ["0.mean", "0.steps"]
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = model.eval()(x, 0)
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    exported = load_compressed(buf, _normalised_mlp())
    fresh = TSNModel(_normalised_mlp())
    fresh.load_state_dict(model.state_dict())
    for other in (exported, fresh):  # the mean task 0 reads comes along, and what moved it
        assert other.task_table.moved_buffers.names() == ["0.mean", "0.steps"]
        with torch.no_grad():
            assert torch.equal(other.eval()(x, 0), expected)
    # each refuses the next task before it opens, as the strategy that noted them does
    for again in (_momentum_strategy(net), _momentum_strategy(fresh), _momentum_strategy(exported)):
        with pytest.raises(TypeError, match=r"updates itself \(0\.mean, 0\.steps\)"):
            again.train(bm.train_stream[1])
        assert again.tsn_model.open_task() is None


@pytest.mark.parametrize(
    "entry",
    [
        ["0.nothing", [12], "torch.float32"],
        ["0.mean", [13], "torch.float32"],
        ["0.mean", [12], "x"],
    ],
    ids=["unknown_name", "other_shape", "unknown_dtype"],
)
def test_an_export_whose_moved_buffers_are_not_the_models_is_refused(entry) -> None:
    strategy = _momentum_strategy(_normalised_mlp())
    strategy.train(blob_stream(n_tasks=1).train_stream[0])
    buf = io.BytesIO()
    strategy.export(buf)
    corrupt = _rewrite(buf.getvalue(), _set(["moved_buffers", 0], entry))
    net = _normalised_mlp()
    with pytest.raises(ValueError, match="corrupt export file"):
        load_compressed(io.BytesIO(corrupt), net)
    assert type(net[1]) is nn.Linear and not bool(net[0].mean.any())  # unchanged


def test_a_buffer_first_changed_by_a_later_task_is_put_back_and_the_task_not_kept() -> None:
    bm = blob_stream(n_tasks=3)
    net = _normalised_mlp()
    net[0].update = False  # constant while task 0 trains: nothing to note
    strategy = _momentum_strategy(net)
    model = strategy.tsn_model
    strategy.train(bm.train_stream[0])
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = model.eval()(x, 0)
    mean = net[0].mean.clone()
    net[0].update = True  # task 1 moves the mean task 0 reads
    with pytest.raises(TypeError, match=r"changed its buffers 0\.mean, 0\.steps while task 1"):
        strategy.train(bm.train_stream[1])
    assert torch.equal(net[0].mean, mean)  # put back as task 0 knew it
    with torch.no_grad():
        assert torch.equal(model.eval()(x, 0), expected)
    assert model.trained_tasks() == [0] and model.open_task() == 1
    net[0].update, net[0].read = False, False  # a buffer only training touches: no refusal
    strategy.train(bm.train_stream[1])
    strategy.train(bm.train_stream[2])
    assert model.trained_tasks() == [0, 1, 2]
    with torch.no_grad():
        assert torch.equal(model.eval()(x, 0), expected)
