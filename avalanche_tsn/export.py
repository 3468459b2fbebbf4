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
before it changes anything. Version 2 (this one) writes the numpy canonical Huffman codes of
:mod:`avalanche_tsn.huffman`; version-1 files (avalanche-tsn 0.1, ``dahuffman`` codes) are
still read.
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

from avalanche_tsn.bitpack import pack_codes, unpack_codes
from avalanche_tsn.encoding import (
    LayerPart,
    ModelEncoding,
    TaskPart,
    indices_by_owner,
    owner_pairs,
    owner_symbols,
)
from avalanche_tsn.heads import freeze_head, new_head
from avalanche_tsn.huffman import (
    HuffmanCode,
    decode_many,
    decode_symbols_v1,
    encode_symbols,
    read_code_v1,
    unpair_symbols,
)
from avalanche_tsn.inference import INFERENCE_METHODS
from avalanche_tsn.layers import (
    FREE,
    MaskedLayer,
    TaskAffineNorm,
    TaskBatchNorm,
    TaskPReLU,
    affine_norm_signature,
    module_device,
)
from avalanche_tsn.model import MASKED_KINDS, TSNModel, require_full
from avalanche_tsn.quantization import small_codes_of
from avalanche_tsn.router import TaskRouter
from avalanche_tsn.task_memory import CODE_DTYPES, decode_samples, encode_samples
from avalanche_tsn.tasks import calibrated, uncalibrated
from avalanche_tsn.tiny import keeps_memory, to_tiny
from avalanche_tsn.validation import check_bool

__all__ = ["export_model", "load_compressed", "pack_codes", "unpack_codes", "MAGIC"]

MAGIC = b"TSNZ"
FORMAT_VERSION = 2
#: Versions :func:`load_compressed` reads.
READABLE_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<4sHI")
_CRC = struct.Struct("<I")


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
        self.raw(pack_codes(small_codes_of(values, centroids), bits))
        self.tensor(centroids.float())


class _Reader:
    def __init__(self, data: bytes, version: int = FORMAT_VERSION) -> None:
        self.data = data
        self.pos = 0
        self.version = version

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

    def code(self) -> HuffmanCode | np.ndarray:
        """Read one Huffman code: decoded at once in version 1, left for a batch in 2."""
        if self.version == 1:
            code, self.pos = read_code_v1(self.data, self.pos)
            return decode_symbols_v1(code)
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
        elif isinstance(m, (MaskedLayer, *MASKED_KINDS)):
            layers[name] = list(m.weight.shape)
        elif (entry := _norm_entry(m)) is not None:
            norms[name] = entry
    return {"layers": layers, "norms": norms, "heads": heads}


