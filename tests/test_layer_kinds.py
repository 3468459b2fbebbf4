"""Convolutions over one and three spatial dimensions (sensor and audio signals, volumes and
clips), LayerNorm and GroupNorm, embedding tables of token ids: kept per task, compressed,
exported and run tiny as ``nn.Conv2d`` and BatchNorm are."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from avalanche.core import SupervisedPlugin
from conftest import (
    Signal1d,
    TextConv,
    TokenBag,
    Volume3d,
    blob_stream,
    quiet_evaluator,
    token_stream,
)
from torch import nn

from avalanche_tsn import TSNStrategy
from avalanche_tsn.compute import compute_report
from avalanche_tsn.export import load_compressed
from avalanche_tsn.layers import (
    FREE,
    TaskAffineNorm,
    TaskBatchNorm,
    TaskPReLU,
    TSNConv1d,
    TSNConv3d,
    TSNEmbedding,
)
from avalanche_tsn.model import TSNModel
from avalanche_tsn.tiny import CodedLayer, to_tiny

KINDS = {"conv1d": (Signal1d, TSNConv1d, 3), "conv3d": (Volume3d, TSNConv3d, 2)}


def _train_recording(
    net: nn.Module, optimizer: torch.optim.Optimizer, epochs: int, bm=None
) -> tuple:
    """Three tasks (of ``bm``, default: blobs) trained with TSN's defaults (pruning,
    quantization); the strategy, the test inputs and each task's outputs on them, recorded
    the moment it was learned."""
    bm = blob_stream(n_tasks=3, dim=16) if bm is None else bm
    strategy = TSNStrategy(
        model=net,
        optimizer=optimizer,
        train_mb_size=16,
        train_epochs=epochs,
        evaluator=quiet_evaluator(),
    )
    x = torch.stack([d[i][0] for d in (e.dataset for e in bm.test_stream) for i in range(len(d))])
    learned = []
    for t, exp in enumerate(bm.train_stream):
        strategy.train(exp)
        with torch.no_grad():
            learned.append(strategy.model.eval()(x, t))
    return strategy, x, learned


def _other_forms(strategy, make) -> dict[str, nn.Module]:
    """The trained model in every other form it can take: a state dict loaded into a fresh
    model, the compact export loaded (dequantized and coded), and the tiny model."""
    buf = io.BytesIO()
    strategy.export(buf)
    fresh = TSNModel(make())
    fresh.load_state_dict(strategy.tsn_model.state_dict())
    forms: dict[str, nn.Module] = {"state_dict": fresh.eval()}
    for dequantize in (True, False):
        buf.seek(0)
        forms[f"export_{dequantize}"] = load_compressed(buf, make(), dequantize=dequantize)
    forms["tiny"] = to_tiny(copy.deepcopy(strategy.tsn_model))
    return forms


def _assert_predicts(model: nn.Module, x: torch.Tensor, learned: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, outputs in enumerate(learned):
            assert torch.equal(model(x, t), outputs)


@pytest.fixture(scope="module", params=sorted(KINDS))
def trained(request):
    """A model of each convolution kind, trained by :func:`_train_recording`."""
    make, _, _ = KINDS[request.param]
    torch.manual_seed(0)
    net = make()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return request.param, *_train_recording(net, optimizer, 8)


def test_the_convolutions_are_masked_and_their_norms_kept_per_task(trained) -> None:
    kind, strategy, _, _ = trained
    _, masked, n_conv = KINDS[kind]
    layers = [m for m in strategy.model.modules() if isinstance(m, masked)]
    assert len(layers) == n_conv
    # the user's layer kind: tools that look for nn.Conv1d / nn.Conv3d find them
    base = {"conv1d": nn.Conv1d, "conv3d": nn.Conv3d}[kind]
    assert all(isinstance(m, base) for m in layers)
    assert any(isinstance(m, TaskBatchNorm) for m in strategy.model.modules())
    # each task reads a subnetwork (sparsity 0.5 by default), pruned and quantized
    for layer in layers:
        for slot in range(3):
            assert 0 < int(layer.task_mask(slot).sum()) < layer.weight.numel()


def test_every_trained_task_is_bit_identical_after_the_later_ones(trained) -> None:
    _, strategy, x, learned = trained
    _assert_predicts(strategy.model.eval(), x, learned)


def test_each_task_reads_at_most_two_to_the_bits_values_a_layer(trained) -> None:
    kind, strategy, _, _ = trained
    _, masked, _ = KINDS[kind]
    for layer in (m for m in strategy.model.modules() if isinstance(m, masked)):
        for slot in range(3):
            bits = int(layer.task_bits[slot])
            assert bits > 0  # quantized (TSN's default)
            assert len(torch.unique(layer.own_values(slot))) <= 2**bits


def test_export_load_tiny_model_and_state_dict_predict_bit_for_bit_the_same(trained) -> None:
    kind, strategy, x, learned = trained
    make, _, n_conv = KINDS[kind]
    forms = _other_forms(strategy, make)
    for name in ("export_False", "tiny"):  # the coded forms run the convolutions themselves
        coded = [m for m in forms[name].modules() if isinstance(m, CodedLayer)]
        assert sum(m.conv is not None for m in coded) == n_conv
    for model in forms.values():
        _assert_predicts(model, x, learned)


def test_macs_count_every_output_position_of_a_convolution(trained) -> None:
    kind, strategy, _, _ = trained
    _, masked, _ = KINDS[kind]
    report = compute_report(strategy.tsn_model, (16,))
    names = {n for n, m in strategy.model.net.named_modules() if isinstance(m, masked)}
    rows = [r for r in report.tasks[0].layers if r.name in names]
    assert len(rows) == len(names)
    for row in rows:
        layer = strategy.model.net.get_submodule(row.name)
        # positions: L (1-d) or D x H x W (3-d) of the layer's output for one sample
        spatial = {"conv1d": {"features.0": 8, "features.3": 8, "features.6": 4}}.get(
            kind, {"features.0": 16, "features.3": 16}
        )
        assert row.positions == spatial[row.name]
        assert row.dense_macs == row.positions * layer.weight.numel()
        assert 0 < row.macs < row.dense_macs


@pytest.mark.parametrize(
    "lazy",
    [
        lambda: nn.LazyLinear(3),
        lambda: nn.LazyConv1d(3, 1),
        lambda: nn.LazyConv2d(3, 1),
        lambda: nn.LazyConv3d(3, 1),
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d"],
)
def test_a_lazy_layer_is_refused_naming_the_forward_that_gives_it_a_shape(lazy) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(lazy()))
    with pytest.raises(TypeError, match=r"1\.0 \(Lazy.*run one forward"):
        TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(model[0], nn.Linear) and type(model[0]) is nn.Linear
    with pytest.raises(TypeError, match=r"model \(Lazy.*run one forward"):
        TSNStrategy(model=lazy(), optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))]))


def test_a_lazy_layer_after_one_forward_is_masked_as_its_kind() -> None:
    model = nn.Sequential(nn.LazyConv1d(4, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 2, 8))
    strategy = TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(strategy.model.net[0], TSNConv1d)


# -- LayerNorm and GroupNorm: affine terms per task ---------------------------------------


class NormedMLP(nn.Module):
    """LayerNorm with and without a bias between the linear layers."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 16),
            nn.LayerNorm(16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.LayerNorm(16, bias=False),
            nn.ReLU(),
            nn.Linear(16, out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GroupNormedConv(nn.Module):
    """GroupNorm with affine terms, and one without (which has nothing to keep per task)."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.GroupNorm(groups, 4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.GroupNorm(1, 4, affine=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 4, 4)).flatten(1))


NORMED = {"layernorm": (NormedMLP, 2), "groupnorm": (GroupNormedConv, 1)}


@pytest.fixture(scope="module", params=sorted(NORMED))
def normed(request):
    """A model of each normalisation kind, trained by :func:`_train_recording`."""
    make, _ = NORMED[request.param]
    torch.manual_seed(0)
    net = make()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    return request.param, *_train_recording(net, optimizer, 4)


def test_each_task_freezes_its_own_affine_terms_and_stays_bit_identical(normed) -> None:
    kind, strategy, x, learned = normed
    norms = [m for m in strategy.model.modules() if isinstance(m, TaskAffineNorm)]
    assert len(norms) == NORMED[kind][1]
    # a GroupNorm without affine terms learns nothing: it stays the user's layer
    plain = [m for m in strategy.model.modules() if type(m) in (nn.LayerNorm, nn.GroupNorm)]
    assert len(plain) == (1 if kind == "groupnorm" else 0)
    for norm in norms:
        assert norm.task_weight.shape[0] == 3
        # each task learned its own terms (AdamW's decay and the updates move the live ones)
        assert not torch.equal(norm.task_weight[0], norm.task_weight[2])
    assert any(n.task_bias is None for n in norms) == (kind == "layernorm")
    _assert_predicts(strategy.model.eval(), x, learned)


def test_export_tiny_and_state_dict_of_affine_norms_predict_the_same(normed) -> None:
    kind, strategy, x, learned = normed
    for model in _other_forms(strategy, NORMED[kind][0]).values():
        _assert_predicts(model, x, learned)


def test_the_capacity_report_counts_each_tasks_affine_terms(normed) -> None:
    kind, strategy, _, _ = normed
    layers = [layer for _, layer in strategy.tsn_model.masked_layers()]
    biases = sum(layer.bias.numel() for layer in layers if layer.bias is not None)
    # LayerNorm(16) weight and bias, LayerNorm(16, bias=False) weight; GroupNorm(2, 4) both
    terms = {"layernorm": 16 * 2 + 16, "groupnorm": 4 * 2}[kind]
    for row in strategy.capacity_report().tasks:
        assert row.norm_bits == 32 * (biases + terms)


def test_an_export_loaded_into_another_normalisation_is_refused(normed) -> None:
    kind, strategy, _, _ = normed
    buf = io.BytesIO()
    strategy.export(buf)
    if kind == "groupnorm":
        other: nn.Module = GroupNormedConv(groups=1)  # the same shapes, another grouping
    else:
        other = NormedMLP()
        other.net[1] = nn.BatchNorm1d(16)  # the same channels, another kind
    buf.seek(0)
    with pytest.raises(ValueError, match="its norms differ"):
        load_compressed(buf, other)


# -- Embedding: token ids looked up in a masked table --------------------------------------

EMBEDDED = {"tokens": TokenBag, "textconv": TextConv}


@pytest.fixture(scope="module", params=sorted(EMBEDDED))
def embedded(request):
    """A bag-of-embeddings MLP and a TextCNN, trained by :func:`_train_recording` on token ids."""
    torch.manual_seed(0)
    net = EMBEDDED[request.param]()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    return request.param, *_train_recording(net, optimizer, 6, token_stream())


def test_each_task_reads_its_own_quantized_subnetwork_of_the_embedding_table(embedded) -> None:
    kind, strategy, x, learned = embedded
    (table,) = [m for m in strategy.model.modules() if isinstance(m, TSNEmbedding)]
    assert isinstance(table, nn.Embedding)  # tools that look for one find it
    assert table.padding_idx == (0 if kind == "tokens" else None)
    for slot in range(3):
        assert 0 < int(table.task_mask(slot).sum()) < table.weight.numel()
        bits = int(table.task_bits[slot])
        assert bits > 0 and len(torch.unique(table.own_values(slot))) <= 2**bits
    _assert_predicts(strategy.model.eval(), x, learned)
    labels = torch.arange(3).repeat_interleave(len(x))
    with torch.no_grad():  # a minibatch that mixes the tasks
        mixed = strategy.model(x.repeat(3, 1), labels)
    assert torch.equal(mixed, torch.cat(learned))


def test_export_tiny_and_state_dict_of_an_embedding_model_predict_the_same(embedded) -> None:
    kind, strategy, x, learned = embedded
    forms = _other_forms(strategy, EMBEDDED[kind])
    for name in ("export_False", "tiny"):  # the coded forms look the ids up themselves
        coded = [m for m in forms[name].modules() if isinstance(m, CodedLayer)]
        assert [m.lookup for m in coded].count(True) == 1
    for model in forms.values():
        _assert_predicts(model, x, learned)


def test_the_compute_report_probes_token_ids_and_counts_no_lookup(embedded) -> None:
    kind, strategy, _, _ = embedded
    report = compute_report(strategy.tsn_model, (10,))
    tiny = compute_report(to_tiny(copy.deepcopy(strategy.tsn_model)), (10,))
    rows = report.tasks[0].layers
    # a lookup multiplies nothing: only the layers after it are counted
    expected = {
        "tokens": {"mlp.0": 8 * 16, "mlp.2": 16 * 3},
        "textconv": {"conv.0": 10 * 8 * 8 * 3, "head": 8 * 3},
    }[kind]
    assert {r.name: r.dense_macs for r in rows} == expected
    assert [r.macs for r in tiny.tasks[0].layers] == [r.macs for r in rows]


@pytest.mark.parametrize(
    "option, what",
    [({"max_norm": 1.0}, "max_norm=1.0: it renormalises"), ({"sparse": True}, "sparse=True")],
)
def test_an_embedding_that_writes_its_table_or_has_sparse_gradients_is_refused(option, what):
    model = nn.Sequential(nn.Embedding(10, 4, **option), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match=rf"^0 \(Embedding\) has {what}"):
        TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(model[0]) is nn.Embedding and type(model[2]) is nn.Linear  # nothing converted


@pytest.mark.parametrize("method", ["router", "memory", "entropy"])
def test_task_inference_routes_token_ids_kept_exactly_in_the_memory(method) -> None:
    torch.manual_seed(0)
    bm = token_stream(3, 2, class_incremental=True)
    net = TokenBag(out=6)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=6,
        evaluator=quiet_evaluator(),
        task_inference=method,
        memory_size=20,
        calibrate_activations=True,
    )
    for exp in bm.train_stream:
        strategy.train(exp)
    model = strategy.tsn_model
    xs = [torch.stack([e.dataset[i][0] for i in range(len(e.dataset))]) for e in bm.test_stream]
    x, truth = torch.cat(xs), torch.arange(3).repeat_interleave(len(xs[0]))
    routed, tasks = strategy.infer(x)
    if method != "entropy":  # (entropy reads no memory, and is no better than chance here)
        assert float((tasks == truth).float().mean()) > {"router": 0.7, "memory": 0.55}[method]
        for t, exp in enumerate(bm.train_stream):
            kept, seen = model.memory(t), exp.dataset.eval()
            inputs = torch.stack([seen[i][0] for i in range(len(seen))])
            assert kept.dtype == torch.long and len(kept) == 20  # the very ids, as int64
            assert all(bool((inputs == row).all(1).any()) for row in kept)
    # the activations are quantized; the table's input, token ids, is left exact
    assert set(strategy.quantized_accuracy(bm.test_stream, 8)) == {0, 1, 2}
    buf = io.BytesIO()
    strategy.export(buf, keep_memory=method != "entropy")
    fresh = TSNModel(TokenBag(out=6))
    fresh.load_state_dict(model.state_dict())
    buf.seek(0)
    copies = [fresh, load_compressed(buf, TokenBag(out=6)), to_tiny(copy.deepcopy(model))]
    for other in copies:
        other.eval().task_inference = model.task_inference
        with torch.no_grad():
            assert torch.equal(other(x), routed)


class _StopAt(SupervisedPlugin):
    """Fails the training at an iteration, as a crash or a KeyboardInterrupt would."""

    def __init__(self, iteration: int) -> None:
        super().__init__()
        self.iteration = iteration

    def after_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == self.iteration:
            raise RuntimeError("interrupted")


def _interrupt_and_abandon(strategy, exp) -> None:
    """Train ``exp`` until it is interrupted at its third iteration, then abandon its task."""
    stop = _StopAt(2)
    strategy.plugins.append(stop)
    with pytest.raises(RuntimeError, match="interrupted"):
        strategy.train(exp)
    strategy.plugins.remove(stop)
    assert strategy.abandon_task() == exp.current_experience


def test_an_abandoned_task_reinitialises_the_free_table_as_nn_embedding_does() -> None:
    torch.manual_seed(0)
    bm = token_stream()
    net = TokenBag()
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        evaluator=quiet_evaluator(),
        prune=False,
        quantize=False,
    )
    first, second = list(bm.train_stream)[:2]
    strategy.train(first)
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(16)])
    with torch.no_grad():
        before = strategy.model.eval()(x, 0)
    _interrupt_and_abandon(strategy, second)
    table = strategy.model.net.embed
    free = table.owner == FREE
    weight = table.weight.detach()
    assert bool(free[0].any()) and not bool(weight[0][free[0]].any())  # the padding row: 0
    spread = float(weight[1:][free[1:]].std())
    assert 0.8 < spread < 1.2  # N(0, 1), not nn.Linear's uniform bound 1/sqrt(8)
    with torch.no_grad():
        assert torch.equal(strategy.model.eval()(x, 0), before)


def test_a_frozen_pretrained_table_learns_its_masks_only_and_keeps_its_values() -> None:
    torch.manual_seed(0)
    table = torch.randn(40, 8)
    net = TokenBag()
    net.embed = nn.Embedding.from_pretrained(table.clone(), freeze=True, padding_idx=0)
    trained = [p for p in net.parameters() if p.requires_grad]
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(trained, lr=1e-2),
        train_mb_size=16,
        train_epochs=3,
        evaluator=quiet_evaluator(),
        quantize=False,  # (quantization would code the values each task owns)
    )
    for exp in token_stream().train_stream:
        strategy.train(exp)
    embed = strategy.model.net.embed
    assert torch.equal(embed.weight.detach(), table)
    for slot in range(3):
        mask = embed.task_mask(slot)
        assert 0 < int(mask.sum()) < mask.numel()
        weight, _ = embed.frozen_params(slot)
        assert torch.equal(weight[mask], table[mask])  # the pretrained values, selected


# -- PReLU: slopes per task ---------------------------------------------------------------


class SlopedMLP(nn.Module):
    """PReLU with a slope per channel, and with one slope, between the linear layers."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 16), nn.PReLU(16), nn.Linear(16, 16), nn.PReLU(), nn.Linear(16, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_each_task_keeps_its_own_prelu_slopes_bit_identical_in_every_form() -> None:
    torch.manual_seed(0)
    net = SlopedMLP()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    strategy, x, learned = _train_recording(net, optimizer, 4)
    slopes = [m for m in strategy.model.modules() if isinstance(m, TaskPReLU)]
    assert [m.num_parameters for m in slopes] == [16, 1]
    for m in slopes:  # each task learned its own slopes
        assert m.task_weight.shape[0] == 3
        assert not torch.equal(m.task_weight[0], m.task_weight[2])
    _assert_predicts(strategy.model.eval(), x, learned)
    for model in _other_forms(strategy, SlopedMLP).values():
        _assert_predicts(model, x, learned)
    layers = [layer for _, layer in strategy.tsn_model.masked_layers()]
    biases = sum(layer.bias.numel() for layer in layers if layer.bias is not None)
    for row in strategy.capacity_report().tasks:  # the slopes count as a task's terms
        assert row.norm_bits == 32 * (biases + 16 + 1)


def test_an_abandoned_task_resets_the_live_slopes_to_the_prelus_init() -> None:
    torch.manual_seed(0)
    net = SlopedMLP()
    net.net[1] = nn.PReLU(16, init=0.1)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        train_mb_size=16,
        evaluator=quiet_evaluator(),
        prune=False,
        quantize=False,
    )
    first, second = blob_stream(n_tasks=2, dim=16).train_stream
    strategy.train(first)
    slope = strategy.model.net.net[1]
    frozen = slope.task_weight[0].clone()
    assert not torch.equal(frozen, torch.full((16,), 0.1))  # task 0 moved its slopes
    _interrupt_and_abandon(strategy, second)
    assert torch.equal(slope.weight.detach(), torch.full((16,), 0.1))
    assert torch.equal(slope.task_weight[0], frozen)
