"""Task-incremental benchmarks: embedded permuted digits, local Fashion-MNIST, and the
paper's scenarios (permuted MNIST, split CIFAR-100, TinyImageNet, 5-datasets) from local data.

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

from avalanche_tsn.validation import check_choice, check_float, check_int

__all__ = [
    "TensorTaskDataset",
    "task_stream",
    "permuted_digits",
    "split_digits",
    "load_fashion_mnist",
    "permuted_fashion_mnist",
    "split_fashion_mnist",
    "FASHION_MNIST_ROOT",
    "load_mnist",
    "permuted_mnist",
    "split_cifar100",
    "split_tiny_imagenet",
    "five_datasets",
    "require_data",
    "DATASETS_ON_DISK",
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


def task_stream(
    train: list[Dataset], test: list[Dataset], *, task_labels: bool = True
) -> NCScenario:
    """One experience per (train, test) dataset pair, in order, task label = its position.

    Class ids start from zero in each experience, as multi-head models expect.

    :param train: one training dataset per task (with ``targets``).
    :param test: one test dataset per task, as many as ``train``.
    :param task_labels: give each experience its own task label (else all are task 0).
    """
    if len(train) != len(test) or not train:
        raise ValueError(
            f"train and test must hold the same number (>= 1) of datasets, "
            f"got {len(train)} and {len(test)}"
        )
    return nc_benchmark(
        train,
        test,
        n_experiences=len(train),
        task_labels=task_labels,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )


def _check_stream(n_tasks: object, seed: object, classes: int | None = None) -> None:
    """``n_tasks`` (dividing ``classes`` when given) and ``seed``, checked before any loading."""
    tasks = check_int(n_tasks, "n_tasks", 1)
    check_int(seed, "seed", 0)
    if classes is not None and classes % tasks:
        raise ValueError(f"n_tasks must divide the {classes} classes, got {tasks}")


def _permuted_stream(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_tasks: int, seed: int
) -> NCScenario:
    rng = np.random.RandomState(seed)
    train, test = [], []
    for _ in range(n_tasks):
        perm = torch.from_numpy(rng.permutation(x_train.shape[1]))
        train.append(TensorTaskDataset(x_train[:, perm], y_train))
        test.append(TensorTaskDataset(x_test[:, perm], y_test))
    return task_stream(train, test)


def _digits(seed: int, test_fraction: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled digits in [0, 1], split stratified: x/y train, x/y test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_float(test_fraction, "test_fraction", 0.0, 1.0, low_open=True, high_open=True)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def permuted_digits(n_tasks: int = 5, *, seed: int = 0, test_fraction: float = 0.25) -> NCScenario:
    """Permuted digits: scikit-learn's bundled 8x8 digits under one pixel permutation per task.

    Needs no download. Inputs are flat 64-dim vectors in [0, 1].

    :param n_tasks: number of tasks (experiences), each with its own task label.
    :param seed: seed of the train/test split and of the permutations.
    :param test_fraction: fraction of the 1,797 images held out for the test stream.
    """
    _check_stream(n_tasks, seed)
    return _permuted_stream(*_digits(seed, test_fraction), n_tasks, seed)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_root(dataset_root: str | Path | None) -> Path:
    root = Path(dataset_root) if dataset_root is not None else FASHION_MNIST_ROOT
    expected = [name for pair in _FASHION_FILES.values() for name in pair]
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {root}: missing {', '.join(missing)}. "
            "Install Debian's dataset-fashion-mnist package or pass dataset_root to a folder "
            f"holding {', '.join(expected)}"
        )
    return root


def load_fashion_mnist(
    dataset_root: str | Path | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST from local idx ``.gz`` files as flat float tensors in [0, 1].

    :param dataset_root: folder holding the four standard idx files (default: Debian's
        ``dataset-fashion-mnist`` location, ``/usr/share/datasets/fashion-mnist``).
    :return: ``x_train, y_train, x_test, y_test``.
    """
    root = _fashion_root(dataset_root)
    out = []
    for images, labels in _FASHION_FILES.values():
        x = torch.from_numpy(_read_idx(root / images).reshape(-1, 784).astype(np.float32) / 255)
        y = torch.from_numpy(_read_idx(root / labels).astype(np.int64))
        out += [x, y]
    return out[0], out[1], out[2], out[3]


#: the TSN reference code's p-MNIST input transform: ``Normalize((0.1307,), (0.3081,))``
REFERENCE_NORMALIZATION = (0.1307, 0.3081)


