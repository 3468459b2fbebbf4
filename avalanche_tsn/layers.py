"""Maskable layers and per-task normalisation for TinySubNets.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024): one backbone holds every task; task
``t`` reads the weights its boolean mask selects, a weight belongs to the first task that
trained it (``owner``) and is frozen after. Biases and normalisation statistics are small,
so each task keeps its own copy of them.

The guarantee that nothing changes a trained task rests on one rule: the values trained tasks
read live in buffers (``bank_weights``, ``task_masks``, ``task_bias``...) that no optimizer
holds, and they are applied by selection, never by multiplication (``0 * NaN`` is NaN). The
user's ``weight`` parameter is the optimizer's working copy: it is read only where no trained
task owns the weight.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche_tsn.kernels import KernelUser, train_weight
from avalanche_tsn.masks import (
    LiveWorkspace,
    keep_count,
    pack_mask,
    packed_size,
    topk_mask,
    topk_threshold,
    unpack_mask,
)
from avalanche_tsn.quantization import store_centroids
from avalanche_tsn.routing import FREE, TaskRouted

__all__ = [
    "MaskedLayer",
    "TSNLinear",
    "TSNConv1d",
    "TSNConv2d",
    "TSNConv3d",
    "TSNEmbedding",
    "TaskNorm",
    "TaskBatchNorm",
    "TaskAffineNorm",
    "TaskPReLU",
    "affine_norm_signature",
    "FREE",
    "module_device",
]


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` lives: its first parameter's or buffer's device (the CPU if none).

    Buffers TSN adds to a module are made there, so a model wrapped on a GPU stays there.

    :param module: any module.
    """
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


#: Training steps between two exact recomputations of a live mask's threshold.
THRESHOLD_REFRESH = 8

#: Trained tasks whose effective weights each layer keeps ready for evaluation (the model
#: raises it to fit its memory budget, see ``TSNModel.eval_cache_bytes``).
EVAL_CACHE_SIZE = 4


def _fingerprint(tensors: tuple[Tensor | None, ...]) -> tuple:
    """The tensors themselves and their versions: a replacement or in-place change alters it."""
    return tuple((t, None if t is None else t._version) for t in tensors)


def _matches(fingerprint: tuple, tensors: tuple[Tensor | None, ...]) -> bool:
    return all(
        t is k and (t is None or t._version == v)
        for t, (k, v) in zip(tensors, fingerprint, strict=True)
    )


class _PerTaskBuffers(TaskRouted):
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

    def _shrink(self, n_slots: int) -> None:
        for name in self._slot_buffers:
            buf = getattr(self, name)
            if buf is not None and buf.shape[0] > n_slots:
                setattr(self, name, buf[:n_slots].clone())

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


class _Banks:
    """The backbone copies (banks) of a masked layer: which task owns each weight of each.

    ``bank_weights`` and ``bank_owners`` hold every bank; the loaded bank's free weights are
    the user's ``weight`` parameter, where the task in training learns.
    """

    weight: nn.Parameter
    bank_weights: Tensor
    bank_owners: Tensor
    slot_bank: Tensor
    loaded_bank: Tensor
    _banks: tuple[list[int], int] | None

    @property
    def n_banks(self) -> int:
        """Number of banks (copies of this layer's weights)."""
        return self.bank_weights.shape[0]

    @property
    def owner(self) -> Tensor:
        """Ownership map of the loaded bank (a view of ``bank_owners``)."""
        return self.bank_owners[self._bank_table()[1]]

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

    def bank_owner(self, bank: int) -> Tensor:
        """Ownership map of ``bank``.

        :param bank: a bank index.
        """
        return self.bank_owners[bank]

    def slot_owner(self, slot: int) -> Tensor:
        """Ownership map of the bank of the task in ``slot``.

        :param slot: a task slot.
        """
        return self.bank_owners[self.bank_of_slot(slot)]

    def free_fraction(self, bank: int | None = None) -> float:
        """Fraction of the weights of ``bank`` (default: the loaded one) that no task owns.

        :param bank: a bank index.
        """
        bank = self._bank_table()[1] if bank is None else bank
        owners = self.bank_owners[bank]
        return int((owners == FREE).sum()) / max(owners.numel(), 1)

    @torch.no_grad()
    def _load_bank(self, bank: int) -> None:
        current = int(self.loaded_bank)
        if bank == current:
            return
        n = self.n_banks
        if not 0 <= bank <= n:
            raise ValueError(f"bank must be an existing bank (0..{n - 1}) or {n} for a new one")
        # Owned entries of the bank being unloaded are already in bank_weights; keep its free
        # entries too (a later task of that bank starts from them).
        free = self.bank_owners[current] == FREE
        self.bank_weights[current] = torch.where(
            free, self.weight.detach(), self.bank_weights[current]
        )
        if bank == n:  # a fresh copy, initialised as the layer's own reset would
            fresh = torch.empty_like(self.weight.detach())
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            self.bank_weights = torch.cat([self.bank_weights, fresh.unsqueeze(0)])
            self.bank_owners = torch.cat(
                [self.bank_owners, torch.full_like(self.bank_owners[:1], FREE)]
            )
        self.weight.copy_(self.bank_weights[bank])
        self.loaded_bank.fill_(bank)
        self._banks = None


