"""Canonical Huffman coding of task masks and ownership maps, vectorised with numpy.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), appendix "Huffman encoding and
decoding": a sparse binary mask is cut into sub-sequences, the sub-sequences are Huffman
coded, and the code table is stored beside the bits. Here a boolean mask is cut into bytes
(8-weight sub-sequences); an ownership map (one small integer per weight) is coded per weight.

Codes are canonical (fixed by the code lengths, so only lengths are stored) and limited to
:data:`MAX_LENGTH` bits. The bit stream is written in blocks of :data:`BLOCK` symbols whose
start offsets are stored, so that decoding runs one numpy lane per block instead of one Python
step per symbol. :func:`encoded_bits` gives a code's exact size from the symbol counts alone,
without encoding (what the capacity report uses).

Files written by avalanche-tsn 0.1 used ``dahuffman`` (one Python step per bit); they are
still read by :func:`decode_symbols_v1`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HuffmanCode",
    "MAX_LENGTH",
    "BLOCK",
    "code_lengths",
    "encoded_bits",
    "encode_symbols",
    "decode_symbols",
    "decode_many",
    "encode_mask",
    "decode_mask",
    "mask_symbols",
    "pair_symbols",
    "unpair_symbols",
    "decode_symbols_v1",
]

#: Longest code, in bits (decoding reads this many bits at once through one table).
MAX_LENGTH = 16
#: Symbols per independently decodable block.
BLOCK = 4096
#: Largest symbol value (symbols are stored as uint16; 65535 marks "no symbol" in decoding).
MAX_SYMBOL = 2**16 - 2
#: Items encoded per step (bounded temporaries).
_CHUNK = 1 << 20
#: Largest alphabet whose symbols are written two at a time (a table of its size squared).
_PAIR_ALPHABET = 512

_NONE = 2**16 - 1  # decoded where no code matches
_GAP = 4 + (31 * BLOCK + 7) // 8
_HEAD = struct.Struct("<IIII")  # table entries, data bytes, symbol count, block offsets
_ENTRY = np.dtype([("symbol", "<u2"), ("length", "u1")])


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths of the symbols with a non-zero count."""
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    # Two queues instead of a heap: the leaves sorted by (count, symbol) and the merged
    # nodes in the order they are made (their counts never decrease). Taking the smaller
    # front, a leaf on ties, merges exactly as a heap of (count, node id) would.
    m = len(present)
    leaf_counts = counts[present].astype(np.int64)
    order = np.argsort(leaf_counts, kind="stable").tolist()
    leaf_sorted = leaf_counts[order].tolist()
    merged: list[int] = []
    parent = [0] * (2 * m - 1)
    li = mi = 0
    for node in range(m, 2 * m - 1):
        total = 0
        for _ in range(2):
            if li < m and (mi >= len(merged) or leaf_sorted[li] <= merged[mi]):
                parent[order[li]] = node
                total += leaf_sorted[li]
                li += 1
            else:
                parent[m + mi] = node
                total += merged[mi]
                mi += 1
        merged.append(total)
    depth = [0] * (2 * len(present) - 1)
    for n in range(2 * len(present) - 3, -1, -1):  # parents come after their children
        depth[n] = depth[parent[n]] + 1
    lengths[present] = depth[: len(present)]
    return lengths


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths for symbol counts, at most :data:`MAX_LENGTH` bits (0: absent).

    :param counts: how often each symbol occurs (index = symbol).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = _huffman_lengths(counts)
    if lengths.max(initial=0) <= MAX_LENGTH:
        return lengths
    # Rare (very skewed counts): cap the lengths, then lengthen the codes of the rarest
    # symbols below the cap until the Kraft sum is back to at most 1.
    lengths = np.minimum(lengths, MAX_LENGTH)
    present = np.flatnonzero(lengths)
    order = present[np.argsort(counts[present], kind="stable")]  # rarest first
    kraft = int(np.sum(1 << (MAX_LENGTH - lengths[present])))
    while kraft > 1 << MAX_LENGTH:
        for s in order:
            if lengths[s] < MAX_LENGTH:
                kraft -= 1 << (MAX_LENGTH - lengths[s] - 1)
                lengths[s] += 1
                break
    return lengths


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for code lengths (symbols ordered by length, then value)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    code, prev = 0, int(lengths[order[0]]) if len(order) else 0
    for i, s in enumerate(order):
        length = int(lengths[s])
        if i:
            code = (code + 1) << (length - prev)
        codes[s] = code
        prev = length
    return codes


