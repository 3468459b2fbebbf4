"""Backbones used by the TinySubNets paper (Zurek et al., arXiv:2412.10869, 2024)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

__all__ = ["MultiHeadMLP", "ReducedAlexNet", "TinyNet", "ReducedResNet18", "single_head"]


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

    def staged_forward(self, task_labels: Tensor | int) -> tuple[list[Callable], Callable]:
        """:meth:`forward` as stages run in order and a head (see :mod:`avalanche_tsn.prefix`).

        :param task_labels: the labels the head is given.
        """
        return [_flatten, *self.features], lambda h: self.classifier(h, task_labels)


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


def _norm(channels: int, dims: int, norm: bool) -> nn.Module:
    if not norm:
        return nn.Identity()
    return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)


class _HeadedNet(MultiTaskModule):
    """A feature extractor followed by one head per task (or one shared head)."""

    def __init__(self, features: nn.Module, width: int, n_classes: int, multihead: bool) -> None:
        super().__init__()
        self.features = features
        self.multihead = multihead
        self.classifier: nn.Module = (
            MultiHeadClassifier(width, n_classes, masking=False)
            if multihead
            else nn.Linear(width, n_classes)
        )

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Tensor:
        feats = self.features(x)
        if self.multihead:
            return self.classifier(feats, task_labels)
        return self.classifier(feats)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.forward(x, task_label)

    def staged_forward(self, task_labels: Tensor | int | None) -> tuple[list[Callable], Callable]:
        """:meth:`forward` as stages run in order and a head (see :mod:`avalanche_tsn.prefix`).

        :param task_labels: the labels the head is given.
        """
        if self.multihead:
            return list(self.features), lambda h: self.classifier(h, task_labels)
        return list(self.features), self.classifier


class ReducedAlexNet(_HeadedNet):
    """The reduced AlexNet of WSN and TinySubNets for 3x32x32 inputs (split CIFAR-100).

    :param n_classes: outputs of each head.
    :param norm: BatchNorm after each layer (TSN keeps its statistics per task).
    :param multihead: one head per task (``MultiHeadClassifier``) or one shared head.
    """

    def __init__(self, n_classes: int = 10, norm: bool = True, multihead: bool = True) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for c_out, k in ((64, 4), (128, 3), (256, 2)):
            layers += [
                nn.Conv2d(c_in, c_out, k, bias=False),
                _norm(c_out, 2, norm),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(256 * 2 * 2, 2048, bias=False), _norm(2048, 1, norm)]
        layers += [nn.ReLU(), nn.Linear(2048, 2048, bias=False), _norm(2048, 1, norm), nn.ReLU()]
        super().__init__(nn.Sequential(*layers), 2048, n_classes, multihead)


class TinyNet(_HeadedNet):
    """A small VGG-like backbone for 3x64x64 inputs (TinyImageNet, 40 tasks of 5 classes).

    :param n_classes: outputs of each head.
    :param norm: BatchNorm after each layer.
    :param multihead: one head per task or one shared head.
    """

    def __init__(self, n_classes: int = 5, norm: bool = True, multihead: bool = True) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (32, 64, 128, 256):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                _norm(c_out, 2, norm),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(256 * 4 * 4, 256, bias=False), _norm(256, 1, norm)]
        layers += [nn.ReLU()]
        super().__init__(nn.Sequential(*layers), 256, n_classes, multihead)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            _norm(c_out, 2, norm),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            _norm(c_out, 2, norm),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out, 2, norm)
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ReducedResNet18(_HeadedNet):
    """The reduced ResNet-18 (20 base filters) used for 5-datasets by GPM, WSN and TSN.

    :param n_classes: outputs of each head.
    :param nf: base number of filters.
    :param norm: BatchNorm after each convolution.
    :param multihead: one head per task or one shared head.
    """

    def __init__(
        self, n_classes: int = 10, nf: int = 20, norm: bool = True, multihead: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(3, nf, 3, 1, 1, bias=False),
            _norm(nf, 2, norm),
            nn.ReLU(),
        ]
        c_in = nf
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            layers += [
                _BasicBlock(c_in, nf * mult, stride, norm),
                _BasicBlock(nf * mult, nf * mult, 1, norm),
            ]
            c_in = nf * mult
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), c_in, n_classes, multihead)


def single_head(input_size: int, hidden_sizes: Sequence[int], n_classes: int) -> nn.Module:
    """A biased ReLU MLP with one shared output layer: a model Avalanche's PackNet can run.

    Avalanche 0.6's ``PackNetModel`` fails on bias-free layers and on ``MultiHeadClassifier``;
    PackNet packs this shared output layer per task like every other layer.

    :param input_size: number of input features (inputs are flattened).
    :param hidden_sizes: widths of the hidden layers.
    :param n_classes: outputs.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_size
    for h in hidden_sizes:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)
