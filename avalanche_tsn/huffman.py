"""Huffman coding of task masks and ownership maps (``dahuffman``).

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), appendix "Huffman encoding and
decoding": a sparse binary mask is cut into sub-sequences, the sub-sequences are Huffman
coded, and the code table is stored beside the bits. Here a boolean mask is cut into bytes
(8-weight sub-sequences); an ownership map (one small integer per weight) is coded per weight.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
from dahuffman import HuffmanCodec
from dahuffman.huffmancodec import _EOF
from torch import Tensor

__all__ = ["HuffmanCode", "encode_symbols", "decode_symbols", "encode_mask", "decode_mask"]

_ENTRY = struct.Struct("<hB")  # symbol (-1 is end-of-data), code length


def _canonical(lengths: dict) -> dict:
    # Canonical codes are fixed by the code lengths alone, so only lengths are stored.
    key = lambda kv: (kv[1], -1 if kv[0] is _EOF else kv[0])  # noqa: E731
    table, code, prev = {}, 0, None
    for sym, length in sorted(lengths.items(), key=key):
        if prev is not None:
            code = (code + 1) << (length - prev)
        table[sym] = (length, code)
        prev = length
    return table


@dataclass(frozen=True)
class HuffmanCode:
    """Huffman-coded symbols: the code table and the bit stream."""

    table: bytes
    data: bytes
    count: int

    @property
    def nbits(self) -> int:
        """Bits needed to store the code: table, data and the symbol count (32 bits)."""
        return 8 * (len(self.table) + len(self.data)) + 32

    def to_bytes(self) -> bytes:
        """Serialise (lengths first) for a compact file."""
        head = struct.pack("<III", len(self.table), len(self.data), self.count)
        return head + self.table + self.data

    @classmethod
    def from_bytes(cls, buf: bytes, offset: int = 0) -> tuple[HuffmanCode, int]:
        """Read one code written by :meth:`to_bytes`; returns it and the next offset.

        :param buf: the buffer.
        :param offset: where the code starts.
        """
        nt, nd, count = struct.unpack_from("<III", buf, offset)
        offset += 12
        if offset + nt + nd > len(buf):
            raise ValueError("truncated Huffman code")
        table = buf[offset : offset + nt]
        data = buf[offset + nt : offset + nt + nd]
        return cls(table, data, count), offset + nt + nd


def encode_symbols(symbols: np.ndarray) -> HuffmanCode:
    """Huffman-code a 1-D array of non-negative integers.

    :param symbols: the symbols.
    """
    values = [int(v) for v in np.asarray(symbols).ravel()]
    if values and not 0 <= min(values) <= max(values) < 2**15:
        raise ValueError("symbols must be integers in [0, 32768)")
    lengths = {
        sym: size for sym, (size, _) in HuffmanCodec.from_data(values).get_code_table().items()
    }
    table = _canonical(lengths)
    packed = b"".join(_ENTRY.pack(-1 if sym is _EOF else sym, n) for sym, (n, _) in table.items())
    return HuffmanCode(packed, HuffmanCodec(table, check=False).encode(values), len(values))


def decode_symbols(code: HuffmanCode) -> np.ndarray:
    """Decode :func:`encode_symbols`' output exactly.

    :param code: the Huffman code.
    """
    if len(code.table) % _ENTRY.size:
        raise ValueError("corrupt Huffman table")
    lengths = {}
    for off in range(0, len(code.table), _ENTRY.size):
        sym, size = _ENTRY.unpack_from(code.table, off)
        lengths[_EOF if sym == -1 else sym] = size
    out = HuffmanCodec(_canonical(lengths), check=False).decode(code.data)
    if len(out) != code.count:
        raise ValueError(f"Huffman data decodes to {len(out)} symbols, expected {code.count}")
    return np.asarray(out, dtype=np.int64)


def encode_mask(mask: Tensor) -> HuffmanCode:
    """Huffman-code a boolean mask by bytes (8-weight sub-sequences).

    :param mask: a boolean tensor.
    """
    bits = np.packbits(mask.detach().cpu().numpy().astype(np.uint8).ravel())
    return encode_symbols(bits)


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
