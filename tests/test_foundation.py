"""Mask learning, weight sharing and exact zero forgetting inside Avalanche."""

from __future__ import annotations

import pytest
import torch
from avalanche.models import MTSimpleMLP
from conftest import SmallConvNet, blob_stream, mlp, normed_mlp, quiet_evaluator
from torch import nn

from avalanche_tsn import MaskLearningPlugin, TSNModel, TSNStrategy
from avalanche_tsn.layers import FREE, MaskedLayer
from avalanche_tsn.masks import keep_count

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def make_model(kind: str):
    if kind == "single_head":
        return mlp()
    if kind == "multi_head":
        return MTSimpleMLP(input_size=12, hidden_size=16)
    return SmallConvNet()


def make_strategy(model, opt="adam", sparsity=0.5, epochs=2, compress=False, **kw):
    kw.setdefault("prune", compress)
    kw.setdefault("quantize", compress)
    return TSNStrategy(
        model=model,
        optimizer=OPTIMIZERS[opt](model.parameters()),
        train_mb_size=16,
        train_epochs=epochs,
        evaluator=quiet_evaluator(),
        sparsity=sparsity,
        **kw,
    )


def outputs(strategy, stream):
    model = strategy.model.eval()
    with torch.no_grad():
        return [
            model(exp.dataset.x if hasattr(exp.dataset, "x") else _x(exp), exp.task_label)
            for exp in stream
        ]


def _x(exp):
    return torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])


