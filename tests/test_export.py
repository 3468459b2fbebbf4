"""Compact export: exact round trip of predictions, size against the capacity report, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SmallConvNet, train_tsn

from avalanche_tsn import TSNModel, TSNStrategy, load_compressed
from avalanche_tsn.capacity import capacity_report
from avalanche_tsn.export import export_model, pack_codes, unpack_codes
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.quantization import _hashed_codes, codes_of, kmeans_1d


def trained(model, dim=12, tasks=3, **kw):
    return train_tsn(model, tasks=tasks, dim=dim, **kw)


def stacked_inputs(bm):
    xs, ts = [], []
    for exp in bm.test_stream:
        x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
        xs.append(x)
        ts.append(torch.full((len(x),), exp.task_label))
    return torch.cat(xs), torch.cat(ts)


@pytest.mark.parametrize(
    "make, dim, kw",
    [
        (lambda: MultiHeadMLP(12, (16, 16), 3, bias=True), 12, {}),
        (lambda: SmallConvNet(), 16, {}),
        (lambda: SmallConvNet(), 16, {"quantize": False}),
        (lambda: MultiHeadMLP(12, (16, 16), 3), 12, {"prune": False, "quant_heads": False}),
    ],
)
def test_export_then_load_gives_identical_predictions_and_matches_report(tmp_path, make, dim, kw):
    strategy, bm = trained(make(), dim=dim, **kw)
    path = tmp_path / "model.tsn"
    size = strategy.export(path)
    assert size == path.stat().st_size
    report = strategy.capacity_report()
    assert size <= 1.1 * report.total_bits / 8 + 8192
    # most of the file is what the report counts: not a dense dump
    assert size * 8 >= 0.9 * report.total_bits
    loaded = load_compressed(path, make())
    live = strategy.model.eval()
    x, t = stacked_inputs(bm)
    with torch.no_grad():
        for label in range(3):
            sel = t == label
            assert torch.equal(loaded(x[sel], label), live(x[sel], label))
        assert torch.equal(loaded(x, t), live(x, t))
    assert loaded.trained_tasks() == live.trained_tasks()


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_code_packing_round_trips(bits, n):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=n)
    packed = pack_codes(codes, bits)
    # code i takes bits i*bits.. of the stream, least significant bit first
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    assert packed == np.packbits(stream, bitorder="little").tobytes()
    assert np.array_equal(unpack_codes(packed, n, bits), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_of_inverts_the_codebook(bits):
    torch.manual_seed(bits)
    book = kmeans_1d(torch.randn(5000), bits)
    centroids = book.centroids.clone()
    centroids[-1] = centroids[0]  # two equal centroids: either code decodes to the value
    values = centroids[book.codes]
    codes = codes_of(values, centroids)
    assert codes.dtype == torch.int64 and torch.equal(centroids[codes], values)
    # the fast path (a hash of the values' bits) answered, not the binary search
    fast = _hashed_codes(values.numpy(), centroids.numpy(), np.arange(len(centroids)))
    assert fast is not None and torch.equal(centroids[torch.from_numpy(fast).long()], values)
    # -0.0 has other bits than 0.0 but is the same value
    codes = codes_of(torch.tensor([-0.0, 0.0, 1.5]), torch.tensor([0.0, 1.5]))
    assert codes.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="not all centroid values"):
        codes_of(torch.cat([values, values[:1] + 1e-3]), centroids)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    strategy, _ = trained(MultiHeadMLP(12, (16, 16), 3, bias=True), tasks=2)
    buf = io.BytesIO()
    strategy.export(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:-40], "checksum"),
        (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum"),
        (lambda d: d[:4] + b"\x09\x00" + d[6:], "version"),
        (lambda d: b"", "magic"),
    ],
)
def test_corrupt_files_are_rejected_before_the_model_changes(exported, corrupt, match):
    model = MultiHeadMLP(12, (16, 16), 3, bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_compressed(io.BytesIO(corrupt(exported)), model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mismatched_architecture_is_rejected(exported):
    model = MultiHeadMLP(12, (16, 8), 3, bias=True)
    with pytest.raises(ValueError, match="does not match"):
        load_compressed(io.BytesIO(exported), model)
    assert type(model.features[0]) is torch.nn.Linear  # not wrapped


def test_export_needs_a_trained_task(tmp_path):
    model = MultiHeadMLP(12, (16, 16), 3)
    strategy = TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no task is trained"):
        strategy.export(tmp_path / "x.tsn")


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_states_of_0_4_export_to_the_same_bytes_and_load_bit_identically(name):
    """Fixtures by ``tests/data/make_v0_4_fixtures.py`` (avalanche-tsn 0.4.1, format 2)."""
    data = Path(__file__).parent / "data"
    make = {"mlp": lambda: MultiHeadMLP(12, (16, 16), 3, bias=True), "conv": SmallConvNet}[name]
    dim = {"mlp": 12, "conv": 16}[name]
    model = TSNModel(make())
    model.load_state_dict(torch.load(data / f"v0_4_{name}_state_dict.pt", weights_only=True))
    saved = (data / f"v0_4_{name}_export.tsn").read_bytes()
    buf = io.BytesIO()
    export_model(model, buf)
    assert buf.getvalue() == saved
    bits = json.loads((data / "v0_4_capacity_bits.json").read_text())[name]
    assert capacity_report(model).total_bits == bits
    loaded = load_compressed(io.BytesIO(saved), make())
    x = torch.randn(64, dim, generator=torch.Generator().manual_seed(3))
    t = torch.arange(64) % 4
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
        for label in range(4):
            assert torch.equal(loaded(x, label), model(x, label))
    assert loaded.trained_tasks() == model.trained_tasks() == [0, 1, 2, 3]
