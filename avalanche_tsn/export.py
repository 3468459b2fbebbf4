"""Compact export of a trained TinySubNets model, and loading it back for inference.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), "Capacity": what inference needs is, per
task, its own weights as ``b``-bit codes with a codebook, its mask and its small per-task
parts (heads, biases, normalisation). The file stores exactly what
:func:`~avalanche_tsn.capacity.capacity_report` counts, so its size matches the report:

- per maskable layer, the Huffman-coded ownership map of each bank, then per task the
  Huffman-coded bitmap of the earlier tasks' weights it shares, its bit-packed codes and
  codebook (or float32 weights when not quantized), and its bias;
- per task, the normalisation statistics and affine terms, and the heads (quantized weights
  as codes and one codebook, the rest float32).

Layout: magic, format version, header length, zlib-compressed JSON header, payload, CRC-32
of everything before it. A load checks the magic, version, checksum and the architecture
before it changes anything.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from avalanche.models import MultiHeadClassifier
from torch import Tensor, nn

from avalanche_tsn.capacity import shared_bitmap
from avalanche_tsn.heads import freeze_head, new_head
from avalanche_tsn.huffman import (
    HuffmanCode,
    decode_mask,
    decode_symbols,
    encode_mask,
    encode_symbols,
)
from avalanche_tsn.layers import FREE, MaskedLayer, TaskBatchNorm
from avalanche_tsn.masks import pack_mask
from avalanche_tsn.model import TSNModel
from avalanche_tsn.quantization import codes_of

__all__ = ["export_model", "load_compressed", "pack_codes", "unpack_codes", "MAGIC"]

MAGIC = b"TSNZ"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_CRC = struct.Struct("<I")


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack integer codes into ``bits`` bits each (little-endian bit order).

    :param codes: non-negative integers below ``2^bits``.
    :param bits: bits per code, 1..16.
    """
    codes = np.asarray(codes, dtype=np.int64).ravel()
    planes = (codes[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_codes(buf: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`.

    :param buf: the packed bytes.
    :param count: number of codes.
    :param bits: bits per code.
    """
    flat = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * bits, bitorder="little")
    return flat.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


class _Writer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def raw(self, data: bytes) -> None:
        self.buf.write(data)

    def tensor(self, t: Tensor) -> None:
        self.raw(t.detach().cpu().contiguous().numpy().tobytes())

    def huffman(self, code: HuffmanCode) -> None:
        self.raw(code.to_bytes())

    def quantized(self, values: Tensor, centroids: Tensor, bits: int) -> None:
        self.raw(pack_codes(codes_of(values, centroids).cpu().numpy(), bits))
        self.tensor(centroids.float())


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("corrupt export file: payload is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        n = int(np.prod(shape)) if shape else 1
        size = torch.empty(0, dtype=dtype).element_size()
        array = np.frombuffer(self.take(n * size), dtype=_NUMPY[dtype]).copy()
        return torch.from_numpy(array).view(shape)

    def huffman(self) -> HuffmanCode:
        code, self.pos = HuffmanCode.from_bytes(self.data, self.pos)
        return code

    def quantized(self, count: int, bits: int) -> tuple[Tensor, Tensor]:
        codes = unpack_codes(self.take((count * bits + 7) // 8), count, bits)
        centroids = self.tensor((2**bits,))
        if count and codes.max() >= 2**bits:
            raise ValueError("corrupt export file: code out of range")
        return centroids[torch.from_numpy(codes)], centroids


_NUMPY = {
    torch.float32: np.float32,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
}
_DTYPES = {str(k): k for k in _NUMPY}


def _head_entries(head: nn.Module) -> tuple[list[str], list[str]]:
    """State keys of a head: its Linear weights (quantizable) and everything else."""
    weights = [
        f"{n}.weight" if n else "weight"
        for n, m in head.named_modules()
        if isinstance(m, nn.Linear)
    ]
    rest = [k for k in head.state_dict() if k not in weights]
    return weights, rest


def _architecture(module: nn.Module) -> dict[str, Any]:
    """Names and shapes of what TSN masks or keeps per task, wrapped or not."""
    layers, norms, heads = {}, {}, {}
    skip: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(m, MultiHeadClassifier):
            heads[name] = m.in_features
            skip.append(name)
        elif isinstance(m, (MaskedLayer, nn.Linear, nn.Conv2d)):
            layers[name] = list(m.weight.shape)
        elif isinstance(m, (TaskBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            norms[name] = m.num_features
    return {"layers": layers, "norms": norms, "heads": heads}


@torch.no_grad()
def export_model(model: TSNModel, path: str | PathLike | BinaryIO) -> int:
    """Write the trained tasks of ``model`` to a compact file.

    :param model: the TSN model.
    :param path: a file path or a writable binary file.
    :return: bytes written.
    """
    tasks = model.trained_tasks()
    if not tasks:
        raise ValueError("nothing to export: no task is trained yet")
    # Trained tasks hold slots 0..k-1; a task in training (or interrupted) is left out.
    slots = [model.slot_of(t) for t in tasks]
    w = _Writer()
    header: dict[str, Any] = {
        "tasks": tasks,
        "sparsity": model.slot_sparsity[: len(tasks)].tolist(),
        "architecture": _architecture(model.net),
        "layers": [],
        "heads": {},
    }
    banks = [model.bank_of(t) for t in tasks]
    header["banks"] = banks
    for name, layer in model.masked_layers():
        for b in range(max(banks) + 1):
            owner = layer.bank_owner(b).cpu()
            w.huffman(encode_symbols(owner.flatten().numpy().astype(np.int64) + 1))
        bits = []
        for slot in slots:
            owner = layer.slot_owner(slot).cpu()
            mask = layer.task_mask(slot).cpu()
            rebuilt = (owner == slot) | _scatter_shared(
                owner, slot, shared_bitmap(owner, mask, slot)
            )
            if not torch.equal(rebuilt, mask):
                raise RuntimeError(f"{name}: task mask is not own plus shared weights")
            bitmap = shared_bitmap(owner, mask, slot)
            if bitmap.numel():
                w.huffman(encode_mask(bitmap))
            b = int(layer.task_bits[slot])
            own = layer.own_values(slot).detach().cpu()
            if b:
                w.quantized(own, layer.task_centroids[slot, : 2**b].cpu(), b)
            else:
                w.tensor(own.float())
            if layer.task_bias is not None:
                w.tensor(layer.task_bias[slot])
            bits.append(b)
        header["layers"].append({"name": name, "bias": layer.task_bias is not None, "bits": bits})
    for norm in model._norms:
        for slot in slots:
            for t in (norm.task_mean, norm.task_var, norm.task_weight, norm.task_bias):
                if t is not None:
                    w.tensor(t[slot])
    header["head_bits"] = [int(model.head_bits[s]) for s in slots]
    for hname, heads in _named_heads(model):
        entry = {}
        for label, slot in zip(tasks, slots, strict=True):
            key = str(label)
            if key not in heads.classifiers:
                continue
            head = heads.classifiers[key]
            weights, rest = _head_entries(head)
            state = head.state_dict()
            b = int(model.head_bits[slot])
            if b:
                values = torch.cat([state[k].flatten() for k in weights])
                w.quantized(values, model.head_centroids[slot, : 2**b].cpu(), b)
            raw = rest if b else weights + rest
            au = f"active_units_T{key}"
            extra = heads._buffers.get(au)
            for k in raw:
                w.tensor(state[k])
            if extra is not None:
                w.tensor(extra)
            entry[key] = {
                "out": head.classifier.out_features,
                "weights": [[k, list(state[k].shape)] for k in weights],
                "raw": [[k, list(state[k].shape), str(state[k].dtype)] for k in raw],
                "active_units": None if extra is None else [len(extra), str(extra.dtype)],
            }
        header["heads"][hname] = entry
    head_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head_bytes)) + head_bytes + w.buf.getvalue()
    data = body + _CRC.pack(zlib.crc32(body))
    if isinstance(path, (str, PathLike)):
        Path(path).write_bytes(data)
    else:
        path.write(data)
    return len(data)


def _named_heads(model: TSNModel) -> list[tuple[str, MultiHeadClassifier]]:
    return [(n, m) for n, m in model.net.named_modules() if isinstance(m, MultiHeadClassifier)]


def _scatter_shared(owner: Tensor, slot: int, bitmap: Tensor) -> Tensor:
    earlier = (owner != FREE) & (owner < slot)
    out = torch.zeros(owner.numel(), dtype=torch.bool)
    out[earlier.flatten()] = bitmap
    return out.view(owner.shape)


def _parse(data: bytes) -> tuple[dict[str, Any], _Reader]:
    if len(data) < _PREFIX.size + _CRC.size or data[:4] != MAGIC:
        raise ValueError("not an avalanche-tsn export file (bad magic number)")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"export format version {version} is not supported (expected {FORMAT_VERSION})"
        )
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise ValueError("corrupt export file: checksum mismatch")
    start = _PREFIX.size
    try:
        header = json.loads(zlib.decompress(data[start : start + hlen]))
    except (zlib.error, ValueError) as err:
        raise ValueError(f"corrupt export file: unreadable header ({err})") from err
    return header, _Reader(data[start + hlen : -_CRC.size])


def _check_architecture(saved: dict[str, Any], module: nn.Module) -> None:
    found = _architecture(module)
    for part in ("layers", "norms", "heads"):
        if found[part] != saved[part]:
            diff = sorted(set(map(str, found[part].items())) ^ set(map(str, saved[part].items())))
            raise ValueError(
                f"model does not match the export file: its {part} differ "
                f"(file vs model, differing entries: {', '.join(diff)})"
            )


@torch.no_grad()
def load_compressed(path: str | PathLike | BinaryIO, model: nn.Module) -> TSNModel:
    """Rebuild the inference model from an :func:`export_model` file.

    Everything is read, decoded and checked against ``model`` before ``model`` changes: a
    wrong magic number, format version or checksum, a truncated or inconsistent payload, or
    a model whose layers (shapes, biases, normalisation, heads) differ raise ``ValueError``.

    :param path: the file (path or readable binary file).
    :param model: a freshly constructed instance of the architecture that was trained (or a
        ``TSNModel`` around one); it is wrapped in place.
    :return: a ``TSNModel`` in eval mode, called as ``model(x, task_labels)``; every task in
        the file gives the same predictions as the model that was exported.
    """
    data = Path(path).read_bytes() if isinstance(path, (str, PathLike)) else path.read()
    header, r = _parse(data)
    net = model.net if isinstance(model, TSNModel) else model
    try:
        _check_architecture(header["architecture"], net)
        decoded = _decode(header, r, net)
    except ValueError as err:
        if str(err).startswith(("corrupt export file", "model does not match")):
            raise
        raise ValueError(f"corrupt export file: {err}") from err
    except (KeyError, IndexError, TypeError, AttributeError, struct.error, RuntimeError) as err:
        # The checksum matched, so the file was written this way: a structural defect.
        raise ValueError(f"corrupt export file: inconsistent content ({err!r})") from err
    return _apply(decoded, TSNModel.of(model, header["sparsity"][0]))


def _decode(header: dict[str, Any], r: _Reader, net: nn.Module) -> dict[str, Any]:
    """Decode the payload into tensors, checking it against ``net`` (which is not changed)."""
    tasks: list[int] = [int(t) for t in header["tasks"]]
    shapes = header["architecture"]["layers"]
    modules = dict(net.named_modules())
    banks: list[int] = [int(b) for b in header["banks"]]
    if not tasks or len(banks) != len(tasks) or min(banks) < 0:
        raise ValueError("corrupt export file: task and bank lists do not match")
    n_banks = max(banks) + 1
    if [e["name"] for e in header["layers"]] != list(shapes):
        raise ValueError("corrupt export file: layer list does not match the architecture")
    layers = []
    for entry in header["layers"]:
        name = entry["name"]
        has_bias = modules[name].bias is not None
        if bool(entry["bias"]) != has_bias:
            raise ValueError(
                f"model does not match the export file: layer {name} has "
                f"{'a' if has_bias else 'no'} bias in the model and "
                f"{'a' if entry['bias'] else 'no'} bias in the file"
            )
        if len(entry["bits"]) != len(tasks):
            raise ValueError(f"corrupt export file: bit-widths of {name} do not match the tasks")
        shape = tuple(shapes[name])
        owners = []
        for _ in range(n_banks):
            owner = torch.from_numpy(decode_symbols(r.huffman()) - 1)
            if owner.numel() != int(np.prod(shape)) or (
                owner.numel() and (owner.min() < FREE or owner.max() >= len(tasks))
            ):
                raise ValueError(f"corrupt export file: ownership map of {name} is invalid")
            owners.append(owner.to(torch.int16).view(shape))
        weights = torch.zeros((n_banks, *shape))
        masks, biases, centroids = [], [], []
        for slot, b in enumerate(entry["bits"]):
            if not isinstance(b, int) or not 0 <= b <= 16:
                raise ValueError(f"corrupt export file: bit-width {b!r} of {name}")
            owner = owners[banks[slot]]
            weight = weights[banks[slot]]
            n_earlier = int(((owner != FREE) & (owner < slot)).sum())
            bitmap = (
                decode_mask(r.huffman(), (n_earlier,))
                if n_earlier
                else torch.zeros(0, dtype=torch.bool)
            )
            own = owner == slot
            masks.append(own | _scatter_shared(owner, slot, bitmap))
            n_own = int(own.sum())
            if b:
                values, book = r.quantized(n_own, b)
            else:
                values, book = r.tensor((n_own,)), torch.zeros(0)
            weight[own] = values
            centroids.append(book)
            if entry["bias"]:
                biases.append(r.tensor((shape[0],)))
        layers.append((weights, owners, masks, biases, centroids, entry["bits"]))
    norms = []
    for name, c in header["architecture"]["norms"].items():
        affine = modules[name].weight is not None
        norms.append([[r.tensor((c,)) for _ in range(4 if affine else 2)] for _ in tasks])
    head_bits = [int(b) for b in header["head_bits"]]
    if len(head_bits) != len(tasks):
        raise ValueError("corrupt export file: head bit-widths do not match the tasks")
    heads = {}
    for hname, entry in header["heads"].items():
        for key, spec in entry.items():
            slot = tasks.index(int(key))
            b = head_bits[slot]
            state = {}
            book = torch.zeros(0)
            if b:
                n = sum(int(np.prod(s)) for _, s in spec["weights"])
                values, book = r.quantized(n, b)
                start = 0
                for k, s in spec["weights"]:
                    size = int(np.prod(s))
                    state[k] = values[start : start + size].view(s)
                    start += size
            for k, s, dt in spec["raw"]:
                state[k] = r.tensor(tuple(s), _dtype(dt))
            au = spec["active_units"]
            active = None if au is None else r.tensor((au[0],), _dtype(au[1]))
            heads[(hname, key)] = (int(spec["out"]), state, active, book, slot)
    if r.pos != len(r.data):
        raise ValueError("corrupt export file: unexpected trailing data")
    return {
        "tasks": tasks,
        "banks": banks,
        "sparsity": [float(x) for x in header["sparsity"]],
        "head_bits": head_bits,
        "layers": layers,
        "norms": norms,
        "heads": heads,
    }


def _apply(decoded: dict[str, Any], tsn: TSNModel) -> TSNModel:
    """Write decoded tensors into ``tsn`` (every check has passed)."""
    tasks, banks = decoded["tasks"], decoded["banks"]
    n = len(tasks)
    dev = tsn.task_labels_by_slot.device
    tsn.task_labels_by_slot = torch.tensor(tasks, dtype=torch.long, device=dev)
    tsn.slot_frozen = torch.ones(n, dtype=torch.bool, device=dev)
    tsn.slot_sparsity = torch.tensor(decoded["sparsity"], device=dev)
    tsn.head_bits = torch.tensor(decoded["head_bits"], dtype=torch.int16, device=dev)
    tsn.head_centroids = torch.zeros(n, 0, device=dev)
    tsn._slot_cache = None
    last = banks[-1]
    for (_, layer), (weights, owners, masks, biases, centroids, bits) in zip(
        tsn.masked_layers(), decoded["layers"], strict=True
    ):
        device = layer.weight.device
        layer.bank_weights = weights.to(layer.weight)
        layer.bank_owners = torch.stack(owners).to(device)
        layer.loaded_bank.fill_(last)
        layer.weight.copy_(weights[last])
        layer.slot_bank = torch.tensor(banks, dtype=torch.int16, device=device)
        layer.task_masks = torch.stack([pack_mask(m) for m in masks]).to(device)
        if layer.task_bias is not None:
            layer.task_bias = torch.stack(biases).to(layer.weight)
        layer.task_bits = torch.tensor(bits, dtype=torch.int16, device=device)
        layer.task_centroids = layer.task_centroids.new_zeros((n, 0))
        for slot, (b, book) in enumerate(zip(bits, centroids, strict=True)):
            if b:
                layer.set_codebook(slot, book, b)
        layer._loaded()
    for norm, per_task in zip(tsn._norms, decoded["norms"], strict=True):
        norm.task_mean = torch.stack([t[0] for t in per_task]).to(norm.running_mean)
        norm.task_var = torch.stack([t[1] for t in per_task]).to(norm.running_mean)
        if norm.task_weight is not None:
            norm.task_weight = torch.stack([t[2] for t in per_task]).to(norm.running_mean)
            norm.task_bias = torch.stack([t[3] for t in per_task]).to(norm.running_mean)
    modules = dict(tsn.net.named_modules())
    for (hname, key), (out, state, active, book, slot) in decoded["heads"].items():
        mh: MultiHeadClassifier = modules[hname]  # type: ignore[assignment]
        units = state["active_units"].shape[0] if "active_units" in state else out
        head = new_head(mh, out, units)
        head.load_state_dict(state)
        mh.classifiers[key] = head.to(dev)
        freeze_head(mh, key)
        if active is not None:
            mh.register_buffer(f"active_units_T{key}", active.to(dev))
        if len(book):
            tsn.set_head_codebook(slot, book, decoded["head_bits"][slot])
    tsn.known_train_tasks_labels = set(tasks)
    return tsn.eval()


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"corrupt export file: unknown dtype {name!r}")
    return _DTYPES[name]
