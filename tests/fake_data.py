"""Tiny datasets written in the real on-disk formats the paper's loaders read.

MNIST and Fashion-MNIST idx files, CIFAR-10/100 python pickles, TinyImageNet's folder layout
with ``val_annotations.txt``, SVHN's ``.mat`` files and notMNIST image folders: a few random
images per class, enough to run the examples and the harness end to end.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    array = np.asarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def mnist(folder: Path, per_class: int = 6, gz: bool = False, seed: int = 0) -> None:
    """``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` in ``folder`` (torchvision's raw)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 10 * per_class), ("t10k", 10 * max(1, per_class // 2))):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28)) // 2 + 12 * labels[:, None, None]
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng, n: int, labels: np.ndarray, size: int = 32) -> np.ndarray:
    base = rng.integers(0, 128, (n, 3, size, size))
    return (base + (labels * 7 % 128)[:, None, None, None]).astype(np.uint8)


def cifar100(root: Path, per_class: int = 3, seed: int = 0) -> None:
    """``cifar-100-python/{train,test,meta}`` as torchvision's CIFAR100 reads them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    for split, k in (("train", per_class), ("test", 1)):
        labels = np.repeat(np.arange(100), k)
        data = _images(rng, len(labels), labels).reshape(len(labels), -1)
        _pickle(
            folder / split,
            {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()},
        )
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})


def cifar10(root: Path, per_class: int = 3, seed: int = 0) -> None:
    """``cifar-10-batches-py/`` (five training batches, a test batch, the meta file)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    for name, k in [(f"data_batch_{i}", per_class) for i in range(1, 6)] + [("test_batch", 1)]:
        labels = np.repeat(np.arange(10), k)
        data = _images(rng, len(labels), labels).reshape(len(labels), -1)
        _pickle(folder / name, {"data": data, "labels": labels.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})


def _jpeg(path: Path, rng, size: int, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (rng.integers(0, 100, (size, size, 3)) + shade).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def tiny_imagenet(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/`` and ``val/``."""
    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rows = []
    for c, wnid in enumerate(wnids):
        for j in range(per_class):
            _jpeg(folder / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", rng, 64, c % 150)
        name = f"val_{c}.JPEG"
        _jpeg(folder / "val" / "images" / name, rng, 64, c % 150)
        rows.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def svhn(root: Path, per_class: int = 3, seed: int = 0) -> None:
    """``train_32x32.mat`` and ``test_32x32.mat`` (labels 1..10, 10 meaning digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    for split, k in (("train", per_class), ("test", 1)):
        labels = np.repeat(np.arange(10), k)
        images = _images(rng, len(labels), labels).transpose(2, 3, 1, 0)  # H, W, C, N
        root.mkdir(parents=True, exist_ok=True)
        savemat(root / f"{split}_32x32.mat", {"X": images, "y": (labels + 1)[:, None]})


def not_mnist(root: Path, per_class: int = 3, seed: int = 0) -> None:
    """``notMNIST/{train,test}/<A..J>/*.png`` image folders."""
    rng = np.random.default_rng(seed)
    for split, k in (("train", per_class), ("test", 1)):
        for c, letter in enumerate("ABCDEFGHIJ"):
            for j in range(k):
                path = root / "notMNIST" / split / letter / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = (rng.integers(0, 100, (28, 28)) + 15 * c).astype(np.uint8)
                Image.fromarray(pixels).save(path)


def five_datasets(root: Path) -> None:
    """Everything :func:`avalanche_tsn.datasets.five_datasets` reads."""
    cifar10(root)
    mnist(root / "MNIST" / "raw", per_class=3)
    svhn(root)
    mnist(root / "FashionMNIST" / "raw", per_class=3, seed=1)
    not_mnist(root)