@pytest.mark.parametrize("compress", [False, True], ids=["masks", "pruned_quantized"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["single_head", "multi_head", "conv_bn"])
def test_earlier_tasks_bit_identical(kind, opt, compress):
    dim = 16 if kind == "conv_bn" else 12
    bm = blob_stream(n_tasks=3, dim=dim)
    model = make_model(kind) if kind != "single_head" else mlp(dim=dim)
    strategy = make_strategy(model, opt, compress=compress)
    test = list(bm.test_stream)
    xs = [_x(e) for e in test]
    seen = []
    for i, exp in enumerate(bm.train_stream):
        strategy.train(exp, eval_streams=[])
        strategy.model.eval()
        with torch.no_grad():
            now = [strategy.model(xs[j], test[j].task_label) for j in range(i + 1)]
        for j, before in enumerate(seen):
            assert torch.equal(before, now[j]), f"task {j} changed after training task {i}"
        seen.append(now[i])
    # the tasks really learned something (so the invariance is not trivial)
    acc = strategy.eval(bm.test_stream)
    assert acc["Top1_Acc_Stream/eval_phase/test_stream/Task002"] > 0.6


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_mask_has_requested_sparsity(sparsity):
    bm = blob_stream(n_tasks=2)
    strategy = make_strategy(mlp(), sparsity=sparsity, epochs=1)
    strategy.train(bm.train_stream, eval_streams=[])
    model = strategy.tsn_model
    for _, layer in model.masked_layers():
        for slot in range(2):
            kept = int(layer.task_mask(slot).sum())
            assert kept == keep_count(layer.weight.numel(), sparsity)
            assert layer.task_mask(slot).dtype == torch.bool


def test_per_task_sparsity_and_sharing():
    bm = blob_stream(n_tasks=3)
    strategy = make_strategy(mlp(), sparsity=[0.5, 0.6, 0.7])
    strategy.train(bm.train_stream, eval_streams=[])
    model = strategy.tsn_model
    for _, layer in model.masked_layers():
        for slot, s in enumerate([0.5, 0.6, 0.7]):
            assert int(layer.task_mask(slot).sum()) == keep_count(layer.weight.numel(), s)
    shared = sum(int(layer.shared_mask(1).sum()) for _, layer in model.masked_layers())
    own1 = sum(int(layer.own_mask(1).sum()) for _, layer in model.masked_layers())
    own2 = sum(int(layer.own_mask(2).sum()) for _, layer in model.masked_layers())
    assert shared > 0, "task 1 shares no weight of task 0"
    assert own1 > 0 and own2 > 0, "later tasks train no free weight"
    for _, layer in model.masked_layers():
        # a weight is owned by the first task whose mask holds it
        first = torch.full_like(layer.owner, FREE)
        for slot in reversed(range(3)):
            first[layer.task_mask(slot)] = slot
        assert torch.equal(first, layer.owner)


def test_free_weights_selected_are_trained_and_frozen_ones_are_not():
    bm = blob_stream(n_tasks=2)
    strategy = make_strategy(mlp(), opt="sgd_momentum_wd")
    exps = list(bm.train_stream)
    strategy.train(exps[0], eval_streams=[])
    layers = [layer for _, layer in strategy.tsn_model.masked_layers()]
    before = [layer.weight.detach().clone() for layer in layers]
    strategy.train(exps[1], eval_streams=[])
    for layer, w0 in zip(layers, before, strict=True):
        owned0 = layer.owner == 0
        assert torch.equal(layer.bank_weights[0][owned0], w0[owned0])
        assert torch.equal(layer.weight[owned0], w0[owned0])  # the parameter mirrors them
        own1 = layer.owner == 1
        assert not torch.equal(layer.weight[own1], w0[own1])


@pytest.mark.parametrize("kind", ["multi_head", "conv_bn"])
def test_mixed_task_minibatch_equals_per_task(kind):
    dim = 16 if kind == "conv_bn" else 12
    bm = blob_stream(n_tasks=3, dim=dim)
    strategy = make_strategy(make_model(kind), epochs=1)
    strategy.train(bm.train_stream, eval_streams=[])
    test = list(bm.test_stream)
    xs = [_x(e)[:10] for e in test]
    labels = torch.cat([torch.full((10,), e.task_label) for e in test])
    x = torch.cat(xs)
    perm = torch.randperm(len(x))
    model = strategy.model.eval()
    x, labels = x[perm], labels[perm]
    with torch.no_grad():
        mixed = model(x, labels)
        # each sample gets its own task's subnetwork: bit for bit what a forward of that
        # task's samples (in the same order) gives
        for e in test:
            sel = labels == e.task_label
            assert torch.equal(mixed[sel], model(x[sel], e.task_label))
        # and, up to the BLAS's order-dependent rounding, what the unshuffled batches give
        per_task = torch.cat([model(xi, e.task_label) for xi, e in zip(xs, test, strict=True)])
    assert torch.allclose(mixed, per_task[perm], rtol=1e-5, atol=1e-6)


def test_untrained_task_runs_with_live_subnetwork():
    bm = blob_stream(n_tasks=2)
    strategy = make_strategy(mlp(), epochs=1)
    strategy.train(list(bm.train_stream)[0], eval_streams=[])
    model = strategy.tsn_model.eval()
    x = _x(list(bm.test_stream)[0])
    with torch.no_grad():
        out = model(x, 7)
    manual = x
    for _i, m in enumerate(model.net):
        if isinstance(m, MaskedLayer):
            manual = torch.nn.functional.linear(manual, m.weight * m.live_mask(), m.bias)
        else:
            manual = m(manual)
    assert torch.equal(out, manual)


def test_avalanche_metrics_bwt_zero_and_fwt(tmp_path):
    from avalanche.evaluation.metrics import (
        accuracy_metrics,
        bwt_metrics,
        forward_transfer_metrics,
    )
    from avalanche.training.plugins import EvaluationPlugin

    bm = blob_stream(n_tasks=3)
    ev = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        forward_transfer_metrics(experience=True, stream=True),
        loggers=[],
    )
    model = mlp()
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=2,
        evaluator=ev,
        eval_every=0,
    )
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[bm.test_stream])
    res = strategy.eval(bm.test_stream)
    assert res["StreamBWT/eval_phase/test_stream"] == 0.0
    assert "StreamForwardTransfer/eval_phase/test_stream" in res
    assert res["Top1_Acc_Stream/eval_phase/test_stream/Task002"] > 0.6


def test_heads_added_for_new_tasks_and_plugins_not_mutated():
    bm = blob_stream(n_tasks=3)
    model = MTSimpleMLP(input_size=12, hidden_size=16)
    plugins = []
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        evaluator=quiet_evaluator(),
        plugins=plugins,
    )
    strategy.train(bm.train_stream, eval_streams=[])
    assert plugins == []
    assert set(model.classifier.classifiers.keys()) == {"0", "1", "2"}
    assert strategy.model.net is model


