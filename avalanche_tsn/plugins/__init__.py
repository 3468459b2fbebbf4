"""Avalanche plugins, one per TinySubNets stage."""

from avalanche_tsn.plugins.mask_learning import MaskLearningPlugin, tsn_model

__all__ = ["MaskLearningPlugin", "tsn_model"]