def _norm_entry(m: nn.Module) -> int | list[str | int] | None:
    """A normalisation's entry in the architecture: its channels for a BatchNorm (as files
    before LayerNorm and GroupNorm were supported wrote them), else its kind and shape."""
    if isinstance(m, (TaskBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return m.num_features
    if isinstance(m, TaskAffineNorm | TaskPReLU):
        return m.signature()
    if isinstance(m, nn.PReLU) or (
        isinstance(m, nn.LayerNorm | nn.GroupNorm) and m.weight is not None
    ):
        return affine_norm_signature(m)
    return None


def _norm_shapes(entry: int | list, module: nn.Module) -> list[tuple[int, ...]]:
    """The shapes of one task's frozen terms of the normalisation ``module`` (``entry``:
    its architecture entry), in the order they are written."""
    if isinstance(entry, int):  # a BatchNorm: mean, var[, weight, bias]
        return [(entry,)] * (4 if module.weight is not None else 2)
    if entry[0] == "prelu":  # slopes alone
        return [(int(entry[1]),)]
    shape = tuple(entry[1:]) if entry[0] == "layer_norm" else (int(entry[2]),)
    return [shape] * (2 if module.bias is not None else 1)


def _check_file(path: object, method: str) -> None:
    if not isinstance(path, str | PathLike) and not callable(getattr(path, method, None)):
        raise TypeError(
            f"path must be a file path (str or os.PathLike) or a binary file with a {method} "
            f"method, got {type(path).__name__}"
        )


@torch.no_grad()
def export_model(
    model: TSNModel, path: str | PathLike | BinaryIO, *, keep_memory: bool | None = None
) -> int:
    """Write the trained tasks of ``model`` to a compact file.

    The file also holds how the model infers tasks (``model.task_inference``), its fitted
    router, and, where asked, its task memory, coded as the model stores it.

    :param model: the TSN model.
    :param path: a file path or a writable binary file.
    :param keep_memory: write the task memory; None (default): only where the model infers
        tasks by it (``task_inference == "memory"``), as :func:`~avalanche_tsn.tiny.to_tiny`.
    :return: bytes written.
    """
    require_full(model, "export")
    _check_file(path, "write")
    keep = keeps_memory(model, keep_memory)
    enc = ModelEncoding.of(model)
    tasks = enc.labels
    if not tasks:
        raise ValueError("nothing to export: no task is trained yet")
    w = _Writer()
    header: dict[str, Any] = {
        "tasks": tasks,
        "sparsity": enc.sparsity,
        "architecture": _architecture(model.net),
        "layers": [],
        "heads": {},
        "banks": enc.banks,
        "owner_pairs": owner_pairs(len(tasks)),
    }
    for layer in enc.layers:
        for owner in layer.owners:
            w.huffman(encode_symbols(owner_symbols(owner, len(tasks))))
        for part in layer.tasks:
            w.huffman(encode_symbols(part.shared_bits))
            if part.bits:
                w.quantized(part.values, part.centroids, part.bits)
            else:
                w.tensor(part.values)
            if part.bias is not None:
                w.tensor(part.bias)
        header["layers"].append(
            {
                "name": layer.name,
                "bias": layer.tasks[0].bias is not None,
                "bits": [part.bits for part in layer.tasks],
                "own": [part.n_own for part in layer.tasks],
            }
        )
    for per_task in enc.norms:
        for terms in per_task:
            for t in terms:
                w.tensor(t)
    header["head_bits"] = enc.head_bits
    # Optional (files without it load with no calibration): each task's activation ranges.
    header["act_range"] = [r.tolist() if bool(calibrated(r).all()) else None for r in enc.act_range]
    for hname, heads in _named_heads(model):
        header["heads"][hname] = _write_heads(w, heads, enc)
    _write_router(w, header, model.task_router, tasks)
    if keep:
        _write_memory(w, header, model, tasks)
    # Optional (files without it load with task_inference None): how tasks are inferred.
    if model.task_inference is not None:
        header["task_inference"] = model.task_inference
    _write_moved(w, header, model)
    head_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head_bytes)) + head_bytes + w.buf.getvalue()
    data = body + _CRC.pack(zlib.crc32(body))
    if isinstance(path, (str, PathLike)):
        Path(path).write_bytes(data)
    else:
        path.write(data)
    return len(data)


def _write_router(w: _Writer, header: dict[str, Any], router: TaskRouter, tasks: list[int]) -> None:
    """The class-incremental router, if fitted for every task (optional: files without it
    load with an unfitted router)."""
    if router.fitted_tasks() and sorted(router.fitted_tasks()) == sorted(tasks):
        learned = router.learned()
        header["router"] = {
            "labels": router.fitted_tasks(),
            "shapes": {k: list(v.shape) for k, v in learned.items()},
        }
        for value in learned.values():
            w.tensor(value.float())


def _write_memory(w: _Writer, header: dict[str, Any], model: TSNModel, tasks: list[int]) -> None:
    """Each task's memory samples, coded per task (optional: files without it load with none)."""
    entries = []
    shape = model.task_table.samples.sample_shape()
    for label in tasks:
        bits, codes, levels = encode_samples(model.memory(label))
        entries.append([len(codes), bits, len(levels)])
        w.tensor(codes)
        w.tensor(levels)
    header["memory"] = {"shape": list(shape or ()), "tasks": entries}
    if bool(model.task_table.samples.integral):  # token ids (absent: floats, as older files)
        header["memory"]["integral"] = True