def _n_offsets(count: int) -> int:
    return max(0, (count - 1) // BLOCK)


def encoded_bits(counts: np.ndarray) -> int:
    """Exact size in bits of :func:`encode_symbols`' output, from the symbol counts alone.

    :param counts: how often each symbol occurs (index = symbol).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = code_lengths(counts)
    n = int(counts.sum())
    data_bytes = (int(np.dot(counts, lengths)) + 7) // 8
    entries = int(np.count_nonzero(lengths))
    return 8 * (_HEAD.size + 3 * entries + data_bytes + 4 * _n_offsets(n))


@dataclass(frozen=True)
class HuffmanCode:
    """Huffman-coded symbols: the code table, the bit stream and the block offsets."""

    table: bytes
    data: bytes
    count: int
    offsets: bytes = b""

    @property
    def nbits(self) -> int:
        """Bits the code takes in a file: header, table, data and block offsets."""
        return 8 * (_HEAD.size + len(self.table) + len(self.data) + len(self.offsets))

    def to_bytes(self) -> bytes:
        """Serialise (lengths first) for a compact file."""
        head = _HEAD.pack(len(self.table) // 3, len(self.data), self.count, len(self.offsets) // 4)
        return head + self.table + self.data + self.offsets

    @classmethod
    def from_bytes(cls, buf: bytes, offset: int = 0) -> tuple[HuffmanCode, int]:
        """Read one code written by :meth:`to_bytes`; returns it and the next offset.

        :param buf: the buffer.
        :param offset: where the code starts.
        """
        if offset + _HEAD.size > len(buf):
            raise ValueError("truncated Huffman code")
        entries, nd, count, n_off = _HEAD.unpack_from(buf, offset)
        offset += _HEAD.size
        end = offset + 3 * entries + nd + 4 * n_off
        if end > len(buf):
            raise ValueError("truncated Huffman code")
        table = buf[offset : offset + 3 * entries]
        data = buf[offset + 3 * entries : offset + 3 * entries + nd]
        offsets = buf[offset + 3 * entries + nd : end]
        return cls(table, data, count, offsets), end


def encode_symbols(symbols: np.ndarray) -> HuffmanCode:
    """Huffman-code a 1-D array of integers in [0, 65535].

    :param symbols: the symbols.
    """
    values = np.asarray(symbols).ravel().astype(np.int64)
    if values.size and not 0 <= values.min() <= values.max() <= MAX_SYMBOL:
        raise ValueError(f"symbols must be integers in [0, {MAX_SYMBOL}]")
    counts = np.bincount(values) if values.size else np.zeros(0, dtype=np.int64)
    lengths = code_lengths(counts)
    codes = _canonical(lengths)
    present = np.flatnonzero(lengths)
    table = np.empty(len(present), dtype=_ENTRY)
    table["symbol"], table["length"] = present, lengths[present]
    total = int(np.dot(counts, lengths)) if values.size else 0
    if total >= 2**32:
        raise ValueError("a single Huffman code is limited to 2**32 bits")
    items, item_codes, item_lengths, block = _pairs(values, codes, lengths)
    # Every item's code (at most 32 bits) lands in at most two 32-bit words; its bits are
    # disjoint from every other code's, so a word is the sum of the shifted codes in it.
    # Done in chunks: weight-sized temporaries cost page faults (on some machines more than
    # the arithmetic).
    words = np.zeros((total + 31) // 32 + 1, dtype=np.float64)
    starts_out: list[np.ndarray] = []
    carry = 0
    for lo in range(0, items.size, _CHUNK):
        chunk = items[lo : lo + _CHUNK]
        length = item_lengths[chunk]
        starts = np.cumsum(length)
        starts -= length
        starts += carry
        carry = int(starts[-1] + length[-1])
        starts_out.append(starts[(block - lo % block) % block :: block])
        left = item_codes[chunk] << (32 - length)  # left-aligned in 32 bits
        first = int(starts[0]) >> 5
        word = (starts >> 5) - first
        shift = starts & 31
        span = int(word[-1]) + 2
        words[first : first + span] += np.bincount(
            word, weights=(left >> shift).astype(np.float64), minlength=span
        )
        spill = (left << (32 - shift)) & 0xFFFFFFFF
        spill[shift == 0] = 0
        words[first + 1 : first + 1 + span] += np.bincount(
            word, weights=spill.astype(np.float64), minlength=span
        )[: len(words) - first - 1]
    data = words.astype(np.uint64).astype(">u4").tobytes()[: (total + 7) // 8]
    block_starts = np.concatenate(starts_out) if starts_out else np.zeros(0, dtype=np.int64)
    offsets = block_starts[1:].astype("<u4").tobytes()
    return HuffmanCode(table.tobytes(), data, int(values.size), offsets)


def _pairs(
    values: np.ndarray, codes: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """What to write: items, their codes and lengths, and the items per block.

    With a small alphabet, two consecutive symbols are written as one item whose code is
    their two codes joined (at most 32 bits): half the items, for the same bit stream.
    """
    alphabet = len(codes)
    if values.size < 2 or alphabet > _PAIR_ALPHABET:
        return values, codes.astype(np.int64), lengths.astype(np.int64), BLOCK
    # Column ``alphabet`` is "no second symbol" (an odd count's last item).
    second_codes = np.append(codes, 0).astype(np.int64)
    second_lengths = np.append(lengths, 0).astype(np.int64)
    pair_codes = (codes.astype(np.int64)[:, None] << second_lengths) | second_codes
    pair_lengths = lengths.astype(np.int64)[:, None] + second_lengths
    items = values[0::2] * (alphabet + 1)
    items[: values.size // 2] += values[1::2]
    if values.size % 2:
        items[-1] += alphabet
    return items, pair_codes.ravel(), pair_lengths.ravel(), BLOCK // 2


def _table_lut(code: HuffmanCode) -> tuple[np.ndarray, int]:
    """The decoding table of one code and its width ``w`` (its longest code).

    For every ``w``-bit window the table holds ``symbol << 5 | code length``.
    """
    if len(code.table) % 3 or len(code.offsets) % 4:
        raise ValueError("corrupt Huffman code: table or offsets have a partial entry")
    table = np.frombuffer(code.table, dtype=_ENTRY)
    present = table["symbol"].astype(np.int64)
    if len(table) == 0 or len(np.unique(present)) != len(table):
        raise ValueError("corrupt Huffman code: bad table")
    lengths = np.zeros(MAX_SYMBOL + 2, dtype=np.int64)
    lengths[present] = table["length"]
    own = lengths[present]
    if own.min() < 1 or own.max() > MAX_LENGTH or np.sum(1 << (MAX_LENGTH - own)) > 1 << 16:
        raise ValueError("corrupt Huffman code: impossible code lengths")
    width = int(own.max())
    codes = _canonical(lengths)
    spans = 1 << (width - own)
    first = codes[present] << (width - own)
    slots = np.repeat(first - (np.cumsum(spans) - spans), spans) + np.arange(int(spans.sum()))
    lut = np.full(1 << width, -1, dtype=np.int32)
    lut[slots] = np.repeat((present << 5) | own, spans)
    return lut, width


def decode_many(codes: list[HuffmanCode]) -> list[np.ndarray]:
    """Decode several codes at once (one numpy lane per block of every code).

    :param codes: codes written by :func:`encode_symbols`.
    :return: their symbols, in order.
    :raises ValueError: if a code is inconsistent (corrupt).
    """
    live = [i for i, c in enumerate(codes) if c.count]
    results = [np.zeros(0, dtype=np.int64) for _ in codes]
    if not live:
        return results
    luts, data, lanes = [], [], []
    bit_base = lut_base = 0
    for i in live:
        code = codes[i]
        lut, width = _table_lut(code)
        n_blocks = (code.count + BLOCK - 1) // BLOCK
        if len(code.offsets) // 4 != n_blocks - 1:
            raise ValueError("corrupt Huffman code: wrong number of block offsets")
        starts = np.zeros(n_blocks, dtype=np.int64)
        starts[1:] = np.frombuffer(code.offsets, dtype="<u4")
        if np.any(np.diff(starts) < 0) or starts[-1] > 8 * len(code.data):
            raise ValueError("corrupt Huffman code: block offsets out of range")
        counts = np.full(n_blocks, BLOCK, dtype=np.int64)
        counts[-1] = code.count - (n_blocks - 1) * BLOCK
        lanes.append((starts + bit_base, counts, lut_base, 32 - width, (1 << width) - 1))
        luts.append(lut)
        data.append(np.frombuffer(code.data, dtype=np.uint8))
        # Zero bytes between codes: a window never reads into the next code, and a corrupt
        # code (at most 31 bits a step) never reads past the stream.
        data.append(np.zeros(_GAP, dtype=np.uint8))
        bit_base += 8 * (len(code.data) + _GAP)
        lut_base += len(lut)
    stream = np.concatenate(data)
    # The big-endian 32-bit word at every byte offset, made once: each step then reads one
    # word per lane with a single gather.
    words = stream[:-3].astype(np.uint32) << np.uint32(24)
    words |= stream[1:-2].astype(np.uint32) << np.uint32(16)
    words |= stream[2:-1].astype(np.uint32) << np.uint32(8)
    words |= stream[3:]
    lut = np.concatenate(luts)
    pos = np.concatenate([lane[0] for lane in lanes])
    count = np.concatenate([lane[1] for lane in lanes])
    base, shift, wmask = (
        np.concatenate([np.full(len(lane[0]), lane[k]) for lane in lanes]) for k in (2, 3, 4)
    )
    order = np.argsort(-count, kind="stable")  # lanes still running form a prefix
    pos, count, base, shift, wmask = (a[order] for a in (pos, count, base, shift, wmask))
    n_lanes = len(pos)
    out = np.empty((BLOCK, n_lanes), dtype=np.uint16)
    active = n_lanes
    for j in range(int(count[0])):
        while count[active - 1] <= j:
            active -= 1
        p = pos[:active]
        word = words[p >> 3].astype(np.int64)
        entry = lut[base[:active] + ((word >> (shift[:active] - (p & 7))) & wmask[:active])]
        out[j, :active] = entry >> 5
        p += entry & 31
    ends = np.empty(n_lanes, dtype=np.int64)
    ends[order] = pos
    columns = np.empty(n_lanes, dtype=np.int64)
    columns[order] = np.arange(n_lanes)
    cursor = 0
    for (starts, _, _, _, _), i in zip(lanes, live, strict=True):
        n_blocks = len(starts)
        block_ends = ends[cursor : cursor + n_blocks]
        # Each block must end exactly where the next starts (the last inside its data).
        if np.any(block_ends[:-1] != starts[1:]) or block_ends[-1] > starts[0] + 8 * len(
            codes[i].data
        ):
            raise ValueError("corrupt Huffman code: data does not decode")
        symbols = out[:, columns[cursor : cursor + n_blocks]].T.ravel()[: codes[i].count]
        cursor += n_blocks
        if np.any(symbols == _NONE):
            raise ValueError("corrupt Huffman code: data does not decode")
        results[i] = symbols.astype(np.int32)
    return results


def decode_symbols(code: HuffmanCode) -> np.ndarray:
    """Decode :func:`encode_symbols`' output exactly.

    :param code: the Huffman code.
    :raises ValueError: if the code is inconsistent (corrupt).
    """
    return decode_many([code])[0]


def pair_symbols(values: np.ndarray, alphabet: int) -> np.ndarray:
    """Symbols for consecutive pairs of values in ``[0, alphabet)`` (the last one padded with 0).

    Coding pairs halves the symbols to decode and brings Huffman closer to the entropy when
    one value is frequent; it needs ``alphabet ** 2 - 1 <= MAX_SYMBOL``.

    :param values: the values, flat.
    :param alphabet: one more than the largest possible value.
    """
    if alphabet**2 - 1 > MAX_SYMBOL:
        raise ValueError(f"pairs need alphabet**2 - 1 <= {MAX_SYMBOL}, got alphabet {alphabet}")
    values = np.asarray(values, dtype=np.int64).ravel()
    if values.size % 2:
        values = np.concatenate([values, np.zeros(1, dtype=np.int64)])
    return values[0::2] * alphabet + values[1::2]


def unpair_symbols(symbols: np.ndarray, alphabet: int, n: int) -> np.ndarray:
    """Inverse of :func:`pair_symbols`: the first ``n`` values.

    :param symbols: the pair symbols.
    :param alphabet: one more than the largest possible value.
    :param n: how many values were paired.
    """
    values = np.empty(2 * len(symbols), dtype=np.int64)
    values[0::2], values[1::2] = np.divmod(np.asarray(symbols, dtype=np.int64), alphabet)
    if len(values) not in (n, n + 1) or (len(values) > n and values[-1] != 0):
        raise ValueError("corrupt pair symbols")
    if len(values) and values.max() >= alphabet:
        raise ValueError("corrupt pair symbols")
    return values[:n]


def mask_symbols(mask: Tensor | np.ndarray) -> np.ndarray:
    """The byte symbols (8-weight sub-sequences, most significant bit first) of a mask.

    :param mask: a boolean tensor or array.
    """
    flat = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    return np.packbits(flat.astype(bool).ravel())


def encode_mask(mask: Tensor) -> HuffmanCode:
    """Huffman-code a boolean mask by bytes (8-weight sub-sequences).

    :param mask: a boolean tensor.
    """
    return encode_symbols(mask_symbols(mask))


def decode_mask(code: HuffmanCode, shape: tuple[int, ...]) -> Tensor:
    """Decode :func:`encode_mask`' output into a boolean tensor of ``shape``.

    :param code: the Huffman code.
    :param shape: the mask's shape.
    """
    n = int(np.prod(shape))
    packed = decode_symbols(code).astype(np.uint8)
    bits = np.unpackbits(packed)[:n]
    if bits.size != n:
        raise ValueError(f"mask code holds {bits.size} bits, expected {n}")
    return torch.from_numpy(bits.astype(bool)).view(shape)


# -- avalanche-tsn 0.1 (export format version 1) -----------------------------------------

_ENTRY_V1 = struct.Struct("<hB")  # symbol (-1 is end-of-data), code length


def read_code_v1(buf: bytes, offset: int) -> tuple[HuffmanCode, int]:
    """Read one code of a version-1 file (``<III`` header, no block offsets).

    :param buf: the buffer.
    :param offset: where the code starts.
    """
    if offset + 12 > len(buf):
        raise ValueError("truncated Huffman code")
    nt, nd, count = struct.unpack_from("<III", buf, offset)
    offset += 12
    if offset + nt + nd > len(buf):
        raise ValueError("truncated Huffman code")
    return HuffmanCode(buf[offset : offset + nt], buf[offset + nt : offset + nt + nd], count), (
        offset + nt + nd
    )


def decode_symbols_v1(code: HuffmanCode) -> np.ndarray:
    """Decode a code written by avalanche-tsn 0.1 (``dahuffman``, slow: one step per bit).

    :param code: the Huffman code, as read by :func:`read_code_v1`.
    """
    from dahuffman import HuffmanCodec
    from dahuffman.huffmancodec import _EOF

    if len(code.table) % _ENTRY_V1.size:
        raise ValueError("corrupt Huffman table")
    lengths = {}
    for off in range(0, len(code.table), _ENTRY_V1.size):
        sym, size = _ENTRY_V1.unpack_from(code.table, off)
        lengths[_EOF if sym == -1 else sym] = size
    key = lambda kv: (kv[1], -1 if kv[0] is _EOF else kv[0])  # noqa: E731
    table, value, prev = {}, 0, None
    for sym, length in sorted(lengths.items(), key=key):
        if prev is not None:
            value = (value + 1) << (length - prev)
        table[sym] = (length, value)
        prev = length
    out = HuffmanCodec(table, check=False).decode(code.data)
    if len(out) != code.count:
        raise ValueError(f"Huffman data decodes to {len(out)} symbols, expected {code.count}")
    return np.asarray(out, dtype=np.int64)
