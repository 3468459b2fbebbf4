"""The task memory: a few input samples kept per task, stored losslessly in 8 or 16 bits.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) keeps a few samples of every task to
measure task similarity (KL divergence), and the class-incremental router fits on them
(:mod:`avalanche_tsn.router`). Those samples are most of what a class-incremental TSN stores
(Fashion-MNIST: 1,531 of 1,590 KiB as float32), and input data is mostly 8-bit: an image's
256 levels (with or without one normalisation), scikit-learn's digits' 17. Each task's
samples are therefore kept as codes into a table of the distinct values they hold (its
*levels*, compared bit for bit): 8-bit codes where a task's samples hold at most 256
distinct values, 16-bit codes up to 65,536 (and fewer than half as many as values), float32
values otherwise. Decoding gives back the
stored floats bit for bit (``-0.0`` and every NaN pattern included), so nothing that reads
the memory can tell the difference, and :meth:`TaskMemory.bits` counts what is stored.
Integer samples (token ids for an embedding) are coded the same way, from their float32
values (exact below 2**24), and given back as int64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "TaskMemory",
    "level_codes",
    "code_bits",
    "coded_bytes",
    "encode_samples",
    "decode_samples",
    "CODE_DTYPES",
    "INTEGRAL_LIMIT",
]

#: integer samples must be below this in magnitude: float32 holds every such integer exactly
INTEGRAL_LIMIT = 1 << 24

#: code width in bits -> the dtype holding the codes (16-bit codes are offset into int16)
CODE_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.float32}
_OFFSET16 = 1 << 15


def code_bits(n_levels: int, n_values: int) -> int:
    """Bits a value takes coded: 8, 16, or 32 (float32) where codes would not be smaller.

    Codes cost their bits a value plus a float32 level each, so values that are mostly
    distinct (measurements, noise) stay float32.

    :param n_levels: how many distinct values the samples hold.
    :param n_values: how many values they hold.
    """
    for bits in (8, 16):
        if n_levels <= 1 << bits and bits * n_values + 32 * n_levels < 32 * n_values:
            return bits
    return 32


def level_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x``'s distinct float32 values by bit pattern, sorted by it, and each entry's index.

    Compared as bit patterns, ``-0.0`` and ``0.0`` (and NaNs of different payloads) are
    different levels, so ``levels[codes]`` is ``x`` bit for bit.

    :param x: float32 values.
    :return: ``(levels, codes)``: ``levels`` 1-d float32, ``codes`` long of ``x``'s shape.
    """
    patterns, codes = torch.unique(x.view(torch.int32), sorted=True, return_inverse=True)
    return patterns.view(torch.float32), codes


def coded_bytes(n_samples: int, sample_numel: int, n_levels: int) -> int:
    """Bytes ``n_samples`` samples take coded as the task memory codes one task's samples.

    The same count for any store of samples (a replay buffer's too), so that memory is
    compared at equal bytes: the codes plus the table of levels (none at float32).

    :param n_samples: how many samples.
    :param sample_numel: values per sample.
    :param n_levels: distinct values (bit patterns) among them.
    """
    bits = code_bits(n_levels, n_samples * sample_numel)
    table = 0 if bits == 32 else 4 * n_levels
    return n_samples * sample_numel * bits // 8 + table