def _write_moved(w: _Writer, header: dict[str, Any], model: TSNModel) -> None:
    """The user's buffers the model moved in training, which trained tasks may read, with
    their values (optional: files before 0.10 have none)."""
    if moved := model.task_table.moved_buffers.names():
        header["moved_buffers"] = []
        for name in moved:
            value = model.net.get_buffer(name).detach().cpu().contiguous()
            header["moved_buffers"].append([name, list(value.shape), str(value.dtype)])
            w.tensor(value)


def _write_heads(w: _Writer, heads: MultiHeadClassifier, enc: ModelEncoding) -> dict[str, Any]:
    """Write each trained task's head of ``heads``; return their header entries."""
    entry = {}
    for slot, label in enumerate(enc.labels):
        key = str(label)
        if key not in heads.classifiers:
            continue
        head = heads.classifiers[key]
        weights, rest = _head_entries(head)
        state = head.state_dict()
        b = enc.head_bits[slot]
        if b:
            values = torch.cat([state[k].flatten() for k in weights]).cpu()
            w.quantized(values, enc.head_centroids[slot], b)
        raw = rest if b else weights + rest
        extra = dict(heads.named_buffers(recurse=False)).get(f"active_units_T{key}")
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
    return entry


def _named_heads(model: TSNModel) -> list[tuple[str, MultiHeadClassifier]]:
    return [(n, m) for n, m in model.net.named_modules() if isinstance(m, MultiHeadClassifier)]


def _parse(data: bytes) -> tuple[dict[str, Any], _Reader]:
    if len(data) < _PREFIX.size + _CRC.size or data[:4] != MAGIC:
        raise ValueError("not an avalanche-tsn export file (bad magic number)")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"export format version {version} is not supported (this avalanche-tsn reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}; a newer file needs a newer "
            "avalanche-tsn)"
        )
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise ValueError("corrupt export file: checksum mismatch")
    start = _PREFIX.size
    try:
        header = json.loads(zlib.decompress(data[start : start + hlen]))
    except (zlib.error, ValueError) as err:
        raise ValueError(f"corrupt export file: unreadable header ({err})") from err
    return header, _Reader(data[start + hlen : -_CRC.size], version)


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
def load_compressed(
    path: str | PathLike | BinaryIO, model: nn.Module, *, dequantize: bool = True
) -> TSNModel:
    """Rebuild the inference model from an :func:`export_model` file.

    Everything is read, decoded and checked against ``model`` before ``model`` changes: a
    wrong magic number, format version or checksum, a truncated or inconsistent payload, or
    a model whose layers (shapes, biases, normalisation, heads) differ raise ``ValueError``.

    :param path: the file (path or readable binary file).
    :param model: a freshly constructed instance of the architecture that was trained (or a
        ``TSNModel`` around one); it is wrapped in place.
    :param dequantize: True: a full ``TSNModel`` (float32 weights, trainable further);
        False: its compressed runnable form (:func:`avalanche_tsn.tiny.to_tiny`), which keeps
        codes and codebooks and dequantizes layer by layer at each forward.
    :return: a ``TSNModel`` in eval mode, called as ``model(x, task_labels)``; every task in
        the file gives the same predictions as the model that was exported.
    """
    check_bool(dequantize, "dequantize")
    _check_file(path, "read")
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
    tsn = _apply(decoded, TSNModel.of(model, header["sparsity"][0]))
    if dequantize:
        return tsn
    return to_tiny(tsn)