class _OwnedValues:
    """A trained task's own weights of a masked layer: what pruning, quantization, the
    encoding and a restored export read and write (always by selection, never through the
    optimizer's parameter)."""

    weight: nn.Parameter
    bank_weights: Tensor
    bank_owners: Tensor
    task_masks: Tensor
    task_bias: Tensor | None
    task_bits: Tensor
    task_centroids: Tensor
    slot_bank: Tensor
    loaded_bank: Tensor

    @torch.no_grad()
    def restore_tasks(
        self,
        weights: Tensor,
        owners: list[Tensor],
        masks: list[Tensor],
        biases: list[Tensor],
        codebooks: list[tuple[Tensor, int]],
        banks: list[int],
    ) -> None:
        """Fill a layer that holds no task with trained tasks read back from an export.

        :param weights: the bank copies, ``[banks, *weight.shape]``.
        :param owners: each bank's ownership map (slot or FREE per weight).
        :param masks: each slot's packed mask.
        :param biases: each slot's bias (empty if the layer has none).
        :param codebooks: each slot's (centroids, bits); bits 0: float32, not quantized.
        :param banks: each slot's bank.
        """
        if len(self.task_bits):
            raise RuntimeError("only a layer without tasks can be restored")
        n, device = len(banks), self.weight.device
        self.bank_weights = weights.to(self.weight)
        self.bank_owners = torch.stack(owners).to(device)
        self.loaded_bank.fill_(banks[-1])
        self.weight.copy_(weights[banks[-1]])
        self.slot_bank = torch.tensor(banks, dtype=torch.int16, device=device)
        self.task_masks = torch.stack(masks).to(device)
        if self.task_bias is not None:
            self.task_bias = torch.stack(biases).to(self.weight)
        self.task_bits = torch.tensor([b for _, b in codebooks], dtype=torch.int16, device=device)
        self.task_centroids = self.task_centroids.new_zeros((n, 0))
        for slot, (book, b) in enumerate(codebooks):
            if b:
                self.set_codebook(slot, book, b)
        self._loaded()

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

    def own_values(self, slot: int) -> Tensor:
        """Frozen values of the weights the task in ``slot`` owns, in flat order.

        :param slot: a trained task's slot.
        """
        return self.bank_weights[self.bank_of_slot(slot)][self.own_mask(slot)]

    @torch.no_grad()
    def set_own_values(self, slot: int, values: Tensor) -> None:
        """Replace the frozen values of the weights the task in ``slot`` owns.

        :param slot: a trained task's slot.
        :param values: new values, in the order of :meth:`own_values`.
        """
        bank = self.bank_of_slot(slot)
        own = self.own_mask(slot)
        self.bank_weights[bank][own] = values.to(self.bank_weights)
        if bank == self._bank_table()[1]:
            self._sync_weight()

    def shared_mask(self, slot: int) -> Tensor:
        """Weights of earlier tasks that the task in ``slot`` reads.

        :param slot: a trained task's slot.
        """
        return self.task_mask(slot) & (self.slot_owner(slot) != slot)

    def task_mask(self, slot: int) -> Tensor:
        """The boolean mask of the task in ``slot`` (shape of ``weight``).

        :param slot: a task slot.
        """
        return unpack_mask(self.task_masks[slot], self.weight.shape)

    def set_task_mask(self, slot: int, mask: Tensor) -> None:
        """Store the boolean mask of the task in ``slot``.

        :param slot: a task slot.
        :param mask: a boolean tensor of the shape of ``weight``.
        """
        self.task_masks[slot] = pack_mask(mask)

    @torch.no_grad()
    def release(self, slot: int, idx: Tensor) -> None:
        """Take weights from the task in ``slot``: out of its mask, free for later tasks.

        Every weight named must be the task's own and read by no later task of its bank
        (checked before anything changes): what a later task reads stays frozen.

        :param slot: a trained task's slot.
        :param idx: flat indices into the weight.
        """
        owners = self.slot_owner(slot).view(-1)
        if not bool((owners[idx] == slot).all()):
            raise ValueError(f"only weights the task in slot {slot} owns can be released")
        bank = self.bank_of_slot(slot)
        for later in range(slot + 1, len(self.task_masks)):
            if self.bank_of_slot(later) == bank and bool(self.task_mask(later).view(-1)[idx].any()):
                raise ValueError(
                    f"the task in slot {later} reads weights named; they stay with slot {slot}"
                )
        self._assign(slot, idx, FREE)

    @torch.no_grad()
    def reclaim(self, slot: int, idx: Tensor) -> None:
        """Give free weights to the task in ``slot`` again (undoes :meth:`release`).

        :param slot: a trained task's slot.
        :param idx: flat indices of free weights.
        """
        if not bool((self.slot_owner(slot).view(-1)[idx] == FREE).all()):
            raise ValueError("only free weights can be reclaimed")
        self._assign(slot, idx, slot)

    def _assign(self, slot: int, idx: Tensor, owner: int) -> None:
        mask = self.task_mask(slot).view(-1)
        mask[idx] = owner == slot
        self.set_task_mask(slot, mask.view(self.weight.shape))
        self.slot_owner(slot).view(-1)[idx] = owner

    def slot_state(self, slot: int) -> tuple[Tensor, Tensor]:
        """A copy of what :meth:`release` changes: the slot's mask and its bank's ownership.

        :param slot: a trained task's slot.
        """
        return self.task_masks[slot].clone(), self.slot_owner(slot).clone()

    @torch.no_grad()
    def restore_slot_state(self, slot: int, state: tuple[Tensor, Tensor]) -> None:
        """Put back what :meth:`slot_state` copied.

        :param slot: the slot it was copied from.
        :param state: the copy.
        """
        mask, owners = state
        self.task_masks[slot] = mask
        self.slot_owner(slot).copy_(owners)


