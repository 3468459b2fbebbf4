"""Per-task activation calibration after training (see :mod:`avalanche_tsn.activations`)."""

from __future__ import annotations

import logging

import torch
from avalanche.core import SupervisedPlugin

from avalanche_tsn.activations import calibrate
from avalanche_tsn.plugins._common import current_task, strategy_batches, tsn_model
from avalanche_tsn.stages import stage_context
from avalanche_tsn.validation import check_int

__all__ = ["ActivationCalibrationPlugin"]

log = logging.getLogger(__name__)


class ActivationCalibrationPlugin(SupervisedPlugin, supports_distributed=True):
    """Record each task's activation ranges once its weights are final.

    Runs after pruning and quantization, on the task's validation split when there is one
    (:class:`~avalanche_tsn.plugins.ValidationSplitPlugin`), else on up to ``samples`` of
    its training data.

    :param samples: most training samples read when there is no validation split, >= 1.
    """

    def __init__(self, samples: int = 1024) -> None:
        super().__init__()
        self.samples = check_int(samples, "samples (calibration)", 1)

    def _data(self, strategy):
        data = stage_context(strategy).validation
        if data is None:
            data = strategy.adapted_dataset.eval()
            data = data.subset(range(min(len(data), self.samples)))
        return strategy_batches(strategy, data, strategy.eval_mb_size)

    def before_training_exp(self, strategy, **kwargs) -> None:
        # Checked before training: after the task is frozen a failure could only leave it
        # trained but uncalibrated.
        # (fork_rng: a loader draws its seed from the global generator, and this read must
        # not change the random stream training then uses)
        with torch.random.fork_rng(devices=[]):
            batches = self._data(strategy)
            try:
                bad = next(
                    (i for i, (x, _) in enumerate(batches) if not torch.isfinite(x).all()), None
                )
            finally:
                batches.close()  # puts strategy.mbatch back now, not when collected
        if bad is not None:
            raise ValueError(
                f"task {current_task(strategy)}: the calibration data (the validation split, "
                f"else the first training samples) holds non-finite inputs in minibatch {bad}; "
                "activation ranges cannot be calibrated on it. Nothing was trained and trained "
                "tasks are unchanged: clean the data (or pass calibrate_activations=False), "
                "then train this experience again or call strategy.abandon_task()."
            )

    def after_training_exp(self, strategy, **kwargs) -> None:
        label = current_task(strategy)
        inputs = (x.to(strategy.device) for x, _ in self._data(strategy))
        try:
            calibrate(tsn_model(strategy), label, inputs)
        except FloatingPointError as err:
            # finite inputs that overflow inside the network: the task stays usable with float
            # activations, and quantized activations refuse it by name
            log.warning("task %d left uncalibrated: %s", label, err)
