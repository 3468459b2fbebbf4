"""Activation quantization, the compute report and the runnable compressed model (issue 13)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import SmallConvNet, blob_stream, mlp, quiet_evaluator
from torch import nn

from avalanche_tsn import TSNStrategy, load_compressed
from avalanche_tsn.activations import (
    calibrate,
    fixed_point,
    quantize_fixed,
    quantized_activations,
)
from avalanche_tsn.compute import compute_report
from avalanche_tsn.layers import MaskedLayer
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.tiny import CodedLayer, CodedLinear, resident_bytes, to_tiny


def _trained(net: nn.Module, n_tasks: int = 3, dim: int = 12, **kwargs) -> tuple:
    bm = blob_stream(n_tasks=n_tasks, dim=dim)
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_mb_size=16,
        train_epochs=15,
        evaluator=quiet_evaluator(),
        **kwargs,
    )
    for exp in bm.train_stream:
        strategy.train(exp)
    return strategy, bm


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(0)
    return _trained(mlp())


def test_fixed_point_has_at_most_2_to_the_bits_values_and_saturates() -> None:
    x = torch.linspace(-3.0, 5.0, 10_001)
    for bits in (2, 4, 8):
        frac, signed = fixed_point(-3.0, 5.0, bits)
        assert signed
        q = quantize_fixed(x, bits, frac, signed)
        assert len(torch.unique(q)) <= 2**bits
        assert torch.equal(q * 2.0**frac, torch.round(q * 2.0**frac))  # on the grid
    frac, signed = fixed_point(0.0, 1.0, 8)
    assert not signed and frac == 8
    q = quantize_fixed(torch.tensor([0.0, 0.5, 1.0, 7.0]), 8, frac, signed)
    assert torch.equal(q, torch.tensor([0.0, 0.5, 255 / 256, 255 / 256]))  # saturating


def test_sixteen_bits_keep_accuracy_and_four_bits_do_not_beat_them(trained_mlp) -> None:
    strategy, bm = trained_mlp
    exact = strategy.quantized_accuracy(bm.test_stream, None)
    at16 = strategy.quantized_accuracy(bm.test_stream, 16)
    at4 = strategy.quantized_accuracy(bm.test_stream, 4)
    for t in exact:
        assert abs(at16[t] - exact[t]) <= 0.01  # the stated tolerance: one point
        assert at4[t] <= at16[t] + 1e-12
    assert sum(exact.values()) / len(exact) > 0.8  # a trained model, not chance


def test_calibration_is_per_task_and_never_changes_other_tasks(trained_mlp) -> None:
    strategy, bm = trained_mlp
    model = strategy.tsn_model.eval()
    x = bm.test_stream[0].dataset.eval()[0][0][None].repeat(5, 1)
    before = model.act_range.clone()
    with quantized_activations(model, 6):
        out0 = model(x, 0)
    calibrate(model, 1, [100 * torch.randn(32, 12)])  # a wild range for task 1 only
    assert torch.equal(model.act_range[0], before[0]) and torch.equal(model.act_range[2], before[2])
    assert not torch.equal(model.act_range[1], before[1])
    with quantized_activations(model, 6):
        assert torch.equal(model(x, 0), out0)
    model.act_range.copy_(before)


def test_float_activations_are_untouched(trained_mlp) -> None:
    strategy, bm = trained_mlp
    model = strategy.tsn_model.eval()
    x = torch.randn(7, 12)
    plain = model(x, 2)
    with quantized_activations(model, None):
        assert torch.equal(model(x, 2), plain)
    with quantized_activations(model, 8):
        assert not torch.equal(model(x, 2), plain)
    assert torch.equal(model(x, 2), plain)  # the hooks are gone after the block


def test_mixed_minibatch_quantized_like_per_task(trained_mlp) -> None:
    strategy, _ = trained_mlp
    model = strategy.tsn_model.eval()
    x = torch.randn(9, 12)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 0, 1, 2])
    with quantized_activations(model, 8):
        mixed = model(x, labels)
        for i in range(len(x)):
            assert torch.allclose(mixed[i], model(x[i : i + 1], int(labels[i]))[0], atol=1e-6)


def test_uncalibrated_task_and_bad_bits_are_refused(trained_mlp) -> None:
    strategy, bm = trained_mlp
    with pytest.raises(ValueError, match=r"act_bits \(None for float activations\) must be"):
        strategy.quantized_accuracy(bm.test_stream, 1)
    with pytest.raises(TypeError, match="act_bits"):
        strategy.quantized_accuracy(bm.test_stream, 8.0)
    torch.manual_seed(0)
    plain, bm2 = _trained(mlp(), n_tasks=1, calibrate_activations=False)
    assert plain.capacity_report().tasks[0].activation_bits == 0
    with pytest.raises(ValueError, match="no activation ranges"):
        plain.quantized_accuracy(bm2.test_stream, 8)


def test_ranges_are_counted_saved_and_exported(trained_mlp) -> None:
    strategy, _ = trained_mlp
    model = strategy.tsn_model
    n_layers = len(list(model.masked_layers()))
    assert all(t.activation_bits == 64 * n_layers for t in strategy.capacity_report().tasks)
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    loaded = load_compressed(buf, mlp())
    assert torch.equal(loaded.act_range, model.act_range)
    fresh = TSNStrategy(
        model=mlp(), optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ).tsn_model
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.act_range, model.act_range)


def _hand_macs(model, label: int, positions: dict[str, int]) -> int:
    slot = model.slot_of(label)
    total = 0
    for name, layer in model.masked_layers():
        total += positions[name] * int(layer.task_mask(slot).sum())
    for head in model.head_weights(label):
        total += head.numel()
    return total


def test_mac_counts_match_a_hand_count_on_an_mlp(trained_mlp) -> None:
    strategy, _ = trained_mlp
    model = strategy.tsn_model
    report = strategy.compute_report()
    assert report.input_shape == (12,)
    positions = {name: 1 for name, _ in model.masked_layers()}
    for t in report.tasks:
        assert t.macs == _hand_macs(model, t.task, positions)
        assert t.dense_macs == 12 * 16 + 16 * 16 + 16 * 3
        assert t.act_bits == 32 and t.dense_bops == t.dense_macs * 32 * 32


def test_mac_counts_match_a_hand_count_on_a_conv_net() -> None:
    torch.manual_seed(0)
    strategy, _ = _trained(SmallConvNet(), n_tasks=2, dim=16)
    model = strategy.tsn_model
    report = compute_report(model, (16,), act_bits=8)
    # 3x3 convolutions with padding 1 on 4x4 maps: 16 output positions each; the head is
    # a linear layer on the flattened features (one position).
    positions = {"features.0": 16, "features.3": 16, "head": 1}
    for t in report.tasks:
        assert t.macs == _hand_macs(model, t.task, positions)
        assert t.dense_macs == 16 * (4 * 9) + 16 * (4 * 4 * 9) + 64 * 3
        # every weight the task reads at its owner's bit-width, 8-bit activations
        slot = model.slot_of(t.task)
        expected = 0
        for name, layer in model.masked_layers():
            mask = layer.task_mask(slot).flatten()
            owner = layer.slot_owner(slot).flatten()[mask]
            bits = layer.task_bits[owner.long()].long()
            expected += positions[name] * int(torch.where(bits == 0, 32, bits).sum())
        assert t.bops == expected * 8


def test_compute_report_checks_its_arguments(trained_mlp) -> None:
    strategy, _ = trained_mlp
    with pytest.raises(ValueError, match="input_shape"):
        strategy.compute_report(input_shape=(0,))
    with pytest.raises(ValueError, match="act_bits"):
        strategy.compute_report(act_bits=64)


@pytest.mark.parametrize("make", [mlp, SmallConvNet, lambda: MultiHeadMLP(12, (16, 16))])
def test_integer_code_model_predicts_like_the_dequantized_one(make) -> None:
    torch.manual_seed(0)
    dim = 16 if make is SmallConvNet else 12
    strategy, bm = _trained(make(), n_tasks=3, dim=dim)
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    full = load_compressed(buf, make())
    buf.seek(0)
    tiny = load_compressed(buf, make(), dequantize=False)
    assert all(isinstance(m, CodedLayer) for m in tiny.routed_layers())
    assert not any(isinstance(m, MaskedLayer) for m in tiny.modules())
    coded_heads = any(isinstance(m, CodedLinear) for m in tiny.modules())
    assert coded_heads == bool(full.head_bits.any())
    x = torch.randn(20, dim)
    for t in range(3):
        assert torch.equal(tiny(x, t), full(x, t))
    labels = torch.arange(20) % 3
    assert torch.equal(tiny(x, labels), full(x, labels))
    assert resident_bytes(tiny) < resident_bytes(full)


def test_to_tiny_refuses_an_open_task() -> None:
    torch.manual_seed(0)
    strategy, _ = _trained(mlp(), n_tasks=1)
    strategy.tsn_model.begin_task(5, 0.5)
    with pytest.raises(ValueError, match="still in training"):
        to_tiny(strategy.tsn_model)


class _PaddedConvNet(nn.Module):
    """Convolutions padded by reflection, replication and wrapping, on 1x4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(4, 4, (3, 2), padding="same", padding_mode="replicate", dilation=(1, 2)),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=(1, 2), padding_mode="circular", bias=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * 4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 4, 4)).flatten(1))


# a convolution padded otherwise than by zeros was refused by to_tiny (ValueError)
def test_tiny_convolutions_pad_as_the_full_layers_do_in_every_padding_mode() -> None:
    torch.manual_seed(0)
    strategy, _ = _trained(_PaddedConvNet(), n_tasks=2, dim=16)
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    tiny = load_compressed(buf, _PaddedConvNet(), dequantize=False)
    model = strategy.tsn_model.eval()
    assert sum(isinstance(m, CodedLayer) and m.conv is not None for m in tiny.modules()) == 3
    converted = to_tiny(copy.deepcopy(model))
    x = torch.randn(20, 16)
    for t in range(2):
        assert torch.equal(tiny(x, t), model(x, t))
        assert torch.equal(converted(x, t), model(x, t))