def _decode(header: dict[str, Any], r: _Reader, net: nn.Module) -> dict[str, Any]:
    """Decode the payload into tensors, checking it against ``net`` (which is not changed)."""
    tasks: list[int] = [int(t) for t in header["tasks"]]
    shapes = header["architecture"]["layers"]
    modules = dict(net.named_modules())
    banks: list[int] = [int(b) for b in header["banks"]]
    if not tasks or len(banks) != len(tasks) or min(banks) < 0:
        raise ValueError("corrupt export file: task and bank lists do not match")
    if [e["name"] for e in header["layers"]] != list(shapes):
        raise ValueError("corrupt export file: layer list does not match the architecture")
    for entry in header["layers"]:
        name = entry["name"]
        has_bias = getattr(modules[name], "bias", None) is not None  # (an nn.Embedding has none)
        if bool(entry["bias"]) != has_bias:
            raise ValueError(
                f"model does not match the export file: layer {name} has "
                f"{'a' if has_bias else 'no'} bias in the model and "
                f"{'a' if entry['bias'] else 'no'} bias in the file"
            )
        if len(entry["bits"]) != len(tasks):
            raise ValueError(f"corrupt export file: bit-widths of {name} do not match the tasks")
        if any(not isinstance(b, int) or not 0 <= b <= 16 for b in entry["bits"]):
            raise ValueError(f"corrupt export file: bit-widths {entry['bits']!r} of {name}")
    layers = _decode_layers(header, r, tasks, banks)
    norms = []
    for name, entry in header["architecture"]["norms"].items():
        shapes_of_terms = _norm_shapes(entry, modules[name])
        norms.append([[r.tensor(shape) for shape in shapes_of_terms] for _ in tasks])
    head_bits = [int(b) for b in header["head_bits"]]
    if len(head_bits) != len(tasks):
        raise ValueError("corrupt export file: head bit-widths do not match the tasks")
    heads = _decode_heads(header, r, tasks, head_bits)
    router = _decode_router(header, r, tasks)
    memory = _decode_memory(header, r, tasks)
    moved = _decode_moved(header, r, net)
    inference = header.get("task_inference")
    if inference is not None and inference not in INFERENCE_METHODS:
        raise ValueError(f"corrupt export file: unknown task_inference {inference!r}")
    if r.pos != len(r.data):
        raise ValueError("corrupt export file: unexpected trailing data")
    act_range = uncalibrated(len(tasks), len(shapes))
    saved_ranges = header.get("act_range")
    if saved_ranges is not None:
        if len(saved_ranges) != len(tasks):
            raise ValueError("corrupt export file: activation ranges do not match the tasks")
        for slot, ranges in enumerate(saved_ranges):
            if ranges is not None:
                act_range[slot] = torch.tensor(ranges, dtype=torch.float32).view(len(shapes), 2)
    return {
        "act_range": act_range,
        "tasks": tasks,
        "banks": banks,
        "sparsity": [float(x) for x in header["sparsity"]],
        "head_bits": head_bits,
        "layers": layers,
        "norms": norms,
        "heads": heads,
        "router": router,
        "memory": memory,
        "task_inference": inference,
        "moved_buffers": moved,
    }


def _decode_heads(
    header: dict[str, Any], r: _Reader, tasks: list[int], head_bits: list[int]
) -> dict[tuple[str, str], tuple]:
    """Each trained task's head: its output count, state, active units, codebook and slot."""
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
    return heads


def _decode_moved(header: dict[str, Any], r: _Reader, net: nn.Module) -> dict[str, Tensor]:
    """The buffers the model moved in training, by name, each the shape of ``net``'s own."""
    known = dict(net.named_buffers())
    moved = {}
    for entry in header.get("moved_buffers", []):
        name, shape, dtype = entry
        if name not in known or list(known[name].shape) != shape:
            raise ValueError(f"corrupt export file: moved buffer {entry!r} is not the model's")
        moved[name] = r.tensor(tuple(shape), _dtype(dtype))  # (which refuses an unknown dtype)
    return moved


def _decode_router(
    header: dict[str, Any], r: _Reader, tasks: list[int]
) -> tuple[list[int], dict[str, Tensor]] | None:
    """The task router's labels and learned tensors, checked on a router of its own."""
    spec = header.get("router")
    if spec is None:
        return None
    labels = [int(t) for t in spec["labels"]]
    if sorted(labels) != sorted(tasks):
        raise ValueError("corrupt export file: the router's tasks do not match the tasks")
    checked = TaskRouter()
    checked.restore(labels, {k: r.tensor(tuple(v)) for k, v in spec["shapes"].items()})
    return labels, checked.learned()


