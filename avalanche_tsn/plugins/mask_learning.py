"""Gradient-mask pruning with weight sharing: the first TinySubNets stage.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 1. The plugin only wires Avalanche's
callbacks to :class:`avalanche_tsn.model.TSNModel`'s task life cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

from avalanche.training.plugins import SupervisedPlugin

from avalanche_tsn.masks import check_sparsity
from avalanche_tsn.model import TSNModel

__all__ = ["MaskLearningPlugin", "tsn_model"]


def tsn_model(strategy) -> TSNModel:
    """The strategy's :class:`TSNModel`, or a TypeError naming what it is.

    :param strategy: an Avalanche strategy.
    """
    model = strategy.model
    if not isinstance(model, TSNModel):
        raise TypeError(
            f"TSN plugins need strategy.model to be a TSNModel, got {type(model).__name__}; "
            "use TSNStrategy or wrap the model with TSNModel"
        )
    return model


class MaskLearningPlugin(SupervisedPlugin):
    """Learns each task's mask over shared and free weights, then freezes it.

    :param sparsity: fraction of each maskable layer a task's mask leaves out, in [0, 1);
        a float for every task or one value per task, in training order.
    """

    def __init__(self, sparsity: float | Sequence[float] = 0.5) -> None:
        super().__init__()
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
        label = strategy.experience.task_label
        index = len(model.trained_tasks())
        # The task-similarity stage, when present, picks the bank just before this one.
        model.begin_task(label, self.sparsity_for(index), getattr(strategy, "tsn_bank", 0))

    def after_update(self, strategy, **kwargs) -> None:
        tsn_model(strategy).restore_frozen()

    def after_training_exp(self, strategy, **kwargs) -> None:
        tsn_model(strategy).end_task(strategy.experience.task_label)