@dataclass(slots=True)
class _StepState:
    """What a masked layer's live forward keeps from step to step, outside the module's
    attributes (``nn.Module.__setattr__`` costs about 1.2 us a call here against 0.04 us,
    a few calls a step)."""

    #: the live mask's threshold and the steps it has served (see ``THRESHOLD_REFRESH``)
    threshold: Tensor | None = None
    age: int = 0
    #: ``weight``'s version when the frozen values were last written into it
    synced_version: int | None = None


class MaskedLayer(_Banks, _OwnedValues, _PerTaskBuffers, KernelUser):
    """Base of :class:`TSNLinear` and :class:`TSNConv2d`.

    ``weight`` and ``bias`` are the user's own parameters (so an optimizer built on the user's
    model keeps working); ``scores`` are new. What trained tasks read is kept in buffers:

    - ``bank_weights[b]``: the weights of bank ``b`` (a bank is a copy of the backbone; there
      is one unless task matching opens more). Where a trained task owns a weight this is its
      frozen value; elsewhere it is the free weight's value when the bank was last unloaded.
    - ``bank_owners[b]``: the slot that owns each weight of bank ``b``, or :data:`FREE`.
    - ``task_masks[s]``: the mask of the task in slot ``s``, bit-packed (1 bit per weight).
    - ``task_bias[s]``, ``task_bits[s]``, ``task_centroids[s]``: its bias and codebook.

    ``weight`` holds the loaded bank (``loaded_bank``): it is synchronised with the frozen
    values at task boundaries, but only its free entries are ever read.
    """

    _slot_buffers = ("task_masks", "task_bias", "task_bits", "task_centroids", "slot_bank")
    _sized_buffers = ("bank_weights", "bank_owners")
    # Version 2: frozen values in bank_weights, bit-packed masks (version 1 read ``weight``).
    _version = 2

    weight: nn.Parameter
    bias: nn.Parameter | None
    scores: nn.Parameter
    bank_weights: Tensor
    bank_owners: Tensor
    task_masks: Tensor
    task_bias: Tensor | None

    def _init_masking(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        self.weight = weight
        self.bias = bias
        scores = torch.empty_like(weight.detach())
        # WSN initialises scores like weights (Kaiming uniform).
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        self.scores = nn.Parameter(scores)
        self.register_buffer("bank_weights", weight.detach().clone().unsqueeze(0))
        dev = weight.device
        self.register_buffer(
            "bank_owners", torch.full((1, *weight.shape), FREE, dtype=torch.int16, device=dev)
        )
        self.register_buffer("loaded_bank", torch.zeros((), dtype=torch.long, device=dev))
        self.register_buffer(
            "task_masks",
            torch.zeros((0, packed_size(weight.numel())), dtype=torch.uint8, device=dev),
        )
        self.register_buffer(
            "task_bias", None if bias is None else bias.detach().new_zeros((0, bias.numel()))
        )
        # Codebook of each task's own weights: bit-width (0: float32, not quantized) and
        # centroids; the codes are implied by the frozen values, which are centroid values.
        self.register_buffer("task_bits", torch.zeros(0, dtype=torch.int16, device=dev))
        self.register_buffer("task_centroids", torch.zeros(0, 0, device=dev))
        self.register_buffer("slot_bank", torch.zeros(0, dtype=torch.int16, device=dev))
        self.route(FREE)
        self.live_keep = keep_count(weight.numel(), 0.5)
        self.eval_cache_size = EVAL_CACHE_SIZE
        self._clear_caches()

    def _clear_caches(self) -> None:
        self._banks: tuple[list[int], int] | None = None
        self._live_mask_cache: tuple[int, int, Tensor, tuple] | None = None
        self._owned_cache: tuple[tuple, int, tuple[Tensor, Tensor] | None] | None = None
        self._workspace: LiveWorkspace | None = None
        self._eval_cache: OrderedDict[int, tuple[tuple, tuple, tuple]] = OrderedDict()
        self._step = _StepState()

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # Moving or casting the module replaces every tensor: cached views would be stale.
        out = super()._apply(fn, *args, **kwargs)
        self._clear_caches()
        return out

    # -- the live mask ------------------------------------------------------------------
    def set_live_sparsity(self, sparsity: float) -> None:
        """Set the sparsity of the live (training or untrained) mask.

        :param sparsity: fraction of the layer the live mask leaves out.
        """
        self.live_keep = keep_count(self.weight.numel(), sparsity)
        self._step.threshold = None

    @torch.no_grad()
    def fix_live_mask(self, mask: Tensor) -> None:
        """Make ``mask`` the live mask and stop training the scores (Ada-QPacknet's pruning).

        :param mask: a boolean mask of the weight's shape with at least one weight kept.
        """
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(self.weight.shape)}")
        self.scores.requires_grad_(False)
        self.scores.copy_(mask.to(self.scores.dtype))
        self.live_keep = max(1, int(mask.sum()))
        self._step.threshold = None

    def live_mask(self) -> Tensor:
        """Exact boolean mask the current scores select."""
        version = self.scores._version
        cache = self._live_mask_cache
        # a mask the caller wrote into (its own version moved) is made again
        stale = cache is None or cache[2].device != self.scores.device
        if (
            stale
            or (cache[0], cache[1]) != (version, self.live_keep)
            or not _matches(cache[3], (cache[2],))
        ):
            mask = topk_mask(self.scores, self.live_keep)
            cache = (version, self.live_keep, mask, _fingerprint((mask,)))
            self._live_mask_cache = cache
        return cache[2]

    def _live_threshold(self) -> Tensor:
        # An exact selection every step costs as much as the layer's whole forward; scores
        # move little per step, so the threshold is refreshed every THRESHOLD_REFRESH steps.
        # The frozen mask is always an exact top-k of the final scores.
        step = self._step
        if step.threshold is None or step.age >= THRESHOLD_REFRESH:
            step.threshold = topk_threshold(self.scores, self.live_keep)
            step.age = 0
        step.age += 1
        return step.threshold

    def _owned(self) -> tuple[Tensor, Tensor] | None:
        """Where trained tasks own weights of the loaded bank (None: nowhere).

        :return: the owned weights' flat indices and their frozen values.
        """
        loaded = self._bank_table()[1]
        parts = (self.bank_owners, self.bank_weights)
        cache = self._owned_cache
        if cache is None or cache[1] != loaded or not _matches(cache[0], parts):
            owned = (self.owner != FREE).flatten()
            found = None
            if bool(owned.any()):
                idx = owned.nonzero().squeeze(1)
                found = (idx, self.bank_weights[loaded].flatten()[idx])
            cache = (_fingerprint(parts), loaded, found)
            self._owned_cache = cache
            self._step.synced_version = None
        return cache[2]

    @torch.no_grad()
    def _sync_weight(self) -> None:
        """Make ``weight`` hold the frozen values wherever a trained task owns the weight.

        The live subnetwork reads ``weight``; the optimizer may have moved owned entries
        (momentum, weight decay, a custom step) since. Skipped when ``weight`` has not changed
        since the last sync, so two forwards before a backward (LwF's) leave it alone.
        """
        owned = self._owned()
        if owned is not None and self.weight._version != self._step.synced_version:
            self.weight.view(-1).scatter_(0, owned[0], owned[1])
            self._step.synced_version = self.weight._version

    def effective_params(self, slot: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of a trained task or of the live subnetwork.

        :param slot: a trained task's slot, or :data:`FREE` for the live subnetwork; default:
            ``active_slot``.
        """
        slot = self.active_slot if slot is None else slot
        if slot != FREE:
            return self.frozen_params(slot)
        self._sync_weight()
        if self.training and torch.is_grad_enabled():
            threshold = self._live_threshold()
            if self._workspace is None:
                self._workspace = LiveWorkspace()
            weight = train_weight(self.kernel, self.weight, self.scores, threshold, self._workspace)
            return weight, self.bias
        # Evaluation with autograd on (EWC's importances, saliency): the same values, and
        # gradients reach the live weights as with any module in eval mode
        weight = self.weight if torch.is_grad_enabled() else self.weight.detach()
        return torch.where(self.live_mask(), weight, weight.new_zeros(())), self.bias

    def frozen_params(self, slot: int) -> tuple[Tensor, Tensor | None]:
        """Effective weight and bias of the trained task in ``slot`` (mask over its bank).

        Kept in a small cache keyed on the buffers they are made of, so that any change to
        them (a later pruning or quantization step, a loaded state dict) is seen.

        :param slot: a trained task's slot.
        """
        parts = (self.bank_weights, self.task_masks, self.slot_bank, self.task_bias)
        hit = self._eval_cache.get(slot)
        # The entry keeps the very tensors it was made from: same objects, same versions; and
        # what it hands out, unchanged (a caller writing into them makes it stale, not wrong).
        if hit is not None and _matches(hit[0], parts) and _matches(hit[2], hit[1]):
            self._eval_cache.move_to_end(slot)
            return hit[1]
        with torch.no_grad():
            values = self.bank_weights[self.bank_of_slot(slot)]
            weight = torch.where(self.task_mask(slot), values, values.new_zeros(()))
            # a copy, not a view: writing into it must not reach the frozen buffer
            bias = None if self.task_bias is None else self.task_bias[slot].clone()
        if self.eval_cache_size > 0:
            self._eval_cache[slot] = (
                _fingerprint(parts),
                (weight, bias),
                _fingerprint((weight, bias)),
            )
            while len(self._eval_cache) > self.eval_cache_size:
                self._eval_cache.popitem(last=False)
        return weight, bias

    def _loaded(self) -> None:
        self._clear_caches()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # type: ignore[override]
        if local_metadata.get("version", 1) < 2 and prefix + "owner" in state_dict:
            _upgrade_v1(state_dict, prefix, self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    # -- task life cycle ----------------------------------------------------------------
    @torch.no_grad()
    def begin_task(self, slot: int, bank: int = 0) -> None:
        """Make room for ``slot`` and load its bank.

        :param slot: the slot of the task about to be trained.
        :param bank: its bank: an existing one, or ``n_banks`` to open a fresh copy.
        """
        self._grow(slot + 1)
        self._load_bank(bank)
        self.slot_bank[slot] = bank
        self._clear_caches()
        self._sync_weight()

    @torch.no_grad()
    def _fresh_weight(self) -> Tensor:
        # nn.Linear's and the convolutions' own initialisation
        fresh = torch.empty_like(self.weight.detach())
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        return fresh

    def reset_live(self) -> None:
        """Re-initialise what the live subnetwork trains: free weights, scores and bias.

        Used when a task's training is abandoned or restarted; trained tasks are untouched.
        """
        self.weight.copy_(self._fresh_weight())
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._clear_caches()
        self._sync_weight()

    def check_finite(self) -> str | None:
        """What is non-finite among the values the live task would freeze, or None.

        :return: a description naming the tensor, or None if every value is finite.
        """
        if not bool(torch.isfinite(self.scores).all()):
            return "scores"
        trained = self.live_mask() & (self.owner == FREE)
        if not bool(torch.isfinite(self.weight[trained]).all()):
            return "weight"
        if self.bias is not None and not bool(torch.isfinite(self.bias).all()):
            return "bias"
        return None

    @torch.no_grad()
    def end_task(self, slot: int) -> None:
        """Freeze the task in ``slot``: its mask from the final scores, ownership, bias.

        Call :meth:`check_finite` first: the values frozen here are what the task keeps.

        :param slot: the slot of the task just trained.
        """
        mask = topk_mask(self.scores, self.live_keep)
        bank = self._bank_table()[1]
        owners = self.bank_owners[bank]
        new = (owners == FREE) & mask
        self.bank_weights[bank] = torch.where(new, self.weight.detach(), self.bank_weights[bank])
        owners[new] = slot
        self.set_task_mask(slot, mask)
        if self.task_bias is not None and self.bias is not None:
            self.task_bias[slot] = self.bias.detach()
        self._clear_caches()
        self._sync_weight()

    @torch.no_grad()
    def drop_slot(self, slot: int) -> None:
        """Forget the slot of a task that was never frozen (it owns no weight).

        A bank opened for that task alone is dropped too.

        :param slot: the last slot.
        """
        bank = self.bank_of_slot(slot) if slot < len(self.slot_bank) else 0
        self._shrink(slot)
        self._banks = None
        if bank > 0 and bank == self.n_banks - 1 and bank not in self._bank_table()[0]:
            self._load_bank(bank - 1)
            self.bank_weights = self.bank_weights[:bank].clone()
            self.bank_owners = self.bank_owners[:bank].clone()
        self._clear_caches()


def _upgrade_v1(state_dict: dict, prefix: str, shape: torch.Size) -> None:
    """Rewrite a version-1 state dict (``owner`` buffer, boolean masks) in place."""
    weight, owner = state_dict[prefix + "weight"], state_dict.pop(prefix + "owner")
    loaded = int(state_dict[prefix + "loaded_bank"])
    banks, owners = state_dict[prefix + "bank_weights"], state_dict[prefix + "bank_owners"]
    if banks.shape[0] == 0:
        banks, owners = weight.detach().clone().unsqueeze(0), owner.unsqueeze(0)
    else:
        banks, owners = banks.clone(), owners.clone()
        banks[loaded], owners[loaded] = weight.detach(), owner
    state_dict[prefix + "bank_weights"] = banks
    state_dict[prefix + "bank_owners"] = owners
    masks = state_dict[prefix + "task_masks"]
    state_dict[prefix + "task_masks"] = (
        torch.stack([pack_mask(m) for m in masks])
        if len(masks)
        else torch.zeros((0, packed_size(shape.numel())), dtype=torch.uint8)
    )


class TSNLinear(MaskedLayer, nn.Linear):
    """An ``nn.Linear`` whose weights are selected per task by a learned mask.

    It is an ``nn.Linear`` (tools that look for one find it), built around the user's layer:
    the very same ``weight`` and ``bias`` parameters.
    """

    def __init__(self, layer: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self._init_masking(layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.run_routed(x, lambda rows, slot: F.linear(rows, *self.effective_params(slot)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _TSNConv(MaskedLayer):
    """What the masked convolutions share: built around the user's layer, computing as it."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        nn.Module.__init__(self)
        for name in nn.Conv2d.__constants__:
            setattr(self, name, getattr(layer, name))
        self._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice
        self._init_masking(layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        conv = self._conv_forward  # the base class's (nn.Conv1d, 2d or 3d), padding modes too
        return self.run_routed(x, lambda rows, slot: conv(rows, *self.effective_params(slot)))


class TSNConv1d(_TSNConv, nn.Conv1d):
    """An ``nn.Conv1d`` whose weights are selected per task by a learned mask.

    It is an ``nn.Conv1d`` (tools that look for one find it), built around the user's layer:
    the very same ``weight`` and ``bias`` parameters.
    """


class TSNConv2d(_TSNConv, nn.Conv2d):
    """An ``nn.Conv2d`` whose weights are selected per task by a learned mask.

    It is an ``nn.Conv2d`` (tools that look for one find it), built around the user's layer:
    the very same ``weight`` and ``bias`` parameters.
    """


class TSNConv3d(_TSNConv, nn.Conv3d):
    """An ``nn.Conv3d`` whose weights are selected per task by a learned mask.

    It is an ``nn.Conv3d`` (tools that look for one find it), built around the user's layer:
    the very same ``weight`` and ``bias`` parameters.
    """


class TSNEmbedding(MaskedLayer, nn.Embedding):
    """An ``nn.Embedding`` whose table entries are selected per task by a learned mask.

    It is an ``nn.Embedding`` built around the user's layer (the very same ``weight``); a
    task's lookup reads the rows of its own effective table, whose unselected entries are 0.
    ``max_norm`` (which renormalises looked-up rows in place, so it would write into frozen
    values) and ``sparse`` gradients are refused before conversion.
    """

    def __init__(self, layer: nn.Embedding) -> None:
        nn.Module.__init__(self)
        for name in nn.Embedding.__constants__:
            setattr(self, name, getattr(layer, name))
        self._init_masking(layer.weight, None)

    def _fresh_weight(self) -> Tensor:
        # nn.Embedding's own initialisation: N(0, 1), the padding row 0
        fresh = torch.randn_like(self.weight.detach())
        if self.padding_idx is not None:
            fresh[self.padding_idx] = 0
        return fresh

    def forward(self, x: Tensor) -> Tensor:
        return self.run_routed(
            x,
            lambda rows, slot: F.embedding(
                rows,
                self.effective_params(slot)[0],
                self.padding_idx,
                scale_grad_by_freq=self.scale_grad_by_freq,
            ),
        )


class TaskNorm(_PerTaskBuffers):
    """A normalisation whose terms are frozen per task: what the per-task kinds share.

    Each slot buffer (``_slot_buffers``, those that are not None) holds one row per task
    slot; :meth:`end_task` freezes the live terms into the task's row, and a trained task's
    forward reads only its row.
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    #: the live tensors frozen into each slot buffer, in ``_slot_buffers``' order
    _live_terms: tuple[str, ...] = ()

    def _terms(self) -> list[Tensor]:
        return [t for t in (getattr(self, n) for n in self._slot_buffers) if t is not None]

    def begin_task(self, slot: int) -> None:
        """Start a task with fresh live statistics (if the kind keeps any).

        :param slot: the slot of the task about to be trained.
        """
        self._grow(slot + 1)
        self.reset_live()

    def reset_live(self) -> None:
        """Fresh live statistics (nothing for a kind that keeps none)."""

    @torch.no_grad()
    def reset_affine(self) -> None:
        """Reset the live affine terms as the user's layer's own reset would."""
        if self.weight is not None:
            self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def check_finite(self) -> str | None:
        """What is non-finite among the values the live task would freeze, or None."""
        for name in self._live_terms:
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                return name
        return None

    def drop_slot(self, slot: int) -> None:
        """Forget the slot of a task that was never frozen.

        :param slot: the last slot.
        """
        self._shrink(slot)

    def slot_terms(self, slot: int) -> tuple[Tensor, ...]:
        """The frozen terms of the task in ``slot``, in the order the export writes them.

        :param slot: a trained task's slot.
        """
        return tuple(t[slot] for t in self._terms())

    def live_statistics(self) -> list[Tensor]:
        """The statistics the task in training keeps up to date (none for a kind that keeps
        none): a trained task never reads them."""
        return []

    def terms_per_task(self) -> int:
        """How many values a task's frozen terms hold."""
        return sum(t.shape[1:].numel() for t in self._terms())

    @torch.no_grad()
    def restore_tasks(self, per_task: list[tuple[Tensor, ...]]) -> None:
        """Fill a normalisation that holds no task with trained tasks read from an export.

        :param per_task: each slot's terms, as :meth:`slot_terms` gives them.
        """
        names = [n for n in self._slot_buffers if getattr(self, n) is not None]
        if len(getattr(self, names[0])):
            raise RuntimeError("only a normalisation without tasks can be restored")
        for i, name in enumerate(names):
            like = getattr(self, name)
            setattr(self, name, torch.stack([t[i] for t in per_task]).to(like))

    @torch.no_grad()
    def end_task(self, slot: int) -> None:
        """Freeze the live terms into ``slot``.

        :param slot: the slot of the task just trained.
        """
        for frozen, live in zip(self._slot_buffers, self._live_terms, strict=True):
            row, value = getattr(self, frozen), getattr(self, live)
            if row is not None and value is not None:
                row[slot] = value.detach()

    def forward(self, x: Tensor) -> Tensor:
        return self.run_routed(x, self._forward_slot)

    def _forward_slot(self, x: Tensor, slot: int) -> Tensor:
        """Normalise ``x`` with the terms of ``slot`` (``FREE``: the live ones); each kind's."""
        raise NotImplementedError


class TaskBatchNorm(TaskNorm):
    """BatchNorm with per-task running statistics and affine terms.

    While a task trains, the layer behaves as the user's BatchNorm (live statistics). When the
    task ends its statistics and affine terms are frozen into ``task_*[slot]`` and evaluation
    always uses them, so a sample's output never depends on the rest of its minibatch (TSN's
    own backbones use batch statistics at test time, which breaks mixed-task minibatches).
    """

    _slot_buffers = ("task_mean", "task_var", "task_weight", "task_bias")
    _live_terms = ("running_mean", "running_var", "weight", "bias")

    def __init__(self, layer: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) -> None:
        super().__init__()
        c = layer.num_features
        self.num_features = c
        self.eps = layer.eps
        self.momentum = layer.momentum
        self.weight = layer.weight
        self.bias = layer.bias
        dev = module_device(layer)
        self.register_buffer("running_mean", torch.zeros(c, device=dev))
        self.register_buffer("running_var", torch.ones(c, device=dev))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=dev))
        self.register_buffer("task_mean", torch.zeros(0, c, device=dev))
        self.register_buffer("task_var", torch.zeros(0, c, device=dev))
        affine = layer.weight is not None
        self.register_buffer("task_weight", torch.zeros(0, c, device=dev) if affine else None)
        self.register_buffer("task_bias", torch.zeros(0, c, device=dev) if affine else None)

    def live_statistics(self) -> list[Tensor]:
        """The running mean and variance the task in training keeps up to date."""
        return [self.running_mean, self.running_var]

    @torch.no_grad()
    def reset_live(self) -> None:
        """Fresh live statistics."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _forward_slot(self, x: Tensor, slot: int) -> Tensor:
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


def affine_norm_signature(layer: nn.LayerNorm | nn.GroupNorm | nn.PReLU) -> list[str | int]:
    """The kind and shape of a LayerNorm, GroupNorm or PReLU, as the export's architecture
    records them: ``["layer_norm", *normalized_shape]``, ``["group_norm", groups,
    channels]`` or ``["prelu", slopes]``.

    :param layer: the user's layer.
    """
    if isinstance(layer, nn.PReLU):
        return ["prelu", layer.num_parameters]
    if isinstance(layer, nn.GroupNorm):
        return ["group_norm", layer.num_groups, layer.num_channels]
    return ["layer_norm", *layer.normalized_shape]


class TaskAffineNorm(TaskNorm):
    """LayerNorm or GroupNorm with per-task affine terms.

    Both normalise each sample by its own statistics, so only the affine terms are learned:
    the live task trains the user's ``weight`` and ``bias``, and when it ends they are frozen
    into ``task_weight[slot]`` and ``task_bias[slot]``, which its forward reads from then on.

    :param layer: an ``nn.LayerNorm`` or ``nn.GroupNorm`` with affine terms.
    """

    _slot_buffers = ("task_weight", "task_bias")
    _live_terms = ("weight", "bias")

    def __init__(self, layer: nn.LayerNorm | nn.GroupNorm) -> None:
        super().__init__()
        if layer.weight is None:
            raise TypeError(f"{type(layer).__name__} without affine terms has nothing per task")
        self._signature = affine_norm_signature(layer)
        self.kind = str(self._signature[0])  # "layer_norm" or "group_norm"
        self.eps = layer.eps
        if isinstance(layer, nn.GroupNorm):
            self.num_groups, self.num_channels = layer.num_groups, layer.num_channels
        else:
            self.normalized_shape = tuple(layer.normalized_shape)
        self.weight = layer.weight
        self.bias = layer.bias
        shape = tuple(layer.weight.shape)
        dev = module_device(layer)
        self.register_buffer("task_weight", torch.zeros(0, *shape, device=dev))
        has_bias = layer.bias is not None
        self.register_buffer("task_bias", torch.zeros(0, *shape, device=dev) if has_bias else None)

    def signature(self) -> list[str | int]:
        """The kind and shape, as the export's architecture records them (the user's layer's
        :func:`affine_norm_signature`)."""
        return list(self._signature)

    def _normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if self.kind == "group_norm":
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def _forward_slot(self, x: Tensor, slot: int) -> Tensor:
        if slot != FREE:
            bias = None if self.task_bias is None else self.task_bias[slot]
            return self._normalise(x, self.task_weight[slot], bias)
        return self._normalise(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        shape = self.signature()[1:]
        return f"{self.kind}, {shape}, eps={self.eps}, bias={self.bias is not None}"


class TaskPReLU(TaskNorm):
    """A PReLU whose slopes are kept per task, as a normalisation's affine terms are.

    The live task trains the user's ``weight`` (one slope, or one per channel); when it ends
    the slopes are frozen into ``task_weight[slot]``, which its forward reads from then on.

    :param layer: the user's ``nn.PReLU``.
    """

    _slot_buffers = ("task_weight",)
    _live_terms = ("weight",)
    bias = None  # (a slope has no bias: what the per-task kinds' shared code reads)

    def __init__(self, layer: nn.PReLU) -> None:
        super().__init__()
        self.num_parameters = layer.num_parameters
        self.init = layer.init
        self._signature = affine_norm_signature(layer)
        self.weight = layer.weight
        dev = module_device(layer)
        self.register_buffer("task_weight", torch.zeros(0, self.num_parameters, device=dev))

    def signature(self) -> list[str | int]:
        """The kind and shape, as the export's architecture records them (the user's layer's
        :func:`affine_norm_signature`)."""
        return list(self._signature)

    @torch.no_grad()
    def reset_affine(self) -> None:
        """Reset the live slopes as ``nn.PReLU`` initialises them."""
        self.weight.fill_(self.init)

    def _forward_slot(self, x: Tensor, slot: int) -> Tensor:
        return F.prelu(x, self.weight if slot == FREE else self.task_weight[slot])

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}"
