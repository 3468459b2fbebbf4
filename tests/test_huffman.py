"""Canonical Huffman coding (numpy): exact round trips, sizes from counts, corruption."""

from __future__ import annotations

import heapq
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_tsn import TSNModel, huffman, load_compressed
from avalanche_tsn.huffman import (
    BLOCK,
    MAX_LENGTH,
    HuffmanCode,
    code_lengths,
    decode_many,
    decode_symbols,
    encode_symbols,
    encoded_bits,
    pair_symbols,
    unpair_symbols,
)
from avalanche_tsn.models import MultiHeadMLP

DATA = Path(__file__).parent / "data"
FIB = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584,
                4181, 6765, 10946, 17711, 28657, 46368, 75025], dtype=float)  # fmt: skip


def _symbols(kind: str, n: int, rng) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 40, n)
    if kind == "skewed":
        return rng.geometric(0.3, n) - 1
    if kind == "one_symbol":
        return np.full(n, 7)
    if kind == "wide":  # too many symbols to write two at a time
        return rng.integers(0, 2000, n)
    return rng.choice(len(FIB), n, p=FIB / FIB.sum())  # Fibonacci counts: deepest tree


@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_symbol", "fibonacci", "wide"])
@pytest.mark.parametrize("n", [0, 1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7, (1 << 20) + 3])
def test_round_trip_and_size_from_counts(kind, n):
    symbols = _symbols(kind, n, np.random.default_rng(n))
    code = encode_symbols(symbols)
    assert np.array_equal(decode_symbols(code), symbols)
    counts = np.bincount(symbols) if n else np.zeros(0, dtype=np.int64)
    assert code.nbits == encoded_bits(counts) == 8 * len(code.to_bytes())
    restored, end = HuffmanCode.from_bytes(code.to_bytes() + b"tail")
    assert restored == code and end == len(code.to_bytes())


@pytest.mark.parametrize("n", [1, 2, 3, BLOCK + 1, 2 * BLOCK, (1 << 21) + 5])
def test_symbols_written_in_pairs_give_the_same_bytes(n, monkeypatch):
    symbols = _symbols("fibonacci", n, np.random.default_rng(n))
    paired = encode_symbols(symbols).to_bytes()
    monkeypatch.setattr(huffman, "_PAIR_ALPHABET", 0)
    assert encode_symbols(symbols).to_bytes() == paired