def _encode(x: Tensor, levels: Tensor, codes: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``x`` (its :func:`level_codes`) as codes of ``bits`` bits and its levels (float32
    values and no levels at 32)."""
    if bits == 32:
        return x.clone(), x.new_zeros(0)
    codes = codes - _OFFSET16 if bits == 16 else codes
    return codes.to(CODE_DTYPES[bits]), levels


def encode_samples(x: Tensor, min_bits: int = 8) -> tuple[int, Tensor, Tensor]:
    """``x`` coded as the task memory codes one task's samples: ``(bits, codes, levels)``.

    :param x: the samples (stored as float32).
    :param min_bits: the narrowest width to use (8; 16 or 32 to match a wider memory).
    :return: the code width (8, 16 or 32), the codes (``uint8``, ``int16`` offset by
        ``-2**15``, or the float32 values themselves at 32) and the levels (empty at 32).
    """
    x = x.detach().to(torch.float32).contiguous()
    levels, codes = level_codes(x)
    # no samples need no width of their own
    bits = max(code_bits(len(levels), x.numel()) if x.numel() else 8, min_bits)
    codes, levels = _encode(x, levels, codes, bits)
    return bits, codes, levels


def decode_samples(bits: int, codes: Tensor, levels: Tensor) -> Tensor:
    """The float32 samples of :func:`encode_samples`'s output, bit for bit.

    :param bits: the code width: 8, 16 or 32.
    :param codes: the codes (or float32 values at 32).
    :param levels: the levels the codes index (any padding after them is never read).
    :raises ValueError: for another width, or a code that indexes no level.
    """
    if bits not in CODE_DTYPES or codes.dtype != CODE_DTYPES[bits]:
        raise ValueError(
            f"memory codes of {bits} bits must be {CODE_DTYPES.get(bits)}, got {codes.dtype}"
        )
    if bits == 32:
        return codes.clone()
    index = codes.long() + (_OFFSET16 if bits == 16 else 0)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(levels)):
        raise ValueError(f"memory codes index {len(levels)} levels out of range")
    return levels[index]


class TaskMemory(nn.Module):
    """Every task slot's memory samples, coded losslessly; owned by the task table.

    All slots share one code width (the widest any slot needs; a slot that needs more widens
    the others first, exactly). Everything is a buffer, in ``state_dict``.

    :param device: where the buffers live (the model's device).
    """

    codes: Tensor  # [slots, width, *sample]: uint8 / int16 codes or float32 values
    integral: Tensor  # bool scalar: the samples are integers (token ids), given back as int64
    levels: Tensor  # [slots, L]: each slot's distinct values, zero-padded
    n_levels: Tensor  # [slots]: how many of a slot's levels are real
    lengths: Tensor  # [slots]: how many of a slot's rows are samples

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("codes", torch.zeros(0, dtype=torch.uint8, device=device))
        self.register_buffer("levels", torch.zeros(0, 0, device=device))
        self.register_buffer("n_levels", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("integral", torch.zeros((), dtype=torch.bool, device=device))

    def bits_per_value(self) -> int:
        """The code width every stored value takes: 8, 16 or 32 (float32)."""
        return {torch.uint8: 8, torch.int16: 16}.get(self.codes.dtype, 32)

    def sample_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample, or None before the first memory is kept."""
        return None if self.codes.dim() < 2 else tuple(self.codes.shape[2:])

    def revision(self) -> tuple[int, int]:
        """Changes whenever the stored samples change (for caches of what is derived)."""
        return id(self.codes), self.codes._version

    def get(self, slot: int | None) -> Tensor:
        """The samples kept in ``slot``, bit for bit as stored (a new tensor): float32, or
        int64 where they are integers.

        :param slot: a slot index; None (or a slot with no memory): no samples.
        """
        shape = self.sample_shape() or ()
        dtype = torch.long if bool(self.integral) else torch.float32
        if self.codes.dim() < 2 or slot is None or slot >= len(self.lengths):
            return torch.zeros((0, *shape), device=self.codes.device, dtype=dtype)
        rows = self.codes[slot, : int(self.lengths[slot])]
        return decode_samples(self.bits_per_value(), rows, self.levels[slot]).to(dtype)

    def bits(self) -> int:
        """Bits the memory stores: each sample's codes plus each slot's levels (float32)."""
        shape = self.sample_shape()
        if shape is None:
            return 0
        per_sample = int(torch.tensor(shape).prod()) * self.bits_per_value()
        return per_sample * int(self.lengths.sum()) + 32 * int(self.n_levels.sum())

    @torch.no_grad()
    def store(self, slot: int, x: Tensor, n_slots: int) -> None:
        """Keep ``x`` as the samples of ``slot`` (replacing any), in a table of ``n_slots``.

        Checked before anything changes: the sample shape must match the earlier memories'.

        :param slot: the slot, below ``n_slots``.
        :param x: the samples, ``[n, *sample]``: floats (stored as float32) or integers below
            :data:`INTEGRAL_LIMIT` in magnitude (token ids), as the earlier memories.
        :param n_slots: how many slots the task table has.
        """
        integral = not (x.is_floating_point() or x.is_complex())
        shape = self.sample_shape()
        if shape is not None and shape != tuple(x.shape[1:]):
            raise ValueError(
                f"memory samples have shape {tuple(x.shape[1:])}, earlier ones {shape}"
            )
        if shape is not None and integral != bool(self.integral):
            kinds = ("floats", "integers")
            raise ValueError(
                f"memory samples are {kinds[integral]}, earlier ones {kinds[bool(self.integral)]}"
            )
        if integral and x.numel() and int(x.abs().max()) >= INTEGRAL_LIMIT:
            raise ValueError(
                f"integer memory samples must lie within +-{INTEGRAL_LIMIT - 1} (float32 holds "
                f"them exactly), got {int(x.abs().max())}"
            )
        x = x.detach().to(self.lengths.device, torch.float32).contiguous()
        if not 0 <= slot < n_slots:
            raise ValueError(f"slot must lie in [0, {n_slots}), got {slot}")
        bits, codes, levels = encode_samples(x, self.bits_per_value() if shape is not None else 8)
        self._reshape(n_slots, len(x), tuple(x.shape[1:]), bits)
        if len(levels) > self.levels.shape[1]:
            wider = self.levels.new_zeros((len(self.levels), len(levels)))
            wider[:, : self.levels.shape[1]] = self.levels
            self.levels = wider
        self.codes[slot].zero_()
        self.codes[slot, : len(x)] = codes
        self.levels[slot].zero_()
        self.levels[slot, : len(levels)] = levels
        self.n_levels[slot] = len(levels)
        self.lengths[slot] = len(x)
        self.integral.fill_(integral)

    def clear(self) -> None:
        """Forget every slot's samples (a model that no longer needs them releases them)."""
        self.drop(0)

    def drop(self, slot: int) -> None:
        """Forget slot ``slot`` and every slot after it (the task table dropped them).

        :param slot: the first slot to forget.
        """
        for name in ("codes", "levels", "n_levels", "lengths"):
            buf = getattr(self, name)
            if buf.shape[0] > slot:
                setattr(self, name, buf[:slot].clone())

    def _reshape(self, n_slots: int, width: int, shape: tuple[int, ...], bits: int) -> None:
        """Room for ``n_slots`` slots of ``width`` samples of ``shape``, codes of ``bits``."""
        rows = max(n_slots, len(self.lengths))
        width = max(width, self.codes.shape[1] if self.codes.dim() >= 2 else 0)
        same = self.codes.dim() >= 2 and (rows, width) == tuple(self.codes.shape[:2])
        if same and bits == self.bits_per_value():
            return
        old = [self.get(s) for s in range(len(self.lengths))]
        dev = self.lengths.device
        self.codes = torch.zeros((rows, width, *shape), dtype=CODE_DTYPES[bits], device=dev)
        self.levels = torch.zeros((rows, 0), device=dev)
        self.n_levels = torch.zeros(rows, dtype=torch.long, device=dev)
        lengths = self.lengths
        self.lengths = torch.zeros(rows, dtype=torch.long, device=dev)
        self.lengths[: len(lengths)] = lengths
        for s, samples in enumerate(old):
            if len(samples):
                self.store(s, samples, rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "integral" not in state_dict:  # written before integer samples were kept
            state_dict[prefix + "integral"] = torch.zeros((), dtype=torch.bool)
        # shapes and the code dtype follow what was stored
        for name in ("codes", "levels", "n_levels", "lengths"):
            value = state_dict.get(prefix + name)
            if value is not None:
                setattr(self, name, torch.zeros_like(value, device=self.lengths.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
