"""A runnable compressed model: integer codes and codebooks, dequantized layer by layer.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) counts a model's memory as its tasks' codes,
codebooks and masks (see :mod:`avalanche_tsn.capacity`); a :class:`~avalanche_tsn.model.TSNModel`
keeps float32 copies for training. :func:`to_tiny` turns a trained model into one that keeps
only what inference reads, so its resident memory follows the capacity figure:

- per bank, the ownership map packed at ``ceil(log2(tasks + 1))`` bits per weight;
- per task, the codes of the weights it owns packed at its bit-width (float32 values for a
  task that was not quantized), its codebook, its bias, and which earlier tasks' weights it
  shares (one bit per weight an earlier task owns, bit-packed: the export's Huffman-coded
  bitmap is smaller but must be decoded whole); its own weights are those the ownership map
  gives it;
- per quantized head, its codes packed at its bit-width and its codebook
  (:class:`CodedLinear`); normalisation statistics, biases and heads that were not quantized
  as they are.
- the task memory (samples kept for training) only where tasks are inferred by it (the
  ``"memory"`` rule; :func:`to_tiny`'s ``keep_memory``): the router reads its own weights.

A forward rebuilds the task's weight of each layer from these (one unpack of the ownership map
and of the codes it reads), runs the layer and drops the weight again; the values are exactly
the trained model's, so predictions are the same. Only trained tasks run (there is no live
subnetwork to train).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche_tsn.bitpack import pack_codes, unpack_codes
from avalanche_tsn.encoding import LayerPart, ModelEncoding
from avalanche_tsn.layers import MaskedLayer, TSNConv1d, TSNConv2d, TSNConv3d, TSNEmbedding
from avalanche_tsn.model import TSNModel, require_full
from avalanche_tsn.quantization import small_codes_of
from avalanche_tsn.routing import FREE, TaskRouted

__all__ = ["CodedLayer", "CodedLinear", "TinyTSN", "to_tiny", "keeps_memory", "resident_bytes"]


def _packed(values: np.ndarray, bits: int) -> Tensor:
    return torch.from_numpy(np.frombuffer(pack_codes(values, bits), dtype=np.uint8).copy())


def _unpacked(packed: Tensor, count: int, bits: int) -> np.ndarray:
    return unpack_codes(packed.cpu().numpy().tobytes(), count, bits)


class CodedLayer(TaskRouted):
    """A trained masked layer held as packed codes; computes with its dequantized weights.

    :param layer: a masked layer of a TSN model whose tasks are all trained (for its kind
        and convolution settings).
    :param part: the layer's part of the model's :class:`~avalanche_tsn.encoding.ModelEncoding`.
    """

    def __init__(self, layer: MaskedLayer, part: LayerPart) -> None:
        super().__init__()
        n_slots = len(part.tasks)
        self.shape = part.shape
        self.numel = part.numel
        # F.conv1d, F.conv2d or F.conv3d, as the layer's kind; None for a linear layer or a
        # lookup table (an embedding: its input is indices, never cast to the weight's dtype)
        self.conv = _CONV_FUNCTIONS.get(len(layer.kernel_size)) if _is_conv(layer) else None
        self.lookup = isinstance(layer, TSNEmbedding)
        if self.conv is not None:
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            self.padding_mode = layer.padding_mode
            if self.padding_mode != "zeros":  # padded apart, as nn.Conv2d does
                self.conv_args = (layer.stride, 0, layer.dilation, layer.groups)
                self.pad = _explicit_padding(layer)
        self.owner_bits = max(1, math.ceil(math.log2(n_slots + 1)))
        self.n_slots = n_slots
        self.register_buffer(
            "slot_bank", torch.tensor([t.bank for t in part.tasks], dtype=torch.int16)
        )
        self.register_buffer(
            "task_bits", torch.tensor([t.bits for t in part.tasks], dtype=torch.int16)
        )
        biases = [t.bias for t in part.tasks if t.bias is not None]
        self.register_buffer("task_bias", torch.stack(biases).clone() if biases else None)
        for bank, owner in enumerate(part.owners):
            owner = owner.astype(np.int64)
            self.register_buffer(f"owner_{bank}", _packed(owner - FREE, self.owner_bits))
        for slot, task in enumerate(part.tasks):
            # The mask is the weights it owns plus the earlier tasks' weights it shares: one
            # bit per weight an earlier task owns (the encoding's shared bitmap).
            self.register_buffer(f"shared_{slot}", torch.from_numpy(task.shared_bits.copy()))
            if task.bits:
                # the codes, packed at the task's bit-width, and its codebook
                codes = small_codes_of(task.values, task.centroids)
                self.register_buffer(f"values_{slot}", _packed(codes, task.bits))
                self.register_buffer(f"centroids_{slot}", task.centroids.clone())
            else:  # a task that was not quantized keeps float32 values
                self.register_buffer(f"values_{slot}", task.values.float().clone())
                self.register_buffer(f"centroids_{slot}", torch.zeros(0))
        self.to(layer.weight.device)  # packed on the host, computed with on the layer's device

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of the layer's float buffers (float32 unless the model was cast)."""
        return self.get_buffer("centroids_0").dtype

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError("a compressed model runs trained tasks only")

    def slot_owner(self, slot: int) -> Tensor:
        """Which slot owns each weight of ``slot``'s bank (``FREE``: nobody), weight-shaped.

        :param slot: a trained task's slot.
        """
        self._check_slot(slot)
        bank = int(self.slot_bank[slot])
        packed_owner = getattr(self, f"owner_{bank}")
        owner = torch.from_numpy(_unpacked(packed_owner, self.numel, self.owner_bits)) + FREE
        return owner.to(self.slot_bank.device).view(self.shape)

    def task_mask(self, slot: int) -> Tensor:
        """The weights the task in ``slot`` reads (its own and those it shares), weight-shaped.

        :param slot: a trained task's slot.
        """
        owner = self.slot_owner(slot).flatten()
        mask = owner == slot
        earlier = (owner != FREE) & (owner < slot)
        shared = np.unpackbits(getattr(self, f"shared_{slot}").cpu().numpy())
        mask[earlier] = torch.from_numpy(shared[: int(earlier.sum())].astype(bool)).to(mask.device)
        return mask.view(self.shape)

    def weight_of(self, slot: int) -> Tensor:
        """The dequantized weight the task in ``slot`` computes with.

        :param slot: a trained task's slot.
        """
        owner = self.slot_owner(slot).flatten()
        mask = self.task_mask(slot).flatten()
        # the dtype of the float buffers (the model may have been cast: .double(), .half())
        weight = torch.zeros(self.numel, device=owner.device, dtype=self.float_dtype)
        for s in torch.unique(owner[mask]).tolist():
            at = owner == s
            b = int(self.task_bits[s])
            values = getattr(self, f"values_{s}")
            if b:
                codes = torch.from_numpy(_unpacked(values, int(at.sum()), b)).to(owner.device)
                weight[at] = getattr(self, f"centroids_{s}")[codes].to(weight.dtype)
            else:
                weight[at] = values.to(weight.dtype)
        weight = torch.where(mask, weight, weight.new_zeros(()))
        return weight.view(self.shape)

    def _run(self, x: Tensor, slot: int) -> Tensor:
        if self.lookup:
            return F.embedding(x, self.weight_of(slot))
        weight = self.weight_of(slot).to(x.dtype)
        bias = None if self.task_bias is None else self.task_bias[slot].to(x)
        if self.conv is not None:
            if self.padding_mode != "zeros":
                x = F.pad(x, self.pad, mode=self.padding_mode)
            return self.conv(x, weight, bias, *self.conv_args)
        return F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.run_routed(x, self._run)


