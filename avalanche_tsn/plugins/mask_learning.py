"""Gradient-mask pruning with weight sharing: the first TinySubNets stage.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 1. The plugin only wires Avalanche's
callbacks to :class:`avalanche_tsn.model.TSNModel`'s task life cycle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from avalanche.training.plugins import SupervisedPlugin

from avalanche_tsn.layer_calls import (
    BufferWatch,
    LayerCalls,
    check_changed_buffers,
    check_direct_reads,
    check_frozen_outputs,
    routed_modules,
)
from avalanche_tsn.masks import check_sparsity
from avalanche_tsn.plugins._common import current_task, first_inputs, tsn_model
from avalanche_tsn.stages import stage_context
from avalanche_tsn.validation import check_float

__all__ = ["MaskLearningPlugin"]


class MaskLearningPlugin(SupervisedPlugin, supports_distributed=True):
    """Learns each task's mask over shared and free weights, then freezes it.

    :param sparsity: fraction of each maskable layer a task's mask leaves out, in [0, 1);
        a float for every task or one value per task, in training order.
    :param new_bank_below: open a fresh bank for a task whose bank has less than this
        fraction of free weights in some layer, in (0, 1); None never does.
    """

    def __init__(
        self, sparsity: float | Sequence[float] = 0.5, new_bank_below: float | None = None
    ) -> None:
        super().__init__()
        if new_bank_below is not None:
            check_float(
                new_bank_below, "new_bank_below (None: never)", 0, 1, low_open=True, high_open=True
            )
        self.new_bank_below = new_bank_below
        self._calls: LayerCalls | None = None
        self._buffers: BufferWatch | None = None
        if isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
            if len(sparsity) == 0:
                raise ValueError("sparsity must be a float or a non-empty sequence of floats")
            self.sparsity: float | list[float] = [
                check_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(sparsity)
            ]
        else:
            self.sparsity = check_sparsity(sparsity)

    def sparsity_for(self, task_index: int) -> float:
        """Sparsity of the ``task_index``-th task trained (0-based).

        :param task_index: position of the task in training order.
        """
        if isinstance(self.sparsity, float):
            return self.sparsity
        if task_index >= len(self.sparsity):
            raise ValueError(
                f"sparsity has {len(self.sparsity)} values but task number {task_index + 1} "
                "is about to be trained; give one value per task or a single float"
            )
        return self.sparsity[task_index]

    def before_training_exp(self, strategy, **kwargs) -> None:
        model = tsn_model(strategy)
        label = current_task(strategy)
        if model.trained_tasks():  # before anything of the new task changes
            x = first_inputs(strategy, strategy.adapted_dataset, 16)
            check_frozen_outputs(model, x, model.task_table.moved_buffers.names())
        restart = model.open_task() == label
        index = len(model.trained_tasks())
        # The task-similarity stage, when present, picks the bank just before this one;
        # otherwise tasks train in the newest bank.
        bank = stage_context(strategy).take_bank()
        bank = model.n_banks - 1 if bank is None else bank
        if self.new_bank_below is not None and bank < model.n_banks:
            if min(model.free_fractions(bank).values()) < self.new_bank_below:
                bank = model.n_banks
        model.begin_task(label, self.sparsity_for(index), bank)
        if restart:
            # The interrupted run may have left non-finite momentum or Adam moments.
            strategy.optimizer.state.clear()
        self._calls = LayerCalls(routed_modules(model.net))
        self._buffers = BufferWatch(model.net)

    def before_backward(self, strategy, **kwargs) -> None:
        loss = strategy.loss
        # a scalar's item() costs 0.2 us on the CPU against 6 us for isfinite().all()
        finite = math.isfinite(loss.item()) if loss.numel() == 1 else torch.isfinite(loss).all()
        if not finite:
            clock = strategy.clock
            raise FloatingPointError(
                f"task {current_task(strategy)}: the training loss is "
                f"{float(loss.detach().float().sum())} at iteration "
                f"{clock.train_epoch_iterations} of epoch {clock.train_exp_epochs} "
                f"(experience {strategy.experience.current_experience}); trained tasks are "
                "unchanged. Check the data and the learning rate, then train this experience "
                "again (the task restarts) or call strategy.abandon_task()."
            )

    def after_backward(self, strategy, **kwargs) -> None:
        if self._calls is not None:  # the task's first step
            calls, self._calls = self._calls, None
            check_direct_reads(calls, current_task(strategy))

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._calls = None
        model, label = tsn_model(strategy), current_task(strategy)
        watch, self._buffers = self._buffers, None
        if watch is not None and (changed := watch.changed()):
            x = first_inputs(strategy, strategy.adapted_dataset, 16)
            check_changed_buffers(model, x, watch, changed, label)
            model.task_table.moved_buffers.note(changed)
        model.end_task(label)
