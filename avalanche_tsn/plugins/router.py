"""Task-router stage of class-incremental TinySubNets as an Avalanche plugin.

Wires Avalanche callbacks to :mod:`avalanche_tsn.router` (a learned task router over the
frozen subnetworks of Zurek et al., arXiv:2412.10869, 2024, trained as MORE and ROW train
their task-identification part, Kim et al., 2022-2023).
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import SupervisedPlugin

from avalanche_tsn.plugins._common import current_task, strategy_batches, tsn_model
from avalanche_tsn.router import (
    DEFAULT_OOD_WEIGHT,
    RouterSettings,
    check_ood_weight,
    fit_samples,
    outlier_exposure_loss,
)
from avalanche_tsn.similarity import task_features

__all__ = ["TaskRouterPlugin"]


class TaskRouterPlugin(SupervisedPlugin, supports_distributed=True):
    """Fits the model's task router after each task; teaches a training task its outliers.

    While a task trains, each minibatch's loss gets ``ood_weight`` times the
    outlier-exposure loss of as many earlier tasks' memory samples run through the training
    task's subnetwork. After the task is compressed and frozen, the router is fitted again
    on the task memory of every earlier task and the new task's training data. Needs the
    task memory (TSNStrategy keeps it with ``task_inference="router"``); the memory of each
    earlier task enters the fit with noisy copies of it (``settings.copies``, ``.noise``).

    :param ood_weight: weight of the outlier-exposure loss, a float >= 0 (0: off).
    :param settings: how the router is fitted.
    :param seed: seed of the memory minibatches drawn for the outlier-exposure loss.
    """

    def __init__(
        self,
        ood_weight: float = DEFAULT_OOD_WEIGHT,
        settings: RouterSettings | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.ood_weight = check_ood_weight(ood_weight)
        if settings is not None and not isinstance(settings, RouterSettings):
            raise TypeError(f"settings must be a RouterSettings, got {type(settings).__name__}")
        self.settings = settings or RouterSettings()
        self.seed = seed
        self._outliers: torch.Tensor | None = None
        self._draws = torch.Generator()
        self._label = 0

    def before_training(self, strategy, **kwargs) -> None:
        # before any work: the outlier exposure and the fit read every trained task's memory
        model = tsn_model(strategy)
        missing = [t for t in model.trained_tasks() if len(model.memory(t)) < 2]
        if missing:
            raise ValueError(
                f"tasks {missing} keep no memory: the router is fitted on every trained task's "
                "memory (train them with task_inference='router' or 'memory', memory_size >= 2; "
                "to train further from an export, write it with keep_memory=True)"
            )

    def before_training_exp(self, strategy, **kwargs) -> None:
        model = tsn_model(strategy)
        earlier = [model.memory(t) for t in model.trained_tasks()]
        self._outliers = torch.cat(earlier) if earlier and self.ood_weight > 0 else None
        # the label once per experience: the training step only reads it
        self._label = current_task(strategy)
        self._draws = torch.Generator().manual_seed(self.seed + self._label)

    def before_backward(self, strategy, **kwargs) -> None:
        if self._outliers is None:
            return
        n = min(len(self._outliers), len(strategy.mb_x))
        pick = torch.randperm(len(self._outliers), generator=self._draws)[:n]
        x = self._outliers[pick.to(self._outliers.device)]
        out = strategy.model(x, self._label)
        strategy.loss = strategy.loss + self.ood_weight * outlier_exposure_loss(out)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._outliers = None
        model = tsn_model(strategy)
        label = current_task(strategy)
        labels = model.trained_tasks()
        data = strategy.experience.dataset.eval()
        current = torch.cat([x for x, _ in strategy_batches(strategy, data, 256)])
        x, targets = fit_samples(
            [current if t == label else model.memory(t).to(current.device) for t in labels],
            [t != label for t in labels],
            self.settings,
        )
        features = [task_features(model, t, x) for t in labels]
        model.task_router.fit(features, targets.to(features[0].device), labels, self.settings)