class CodedLinear(nn.Module):
    """A quantized head's linear layer held as packed codes and its task's codebook.

    :param layer: the head's ``nn.Linear`` (weights, possibly held as buffers).
    :param centroids: the head's codebook; every weight is one of its values.
    :param bits: the codebook's bit-width.
    """

    def __init__(self, layer: nn.Linear, centroids: Tensor, bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, bits
        book = centroids.detach().cpu().float().clone()
        self.register_buffer("codes", _packed(small_codes_of(layer.weight, book), bits))
        self.register_buffer("centroids", book)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        self.register_buffer("bias", bias)
        self.to(layer.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        n = self.in_features * self.out_features
        codes = torch.from_numpy(_unpacked(self.codes, n, self.bits)).to(self.centroids.device)
        weight = self.centroids[codes].view(self.out_features, self.in_features)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x))


#: the functional convolution of each number of spatial dimensions
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _is_conv(layer: MaskedLayer) -> bool:
    return isinstance(layer, TSNConv1d | TSNConv2d | TSNConv3d)


def _explicit_padding(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[int, ...]:
    """``F.pad``'s (left, right, top, bottom, ...) for ``layer``'s padding (ints, same, valid)."""
    pad: list[int] = []
    for i in reversed(range(len(layer.kernel_size))):  # F.pad lists the last dimension first
        if layer.padding == "same":
            total = layer.dilation[i] * (layer.kernel_size[i] - 1)
            pad += [total // 2, total - total // 2]
        elif layer.padding == "valid":
            pad += [0, 0]
        else:
            pad += [int(layer.padding[i])] * 2
    return tuple(pad)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class TinyTSN(TSNModel):
    """The compressed, inference-only form of a :class:`TSNModel` (made by :func:`to_tiny`).

    It runs every trained task as the model it was made from did, bit for bit: one task,
    minibatches that mix tasks, task inference (``task_inference``), quantized activations
    and the compute report. What needs the float weights refuses with a ``TypeError``:
    training (``train()``, a strategy, the task life cycle), the capacity report, export and
    a second conversion.
    """

    compressed = True

    def masked_layers(self) -> Iterator[tuple[str, CodedLayer]]:  # type: ignore[override]
        """The coded layers with their names, in module order."""
        for name, module in self.net.named_modules():
            if isinstance(module, CodedLayer):
                yield name, module

    def train(self, mode: bool = True) -> TinyTSN:
        """Evaluation mode only (``train(False)``); ``train()`` raises a TypeError.

        :param mode: False.
        """
        if mode:
            raise TypeError(
                "a TinyTSN cannot train: it holds integer codes, not trainable weights; train "
                "the TSNModel it was made from, or load_compressed(..., dequantize=True)"
            )
        return super().train(False)

    def _refuse(self, *args: object, **kwargs: object) -> None:
        require_full(self, "the task life cycle (training)")

    begin_task = end_task = reset_live = abandon_task = _refuse  # type: ignore[assignment]
    store_memory = set_head_codebook = _refuse  # type: ignore[assignment]


def keeps_memory(model: TSNModel, keep_memory: bool | None) -> bool:
    """Whether a compact form of ``model`` keeps its task memory (samples kept for training).

    :param model: the TSN model.
    :param keep_memory: True or False decides; None: only where the model infers tasks by the
        memory (``task_inference == "memory"``): the router and the entropy rule never read it.
    :raises TypeError: for anything but a bool or None.
    """
    if keep_memory is not None and not isinstance(keep_memory, bool):
        raise TypeError(f"keep_memory must be a bool or None, got {type(keep_memory).__name__}")
    return model.task_inference == "memory" if keep_memory is None else keep_memory


@torch.no_grad()
def to_tiny(model: TSNModel, keep_memory: bool | None = None) -> TinyTSN:
    """Turn ``model`` into its compressed runnable form, in place, and return it.

    Every masked layer becomes a :class:`CodedLayer` and every quantized head a
    :class:`CodedLinear`; the float copies used for training (weights, scores, bank copies,
    optimizer-facing parameters) are released, and the model becomes a :class:`TinyTSN`,
    which only evaluates its trained tasks, with the same predictions as before.

    :param model: a full TSN model with no task in training.
    :param keep_memory: keep the task memory (samples kept for training); None (default):
        only where the model infers tasks by it (``task_inference == "memory"``); the router
        and the entropy rule never read it.
    :raises TypeError: for anything but a full ``TSNModel`` (a TinyTSN included), or a
        ``keep_memory`` that is not a bool or None.
    """
    require_full(model, "to_tiny")
    keep = keeps_memory(model, keep_memory)
    if model.open_task() is not None:
        raise ValueError("a task is still in training: finish or abandon it first")
    if not model.trained_tasks():
        raise ValueError("nothing to compress: no task is trained yet")
    parts = ModelEncoding.of(model).layers
    model.replace_routed_layers(
        {
            name: CodedLayer(layer, part)
            for (name, layer), part in zip(model.masked_layers(), parts, strict=True)
        }
    )
    for label in model.trained_tasks():
        slot = model.slot_of(label)
        book, b = model.task_table.head_codebook(slot)
        if not b:
            continue  # heads that were not quantized stay float32
        for head in model.head_modules(label):
            for name, m in list(head.named_modules()):
                if isinstance(m, nn.Linear):
                    _replace(head, name, CodedLinear(m, book, b))
    for head in model.classifier_heads():
        head.requires_grad_(False)
    if not keep:
        model.task_table.release_memory()
    model.eval()
    model.__class__ = TinyTSN  # the converted type: what needs float weights refuses
    return model  # type: ignore[return-value]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a model holds (parameters and buffers, shared storage once).

    :param model: a model (a plain ``nn.Module`` or a compressed TSN model).
    """
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
