"""The task table of a TinySubNets model: one row (slot) per task, in training order.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), steps 1 and 6: every task label gets its
own subnetwork, frozen once trained. The table is the single owner of what is known per task
apart from the layers' own parameters: its label, whether it is frozen, its sparsity, its
head codebook, its activation ranges and its memory samples. Its transitions are guarded
like Avalanche's ``PackNetModel`` state machine: a slot opens for a task that is not trained,
only the open slot freezes or is dropped, and a frozen slot never changes again except for
records written once after freezing (head codebook, activation ranges).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from avalanche_tsn.masks import check_sparsity
from avalanche_tsn.quantization import store_centroids
from avalanche_tsn.task_memory import TaskMemory

__all__ = ["TaskTable", "MovedBuffers", "uncalibrated", "calibrated"]


def uncalibrated(slots: int, layers: int, device: torch.device | str | None = None) -> Tensor:
    """Activation ranges of tasks not calibrated yet: the empty range ``(inf, -inf)``.

    :param slots: rows.
    :param layers: masked layers.
    :param device: where to make them (the model's device); None is the default device.
    """
    empty = torch.empty(slots, layers, 2, device=device)
    empty[..., 0], empty[..., 1] = math.inf, -math.inf
    return empty


def calibrated(ranges: Tensor) -> Tensor:
    """Which of the activation ranges ``[..., 2]`` (min, max) were calibrated (not empty).

    :param ranges: ranges as ``TaskTable.act_range`` holds them.
    """
    return ranges[..., 0] <= ranges[..., 1]


class MovedBuffers(nn.Module):
    """The names of the user's buffers that the model changed itself while a task trained.

    Learned about the model, so kept in ``state_dict`` with the rest (a strategy rebuilt
    around the model, a state dict or an export loaded into a fresh one know them): before a
    task opens, :func:`avalanche_tsn.layer_calls.check_frozen_outputs` sets them to NaN with
    the parameters. The names are one UTF-8 buffer, newline-separated.

    :param device: where the buffer lives (the model's device).
    """

    encoded: Tensor

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("encoded", torch.zeros(0, dtype=torch.uint8, device=device))

    def names(self) -> list[str]:
        """The buffers' names, in the order they were first noted."""
        text = bytes(self.encoded.cpu().tolist()).decode()
        return text.split("\n") if text else []

    def note(self, names: Sequence[str]) -> None:
        """Add ``names`` (those not noted yet).

        :param names: buffer names, as ``named_buffers`` gives them (no newline).
        """
        if any(not isinstance(n, str) or not n or "\n" in n for n in names):
            raise ValueError(f"buffer names must be non-empty strings without newlines: {names}")
        known = self.names()
        new = known + [n for n in dict.fromkeys(names) if n not in known]
        if new != known:
            data = list("\n".join(new).encode())
            self.encoded = torch.tensor(data, dtype=torch.uint8, device=self.encoded.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # written before 0.10: nothing was noted
        value = state_dict.setdefault(prefix + "encoded", torch.zeros(0, dtype=torch.uint8))
        self.encoded = torch.zeros_like(value, device=self.encoded.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TaskTable(nn.Module):
    """Per-task records of a TSN model, one slot per task; every field is a buffer.

    :param n_layers: the model's masked layers (one activation range each per task).
    :param device: where the buffers live (the model's device).
    """

    #: Buffers whose first dimension is the slot.
    BUFFERS = ("task_labels_by_slot", "slot_frozen", "slot_sparsity", "head_bits")
    BUFFERS += ("head_centroids", "act_range")
    #: Buffers of 0.6 and older, read into their new owners on loading.
    LEGACY_BUFFERS = ("memory_x", "memory_len")

    task_labels_by_slot: Tensor
    slot_frozen: Tensor
    slot_sparsity: Tensor
    head_bits: Tensor
    head_centroids: Tensor
    act_range: Tensor  # (min, max) input of each masked layer; (inf, -inf) uncalibrated

    def __init__(self, n_layers: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.register_buffer("task_labels_by_slot", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("slot_frozen", torch.zeros(0, dtype=torch.bool, device=device))
        self.register_buffer("slot_sparsity", torch.zeros(0, device=device))
        # Codebook of each task's head weights (bits 0: float32, not quantized).
        self.register_buffer("head_bits", torch.zeros(0, dtype=torch.int16, device=device))
        self.register_buffer("head_centroids", torch.zeros(0, 0, device=device))
        self.register_buffer("act_range", torch.zeros(0, n_layers, 2, device=device))
        #: each slot's memory samples (task similarity, the task router), coded losslessly
        self.samples = TaskMemory(device)
        #: the user's buffers the model changed itself while a task trained
        self.moved_buffers = MovedBuffers(device)
        self._cache: tuple[dict[int, int], frozenset[int]] | None = None

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.task_labels_by_slot)

    def _table(self) -> tuple[dict[int, int], frozenset[int]]:
        # Read on every forward: a Python copy avoids a device sync per minibatch.
        if self._cache is None:
            labels = self.task_labels_by_slot.tolist()
            frozen = self.slot_frozen.tolist()
            self._cache = (
                {t: s for s, t in enumerate(labels)},
                frozenset(s for s, f in enumerate(frozen) if f),
            )
        return self._cache

    def slot_of(self, task_label: int) -> int | None:
        """Slot of ``task_label``, or None if it never started training.

        :param task_label: a task label.
        """
        return self._table()[0].get(int(task_label))

    def frozen_slot(self, task_label: int) -> int | None:
        """Slot of ``task_label`` if it is trained (frozen), else None.

        :param task_label: a task label.
        """
        slots, frozen = self._table()
        slot = slots.get(int(task_label))
        return slot if slot in frozen else None

    def label_of(self, slot: int) -> int:
        """Task label of ``slot``.

        :param slot: a slot of the table.
        """
        return int(self.task_labels_by_slot[slot])

    def trained_tasks(self) -> list[int]:
        """Task labels whose subnetworks are frozen, in training order."""
        slots, frozen = self._table()
        return [t for t, s in sorted(slots.items(), key=lambda kv: kv[1]) if s in frozen]

    def open_task(self) -> int | None:
        """Label of the task being trained (or whose training was interrupted), or None."""
        slots, frozen = self._table()
        return next((t for t, s in slots.items() if s not in frozen), None)

    def is_trained(self, task_label: int) -> bool:
        """Whether ``task_label`` has a frozen subnetwork.

        :param task_label: a task label.
        """
        return self.frozen_slot(task_label) is not None

    def sparsity_of(self, slot: int) -> float:
        """Sparsity the task in ``slot`` was trained at.

        :param slot: a slot of the table.
        """
        return float(self.slot_sparsity[slot])

    # -- transitions -----------------------------------------------------------------------
    @torch.no_grad()
    def open(self, task_label: int, sparsity: float) -> tuple[int, bool]:
        """Open the slot of a task that is not trained, or reopen its interrupted slot.

        :param task_label: the task about to be trained.
        :param sparsity: its sparsity.
        :return: its slot, and whether the slot was open already (a restart).
        """
        check_sparsity(sparsity)
        if self.is_trained(task_label):
            raise ValueError(f"task {task_label} is already trained; its subnetwork is frozen")
        interrupted = self.open_task()
        if interrupted is not None and interrupted != int(task_label):
            raise RuntimeError(f"task {interrupted} is open; drop it before opening another")
        slot = self.slot_of(task_label)
        restart = slot is not None
        if slot is None:
            slot = len(self)
            dev = self.task_labels_by_slot.device
            self.task_labels_by_slot = torch.cat(
                [self.task_labels_by_slot, torch.tensor([int(task_label)], device=dev)]
            )
            self.slot_frozen = torch.cat([self.slot_frozen, self.slot_frozen.new_zeros(1)])
            self.slot_sparsity = torch.cat([self.slot_sparsity, self.slot_sparsity.new_zeros(1)])
            self.head_bits = torch.cat([self.head_bits, self.head_bits.new_zeros(1)])
            self.head_centroids = torch.cat(
                [
                    self.head_centroids,
                    self.head_centroids.new_zeros((1, *self.head_centroids.shape[1:])),
                ]
            )
            self.act_range = torch.cat([self.act_range, uncalibrated(1, self.n_layers, dev)])
            self._cache = None
        self.slot_sparsity[slot] = float(sparsity)
        return slot, restart

    @torch.no_grad()
    def freeze(self, task_label: int) -> int:
        """Mark the open task trained.

        :param task_label: the open task.
        :return: its slot.
        """
        slot = self.slot_of(task_label)
        if slot is None or bool(self.slot_frozen[slot]):
            raise RuntimeError(f"task {task_label} is not being trained")
        self.slot_frozen[slot] = True
        self._cache = None
        return slot

    @torch.no_grad()
    def drop_open(self) -> tuple[int, int] | None:
        """Drop the open slot (the last), as if its task had never started.

        :return: the dropped task's label and slot, or None if no task was open.
        """
        label = self.open_task()
        if label is None:
            return None
        slot = self.slot_of(label)
        if slot != len(self) - 1:  # open() only ever appends the open slot
            raise RuntimeError(f"task table corrupt: open slot {slot} is not the last")
        for name in self.BUFFERS:
            buf = getattr(self, name)
            if buf.shape[0] > slot:
                setattr(self, name, buf[:slot].clone())
        self.samples.drop(slot)
        self._cache = None
        return label, slot

    @torch.no_grad()
    def restore(
        self,
        labels: Sequence[int],
        sparsity: Sequence[float],
        head_bits: Sequence[int],
        act_range: Tensor,
    ) -> None:
        """Fill an empty table with trained tasks (a model read back from its export).

        :param labels: the task labels in slot order.
        :param sparsity: their sparsities.
        :param head_bits: their head codebooks' bit-widths (0: float32).
        :param act_range: their activation ranges, ``[slots, layers, 2]``.
        """
        if len(self):
            raise RuntimeError("only an empty task table can be restored")
        n = len(labels)
        if not (
            len(sparsity) == len(head_bits) == n and tuple(act_range.shape) == (n, self.n_layers, 2)
        ):
            raise ValueError(
                "labels, sparsity, head_bits and act_range must describe the same slots"
            )
        dev = self.task_labels_by_slot.device
        self.task_labels_by_slot = torch.tensor(list(labels), dtype=torch.long, device=dev)
        self.slot_frozen = torch.ones(n, dtype=torch.bool, device=dev)
        self.slot_sparsity = torch.tensor(list(sparsity), device=dev)
        self.head_bits = torch.tensor(list(head_bits), dtype=torch.int16, device=dev)
        self.head_centroids = torch.zeros(n, 0, device=dev)
        self.act_range = act_range.to(dev, torch.float32)
        self._cache = None

    # -- records of a slot -----------------------------------------------------------------
    @torch.no_grad()
    def set_head_codebook(self, slot: int, centroids: Tensor, bits: int) -> None:
        """Record the head codebook of the task in ``slot`` (``bits == 0``: not quantized).

        :param slot: a task's slot.
        :param centroids: the ``2^bits`` centroids.
        :param bits: the bit-width.
        """
        self.head_centroids = store_centroids(self.head_centroids, slot, centroids)
        self.head_bits[slot] = bits

    def head_codebook(self, slot: int) -> tuple[Tensor, int]:
        """The head codebook of ``slot``: its centroids and bit-width (0: float32, none).

        :param slot: a task's slot.
        """
        bits = int(self.head_bits[slot]) if slot < len(self.head_bits) else 0
        if not bits:
            return self.head_centroids.new_zeros(0), 0
        return self.head_centroids[slot, : 2**bits], bits

    @torch.no_grad()
    def set_act_range(self, slot: int, ranges: Tensor) -> None:
        """Record the calibrated activation ranges of ``slot``, ``[layers, 2]`` (min, max).

        :param slot: a task's slot.
        :param ranges: one (min, max) per masked layer.
        """
        if tuple(ranges.shape) != (self.n_layers, 2):
            raise ValueError(
                f"ranges must have shape ({self.n_layers}, 2), got {tuple(ranges.shape)}"
            )
        self.act_range[slot] = ranges.to(self.act_range)

    @torch.no_grad()
    def store_memory(self, task_label: int, x: Tensor) -> None:
        """Keep ``x`` (a few input samples) as the memory of ``task_label``.

        Stored losslessly in 8 or 16 bits where the samples allow
        (:mod:`avalanche_tsn.task_memory`).

        :param task_label: a task that has started training.
        :param x: the samples, ``[n, ...]``, the same sample shape as earlier memories.
        """
        slot = self.slot_of(task_label)
        if slot is None:
            raise ValueError(f"task {task_label} never started training")
        try:
            self.samples.store(slot, x, len(self))
        except ValueError as e:
            raise ValueError(f"task {task_label}: {e}") from None

    def memory(self, task_label: int) -> Tensor:
        """A copy of the memory samples of ``task_label`` (empty if none were kept).

        :param task_label: a task label.
        """
        # a new tensor: a caller writing into it must not change what routing reads
        return self.samples.get(self.slot_of(task_label))

    def release_memory(self) -> None:
        """Forget every task's memory samples (an inference-only model that never reads them)."""
        self.samples.clear()

    def memory_bits(self) -> int:
        """Bits the task memory stores (its codes and each task's levels)."""
        return self.samples.bits()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "task_labels_by_slot" in state_dict and prefix + "act_range" not in state_dict:
            # saved before activation ranges existed (0.2 and older): none calibrated
            n = len(state_dict[prefix + "task_labels_by_slot"])
            state_dict[prefix + "act_range"] = uncalibrated(n, self.n_layers)
        if prefix + "memory_x" in state_dict:
            _legacy_memory(state_dict, prefix)
        for name in self.BUFFERS:
            if prefix + name in state_dict:
                setattr(self, name, getattr(self, name).new_zeros(state_dict[prefix + name].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cache = None


def _legacy_memory(state_dict: dict, prefix: str) -> None:
    """A state dict of 0.6 and older (float32 ``memory_x``) in the task memory's keys."""
    x, lengths = state_dict.pop(prefix + "memory_x"), state_dict.pop(prefix + "memory_len")
    if x.dim() < 2:  # no memory kept
        x = torch.zeros(0, dtype=torch.uint8)
    rows = len(lengths)
    state_dict[prefix + "samples.codes"] = x
    state_dict[prefix + "samples.levels"] = torch.zeros(rows, 0)
    state_dict[prefix + "samples.n_levels"] = torch.zeros(rows, dtype=torch.long)
    state_dict[prefix + "samples.lengths"] = lengths