def _heap_lengths(counts):
    """Textbook Huffman with a heap of (count, node id): the lengths files have always used."""
    present = [s for s, c in enumerate(counts) if c]
    if len(present) == 1:
        return {present[0]: 1}
    heap = [(int(counts[s]), i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent, node = {}, len(present)
    while len(heap) > 1:
        (c1, a), (c2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
        node += 1
    depth = {node - 1: 0}
    for n in range(node - 2, -1, -1):
        depth[n] = depth[parent[n]] + 1
    return {s: depth[i] for i, s in enumerate(present)}


@pytest.mark.parametrize("seed", range(20))
def test_code_lengths_are_the_heap_algorithm_s_ties_included(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    counts = rng.integers(0, [3, 50, 10_000][seed % 3], n)  # small ranges: many ties
    counts[0] = max(counts[0], 1)
    lengths = code_lengths(counts)
    expected = _heap_lengths(counts)
    if max(expected.values()) <= MAX_LENGTH:
        assert {s: int(lengths[s]) for s in np.flatnonzero(counts)} == expected


def test_code_lengths_are_limited_and_form_a_prefix_code():
    counts = np.array([2**k for k in range(30)], dtype=np.int64)  # would need 29-bit codes
    lengths = code_lengths(counts)
    assert lengths.max() <= MAX_LENGTH
    assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1.0
    symbols = np.repeat(np.arange(30), np.minimum(counts, 300))
    assert np.array_equal(decode_symbols(encode_symbols(symbols)), symbols)


def test_size_is_near_the_entropy():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    symbols = rng.choice(4, 100_000, p=p)
    bits = encode_symbols(symbols).nbits
    assert bits / len(symbols) < 1.76  # entropy 1.75 bits (dyadic: Huffman is exact)


def test_many_codes_decode_in_one_batch():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, k, m) for k, m in [(3, 10), (256, 50_000), (11, 20_000), (2, 1)]]
    arrays.append(np.zeros(0, dtype=np.int64))
    decoded = decode_many([encode_symbols(a) for a in arrays])
    assert all(np.array_equal(a, d) for a, d in zip(arrays, decoded, strict=True))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_pair_symbols_round_trip(n):
    values = np.random.default_rng(n).integers(0, 11, n)
    pairs = pair_symbols(values, 11)
    assert len(pairs) == (n + 1) // 2
    assert np.array_equal(unpair_symbols(pairs, 11, n), values)
    with pytest.raises(ValueError):
        pair_symbols(values, 300)  # 300**2 symbols do not fit


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda c: HuffmanCode(c.table, c.data[: len(c.data) // 2], c.count, c.offsets),
        lambda c: HuffmanCode(c.table, bytes(b ^ 0xA5 for b in c.data), c.count, c.offsets),
        lambda c: HuffmanCode(c.table[:-3], c.data, c.count, c.offsets),
        lambda c: HuffmanCode(c.table + c.table[:3], c.data, c.count, c.offsets),
        lambda c: HuffmanCode(c.table, c.data, c.count + BLOCK, c.offsets),
        lambda c: HuffmanCode(c.table, c.data, c.count, c.offsets[:-4]),
        lambda c: HuffmanCode(c.table, c.data, c.count, b"\xff\xff\xff\x7f" + c.offsets[4:]),
        lambda c: HuffmanCode(b"\x00\x00\x11" + c.table[3:], c.data, c.count, c.offsets),
    ],
)
def test_corrupt_codes_raise_value_error(corrupt):
    rng = np.random.default_rng(2)
    code = encode_symbols(rng.geometric(0.4, 3 * BLOCK + 11) - 1)
    with pytest.raises(ValueError, match="corrupt|truncated"):
        decode_symbols(corrupt(code))
    with pytest.raises(ValueError, match="truncated"):
        HuffmanCode.from_bytes(code.to_bytes()[:-5])


def test_files_and_state_dicts_of_avalanche_tsn_0_1_still_load():
    """Fixtures written by avalanche-tsn 0.1: export format 1, unpacked masks in state dicts."""
    expected = torch.load(DATA / "v1_outputs.pt", weights_only=True)
    x = expected["x"]
    loaded = load_compressed(DATA / "v1_export.tsn", MultiHeadMLP(12, (16, 16), 3, bias=True))
    model = TSNModel(MultiHeadMLP(12, (16, 16), 3, bias=True))
    model.load_state_dict(torch.load(DATA / "v1_state_dict.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        for t in (0, 1):
            # both loading paths give the same bits on this machine; the stored outputs were
            # computed on another CPU, whose GEMM kernels (AVX2 vs AVX-512) round differently
            assert torch.equal(loaded(x, t), model(x, t))
            assert torch.allclose(loaded(x, t), expected["outputs"][t], rtol=0, atol=1e-6)
    # files and state dicts from before activation ranges existed load with none calibrated
    for m in (loaded, model):
        assert m.act_range.shape == (2, 2, 2)  # 2 tasks, 2 masked layers
        assert bool((m.act_range[..., 0] > m.act_range[..., 1]).all())
    # and the reloaded state is today's: it exports in the current format, identically
    buf = io.BytesIO()
    from avalanche_tsn.export import FORMAT_VERSION, export_model

    export_model(model, buf)
    assert int.from_bytes(buf.getvalue()[4:6], "little") == FORMAT_VERSION == 2
    buf.seek(0)
    again = load_compressed(buf, MultiHeadMLP(12, (16, 16), 3, bias=True))
    with torch.no_grad():
        assert all(torch.equal(again(x, t), model(x, t)) for t in (0, 1))
