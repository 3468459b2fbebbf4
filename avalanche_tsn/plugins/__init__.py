"""Avalanche plugins, one per TinySubNets stage."""

from avalanche_tsn.plugins._common import current_task, tsn_model
from avalanche_tsn.plugins.activations import ActivationCalibrationPlugin
from avalanche_tsn.plugins.batches import TensorBatchesPlugin
from avalanche_tsn.plugins.compression import (
    PruningPlugin,
    QuantizationPlugin,
    ValidationSplitPlugin,
    validation_accuracy,
)
from avalanche_tsn.plugins.mask_learning import MaskLearningPlugin
from avalanche_tsn.plugins.progress import TaskProgressPlugin
from avalanche_tsn.plugins.router import TaskRouterPlugin
from avalanche_tsn.plugins.similarity import TaskSimilarityPlugin

__all__ = [
    "ActivationCalibrationPlugin",
    "MaskLearningPlugin",
    "ValidationSplitPlugin",
    "PruningPlugin",
    "QuantizationPlugin",
    "TaskSimilarityPlugin",
    "TaskRouterPlugin",
    "TensorBatchesPlugin",
    "TaskProgressPlugin",
    "tsn_model",
    "current_task",
    "validation_accuracy",
]
