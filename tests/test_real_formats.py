"""The paper's scenarios on small files in each dataset's real on-disk format (issue 11).

Each example script and each harness scenario runs end to end, one short epoch, on data
written as the real datasets are (idx files, CIFAR python pickles, TinyImageNet's folders,
SVHN's ``.mat``, notMNIST image folders). torchvision checks the MD5 sums of the official
CIFAR and SVHN archives' files; those checks are switched off here, as the files are ours.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import fake_data
import pytest
import torchvision

from avalanche_tsn import datasets
from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trusted(monkeypatch):
    """Accept our own CIFAR/SVHN files in place of the official ones."""
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)


def _example(name: str, *args: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write into results/<name> under it
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")


def _harness(scenario: str, root: Path, tasks: int = 2) -> dict:
    rows = harness.main(
        [
            "--scenario", scenario, "--dataset-root", str(root), "--strategies", "tsn",
            "--tasks", str(tasks), "--epochs", "1", "--in-process", "--quiet", "--device", "cpu",
        ]
    )  # fmt: skip
    (row,) = rows
    assert row["strategy"] == "tsn" and row["BWT"] == 0.0
    return row


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_permuted_mnist_from_idx_files(tmp_path, monkeypatch, capsys, gz):
    fake_data.mnist(tmp_path / "data" / "MNIST" / "raw", per_class=4, gz=gz)
    root = str(tmp_path / "data")
    _example("permuted_mnist.py", "--dataset-root", root, "--epochs", "1", "--tasks", "2",
             monkeypatch=monkeypatch, tmp_path=tmp_path)  # fmt: skip
    assert "export:" in capsys.readouterr().out
    out = tmp_path / "results" / "permuted_mnist"
    assert (out / "permuted_mnist.tsn").stat().st_size > 0
    assert "Top1_Acc_Stream" in (out / "permuted_mnist.log").read_text()
    _harness("permuted_mnist", tmp_path / "data")


def test_split_cifar100_from_python_pickles(tmp_path, monkeypatch, capsys, trusted):
    fake_data.cifar100(tmp_path / "data")
    bm = datasets.split_cifar100(10, dataset_root=tmp_path / "data")
    assert len(bm.train_stream) == 10 and len(bm.train_stream[0].dataset) == 30
    _example("split_cifar100.py", "--dataset-root", str(tmp_path / "data"), "--epochs", "1",
             "--tasks", "2", monkeypatch=monkeypatch, tmp_path=tmp_path)  # fmt: skip
    assert "export:" in capsys.readouterr().out
    _harness("split_cifar100", tmp_path / "data")


def test_tiny_imagenet_from_its_folders(tmp_path, monkeypatch, capsys):
    fake_data.tiny_imagenet(tmp_path / "data")
    bm = datasets.split_tiny_imagenet(40, dataset_root=tmp_path / "data")
    assert len(bm.train_stream) == 40 and len(bm.test_stream[0].dataset) == 5
    _example("tiny_imagenet.py", "--dataset-root", str(tmp_path / "data"), "--epochs", "1",
             "--tasks", "2", monkeypatch=monkeypatch, tmp_path=tmp_path)  # fmt: skip
    assert "export:" in capsys.readouterr().out
    _harness("tiny_imagenet", tmp_path / "data")


def test_five_datasets_from_their_files(tmp_path, trusted):
    fake_data.five_datasets(tmp_path / "data")
    bm = datasets.five_datasets(dataset_root=tmp_path / "data")
    assert len(bm.train_stream) == 5
    x, y, t = bm.train_stream[2].dataset[0]  # SVHN, resized to 3x32x32
    assert tuple(x.shape) == (3, 32, 32) and 0 <= int(y) < 10 and int(t) == 2
    _harness("five_datasets", tmp_path / "data", tasks=2)


@pytest.mark.parametrize(
    ("builder", "kwargs", "error", "match"),
    [
        (datasets.split_digits, {"n_tasks": 5.0}, TypeError, "n_tasks must be an int >= 1"),
        (datasets.permuted_digits, {"n_tasks": True}, TypeError, "n_tasks must be an int >= 1"),
        (datasets.permuted_digits, {"n_tasks": 0}, ValueError, "n_tasks must be an int >= 1"),
        (datasets.split_digits, {"n_tasks": 3}, ValueError, "divide the 10 classes"),
        (datasets.split_digits, {"seed": 1.5}, TypeError, "seed must be an int >= 0"),
        (datasets.permuted_digits, {"test_fraction": 1.0}, ValueError, "test_fraction"),
        # checked before the files are looked for: the argument's error, not a missing file
        (datasets.split_cifar100, {"n_tasks": 7, "dataset_root": "/nowhere"}, ValueError,
         "divide the 100 classes"),
        (datasets.split_tiny_imagenet, {"n_tasks": 3, "dataset_root": "/nowhere"}, ValueError,
         "divide the 200 classes"),
        (datasets.permuted_mnist, {"n_tasks": 2.5, "dataset_root": "/nowhere"}, TypeError,
         "n_tasks must be an int"),
        (datasets.split_fashion_mnist, {"n_tasks": 4, "dataset_root": "/nowhere"}, ValueError,
         "divide the 10 classes"),
    ],
)  # fmt: skip
def test_stream_builders_check_their_arguments_before_reading_data(
    builder, kwargs, error, match
) -> None:
    with pytest.raises(error, match=match):
        builder(**kwargs)
