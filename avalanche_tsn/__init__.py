"""avalanche-tsn: TinySubNets (arXiv:2412.10869) for the Avalanche continual-learning library."""

from avalanche_tsn._compat import expose_optimizer_modules
from avalanche_tsn._version import __version__
from avalanche_tsn.export import load_compressed
from avalanche_tsn.model import TSNModel, wrap_model
from avalanche_tsn.plugins import MaskLearningPlugin, TensorBatchesPlugin
from avalanche_tsn.recipes import AdaQPacknetStrategy, WSNStrategy
from avalanche_tsn.strategy import TSNStrategy
from avalanche_tsn.tiny import to_tiny

expose_optimizer_modules()

__all__ = [
    "__version__",
    "TSNStrategy",
    "WSNStrategy",
    "AdaQPacknetStrategy",
    "TSNModel",
    "MaskLearningPlugin",
    "TensorBatchesPlugin",
    "wrap_model",
    "load_compressed",
    "to_tiny",
]