def _decode_memory(header: dict[str, Any], r: _Reader, tasks: list[int]) -> list[Tensor] | None:
    """Each task's memory samples (float32, or int64 token ids, as stored), or None where the
    file has none."""
    spec = header.get("memory")
    if spec is None:
        return None
    integral = spec.get("integral", False)
    if not isinstance(integral, bool):
        raise ValueError(f"corrupt export file: memory integral flag {integral!r}")
    shape = tuple(int(d) for d in spec["shape"])
    held = any(entry[0] for entry in spec["tasks"])
    if len(spec["tasks"]) != len(tasks) or any(d < 1 for d in shape) or (held and not shape):
        raise ValueError("corrupt export file: the memory does not match the tasks")
    samples = []
    for n, bits, n_levels in spec["tasks"]:
        if bits not in CODE_DTYPES or n < 0 or n_levels < 0:
            raise ValueError(f"corrupt export file: memory entry {[n, bits, n_levels]}")
        codes = r.tensor((n, *shape), CODE_DTYPES[bits])
        values = decode_samples(bits, codes, r.tensor((n_levels,)))
        samples.append(values.long() if integral else values)
    return samples


def _decode_layers(
    header: dict[str, Any], r: _Reader, tasks: list[int], banks: list[int]
) -> list[tuple]:
    """Read every masked layer: ownership maps, masks, own values, biases, codebooks.

    Version 2 files give each task's own-weight count in the header and always write each
    shared bitmap, so the payload is parsed first and every Huffman code decoded in one
    batch; version-1 files are read code by code.
    """
    n_banks = max(banks) + 1
    shapes = header["architecture"]["layers"]
    parsed = []
    for entry in header["layers"]:
        name, numel = entry["name"], int(np.prod(shapes[entry["name"]]))
        owners = [r.code() for _ in range(n_banks)]
        if r.version == 1:
            owners = [_check_owner(o - 1, numel, len(tasks), name) for o in owners]
            counts = [[int(np.count_nonzero(o == s)) for s in range(len(tasks))] for o in owners]
            n_own = [counts[banks[s]][s] for s in range(len(tasks))]
        else:
            n_own = [int(n) for n in entry["own"]]
            if len(n_own) != len(tasks) or min(n_own) < 0:
                raise ValueError(f"corrupt export file: own-weight counts of {name}")
        slots = []
        for slot, b in enumerate(entry["bits"]):
            if r.version == 1:
                owner = owners[banks[slot]]
                n_earlier = int(np.count_nonzero((owner != FREE) & (owner < slot)))
                bitmap = r.code() if n_earlier else np.zeros(0, dtype=np.int64)
            else:
                bitmap = r.code()
            if b:
                values, book = r.quantized(n_own[slot], b)
            else:
                values, book = r.tensor((n_own[slot],)), torch.zeros(0)
            bias = r.tensor((shapes[name][0],)) if entry["bias"] else None
            slots.append((bitmap, values, book, bias))
        parsed.append((name, numel, owners, n_own, slots, [int(b) for b in entry["bits"]]))
    if r.version != 1:
        pending = [c for p in parsed for c in p[2] + [s[0] for s in p[4]]]
        decoded = iter(decode_many(pending))
        pairs = bool(header.get("owner_pairs", False))
        parsed = [
            (
                name,
                numel,
                [_owner_from(next(decoded), pairs, len(tasks), numel) for _ in owners],
                n_own,
                [(next(decoded), *rest) for _, *rest in slots],
                bits,
            )
            for name, numel, owners, n_own, slots, bits in parsed
        ]
    return [
        _layer_part(name, tuple(shapes[name]), owners, n_own, slots, bits, banks)
        for name, _, owners, n_own, slots, bits in parsed
    ]


