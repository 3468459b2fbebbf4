"""Distributed TinySubNets: one model on every rank, trained through torch DDP.

TinySubNets (Zurek et al., "TinySubNets: An efficient and low capacity continual learning
strategy", arXiv:2412.10869, 2024) learns each task's mask, prunes it, quantizes it and may
open a backbone copy for it: every one of those is a decision, and ranks that take them
apart end up with different models. Under ``torchrun`` with Avalanche's ``DistributedHelper``
the TSN strategies therefore train each experience through a ``DistributedDataParallel``
wrapper of their own (gradients of the scores, heads and weights averaged by DDP), and
bring every rank to rank 0's state where decisions are taken: after the stages that start a
task (scores, heads, banks, restarts) and after those that finish it (pruning,
quantization, calibration, the task router). Each rank then hashes its whole state; a
difference raises :class:`DivergenceError` naming the first differing tensor.

A rank that fails (an exception, a non-finite loss) does not leave the others waiting in a
collective: every rank reports at fixed points (before each backward, after each epoch and
after each stage of a task) and all of them raise the same :class:`DistributedFault`.

Single-process runs never reach this module's collectives: every function is a no-op
unless ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from avalanche.distributed import DistributedHelper
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistributedFault",
    "DivergenceError",
    "is_distributed",
    "is_main_process",
    "unwrap",
    "wrap",
    "agree",
    "reporting",
    "state_digest",
    "check_same_state",
    "broadcast_state",
    "gather_parts",
    "NOT_CARRIED",
    "leave_to_tsn",
]

log = logging.getLogger(__name__)

#: buffer dtypes that neither gloo nor NCCL carry (TSN's ownership and bit-width buffers)
NOT_CARRIED: tuple[torch.dtype, ...] = (torch.int16,)


class DistributedFault(RuntimeError):
    """A rank failed; every rank raises this, with the same message."""


class DivergenceError(RuntimeError):
    """The ranks' TSN states differ (names the first differing tensor)."""


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised (``torchrun`` with a process group)."""
    return DistributedHelper.is_distributed


def is_main_process() -> bool:
    """Whether this process is rank 0 (always True when not distributed)."""
    return DistributedHelper.is_main_process


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, or ``model`` itself.

    :param model: a module, possibly wrapped.
    """
    if isinstance(model, DistributedDataParallel):
        log.warning(
            "the model was given wrapped in DistributedDataParallel; the TSN strategies wrap "
            "it themselves around each experience's training, so its .module is used"
        )
        return model.module
    return model


def leave_to_tsn(model: nn.Module) -> None:
    """Tell any DDP wrapper of ``model`` to leave the buffers no backend carries to TSN.

    A user's own ``DistributedDataParallel(model)`` then builds (it would fail on the int16
    ownership buffers otherwise); the TSN strategies unwrap it and synchronise those buffers
    themselves.

    :param model: the TSN model.
    """
    names = [name for name, b in model.named_buffers() if b.dtype in NOT_CARRIED]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def wrap(model: nn.Module) -> DistributedDataParallel:
    """``model`` in a ``DistributedDataParallel`` wrapper for one experience's training.

    Buffers are not broadcast by DDP (TSN brings them to rank 0's with
    :func:`broadcast_state`); parameters a minibatch does not reach (frozen heads, other
    tasks' routes) are allowed.

    :param model: the TSN model, already on this rank's device.
    """
    device = DistributedHelper.make_device()
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False
    )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _fault(where: str, texts: list[str | None], cause: BaseException | None) -> DistributedFault:
    """The error every rank raises: each failed rank (a text) named with its error."""
    failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(texts) if m is not None)
    fault = DistributedFault(f"{where} stopped on every rank ({failed})")
    fault.__cause__ = cause
    return fault


