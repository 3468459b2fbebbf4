"""Maskable layers and per-task normalisation for TinySubNets.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024): one backbone holds every task; task
``t`` reads the weights its boolean mask selects, a weight belongs to the first task that
trained it (``owner``) and is frozen after. Biases and normalisation statistics are small,
so each task keeps its own copy of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche_tsn.masks import keep_count, ste_masked_weight, topk_mask, topk_threshold
from avalanche_tsn.quantization import store_centroids

__all__ = ["MaskedLayer", "TSNLinear", "TSNConv2d", "TaskBatchNorm", "FREE"]

#: ``owner`` value of a weight that no trained task uses.
FREE = -1

#: Training steps between two exact recomputations of a live mask's threshold.
THRESHOLD_REFRESH = 8


class _PerTaskBuffers(nn.Module):
    """Buffers whose first dimension is the task slot; resized when a state dict is loaded."""

    _slot_buffers: tuple[str, ...] = ()
    #: Further buffers whose shape a state dict decides (bank copies).
    _sized_buffers: tuple[str, ...] = ()

    def _grow(self, n_slots: int) -> None:
        for name in self._slot_buffers:
            buf = getattr(self, name)
            if buf is None or buf.shape[0] >= n_slots:
                continue
            extra = buf.new_zeros((n_slots - buf.shape[0], *buf.shape[1:]))
            setattr(self, name, torch.cat([buf, extra]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # A freshly built model has no task slots yet; make room for the saved ones.
        for name in self._slot_buffers + self._sized_buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name) is not None:
                saved = state_dict[key]
                current = getattr(self, name)
                setattr(self, name, current.new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._loaded()

    def _loaded(self) -> None:
        """Hook run after a state dict is loaded."""


class MaskedLayer(_PerTaskBuffers):
    """Base of :class:`TSNLinear` and :class:`TSNConv2d`.

    ``weight`` and ``bias`` are the user's own parameters (so an optimizer built on the user's
    model keeps working); ``scores`` are new. ``task_masks[s]`` is the frozen mask of the task
    in slot ``s``; ``owner`` holds the slot that owns each weight or :data:`FREE`.

    Banks (fresh copies of the backbone for tasks unlike earlier ones): ``weight`` and
    ``owner`` belong to the bank in ``loaded_bank``; the others are kept in ``bank_weights``
    and ``bank_owners`` (empty while there is one bank); ``slot_bank[s]`` is each task's bank.
    """

    _slot_buffers = ("task_masks", "task_bias", "task_bits", "task_centroids", "slot_bank")
    _sized_buffers = ("bank_weights", "bank_owners")

    weight: nn.Parameter
    bias: nn.Parameter | None
    scores: nn.Parameter
    owner: Tensor
    task_masks: Tensor
    task_bias: Tensor | None

    def _init_masking(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        self.weight = weight
        self.bias = bias
        scores = torch.empty_like(weight.detach())
        # WSN initialises scores like weights (Kaiming uniform).
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        self.scores = nn.Parameter(scores)
        self.register_buffer("owner", torch.full(weight.shape, FREE, dtype=torch.int16))
        self.register_buffer("task_masks", torch.zeros((0, *weight.shape), dtype=torch.bool))
        self.register_buffer(
            "task_bias", None if bias is None else bias.detach().new_zeros((0, bias.numel()))
        )
        # Codebook of each task's own weights: bit-width (0: float32, not quantized) and
        # centroids; the codes are implied by the weights, which hold centroid values.
        self.register_buffer("task_bits", torch.zeros(0, dtype=torch.int16))
        self.register_buffer("task_centroids", torch.zeros(0, 0))
        self.register_buffer("slot_bank", torch.zeros(0, dtype=torch.int16))
        self.register_buffer("bank_weights", torch.zeros((0, *weight.shape)))
        self.register_buffer("bank_owners", torch.zeros((0, *weight.shape), dtype=torch.int16))
        self.register_buffer("loaded_bank", torch.zeros((), dtype=torch.long))
        self._banks: tuple[list[int], int] | None = None
        self.register_buffer("_snapshot", None, persistent=False)
        self.register_buffer("_frozen", None, persistent=False)
        self.active_slot = FREE
        self.live_keep = keep_count(weight.numel(), 0.5)
        self._eval_mask_cache: tuple[int, int, Tensor] | None = None
        self._threshold: Tensor | None = None
        self._threshold_age = 0

    # -- masks --------------------------------------------------------------------------
    def set_live_sparsity(self, sparsity: float) -> None:
        """Set the sparsity of the live (training or untrained) mask.

        :param sparsity: fraction of the layer the live mask leaves out.
        """
        self.live_keep = keep_count(self.weight.numel(), sparsity)
        self._threshold = None

    def live_mask(self) -> Tensor:
        """Exact boolean mask the current scores select."""
        version = self.scores._version
        cache = self._eval_mask_cache
        stale = cache is None or cache[2].device != self.scores.device
        if stale or cache[0] != version or cache[1] != self.live_keep:
            cache = (version, self.live_keep, topk_mask(self.scores, self.live_keep))
            self._eval_mask_cache = cache
        return cache[2]

    def _live_threshold(self) -> Tensor:
        # An exact selection every step costs as much as the layer's whole forward; scores
        # move little per step, so the threshold is refreshed every THRESHOLD_REFRESH steps.
        # The frozen mask is always an exact top-k of the final scores.
        if self._threshold is None or self._threshold_age >= THRESHOLD_REFRESH:
            self._threshold = topk_threshold(self.scores, self.live_keep)
            self._threshold_age = 0
        self._threshold_age += 1
        return self._threshold

    def effective_params(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of the active task (``active_slot``) or of the live subnetwork."""
        slot = self.active_slot
        if slot != FREE:
            bias = None if self.task_bias is None else self.task_bias[slot]
            return self.bank_weight(self.bank_of_slot(slot)) * self.task_masks[slot], bias
        if self.training and torch.is_grad_enabled():
            return ste_masked_weight(self.weight, self.scores, self._live_threshold()), self.bias
        return self.weight * self.live_mask(), self.bias

    # -- task life cycle ----------------------------------------------------------------
    # -- banks --------------------------------------------------------------------------
    @property
    def n_banks(self) -> int:
        """Number of banks (copies of this layer's weights)."""
        return max(1, self.bank_weights.shape[0])

    def bank_of_slot(self, slot: int) -> int:
        """Bank of the task in ``slot``.

        :param slot: a task slot.
        """
        return self._bank_table()[0][slot]

    def _bank_table(self) -> tuple[list[int], int]:
        # A Python copy avoids a device sync per forward.
        if self._banks is None:
            self._banks = (self.slot_bank.tolist(), int(self.loaded_bank))
        return self._banks

    def bank_weight(self, bank: int) -> Tensor:
        """Weights of ``bank`` (the live ``weight`` for the loaded bank).

        :param bank: a bank index.
        """
        return self.weight if bank == self._bank_table()[1] else self.bank_weights[bank]

    def bank_owner(self, bank: int) -> Tensor:
        """Ownership map of ``bank``.

        :param bank: a bank index.
        """
        return self.owner if bank == self._bank_table()[1] else self.bank_owners[bank]

    def slot_owner(self, slot: int) -> Tensor:
        """Ownership map of the bank of the task in ``slot``.

        :param slot: a task slot.
        """
        return self.bank_owner(self.bank_of_slot(slot))

    @torch.no_grad()
    def _load_bank(self, bank: int) -> None:
        current = int(self.loaded_bank)
        if bank == current:
            return
        n = self.n_banks
        if bank > n:
            raise ValueError(f"bank must be an existing bank (0..{n - 1}) or {n} for a new one")
        rows = max(n, bank + 1)
        if self.bank_weights.shape[0] < rows:
            extra = rows - self.bank_weights.shape[0]
            self.bank_weights = torch.cat(
                [self.bank_weights, self.weight.detach().new_zeros((extra, *self.weight.shape))]
            )
            self.bank_owners = torch.cat(
                [self.bank_owners, self.owner.new_full((extra, *self.owner.shape), FREE)]
            )
        self.bank_weights[current] = self.weight.detach()
        self.bank_owners[current] = self.owner
        if bank == n:  # a fresh copy, initialised as the layer's own reset would
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.owner.fill_(FREE)
        else:
            self.weight.copy_(self.bank_weights[bank])
            self.owner.copy_(self.bank_owners[bank])
        self.loaded_bank.fill_(bank)
        self._banks = None

    def _loaded(self) -> None:
        self._banks = None

    def begin_task(self, slot: int, bank: int = 0) -> None:
        """Make room for ``slot``, load its bank and snapshot the weights earlier tasks own.

        :param slot: the slot of the task about to be trained.
        :param bank: its bank: an existing one, or ``n_banks`` to open a fresh copy.
        """
        self._grow(slot + 1)
        self._load_bank(bank)
        self.slot_bank[slot] = bank
        self._banks = None
        self._threshold = None
        frozen = self.owner != FREE
        if bool(frozen.any()):
            self._frozen = frozen
            self._snapshot = self.weight.detach().clone()
        else:
            self._frozen = self._snapshot = None

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Undo any optimizer change to weights owned by earlier tasks (momentum, decay...)."""
        if self._frozen is not None:
            self.weight.data.copy_(torch.where(self._frozen, self._snapshot, self.weight.data))

    @torch.no_grad()
    def end_task(self, slot: int) -> None:
        """Freeze the task in ``slot``: its mask from the final scores, ownership, bias.

        :param slot: the slot of the task just trained.
        """
        self.restore_frozen()
        mask = topk_mask(self.scores, self.live_keep)
        self.task_masks[slot] = mask
        self.owner[(self.owner == FREE) & mask] = slot
        if self.task_bias is not None and self.bias is not None:
            self.task_bias[slot] = self.bias.detach()
        self._frozen = self._snapshot = None

    @torch.no_grad()
    def set_codebook(self, slot: int, centroids: Tensor, bits: int) -> None:
        """Record the codebook of the task in ``slot`` (``bits == 0``: not quantized).

        :param slot: a trained task's slot.
        :param centroids: the ``2^bits`` centroids.
        :param bits: the bit-width.
        """
        self.task_centroids = store_centroids(self.task_centroids, slot, centroids)
        self.task_bits[slot] = bits

    def own_mask(self, slot: int) -> Tensor:
        """Weights the task in ``slot`` owns (trained first).

        :param slot: a trained task's slot.
        """
        return self.slot_owner(slot) == slot

    def shared_mask(self, slot: int) -> Tensor:
        """Weights of earlier tasks that the task in ``slot`` reads.

        :param slot: a trained task's slot.
        """
        return self.task_masks[slot] & (self.slot_owner(slot) != slot)


class TSNLinear(MaskedLayer):
    """An ``nn.Linear`` whose weights are selected per task by a learned mask."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self._init_masking(layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.effective_params()
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TSNConv2d(MaskedLayer):
    """An ``nn.Conv2d`` whose weights are selected per task by a learned mask."""

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels = layer.in_channels
        self.out_channels = layer.out_channels
        self.kernel_size = layer.kernel_size
        self.stride = layer.stride
        self.padding = layer.padding
        self.dilation = layer.dilation
        self.groups = layer.groups
        self.padding_mode = layer.padding_mode
        self._pad = layer._reversed_padding_repeated_twice
        self._init_masking(layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.effective_params()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class TaskBatchNorm(_PerTaskBuffers):
    """BatchNorm with per-task running statistics and affine terms.

    While a task trains, the layer behaves as the user's BatchNorm (live statistics). When the
    task ends its statistics and affine terms are frozen into ``task_*[slot]`` and evaluation
    always uses them, so a sample's output never depends on the rest of its minibatch (TSN's
    own backbones use batch statistics at test time, which breaks mixed-task minibatches).
    """

    _slot_buffers = ("task_mean", "task_var", "task_weight", "task_bias")

    def __init__(self, layer: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        super().__init__()
        c = layer.num_features
        self.num_features = c
        self.eps = layer.eps
        self.momentum = layer.momentum
        self.weight = layer.weight
        self.bias = layer.bias
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("task_mean", torch.zeros(0, c))
        self.register_buffer("task_var", torch.zeros(0, c))
        affine = layer.weight is not None
        self.register_buffer("task_weight", torch.zeros(0, c) if affine else None)
        self.register_buffer("task_bias", torch.zeros(0, c) if affine else None)
        self.active_slot = FREE

    def begin_task(self, slot: int) -> None:
        """Start a task with fresh statistics.

        :param slot: the slot of the task about to be trained.
        """
        self._grow(slot + 1)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def restore_frozen(self) -> None:
        """Nothing to restore: frozen tasks read their own copies."""

    @torch.no_grad()
    def end_task(self, slot: int) -> None:
        """Freeze the live statistics and affine terms into ``slot``.

        :param slot: the slot of the task just trained.
        """
        self.task_mean[slot] = self.running_mean
        self.task_var[slot] = self.running_var
        if self.task_weight is not None and self.weight is not None:
            self.task_weight[slot] = self.weight.detach()
        if self.task_bias is not None and self.bias is not None:
            self.task_bias[slot] = self.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        slot = self.active_slot
        if slot != FREE:
            weight = None if self.task_weight is None else self.task_weight[slot]
            bias = None if self.task_bias is None else self.task_bias[slot]
            return F.batch_norm(
                x, self.task_mean[slot], self.task_var[slot], weight, bias, False, 0.0, self.eps
            )
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            0.0 if momentum is None else momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"
