"""The comparison harness end to end on a tiny subset, and missing-data messages."""

from __future__ import annotations

import json
import mmap

import pytest
import torch

from avalanche_tsn import datasets
from avalanche_tsn.models import ReducedAlexNet, ReducedResNet18, TinyNet, single_head
from benchmarks import class_incremental, harness, router_ceiling


def test_harness_smoke_runs_every_strategy(tmp_path):
    rows = harness.main(
        [
            "--scenario", "permuted_digits", "--tasks", "2", "--epochs", "2", "--subset", "48",
            "--in-process", "--quiet", "--device", "cpu", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert [r["strategy"] for r in rows] == list(harness.STRATEGIES)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["strategy"] for r in saved["rows"]] == list(harness.STRATEGIES)
    tsn = rows[0]
    assert tsn["BWT"] == 0.0
    m = tsn["accuracy_matrix"]
    assert len(m) == 2 and len(m[0]) == 2
    assert m[1][0] == m[0][0]  # row i is measured after task i: TSN forgets nothing
    assert sum(m[1]) / 2 == pytest.approx(tsn["ACC"], abs=0.01)
    assert tsn["capacity_percent"] < 100.0
    table = (tmp_path / "results.md").read_text()
    assert "| wsn [1] |" in table and "| adaqpacknet [2] |" in table
    assert "| replay [3] |" in table and "| packnet [4] |" in table
    adaq = rows[2]
    assert adaq["BWT"] == 0.0 and adaq["capacity_percent"] < 100.0
    wsn = rows[1]
    assert wsn["BWT"] == 0.0 and wsn["capacity_wsn_percent"] > 0
    assert wsn["capacity_percent"] > tsn["capacity_percent"]  # float32 weights, nothing pruned
    for png in ("accuracy_matrices.png", "tsn_capacity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_harness_evaluates_what_the_metrics_read_and_both_loaders_agree():
    base = [
        "--scenario", "permuted_digits", "--tasks", "3", "--epochs", "1", "--subset", "40",
        "--in-process", "--quiet", "--device", "cpu", "--strategies", "naive",
        "--momentum", "0",
    ]  # fmt: skip
    needed = harness.main(base)[0]
    full = harness.main([*base, "--eval", "full"])[0]
    slow = harness.main([*base, "--eval", "full", "--avalanche-loader"])[0]
    m = needed["accuracy_matrix"]
    # after task i: tasks 0..i and i+1 (forward transfer), nothing further
    assert [[v is not None for v in row] for row in m] == [
        [True, True, False],
        [True, True, True],
        [True, True, True],
    ]
    assert all(v is not None for row in full["accuracy_matrix"] for v in row)
    for row in (needed, full):
        assert row["FWT"] is not None and row["BWT"] is not None
    # the tensor fetch changes nothing: same samples, same order, same random stream
    assert slow["accuracy_matrix"] == full["accuracy_matrix"]
    assert (slow["ACC"], slow["BWT"], slow["FWT"]) == (full["ACC"], full["BWT"], full["FWT"])


def test_harness_passes_the_pruning_search_to_tsn():
    base = [
        "--scenario", "permuted_digits", "--tasks", "2", "--epochs", "1", "--subset", "48",
        "--in-process", "--quiet", "--device", "cpu", "--strategies", "tsn",
    ]  # fmt: skip
    for search in ("layerwise", "bisect"):
        (row,) = harness.main([*base, "--prune-search", search])
        passes = [r["evaluations"] for r in row["pruning"]]
        assert len(passes) == 2 and row["BWT"] == 0.0
        if search == "bisect":
            assert max(passes) <= 5 + 2  # prune_iterations + 2, whatever the backbone
        else:
            assert min(passes) >= 3  # at least one pass over the three layers
    with pytest.raises(SystemExit):
        harness.main([*base, "--prune-search", "greedy"])


def test_unknown_strategy_is_rejected():
    with pytest.raises(SystemExit):
        harness.parse(["--strategies", "tsn,gem"])
    with pytest.raises(SystemExit):  # PackNet needs task labels at test time
        harness.parse(["--scenario", "split_digits_ci", "--strategies", "tsn,packnet"])


def test_class_incremental_scenario_runs_tsn_with_task_inference(tmp_path):
    rows = harness.main(
        [
            "--scenario", "split_digits_ci", "--tasks", "2", "--epochs", "2", "--subset", "60",
            "--in-process", "--quiet", "--device", "cpu", "--replay-size", "20",
            "--strategies", "tsn,replay,er_ace,der,icarl", "--memory-size", "10",
        ]
    )  # fmt: skip
    tsn, replay, *rehearsal = rows
    assert 0.0 <= tsn["task_inference_acc"] <= 1.0
    assert "task inference (router) right" in tsn["note"]
    assert "buffer of 20 samples" in replay["note"]
    # stored bytes: TSN's 2 x 10 memory samples of 64 values (the digits' 17 levels: 8-bit
    # codes, and each task's levels as float32), its router; the others' float32 model and
    # 20-sample buffer coded alike (DER's with 10 logits per sample)
    levels = (tsn["stored_bytes"]["samples"] - 2 * 10 * 64) / 4
    assert levels == int(levels) and 2 <= levels <= 2 * 17 and tsn["stored_bytes"]["other"] > 0
    assert tsn["inference_forwards"] == 2 and replay["inference_forwards"] == 1
    for row, logits in zip(rehearsal, (0, 20 * 10 * 4, 0), strict=True):
        assert row["stored_bytes"]["samples"] == 20 * 64 + 17 * 4
        assert row["stored_bytes"]["other"] == logits
        assert row["stored_bytes"]["model"] == replay["stored_bytes"]["model"]
        assert 0.0 <= row["ACC"] <= 1.0
    m = tsn["accuracy_matrix"]
    assert len(m) == 2 and None not in (m[0][0], m[0][1], m[1][0], m[1][1])
    # wrong task inference is the only way to miss a class: accuracy <= inference accuracy
    assert tsn["ACC"] <= tsn["task_inference_acc"] + 1e-9


@pytest.mark.parametrize(
    "load, names",
    [
        (lambda r: datasets.permuted_mnist(dataset_root=r), "train-images-idx3-ubyte"),
        (lambda r: datasets.split_cifar100(dataset_root=r), "cifar-100-python/train"),
        (lambda r: datasets.split_tiny_imagenet(dataset_root=r), "tiny-imagenet-200/wnids.txt"),
        (lambda r: datasets.five_datasets(dataset_root=r), "train_32x32.mat"),
        (lambda r: datasets.load_fashion_mnist(r), "t10k-labels-idx1-ubyte.gz"),
    ],
)
def test_missing_data_names_the_files_and_the_folder(tmp_path, load, names):
    with pytest.raises(FileNotFoundError) as err:
        load(tmp_path)
    assert names in str(err.value) and str(tmp_path) in str(err.value)


def _write_idx(path, array):
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def test_permuted_mnist_reads_torchvision_layout(tmp_path):
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    x_train, y_train, x_test, _ = datasets.load_mnist(tmp_path)
    assert x_train.shape == (40, 784) and x_test.shape == (20, 784)
    assert float(x_train.max()) <= 1.0 and y_train.tolist()[:3] == [0, 1, 2]
    bm = datasets.permuted_mnist(3, dataset_root=tmp_path)
    assert [e.task_label for e in bm.train_stream] == [0, 1, 2]


@pytest.mark.parametrize(
    "make, size, classes",
    [
        (lambda **k: ReducedAlexNet(10, **k), 32, 10),
        (lambda **k: TinyNet(5, **k), 64, 5),
        (lambda **k: ReducedResNet18(10, **k), 32, 10),
    ],
)
def test_paper_backbones_run_under_tsn_and_packnet(make, size, classes):
    import torch
    from avalanche.models.packnet import PackNetModel

    from avalanche_tsn import TSNModel

    x = torch.randn(2, 3, size, size)
    tsn = TSNModel(make())
    assert tsn(x, 0).shape == (2, classes)
    tsn.begin_task(0, 0.5)
    tsn.train()
    tsn(x, 0).sum().backward()
    assert all(layer.scores.grad is not None for _, layer in tsn.masked_layers())
    packnet = PackNetModel(make(norm=False, multihead=False))
    assert packnet(x, torch.zeros(2, dtype=torch.long)).shape == (2, classes)


def test_gpu_check_skips_cleanly_without_cuda(capsys, monkeypatch):
    import sys

    import torch

    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 0
    assert "skipped" in capsys.readouterr().out


def test_gpu_check_sections_run_on_any_device():
    """What gpu_check measures on CUDA, run small on the CPU: its checks can fail."""
    import argparse

    from benchmarks import gpu_check

    args = argparse.Namespace(
        tasks=2, epochs=1, samples=64, mb=32, steps=1, repeats=1, step_mbs=[16],
        kernels=["eager", "compiled"],
    )  # fmt: skip
    tsn = gpu_check._run("tsn", False, args, "cpu")
    assert tsn["earlier_tasks_bit_identical"] and tsn["export_load_identical"]
    assert 0 < tsn["capacity_percent"] < 100 and tsn["epoch_s_median"] > 0
    diverge = gpu_check._diverge(args, "cpu")
    assert diverge == dict.fromkeys(diverge, True) and len(diverge) == 4
    rows = gpu_check._steps(args, "cpu")
    assert [r["backbone"] for r in rows] == ["MLP 784-100-100", "ReducedAlexNet", "ReducedResNet18"]
    assert all(r["tsn_over_plain"] > 0 and r["tsn_no_check_ms_min"] > 0 for r in rows)
    assert all(r["tsn_compiled_over_plain"] > 0 and r["tsn_compiled_ms_min"] > 0 for r in rows)
    from benchmarks import scale

    sweep = scale.layer_sweep(((4, 4), (8, 16)), mb=4, device="cpu", repeats=2, budget=64)
    assert [r["weights"] for r in sweep] == [16, 128]
    assert all(r["fallback"] is None and r["compiled_over_eager"] > 0 for r in sweep)
    assert all(0 < r["eager_us_min"] <= r["eager_us_median"] for r in sweep)


def test_task_stream_labels_each_pair_and_rejects_mismatched_lists():
    import torch

    pairs = [datasets.TensorTaskDataset(torch.randn(6, 2), torch.tensor([3, 4] * 3)) for _ in "ab"]
    bm = datasets.task_stream(pairs, pairs)
    assert [e.task_label for e in bm.train_stream] == [0, 1]
    assert sorted(set(bm.train_stream[1].dataset.targets)) == [0, 1]
    with pytest.raises(ValueError, match="train and test"):
        datasets.task_stream(pairs, pairs[:1])


def test_class_incremental_comparison_sizes_buffers_to_tsn_bytes(tmp_path):
    by_seed = class_incremental.main(
        ["--seeds", "0", "--subset", "240", "--memory-size", "200", "--threads", "1",
         "--epochs", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    # 200 8-bit samples a task: TSN stores more than a baseline's float32 model (69 KiB)
    rows = by_seed[0]
    tsn = rows[0]
    stored = sum(tsn["stored_bytes"].values())
    for row in rows:
        if row["label"].endswith("(equal bytes)"):
            used = sum(row["stored_bytes"].values())
            # a sample's 64 values as 8-bit codes (the digits' 17 levels), DER's 10 logits
            per_sample = 64 + (10 * 4 if row["strategy"] == "der" else 0)
            if row["ACC"] is None:  # the float32 model alone is above TSN's bytes: no run
                assert row["buffer"] == 0 and row["stored_bytes"]["model"] > stored
            else:  # the largest buffer whose bytes stay within TSN's
                assert used <= stored < used + per_sample
        elif row["label"].endswith("(equal samples)"):
            assert row["buffer"] == 1000
    assert any(r["label"].endswith("(equal bytes)") and r["ACC"] is not None for r in rows)
    assert "| tsn (router) |" in (tmp_path / "results.md").read_text()


def test_router_ceiling_reproduces_the_strategys_router_and_metrics():
    by_seed = router_ceiling.main(
        ["--seeds", "0", "--subset", "40", "--epochs", "1", "--threads", "1"]
    )  # fmt: skip
    rows = by_seed[0]
    trained = rows["as trained (memory + copies)"]
    # our own routing of the final model is Avalanche's metric, and refitting the router on
    # the plugin's inputs gives the router the strategy stored
    assert trained == pytest.approx(rows["harness figures (Avalanche's metrics)"], abs=1e-6)
    assert rows["refitted on memory + copies (check)"] == trained
    # the Joint reference: our accuracy of its model is Avalanche's, and a right class is a
    # right task, so its task identification is never below its accuracy
    joint_inferred, joint_acc = rows["joint (not TSN: one model, all data at once)"]
    assert joint_acc == pytest.approx(
        rows["joint, harness figure (Avalanche's metric)"][1], abs=1e-6
    )
    assert joint_inferred >= joint_acc
    assert all(0 <= v <= 1 for pair in rows.values() for v in pair if v is not None)


def test_time_ratio_times_every_strategy_on_the_same_epochs(tmp_path, monkeypatch):
    import sys

    from benchmarks import time_ratio

    out = tmp_path / "ratio.json"
    argv = ["time_ratio.py", "--scenario", "permuted_digits", "--tasks", "1", "--epochs", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--json", str(out)])
    time_ratio.main()
    r = json.loads(out.read_text())
    assert r["epochs_timed"] == {kind: 2 for kind in time_ratio.KINDS}
    med = {k: r[f"{k}_s_per_epoch"]["median"] for k in time_ratio.KINDS}
    assert all(v > 0 for v in med.values())
    # the ratio of the medians, up to the rounding of each to 1 ms
    lo = (med["tsn"] - 5e-4) / (med["naive_tensor"] + 5e-4) - 5e-4
    hi = (med["tsn"] + 5e-4) / (med["naive_tensor"] - 5e-4) + 5e-4
    assert lo <= r["ratio_same_minibatches"] <= hi
    assert r["flush_denormal"] is False


def test_time_ratio_flushes_subnormals_only_while_it_times(tmp_path, monkeypatch):
    import sys

    from benchmarks import time_ratio

    seen = []
    real_run = time_ratio.run

    def run(*args):
        seen.append((torch.tensor(1e-40) * 1).item())  # 0 while subnormals are flushed
        return real_run(*args)

    monkeypatch.setattr(time_ratio, "run", run)
    out = tmp_path / "ratio.json"
    argv = ["time_ratio.py", "--scenario", "permuted_digits", "--tasks", "1", "--epochs", "1"]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--repeats", "1", "--flush-denormal", "--json", str(out)]
    )
    time_ratio.main()
    assert (torch.tensor(1e-40) * 1).item() != 0  # off again afterwards
    supported = json.loads(out.read_text())["flush_denormal"]
    assert supported is torch.set_flush_denormal(False)  # True where the CPU can flush
    assert len(seen) == len(time_ratio.KINDS)
    assert all((v == 0) is supported for v in seen)


@pytest.mark.parametrize("replay, expected", [(20, 10), (125, 115), (200, 128), (8, 1)])
def test_er_ace_and_der_replay_from_a_buffer_smaller_than_a_minibatch(replay, expected):
    # Avalanche's ER-ACE and DER skip replay while the buffer holds fewer samples than one
    # memory minibatch: an equal-bytes buffer of 125 samples at minibatch 128 was Naive
    argv = ["--scenario", "split_digits_ci", "--replay-size", str(replay), "--mb", "128"]
    args = harness.parse(argv)
    sc = harness.SCENARIOS["split_digits_ci"]
    for name in ("er_ace", "der"):
        strategy = harness._strategy(name, sc, args, 5)
        assert strategy.batch_size_mem == expected <= strategy.train_mb_size


def test_scale_train_row_counts_page_faults_and_names_the_allocator(monkeypatch):
    from benchmarks import scale

    faults: list[int] = []
    optimizer: list[float] = []
    make = lambda: single_head(8, (6,), 10)  # noqa: E731
    times = scale._step_times(make, (8,), True, 4, mb=4, optimizer_seconds=optimizer, faults=faults)
    assert len(times) == len(faults) == len(optimizer) == 4
    assert all(isinstance(f, int) and f >= 0 for f in faults)
    if scale.resource is not None:
        # a fresh anonymous mapping: each page (4 KiB, or 2 MiB where the kernel backs it with
        # huge pages) faults on its first touch
        pages = mmap.mmap(-1, 64 << 20)
        before = scale.minor_faults()
        for offset in range(0, 64 << 20, 4096):
            pages[offset] = 1
        assert scale.minor_faults() - before >= 16
        pages.close()
    for name in scale.ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert scale.allocator() == "the C library's default allocator"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert scale.allocator() == "LD_PRELOAD=libjemalloc.so.2, MALLOC_TRIM_THRESHOLD_=68719476736"