def test_state_dict_restores_predictions():
    bm = blob_stream(n_tasks=2)
    strategy = make_strategy(mlp(), epochs=1)
    strategy.train(bm.train_stream, eval_streams=[])
    fresh = TSNModel(mlp())
    fresh.load_state_dict(strategy.model.state_dict())
    fresh.eval()
    strategy.model.eval()
    for exp in bm.test_stream:
        x = _x(exp)
        with torch.no_grad():
            assert torch.equal(fresh(x, exp.task_label), strategy.model(x, exp.task_label))
    assert fresh.trained_tasks() == [0, 1]


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    def run(ckpt, stop_after):
        torch.manual_seed(0)
        bm = blob_stream(n_tasks=3)
        model = MTSimpleMLP(input_size=12, hidden_size=16)
        strategy = make_strategy(model, opt="sgd_momentum_wd")
        strategy, start = maybe_load_checkpoint(strategy, ckpt)
        for exp in list(bm.train_stream)[start:]:
            torch.manual_seed(100 + exp.current_experience)
            strategy.train(exp, eval_streams=[])
            save_checkpoint(strategy, ckpt)
            if exp.current_experience == stop_after:
                return None
        strategy.model.eval()
        with torch.no_grad():
            return [strategy.model(_x(e), e.task_label) for e in bm.test_stream]

    full = run(str(tmp_path / "a.pkl"), stop_after=-1)
    assert run(str(tmp_path / "b.pkl"), stop_after=0) is None
    resumed = run(str(tmp_path / "b.pkl"), stop_after=-1)
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.5", [0.5, 2.0], []])
def test_bad_sparsity(bad):
    model = mlp()
    with pytest.raises((ValueError, TypeError), match="sparsity"):
        TSNStrategy(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), sparsity=bad
        )


def test_stream_without_task_labels_fails_before_training():
    bm = blob_stream(n_tasks=2, task_labels=False)
    model = mlp()
    strategy = make_strategy(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="task label"):
        strategy.train(bm.train_stream, eval_streams=[])
    assert strategy.tsn_model.trained_tasks() == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_unlabelled_stream_is_refused_before_its_first_experience_trains():
    # the usual per-experience loop: the first call already sees the whole stream
    bm = blob_stream(n_tasks=2, task_labels=False)
    strategy = make_strategy(mlp())
    state = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    with pytest.raises(ValueError, match="experience 1 of the train stream has task label 0"):
        strategy.train(list(bm.train_stream)[0], eval_streams=[])
    after = strategy.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert strategy.tsn_model.open_task() is None


def test_repeated_task_label_keeps_learned_state():
    bm = blob_stream(n_tasks=2)
    strategy = make_strategy(mlp())
    exps = list(bm.train_stream)
    strategy.train(exps[0], eval_streams=[])
    state = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    with pytest.raises(
        ValueError, match="experience 0 has task label 0, which this model has already learned"
    ):
        strategy.train(exps[0], eval_streams=[])
    after = strategy.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_too_few_sparsity_values_fails_before_training():
    bm = blob_stream(n_tasks=3)
    strategy = make_strategy(mlp(), sparsity=[0.5, 0.5])
    with pytest.raises(ValueError, match="sparsity has 2 values"):
        strategy.train(bm.train_stream, eval_streams=[])
    assert strategy.tsn_model.trained_tasks() == []


def test_model_without_maskable_layer():
    from torch import nn

    with pytest.raises(ValueError, match="no maskable layer"):
        TSNModel(nn.Sequential(nn.ReLU(), nn.Flatten()))


@pytest.mark.parametrize("layer", ["bilinear", "embedding_bag", "incremental"])
def test_unsupported_layer(layer):
    from avalanche.models import IncrementalClassifier
    from torch import nn

    extra = {
        "bilinear": nn.Bilinear(8, 8, 8),
        "embedding_bag": nn.EmbeddingBag(4, 8),
        "incremental": IncrementalClassifier(8, 2),
    }[layer]
    with pytest.raises(TypeError, match="TSN"):
        TSNModel(nn.Sequential(nn.Linear(8, 8), extra))


def test_bad_plugins_and_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="plugins"):
        TSNStrategy(model=model, optimizer=opt, plugins=[object()])
    with pytest.raises(ValueError, match="both"):
        TSNStrategy(model=model, optimizer=opt, plugins=[MaskLearningPlugin(0.3)], sparsity=0.2)
    with pytest.raises(TypeError, match="optimizer"):
        TSNStrategy(model=model, optimizer="sgd")
    with pytest.raises(TypeError):
        TSNStrategy(mlp(), opt)  # keyword-only


@pytest.mark.parametrize(
    "make_model",
    [lambda: mlp(12), SmallConvNet, lambda: SmallConvNet(group_norm=True), normed_mlp],
    ids=["mlp", "conv_bn", "conv_gn", "mlp_ln"],
)
def test_wrapping_keeps_every_buffer_on_the_model_device(make_model):
    # A model wrapped where it lives (a GPU, here the meta device) gets its task buffers there
    # too: buffers made on the default device broke training and loading on CUDA.
    model = TSNModel(make_model().to("meta"))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_batchnorm_without_parameters_or_statistics_is_wrapped_where_the_model_is():
    def net():
        return nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8, affine=False, track_running_stats=False)
        )

    model = TSNModel(net().to("meta"))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    trained = TSNModel(net())
    trained.begin_task(0, 0.5)
    trained.train()
    assert trained(torch.randn(5, 4), 0).shape == (5, 8)
