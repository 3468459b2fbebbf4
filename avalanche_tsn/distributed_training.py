"""The TSN strategies under ``torchrun``: DDP around each experience, one model on every rank.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) on several processes, the way Avalanche's
``DistributedHelper`` runs strategies: each rank reads its share of the training data
(Avalanche's loaders shard it), gradients are averaged by ``DistributedDataParallel``, and the
model stays the TSN model everywhere but in the training forward. What keeps the ranks on
one model is in :mod:`avalanche_tsn.distributed`: state brought to rank 0's where a task starts
and where it ends, a hash comparison after each task, and failures reported to every rank.

Evaluation is split and combined: every rank reads the same evaluation minibatches, runs the
model on its own slice of each, and the slices' outputs are gathered back into the whole
minibatch, so Avalanche's metrics (which do not combine ranks) see on every rank exactly the
minibatches of a single-process evaluation, for a ``1 / world_size`` share of the forwards.
"""

from __future__ import annotations

from typing import Any

import torch

from avalanche_tsn.distributed import (
    agree,
    broadcast_state,
    check_same_state,
    gather_parts,
    is_distributed,
    reporting,
    unwrap,
    wrap,
)
from avalanche_tsn.stages import stage_context

__all__ = ["DistributedTrainingMixin"]


def _sliceable(batch: object) -> bool:
    """Whether a minibatch is tensors of one length (it can be split by rows)."""
    return isinstance(batch, (list, tuple)) and all(
        isinstance(t, torch.Tensor) and len(t) == len(batch[0]) for t in batch
    )


class DistributedTrainingMixin:
    """Strategy methods that train each experience through DDP when distributed.

    Single-process runs take none of these paths. Expects ``tsn_model`` on the strategy.
    """

    def _init_distributed(self) -> None:
        #: the DDP wrapper of the experience in training (None outside training or alone)
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None

    def _where(self) -> str:
        index = getattr(self.experience, "current_experience", "?")  # type: ignore[attr-defined]
        return f"experience {index}"

    def _before_training_exp(self, **kwargs: Any) -> None:
        # a user's own DDP wrapper would average what TSN keeps apart; TSN wraps itself
        self.model = unwrap(self.model)  # type: ignore[has-type]
        if not is_distributed():
            super()._before_training_exp(**kwargs)  # type: ignore[misc]
            return
        where = f"starting {self._where()}"
        with reporting(where):
            super()._before_training_exp(**kwargs)  # type: ignore[misc]
        # scores, new heads, a new bank or restarted weights: rank 0's everywhere
        broadcast_state(self.tsn_model, where)  # type: ignore[attr-defined]
        self._ddp = wrap(self.tsn_model)  # type: ignore[attr-defined]

    def training_epoch(self, **kwargs: Any) -> None:
        """One epoch (Avalanche's), with a failure on any rank stopping every rank."""
        if self._ddp is None:
            super().training_epoch(**kwargs)  # type: ignore[misc]
            return
        try:
            with reporting(f"training {self._where()}"):
                super().training_epoch(**kwargs)  # type: ignore[misc]
        except BaseException:
            self._ddp = None
            raise

    def forward(self) -> Any:
        """The training forward through DDP (so gradients are averaged); when distributed,
        the evaluation forward of this rank's slice of the minibatch, gathered whole."""
        if self.is_training:  # type: ignore[attr-defined]
            if self._ddp is not None:
                return self._ddp(self.mb_x, self.mb_task_id)  # type: ignore[attr-defined]
            return super().forward()  # type: ignore[misc]
        batch = self.mbatch  # type: ignore[has-type]
        if is_distributed() and _sliceable(batch):
            return self._shard_forward(batch)
        return super().forward()  # type: ignore[misc]

    def _shard_forward(self, batch: list | tuple) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
        n = len(batch[0])
        lo, hi = n * rank // world, n * (rank + 1) // world
        ctx = stage_context(self)
        part: object
        try:
            self.mbatch = type(batch)(t[lo:hi] for t in batch)
            out = super().forward() if hi > lo else None  # type: ignore[misc]
            tasks = ctx.take_inferred_tasks()
            part = (None if out is None else out.detach().cpu(), tasks)
        except Exception as err:  # sent to every rank, which all raise it
            part = err
        finally:
            self.mbatch = batch
        parts = gather_parts(part, f"evaluating {self._where()}")
        outs = [p[0] for p in parts if p[0] is not None]  # type: ignore[index]
        tasks = [p[1] for p in parts if p[0] is not None and p[1] is not None]  # type: ignore[index]
        if tasks:
            ctx.inferred_tasks = torch.cat(tasks).to(self.device)  # type: ignore[attr-defined]
        return torch.cat(outs).to(self.device)  # type: ignore[attr-defined]

    def backward(self) -> None:
        """Avalanche's backward, after every rank has reached it.

        A rank whose step failed before (an exception, or the non-finite loss that
        :class:`~avalanche_tsn.plugins.MaskLearningPlugin` refuses before every backward)
        reports it here instead (see :meth:`training_epoch`), so no rank enters DDP's
        gradient all-reduce alone.
        """
        if self._ddp is not None:
            agree(None, f"training {self._where()}")
        super().backward()  # type: ignore[misc]

    def _after_training_exp(self, **kwargs: Any) -> None:
        if self._ddp is None:
            super()._after_training_exp(**kwargs)  # type: ignore[misc]
            return
        # pruning, quantization, calibration and the router run on the plain model
        self._ddp = None
        where = f"finishing {self._where()}"
        with reporting(where):
            super()._after_training_exp(**kwargs)  # type: ignore[misc]
        broadcast_state(self.tsn_model, where)  # type: ignore[attr-defined]
        check_same_state(self.tsn_model, f"after {self._where()}")  # type: ignore[attr-defined]

    def make_eval_dataloader(self, **kwargs: Any) -> None:
        """Avalanche's evaluation loader; when distributed, every rank reads the whole stream
        (each runs the model on its slice of each minibatch, see :meth:`forward`)."""
        super().make_eval_dataloader(**kwargs)  # type: ignore[misc]
        if is_distributed() and hasattr(self.dataloader, "distributed_sampling"):  # type: ignore[has-type]
            self.dataloader.distributed_sampling = False  # type: ignore[has-type]
