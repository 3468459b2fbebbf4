"""Per-task activation calibration after training (see :mod:`avalanche_tsn.activations`)."""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from avalanche_tsn.activations import calibrate
from avalanche_tsn.plugins._common import current_task, strategy_batches, tsn_model

__all__ = ["ActivationCalibrationPlugin"]


class ActivationCalibrationPlugin(SupervisedPlugin):
    """Record each task's activation ranges once its weights are final.

    Runs after pruning and quantization, on the task's validation split when there is one
    (:class:`~avalanche_tsn.plugins.ValidationSplitPlugin`), else on up to ``samples`` of
    its training data.

    :param samples: most training samples read when there is no validation split, >= 1.
    """

    def __init__(self, samples: int = 1024) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"calibration samples must be a positive int, got {samples!r}")
        self.samples = samples

    def after_training_exp(self, strategy, **kwargs) -> None:
        data = getattr(strategy, "tsn_validation", None)
        if data is None:
            data = strategy.adapted_dataset.eval()
            data = data.subset(range(min(len(data), self.samples)))
        device = strategy.device
        batches = strategy_batches(strategy, data, strategy.eval_mb_size)
        calibrate(tsn_model(strategy), current_task(strategy), (x.to(device) for x, _ in batches))