def agree(error: BaseException | None, where: str) -> None:
    """Every rank says whether its part of ``where`` went well; if one did not, all raise.

    Call it at the same point on every rank. Nothing is gathered when all went well (one
    all-reduce of an integer).

    :param error: this rank's exception, or None.
    :param where: what was running (in the message).
    :raises DistributedFault: on every rank, naming each failed rank and its error.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    # NCCL reduces CUDA tensors only
    cuda = DistributedHelper.forced_cuda_comm
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag)
    if int(flag.item()) == 0:
        return
    texts = DistributedHelper.gather_all_objects(None if error is None else _describe(error))
    raise _fault(where, texts, error)


@contextmanager
def reporting(where: str) -> Iterator[None]:
    """Run a section whose failure on one rank stops every rank (see :func:`agree`).

    :param where: what the section does (in the message).
    """
    try:
        yield
    except DistributedFault:
        raise
    except Exception as err:  # every rank must hear of it before any raises
        if not is_distributed():
            raise
        agree(err, where)
        raise  # (agree raised already; kept for type checkers)
    agree(None, where)


def _entries(model: nn.Module) -> list[tuple[str, Tensor]]:
    return list(model.state_dict(keep_vars=True).items())


def _structure(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, str(v.dtype), tuple(v.shape)) for k, v in _entries(model) if v is not None]


def state_digest(model: nn.Module) -> list[tuple[str, str]]:
    """One hash per ``state_dict`` entry of ``model`` (dtype, shape and every byte).

    :param model: a module.
    """
    out = []
    for name, value in _entries(model):
        if value is None:
            continue
        h = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
        data = value.detach().contiguous().cpu().reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        out.append((name, h.hexdigest()))
    return out


def check_same_state(model: nn.Module, where: str) -> None:
    """Raise on every rank if any rank's state differs from rank 0's.

    :param model: the TSN model.
    :param where: the point of the run (in the message).
    :raises DivergenceError: naming the first differing tensor and the ranks.
    """
    if not is_distributed():
        return
    every = DistributedHelper.gather_all_objects(state_digest(model))
    reference = dict(every[0])
    for r, digest in enumerate(every[1:], start=1):
        mine = dict(digest)
        for name in [*reference, *[n for n in mine if n not in reference]]:
            if reference.get(name) != mine.get(name):
                raise DivergenceError(
                    f"{where}: rank {r}'s {name!r} differs from rank 0's "
                    "(the ranks no longer hold the same model)"
                )


@torch.no_grad()
def _broadcast_in_place(tensors: list[Tensor]) -> None:
    # one flat byte buffer: any dtype, one collective
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    sizes = [f.numel() for f in flat]
    buffer = torch.cat([f.cpu() for f in flat]) if flat else torch.zeros(0, dtype=torch.uint8)
    buffer = DistributedHelper.broadcast(buffer, src=0)  # (moved to CUDA and back for NCCL)
    for t, part in zip(tensors, torch.split(buffer, sizes), strict=True):
        t.detach().copy_(part.clone().view(t.dtype).reshape(t.shape))


def broadcast_state(model: nn.Module, where: str) -> None:
    """Give every rank rank 0's state (parameters and buffers), keeping tensor identities.

    Where ranks took different structural decisions (another bit-width, another bank) the
    other ranks load rank 0's ``state_dict``; otherwise every tensor is overwritten in place,
    so optimizers keep their parameters.

    :param model: the TSN model.
    :param where: the point of the run (in messages).
    """
    if not is_distributed():
        return
    every = DistributedHelper.gather_all_objects(_structure(model))
    if all(s == every[0] for s in every[1:]):
        _broadcast_in_place([v for _, v in _entries(model) if v is not None])
        return
    log.warning("%s: ranks took different decisions; every rank takes rank 0's", where)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if v is not None}
    state = DistributedHelper.broadcast_object(state if is_main_process() else None)
    if not is_main_process():
        model.load_state_dict(state)
    check_same_state(model, where)


def gather_parts(part: object, where: str) -> list[object]:
    """Every rank's ``part`` (or its error), in rank order, on every rank.

    A rank whose part failed sends its exception instead of leaving the others waiting;
    then every rank raises the same :class:`DistributedFault`.

    :param part: this rank's result, or the exception computing it raised.
    :param where: what was computed (in the message).
    """
    failed = isinstance(part, BaseException)
    if not is_distributed():
        if failed:
            raise part  # type: ignore[misc]
        return [part]
    sent = _describe(part) if failed else part  # type: ignore[arg-type]
    every = DistributedHelper.gather_all_objects((failed, sent))
    if any(bad for bad, _ in every):
        texts = [m if bad else None for bad, m in every]
        raise _fault(where, texts, part if failed else None)  # type: ignore[arg-type]
    return [m for _, m in every]