def permuted_fashion_mnist(
    n_tasks: int = 10,
    *,
    seed: int = 0,
    dataset_root: str | Path | None = None,
    standardize: bool = False,
) -> NCScenario:
    """Permuted Fashion-MNIST: one pixel permutation and task label per experience.

    :param n_tasks: number of tasks.
    :param seed: seed of the permutations.
    :param dataset_root: folder with the idx files (see :func:`load_fashion_mnist`).
    :param standardize: inputs ``(x - 0.1307) / 0.3081`` as the TSN reference code's loader
        makes them (:data:`REFERENCE_NORMALIZATION`), instead of [0, 1].
    """
    _check_stream(n_tasks, seed)
    x_train, y_train, x_test, y_test = load_fashion_mnist(dataset_root)
    if standardize:
        mean, std = REFERENCE_NORMALIZATION
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return _permuted_stream(x_train, y_train, x_test, y_test, n_tasks, seed)


def _split(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_tasks: int, seed: int,
    task_labels: bool,
) -> NCScenario:  # fmt: skip
    return nc_benchmark(
        TensorTaskDataset(x_train, y_train),
        TensorTaskDataset(x_test, y_test),
        n_experiences=n_tasks,
        task_labels=task_labels,
        shuffle=True,
        seed=seed,
        class_ids_from_zero_in_each_exp=task_labels,
    )


def split_fashion_mnist(
    n_tasks: int = 5,
    *,
    seed: int = 0,
    dataset_root: str | Path | None = None,
    task_labels: bool = True,
) -> NCScenario:
    """Split Fashion-MNIST: the 10 classes in ``n_tasks`` disjoint groups.

    :param n_tasks: number of tasks (a divisor of 10).
    :param seed: seed of the class order.
    :param dataset_root: folder with the idx files (see :func:`load_fashion_mnist`).
    :param task_labels: one task label per experience and class ids from zero in each
        (task-incremental); False: every experience task label 0 and the original class ids
        (class-incremental).
    """
    _check_stream(n_tasks, seed, 10)
    return _split(*load_fashion_mnist(dataset_root), n_tasks, seed, task_labels)


def split_digits(
    n_tasks: int = 5, *, seed: int = 0, test_fraction: float = 0.25, task_labels: bool = True
) -> NCScenario:
    """Split digits: scikit-learn's bundled 8x8 digits, the 10 classes in disjoint groups.

    Needs no download. Inputs are flat 64-dim vectors in [0, 1].

    :param n_tasks: number of tasks (a divisor of 10).
    :param seed: seed of the train/test split and of the class order.
    :param test_fraction: fraction of the 1,797 images held out for the test stream.
    :param task_labels: as in :func:`split_fashion_mnist`.
    """
    _check_stream(n_tasks, seed, 10)
    return _split(*_digits(seed, test_fraction), n_tasks, seed, task_labels)


# -- the paper's scenarios: need the data on disk (or internet through torchvision) -----------


