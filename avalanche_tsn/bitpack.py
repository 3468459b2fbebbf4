"""Fixed-width bit packing of quantization codes, as the export file and the tiny model hold them.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 5: a task's weights are stored as
``b``-bit codes into its codebook; here they take exactly ``b`` bits each.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_codes", "unpack_codes"]


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack integer codes into ``bits`` bits each (little-endian bit order).

    :param codes: non-negative integers below ``2^bits``.
    :param bits: bits per code, 1..16.
    """
    codes = np.asarray(codes).ravel()
    if bits in (8, 16):
        return codes.astype("<u1" if bits == 8 else "<u2").tobytes()
    if 8 % bits == 0:
        # 2, 4 or 8 codes a byte: each byte is the sum of its codes' shifted values.
        per = 8 // bits
        padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
        padded[: codes.size] = codes
        lanes = padded.reshape(-1, per)
        out = lanes[:, 0].copy()
        for j in range(1, per):
            out |= lanes[:, j] << np.uint8(j * bits)
        return out.tobytes()
    codes = codes.astype(np.int64)
    start = np.arange(codes.size, dtype=np.int64) * bits
    word, shift = start >> 5, start & 31
    n_words = (codes.size * bits + 31) // 32 + 1
    # Codes never overlap, so each 32-bit word is the sum of the code pieces that land in it.
    low = ((codes << shift) & 0xFFFFFFFF).astype(np.float64)
    high = (codes >> (32 - shift)).astype(np.float64)
    words = np.bincount(word, weights=low, minlength=n_words)
    words += np.bincount(word + 1, weights=high, minlength=n_words)
    return words.astype(np.uint64).astype("<u4").tobytes()[: (codes.size * bits + 7) // 8]


def unpack_codes(buf: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`.

    :param buf: the packed bytes.
    :param count: number of codes.
    :param bits: bits per code.
    """
    if bits in (8, 16) or 8 % bits == 0:
        size = (count * bits + 7) // 8
        raw = np.zeros(size, dtype=np.uint8)
        data = np.frombuffer(buf, dtype=np.uint8)[:size]
        raw[: data.size] = data
        if bits == 16:
            return raw.view("<u2").astype(np.int64)
        per = 8 // bits
        lanes = np.empty((size, per), dtype=np.uint8)
        for j in range(per):
            np.right_shift(raw, np.uint8(j * bits), out=lanes[:, j])
        if bits < 8:
            lanes &= np.uint8((1 << bits) - 1)
        return lanes.ravel()[:count].astype(np.int64)
    n_words = (count * bits + 31) // 32 + 2
    raw = np.zeros(4 * n_words, dtype=np.uint8)
    data = np.frombuffer(buf, dtype=np.uint8)[: 4 * n_words]
    raw[: data.size] = data
    words = raw.view("<u4").astype(np.uint64)
    start = np.arange(count, dtype=np.int64) * bits
    word, shift = start >> 5, (start & 31).astype(np.uint64)
    pair = words[word] | (words[word + 1] << np.uint64(32))
    return ((pair >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)
