"""Task-incremental benchmarks: embedded permuted digits and local Fashion-MNIST.

Permuted streams follow the p-MNIST protocol used by TinySubNets (Zurek et al.,
arXiv:2412.10869, 2024): every task is the same classification problem under its own fixed
pixel permutation, with one task label per experience.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from avalanche.benchmarks import NCScenario, nc_benchmark
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "TensorTaskDataset",
    "permuted_digits",
    "load_fashion_mnist",
    "permuted_fashion_mnist",
    "split_fashion_mnist",
    "FASHION_MNIST_ROOT",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the idx files.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class TensorTaskDataset(Dataset):
    """Inputs and integer targets held as tensors (what Avalanche's generators expect).

    :param x: inputs, one row per sample.
    :param y: integer class labels.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x = x
        self.targets = y.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.targets[i]


def _permuted_stream(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_tasks: int, seed: int
) -> NCScenario:
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be at least 1, got {n_tasks}")
    rng = np.random.RandomState(seed)
    train, test = [], []
    for _ in range(n_tasks):
        perm = torch.from_numpy(rng.permutation(x_train.shape[1]))
        train.append(TensorTaskDataset(x_train[:, perm], y_train))
        test.append(TensorTaskDataset(x_test[:, perm], y_test))
    return nc_benchmark(
        train,
        test,
        n_experiences=n_tasks,
        task_labels=True,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )


def permuted_digits(n_tasks: int = 5, *, seed: int = 0, test_fraction: float = 0.25) -> NCScenario:
    """Permuted digits: scikit-learn's bundled 8x8 digits under one pixel permutation per task.

    Needs no download. Inputs are flat 64-dim vectors in [0, 1].

    :param n_tasks: number of tasks (experiences), each with its own task label.
    :param seed: seed of the train/test split and of the permutations.
    :param test_fraction: fraction of the 1,797 images held out for the test stream.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return _permuted_stream(x[idx_train], y[idx_train], x[idx_test], y[idx_test], n_tasks, seed)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    dataset_root: str | Path | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST from local idx ``.gz`` files as flat float tensors in [0, 1].

    :param dataset_root: folder holding the four standard idx files (default: Debian's
        ``dataset-fashion-mnist`` location, ``/usr/share/datasets/fashion-mnist``).
    :return: ``x_train, y_train, x_test, y_test``.
    """
    root = Path(dataset_root) if dataset_root is not None else FASHION_MNIST_ROOT
    expected = [name for pair in _FASHION_FILES.values() for name in pair]
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {root}: missing {', '.join(missing)}. "
            "Install Debian's dataset-fashion-mnist package or pass dataset_root to a folder "
            f"holding {', '.join(expected)}"
        )
    out = []
    for images, labels in _FASHION_FILES.values():
        x = torch.from_numpy(_read_idx(root / images).reshape(-1, 784).astype(np.float32) / 255)
        y = torch.from_numpy(_read_idx(root / labels).astype(np.int64))
        out += [x, y]
    return out[0], out[1], out[2], out[3]


def permuted_fashion_mnist(
    n_tasks: int = 10, *, seed: int = 0, dataset_root: str | Path | None = None
) -> NCScenario:
    """Permuted Fashion-MNIST: one pixel permutation and task label per experience.

    :param n_tasks: number of tasks.
    :param seed: seed of the permutations.
    :param dataset_root: folder with the idx files (see :func:`load_fashion_mnist`).
    """
    return _permuted_stream(*load_fashion_mnist(dataset_root), n_tasks, seed)


def split_fashion_mnist(
    n_tasks: int = 5, *, seed: int = 0, dataset_root: str | Path | None = None
) -> NCScenario:
    """Split Fashion-MNIST: the 10 classes in ``n_tasks`` disjoint groups, one task label each.

    :param n_tasks: number of tasks (a divisor of 10).
    :param seed: seed of the class order.
    :param dataset_root: folder with the idx files (see :func:`load_fashion_mnist`).
    """
    if n_tasks < 1 or 10 % n_tasks:
        raise ValueError(f"n_tasks must divide the 10 classes, got {n_tasks}")
    x_train, y_train, x_test, y_test = load_fashion_mnist(dataset_root)
    return nc_benchmark(
        TensorTaskDataset(x_train, y_train),
        TensorTaskDataset(x_test, y_test),
        n_experiences=n_tasks,
        task_labels=True,
        shuffle=True,
        seed=seed,
        class_ids_from_zero_in_each_exp=True,
    )