#: files each dataset on disk needs, what it is, and how to get it
_FILES: dict[str, tuple[list[str], str, str]] = {
    "cifar100": (
        ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
        "CIFAR-100",
        "Extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
    "tiny_imagenet": (
        ["tiny-imagenet-200/train", "tiny-imagenet-200/val", "tiny-imagenet-200/wnids.txt"],
        "TinyImageNet",
        "Extract tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    ),
    "five_datasets": (
        [
            "cifar-10-batches-py",
            "MNIST/raw",
            "train_32x32.mat",
            "test_32x32.mat",
            "FashionMNIST/raw",
            "notMNIST/train",
            "notMNIST/test",
        ],
        "5-datasets",
        "Download CIFAR-10, MNIST, SVHN and Fashion-MNIST once with torchvision "
        "(download=True) into that folder and add notMNIST as image folders",
    ),
}

#: the datasets :func:`require_data` knows (the bundled ones need nothing)
DATASETS_ON_DISK = ("mnist", "fashion_mnist", *_FILES)


def require_data(dataset: str, dataset_root: str | Path | None) -> None:
    """Raise the loader's ``FileNotFoundError`` if ``dataset``'s files are missing; load nothing.

    For scripts that check their data before any work (the harness checks before it spawns
    a process per strategy).

    :param dataset: one of :data:`DATASETS_ON_DISK`.
    :param dataset_root: the folder given (None: Fashion-MNIST's Debian folder).
    """
    check_choice(dataset, "dataset", DATASETS_ON_DISK)
    if dataset == "fashion_mnist":
        _fashion_root(dataset_root)
    elif dataset_root is None:
        raise FileNotFoundError(f"{dataset} is read from disk: pass dataset_root (--dataset-root)")
    elif dataset == "mnist":
        _mnist_paths(dataset_root)
    else:
        _require(Path(dataset_root), *_FILES[dataset])


def _require(root: Path, files: list[str], what: str, hint: str) -> None:
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{what} not found under {root}: missing {', '.join(missing)}. {hint} "
            "(pass dataset_root=<folder> or --dataset-root <folder>)"
        )


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_any_idx(path: Path) -> np.ndarray:
    if path.suffix == ".gz":
        return _read_idx(path)
    data = path.read_bytes()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_paths(dataset_root: str | Path) -> list[Path]:
    root = Path(dataset_root)
    stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    paths = [_find_idx(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths, strict=True) if p is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST idx files not found under {root} or {root / 'MNIST' / 'raw'}: missing "
            f"{', '.join(missing)} (plain or .gz). Download them once with "
            "torchvision.datasets.MNIST(root, download=True) and pass dataset_root=<root>"
        )
    return paths  # type: ignore[return-value]


def load_mnist(dataset_root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST from the standard idx files (plain or ``.gz``, in the folder or ``MNIST/raw``).

    :param dataset_root: the folder (torchvision's MNIST root works as is).
    :return: ``x_train, y_train, x_test, y_test`` as flat float tensors in [0, 1].
    """
    arrays = [_read_any_idx(p) for p in _mnist_paths(dataset_root)]
    x_train, x_test = (
        torch.from_numpy(a.reshape(-1, 784).astype(np.float32) / 255) for a in arrays[::2]
    )
    y_train, y_test = (torch.from_numpy(a.astype(np.int64)) for a in arrays[1::2])
    return x_train, y_train, x_test, y_test


def permuted_mnist(n_tasks: int = 10, *, seed: int = 0, dataset_root: str | Path) -> NCScenario:
    """Permuted MNIST (the paper's p-MNIST): one pixel permutation and task label per task.

    :param n_tasks: number of tasks.
    :param seed: seed of the permutations.
    :param dataset_root: folder with the MNIST idx files (see :func:`load_mnist`).
    """
    _check_stream(n_tasks, seed)
    return _permuted_stream(*load_mnist(dataset_root), n_tasks, seed)


def split_cifar100(n_tasks: int = 10, *, seed: int = 0, dataset_root: str | Path):
    """Split CIFAR-100 through Avalanche's ``SplitCIFAR100``: ``n_tasks`` tasks of classes.

    :param n_tasks: number of tasks (a divisor of 100).
    :param seed: seed of the class order.
    :param dataset_root: folder holding ``cifar-100-python/``.
    """
    from avalanche.benchmarks.classic import SplitCIFAR100

    _check_stream(n_tasks, seed, 100)
    root = Path(dataset_root)
    _require(root, *_FILES["cifar100"])
    return SplitCIFAR100(
        n_experiences=n_tasks,
        return_task_id=True,
        seed=seed,
        class_ids_from_zero_in_each_exp=True,
        dataset_root=root,
    )


def split_tiny_imagenet(n_tasks: int = 40, *, seed: int = 0, dataset_root: str | Path):
    """TinyImageNet in ``n_tasks`` tasks through Avalanche's ``SplitTinyImageNet``.

    :param n_tasks: number of tasks (a divisor of 200; the paper: 40 tasks of 5 classes).
    :param seed: seed of the class order.
    :param dataset_root: folder holding ``tiny-imagenet-200/``.
    """
    from avalanche.benchmarks.classic import SplitTinyImageNet

    _check_stream(n_tasks, seed, 200)
    root = Path(dataset_root)
    _require(root, *_FILES["tiny_imagenet"])
    return SplitTinyImageNet(
        n_experiences=n_tasks,
        return_task_id=True,
        seed=seed,
        class_ids_from_zero_in_each_exp=True,
        dataset_root=root,
    )


class _Resized(Dataset):
    """A classification dataset of PIL images as 3x32x32 float tensors, with ``targets``."""

    def __init__(self, base, targets) -> None:
        from torchvision import transforms

        self.base = base
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.tf = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tf(self.base[i][0].convert("RGB")), self.targets[i]


def five_datasets(*, dataset_root: str | Path) -> NCScenario:
    """5-datasets: CIFAR-10, MNIST, SVHN, Fashion-MNIST and notMNIST, one task each, at 32x32.

    :param dataset_root: folder holding ``cifar-10-batches-py/``, ``MNIST/raw/``,
        ``train_32x32.mat`` and ``test_32x32.mat`` (SVHN), ``FashionMNIST/raw/`` and
        ``notMNIST/{train,test}/<A..J>/`` image folders.
    """
    from torchvision import datasets as tv

    root = Path(dataset_root)
    _require(root, *_FILES["five_datasets"])
    train, test = [], []
    for make in (
        lambda t: tv.CIFAR10(root, train=t),
        lambda t: tv.MNIST(root, train=t),
        lambda t: tv.SVHN(root, split="train" if t else "test"),
        lambda t: tv.FashionMNIST(root, train=t),
        lambda t: tv.ImageFolder(root / "notMNIST" / ("train" if t else "test")),
    ):
        for flag, out in ((True, train), (False, test)):
            base = make(flag)
            targets = getattr(base, "targets", None)
            if targets is None:
                targets = base.labels  # SVHN
            out.append(_Resized(base, targets))
    return task_stream(train, test)
