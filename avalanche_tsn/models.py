"""Backbones used by the TinySubNets paper (Zurek et al., arXiv:2412.10869, 2024)."""

from __future__ import annotations

from collections.abc import Sequence

from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

__all__ = ["MultiHeadMLP"]


class MultiHeadMLP(MultiTaskModule):
    """The p-MNIST backbone: a bias-free ReLU MLP with one classifier head per task.

    :param input_size: number of input features (inputs are flattened).
    :param hidden_sizes: widths of the hidden layers (paper: 100, 100).
    :param n_classes: outputs of each head.
    :param bias: whether hidden layers have biases (paper: no).
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (100, 100),
        n_classes: int = 10,
        bias: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_size
        for h in hidden_sizes:
            layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        # masking=False: a head of a task not trained yet then scores all its classes, so
        # forward transfer measures something (Avalanche masks every unit of such a head).
        self.classifier = MultiHeadClassifier(width, n_classes, masking=False)

    def forward(self, x: Tensor, task_labels: Tensor | int) -> Tensor:
        return self.classifier(self.features(x.flatten(1)), task_labels)
