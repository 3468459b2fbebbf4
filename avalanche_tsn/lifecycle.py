"""The guarded task life cycle of a TinySubNets model: begin, restart, freeze, abandon.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), steps 1 and 6: a task trains in the free
weights of its bank and is frozen after; nothing it froze changes again. The transitions
are guarded the way Avalanche's ``PackNetModel`` guards its state machine: the task table
(:class:`~avalanche_tsn.tasks.TaskTable`) decides which transition is allowed, the layers
carry it out, and a refused transition changes nothing.
"""

from __future__ import annotations

import logging

import torch
from avalanche.models import MultiHeadClassifier
from torch import nn

from avalanche_tsn.heads import freeze_head
from avalanche_tsn.layers import MaskedLayer, TaskNorm
from avalanche_tsn.masks import check_sparsity
from avalanche_tsn.tasks import TaskTable
from avalanche_tsn.validation import check_float32, check_int

__all__ = ["TaskLifeCycleMixin", "LOW_FREE_FRACTION"]

log = logging.getLogger(__name__)

#: A task that starts with less than this fraction of free weights in some layer of its bank
#: gets a logged warning: it can train almost nothing of its own.
LOW_FREE_FRACTION = 0.05


class TaskLifeCycleMixin:
    """The life-cycle transitions of :class:`~avalanche_tsn.model.TSNModel`."""

    # the model's (see TSNModel)
    task_table: TaskTable
    net: nn.Module
    _layers: list[MaskedLayer]
    _norms: list[TaskNorm]
    _heads: list[MultiHeadClassifier]
    known_train_tasks_labels: set[int]
    live_sparsity: float
    n_banks: int
    # (and its queries: is_trained, open_task, slot_of, free_fractions, head_modules)

    @torch.no_grad()
    def begin_task(self, task_label: int, sparsity: float, bank: int = 0) -> int:
        """Open the slot of ``task_label``; restart it if its training was interrupted.

        A restarted task starts afresh (see :meth:`reset_live`); a different task whose
        training was interrupted is abandoned first (see :meth:`abandon_task`).

        :param task_label: the label of the task about to be trained.
        :param sparsity: fraction of each maskable layer its mask leaves out.
        :param bank: the backbone copy it trains in: an existing bank, or ``n_banks`` to open
            a fresh one.
        :return: the task's slot.
        """
        if self.is_trained(task_label):
            raise ValueError(f"task {task_label} is already trained; its subnetwork is frozen")
        check_sparsity(sparsity)
        # a cast after wrapping (model.double()) would fail inside the first training step
        check_float32(self, "model")
        check_int(
            bank, f"bank (an existing bank, or {self.n_banks} for a new one)", 0, self.n_banks
        )
        interrupted = self.open_task()
        if interrupted is not None and interrupted != int(task_label):
            log.warning(
                "task %d was never finished; abandoning it to train task %d",
                interrupted,
                task_label,
            )
            self.abandon_task()
        slot, restart = self.task_table.open(task_label, sparsity)
        self.live_sparsity = sparsity
        for layer in self._layers:
            layer.begin_task(slot, bank)
        for norm in self._norms:
            norm.begin_task(slot)
        if restart:
            self.reset_live(task_label)
        low = sorted((f, n) for n, f in self.free_fractions().items() if f < LOW_FREE_FRACTION)
        if low:
            shown = ", ".join(f"{n}: {100 * f:.1f}% free" for f, n in low[:3])
            more = f" and {len(low) - 3} more layers" if len(low) > 3 else ""
            log.warning(
                "task %d starts with few free weights in bank %d (%s%s): it can train almost "
                "nothing of its own. Lower the sparsity, prune more, use a bigger backbone or "
                "let new banks open (new_bank_below, task_matching).",
                task_label,
                bank,
                shown,
                more,
            )
        return slot

    @torch.no_grad()
    def reset_live(self, task_label: int | None = None) -> None:
        """Re-initialise what the live subnetwork trains, leaving trained tasks untouched.

        Free weights, scores and live biases of every maskable layer, live normalisation
        statistics and affine terms, and the heads of ``task_label`` (if it is not trained).

        :param task_label: the task whose heads are reset too.
        """
        for layer in self._layers:
            layer.reset_live()
        for norm in self._norms:
            norm.reset_live()
            norm.reset_affine()
        if task_label is not None and not self.is_trained(task_label):
            for head in self.head_modules(task_label):
                for m in head.modules():
                    if isinstance(m, nn.Linear):
                        m.reset_parameters()

    @torch.no_grad()
    def abandon_task(self) -> int | None:
        """Forget the task whose training was interrupted, as if it had never started.

        Its slot is dropped and the live subnetwork re-initialised; trained tasks are
        untouched. Export and the capacity report work with or without this call.

        :return: the abandoned task's label, or None if no task was open.
        """
        label = self.open_task()
        if label is None:
            return None
        self.reset_live(label)
        _, slot = self.task_table.drop_open()  # type: ignore[misc]
        for layer in self._layers:
            layer.drop_slot(slot)
        for norm in self._norms:
            norm.drop_slot(slot)
        self.known_train_tasks_labels.discard(label)
        log.info("task %d abandoned", label)
        return label

    def check_finite(self, task_label: int) -> str | None:
        """The first non-finite value the task in training would freeze, or None.

        :param task_label: the task being trained.
        :return: where it is (layer and tensor), or None if every value is finite.
        """
        for name, layer in self.masked_layers():
            bad = layer.check_finite()
            if bad:
                return f"{name}.{bad}"
        for name, norm in self.net.named_modules():
            if isinstance(norm, TaskNorm) and (bad := norm.check_finite()):
                return f"{name}.{bad}"
        for head in self.head_modules(task_label):
            for name, t in head.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"head {task_label}: {name}"
        return None

    @torch.no_grad()
    def end_task(self, task_label: int) -> int:
        """Freeze ``task_label``'s subnetwork from the final scores.

        Every value to be frozen is checked first: a non-finite one raises
        ``FloatingPointError`` and nothing changes (train the task again, or abandon it).

        :param task_label: the label of the task just trained.
        :return: the task's slot.
        """
        slot = self.slot_of(task_label)
        if slot is None or self.is_trained(task_label):
            raise RuntimeError(f"task {task_label} is not being trained")
        bad = self.check_finite(task_label)
        if bad is not None:
            raise FloatingPointError(
                f"task {task_label}: {bad} holds non-finite values at the end of training, so "
                "the task cannot be frozen; trained tasks are unchanged. Train this "
                "experience again (e.g. with a lower learning rate) or abandon the task."
            )
        for layer in self._layers:
            layer.end_task(slot)
        for norm in self._norms:
            norm.end_task(slot)
        key = str(int(task_label))
        for heads in self._heads:
            if key in heads.classifiers:
                freeze_head(heads, key)
        self.task_table.freeze(task_label)
        self.known_train_tasks_labels.add(int(task_label))
        log.debug("task %s frozen in slot %d", task_label, slot)
        return slot
