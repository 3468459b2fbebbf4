"""Convolutions over one and three spatial dimensions (sensor and audio signals, volumes and
clips), LayerNorm and GroupNorm: kept per task, compressed, exported and run tiny as
``nn.Conv2d`` and BatchNorm are."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import Signal1d, Volume3d, blob_stream, quiet_evaluator
from torch import nn

from avalanche_tsn import TSNStrategy
from avalanche_tsn.compute import compute_report
from avalanche_tsn.export import load_compressed
from avalanche_tsn.layers import TaskAffineNorm, TaskBatchNorm, TSNConv1d, TSNConv3d
from avalanche_tsn.model import TSNModel
from avalanche_tsn.tiny import CodedLayer, to_tiny

KINDS = {"conv1d": (Signal1d, TSNConv1d, 3), "conv3d": (Volume3d, TSNConv3d, 2)}


def _train_recording(net: nn.Module, optimizer: torch.optim.Optimizer, epochs: int) -> tuple:
    """Three tasks trained with TSN's defaults (pruning, quantization); the strategy, the test
    inputs and each task's outputs on them, recorded the moment it was learned."""
    bm = blob_stream(n_tasks=3, dim=16)
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
