"""TSN on a CUDA device: zero forgetting, export identity, time and memory against Naive.

Usage: ``python benchmarks/gpu_check.py [--tasks 3] [--epochs 2] [--json out.json]``.

On a machine without CUDA it prints that it skipped and exits 0. With CUDA it trains a few
tasks of a conv backbone (ReducedAlexNet, synthetic 3x32x32 data with a class signal), once
in float32 and once with mixed precision (``torch.autocast`` to float16 with a gradient
scaler, through the small strategy subclass below: Avalanche 0.6 has no mixed-precision
switch), and checks:

- every earlier task's outputs are bit-identical after each later task (deterministic
  algorithms are switched on for this);
- the compact export, loaded back on the device, predicts every task identically;
- TSN / Naive epoch time and the peak CUDA memory of each.

It prints one JSON object (and writes it with ``--json``): put its figures in BENCHMARKS.md
with the date and the device.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from contextlib import nullcontext

import torch


def _stream(tasks: int, n: int, seed: int = 0):
    from avalanche_tsn.datasets import TensorTaskDataset, task_stream

    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for _ in range(tasks):
        centres = torch.randn(10, 3, 1, 1, generator=g)
        for part, size in ((train, n), (test, n // 4)):
            y = torch.arange(size) % 10
            x = centres[y] + torch.randn(size, 3, 32, 32, generator=g)
            part.append(TensorTaskDataset(x, y))
    return task_stream(train, test)


def _amp_strategy(base):
    """``base`` (a strategy class) with its forward under autocast and a gradient scaler."""

    class Mixed(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scaler = torch.amp.GradScaler("cuda")

        def forward(self):
            with torch.autocast("cuda", dtype=torch.float16):
                return super().forward()

        def criterion(self):
            with torch.autocast("cuda", dtype=torch.float16):
                return super().criterion()

        def backward(self):
            self.scaler.scale(self.loss).backward(retain_graph=self.retain_graph)

        def optimizer_step(self):
            self.scaler.step(self.optimizer)
            self.scaler.update()

    return Mixed


class _EpochClock:
    def __init__(self) -> None:
        from avalanche.training.plugins import SupervisedPlugin

        clock = self

        class Plugin(SupervisedPlugin):
            def before_training_epoch(self, strategy, **kwargs):
                torch.cuda.synchronize()
                clock.t0 = time.perf_counter()

            def after_training_epoch(self, strategy, **kwargs):
                torch.cuda.synchronize()
                clock.times.append(time.perf_counter() - clock.t0)

        self.times: list[float] = []
        self.plugin = Plugin()


def _run(kind: str, amp: bool, args) -> dict:
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_tsn import TSNStrategy, load_compressed
    from avalanche_tsn.models import ReducedAlexNet

    torch.manual_seed(0)
    bm = _stream(args.tasks, args.samples)
    model = ReducedAlexNet(
        n_classes=10, multihead=False
    )  # Avalanche's MultiTaskModule breaks under autocast
    clock = _EpochClock()
    base = TSNStrategy if kind == "tsn" else Naive
    cls = _amp_strategy(base) if amp else base
    kwargs = dict(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=args.mb,
        train_epochs=args.epochs,
        eval_mb_size=256,
        device="cuda",
        plugins=[clock.plugin],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    strategy = cls(**kwargs)
    torch.cuda.reset_peak_memory_stats()
    probes = [
        (torch.stack([e.dataset[i][0] for i in range(64)]).cuda(), e.task_label)
        for e in bm.test_stream
    ]
    recorded: dict[int, torch.Tensor] = {}
    identical = True
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext()
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        if kind != "tsn":
            continue
        strategy.model.eval()
        with torch.no_grad(), autocast:
            for x, t in probes[: exp.current_experience + 1]:
                out = strategy.model(x, t)
                if t in recorded:
                    identical &= torch.equal(out, recorded[t])
                recorded[t] = out
    result = {
        "strategy": kind,
        "amp": amp,
        "epoch_s_median": sorted(clock.times)[len(clock.times) // 2],
        "peak_cuda_MiB": torch.cuda.max_memory_allocated() / 2**20,
    }
    if kind == "tsn":
        buf = io.BytesIO()
        strategy.export(buf)
        buf.seek(0)
        loaded = load_compressed(buf, ReducedAlexNet(n_classes=10, multihead=False).cuda())
        with torch.no_grad(), autocast:
            same = all(torch.equal(loaded(x, t), strategy.model(x, t)) for x, t in probes)
        result.update(earlier_tasks_bit_identical=identical, export_load_identical=same)
        result["capacity_percent"] = strategy.capacity_report().percent
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048, help="training samples a task")
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped")
        return 0
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    runs = [_run(kind, amp, args) for amp in (False, True) for kind in ("naive", "tsn")]
    by = {(r["strategy"], r["amp"]): r for r in runs}
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "settings": vars(args),
        "runs": runs,
        "tsn_over_naive_epoch": {
            "float32": by[("tsn", False)]["epoch_s_median"]
            / by[("naive", False)]["epoch_s_median"],
            "amp": by[("tsn", True)]["epoch_s_median"] / by[("naive", True)]["epoch_s_median"],
        },
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    ok = all(r.get("earlier_tasks_bit_identical", True) and r.get("export_load_identical", True)
             for r in runs)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
