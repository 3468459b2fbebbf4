"""Tensor-gathered minibatches for any Avalanche strategy (see :mod:`avalanche_tsn.batches`)."""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from avalanche_tsn.batches import gather_from_tensors

__all__ = ["TensorBatchesPlugin"]


class TensorBatchesPlugin(SupervisedPlugin, supports_distributed=True):
    """Serve the strategy's training and evaluation loaders from whole tensors.

    Put it after any plugin that replaces ``strategy.dataloader`` (replay does) so that it
    sees the loader in use; data without a tensor form keep Avalanche's loader.
    """

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._gather(strategy)

    def before_eval_exp(self, strategy, **kwargs) -> None:
        self._gather(strategy)

    @staticmethod
    def _gather(strategy) -> None:
        # the strategy's loader is replaced, as Avalanche's replay plugin replaces it
        gathering = gather_from_tensors(strategy.dataloader)
        if gathering is not None:
            strategy.dataloader = gathering