def _layer_part(
    name: str,
    shape: tuple[int, ...],
    owners: list[np.ndarray],
    n_own: list[int],
    slots: list[tuple],
    bits_per_slot: list[int],
    banks: list[int],
) -> LayerPart:
    """One layer's decoded codes as a :class:`LayerPart`, every count checked."""
    numel, n_tasks = int(np.prod(shape)), len(banks)
    owners = [_check_owner(o, numel, n_tasks, name) for o in owners]
    own_idx = [indices_by_owner(owner, n_tasks) for owner in owners]
    free = []
    for bank, owner in enumerate(owners):
        counts = np.bincount(owner.astype(np.int64) - FREE, minlength=n_tasks - FREE)
        if any(counts[s - FREE] and banks[s] != bank for s in range(n_tasks)):
            raise ValueError(f"corrupt export file: ownership map of {name} is invalid")
        free.append(int(counts[0]))
    parts = []
    for slot, ((symbols, values, book, bias), b) in enumerate(
        zip(slots, bits_per_slot, strict=True)
    ):
        bank = banks[slot]
        idx = own_idx[bank][slot]
        if idx.size != n_own[slot]:
            raise ValueError(f"corrupt export file: ownership map of {name} is invalid")
        owner = owners[bank]
        n_earlier = int(np.count_nonzero((owner != FREE) & (owner < slot)))
        shared = np.unpackbits(np.asarray(symbols, dtype=np.uint8))[:n_earlier]
        if shared.size != n_earlier or len(symbols) != (n_earlier + 7) // 8:
            raise ValueError(f"corrupt export file: shared bitmap of {name} has wrong size")
        parts.append(
            TaskPart(
                bank,
                idx.size,
                np.packbits(shared),
                n_earlier,
                int(np.count_nonzero(shared)),
                b,
                book,
                bias,
                lambda i=idx: i,
                lambda _own, v=values: v,
            )
        )
    return LayerPart(name, shape, owners, parts, free)


def _owner_from(symbols: np.ndarray, pairs: bool, n_tasks: int, numel: int) -> np.ndarray:
    """An ownership map from its Huffman symbols (see :func:`owner_symbols`)."""
    values = unpair_symbols(symbols, n_tasks + 1, numel) if pairs else symbols
    return values.astype(np.int32) - 1


def _check_owner(owner: np.ndarray, numel: int, n_tasks: int, name: str) -> np.ndarray:
    if owner.size != numel or (owner.size and (owner.min() < FREE or owner.max() >= n_tasks)):
        raise ValueError(f"corrupt export file: ownership map of {name} is invalid")
    return owner


def _apply(decoded: dict[str, Any], tsn: TSNModel) -> TSNModel:
    """Write decoded tensors into ``tsn`` (every check has passed)."""
    tasks, banks = decoded["tasks"], decoded["banks"]
    tsn.restore_tasks(tasks, decoded["sparsity"], decoded["head_bits"], decoded["act_range"])
    for (_, layer), part in zip(tsn.masked_layers(), decoded["layers"], strict=True):
        n_slots, shape = len(part.tasks), part.shape
        weights = torch.from_numpy(part.bank_weights()).view(len(part.owners), *shape)
        owners = [torch.from_numpy(o.astype(np.int16)).view(shape) for o in part.owners]
        masks = [
            torch.from_numpy(np.packbits(part.mask(s), bitorder="little")) for s in range(n_slots)
        ]
        biases = [t.bias for t in part.tasks if t.bias is not None]
        codebooks = [(t.centroids, t.bits) for t in part.tasks]
        layer.restore_tasks(weights, owners, masks, biases, codebooks, banks)
    for norm, per_task in zip(tsn.norm_layers(), decoded["norms"], strict=True):
        norm.restore_tasks(per_task)
    dev = module_device(tsn)
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
        mh.max_class_label = max(mh.max_class_label, out)
    if decoded["router"] is not None:
        tsn.task_router.restore(*decoded["router"])
    if decoded["memory"] is not None:
        for label, samples in zip(tasks, decoded["memory"], strict=True):
            if len(samples):
                tsn.store_memory(label, samples.to(dev))
    tsn.task_inference = decoded["task_inference"]
    for name, value in decoded["moved_buffers"].items():
        buffer = tsn.net.get_buffer(name)
        buffer.copy_(value.to(buffer.device, buffer.dtype))
    tsn.task_table.moved_buffers.note(list(decoded["moved_buffers"]))
    return tsn.eval()


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"corrupt export file: unknown dtype {name!r}")
    return _DTYPES[name]
