"""TSN on a CUDA device: zero forgetting, export identity, time and memory against Naive.

Usage: ``python benchmarks/gpu_check.py [--tasks 3] [--epochs 2] [--json out.json]``.

On a machine without CUDA it prints that it skipped and exits 0. With CUDA it:

- trains a few tasks of a conv backbone (ReducedAlexNet, synthetic 3x32x32 data with a class
  signal), once in float32 and once with mixed precision (``torch.autocast`` to float16 with
  a gradient scaler, through the small strategy subclass below: Avalanche 0.6 has no
  mixed-precision switch), and checks that every earlier task's outputs are bit-identical
  after each later task (deterministic algorithms are switched on for this) and that the
  compact export, loaded back on the device, predicts every task identically; it reports
  TSN / Naive epoch time and the peak CUDA memory of each;
- trains a last task on data holding a NaN and checks that it stops with
  ``FloatingPointError``, that no earlier task moved, and that the task then retrains;
- times single training steps (minibatch 64, deterministic algorithms off) of the plain
  model and of TSN's second task, with and without TSN's per-step finite-loss check, which
  makes the host wait for the device every step, and with each training kernel of
  ``--kernels`` (default ``eager,compiled``: whether the compiled kernel, the default
  ``train_kernel="auto"`` on CUDA, is faster than the eager one there);
- times one masked linear layer's forward and backward, eager against compiled, from 256 to
  2,097,152 weights (``scale.layer_sweep``, minibatch 64): where on CUDA a compiled call's
  host cost stops outweighing the launches it saves (the CPU's threshold,
  ``kernels.CPU_AUTO_MIN_WEIGHTS``, came from the same sweep).

It prints one JSON object (and writes it with ``--json``): put its figures in BENCHMARKS.md
with the date and the device.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from avalanche_tsn._cli import show_defaults
from avalanche_tsn.kernels import check_kernel


def _stream(tasks: int, n: int, seed: int = 0, poison_last: bool = False):
    """Synthetic 3x32x32 tasks; ``poison_last`` puts a NaN in the last task's first sample."""
    from avalanche_tsn.datasets import TensorTaskDataset, task_stream

    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for _ in range(tasks):
        centres = torch.randn(10, 3, 1, 1, generator=g)
        for part, size in ((train, n), (test, n // 4)):
            y = torch.arange(size) % 10
            x = centres[y] + torch.randn(size, 3, 32, 32, generator=g)
            part.append(TensorTaskDataset(x, y))
    if poison_last:
        train[-1].x[0, 0, 0, 0] = float("nan")
    return task_stream(train, test)


def _probes(bm, device: str) -> list[tuple[torch.Tensor, int]]:
    return [
        (
            torch.stack([e.dataset[i][0] for i in range(min(64, len(e.dataset)))]).to(device),
            e.task_label,
        )
        for e in bm.test_stream
    ]


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
    def __init__(self, device: str) -> None:
        from avalanche.training.plugins import SupervisedPlugin

        clock = self
        cuda = torch.device(device).type == "cuda"

        class Plugin(SupervisedPlugin):
            def before_training_epoch(self, strategy, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                clock.t0 = time.perf_counter()

            def after_training_epoch(self, strategy, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                clock.times.append(time.perf_counter() - clock.t0)

        self.times: list[float] = []
        self.plugin = Plugin()


def _strategy(
    base, args, device: str, plugins=(), epochs: int | None = None, multihead: bool = False
):
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_tsn.models import ReducedAlexNet

    # One shared head by default: see _amp_multihead for Avalanche's heads under autocast.
    model = ReducedAlexNet(n_classes=10, multihead=multihead)
    return base(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=args.mb,
        train_epochs=args.epochs if epochs is None else epochs,
        eval_mb_size=256,
        device=device,
        plugins=list(plugins),
        evaluator=EvaluationPlugin(loggers=[]),
    )


def _outputs(model, probes, autocast=None) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad(), autocast or nullcontext():
        return [model(x, t) for x, t in probes]


def _run(kind: str, amp: bool, args, device: str = "cuda", multihead: bool = False) -> dict:
    """Train the stream with Naive or TSN; TSN's earlier tasks are checked after each task."""
    from avalanche.training import Naive

    from avalanche_tsn import TSNStrategy, load_compressed
    from avalanche_tsn.models import ReducedAlexNet

    torch.manual_seed(0)
    bm = _stream(args.tasks, args.samples)
    clock = _EpochClock(device)
    base = TSNStrategy if kind == "tsn" else Naive
    cls = _amp_strategy(base) if amp else base
    strategy = _strategy(cls, args, device, [clock.plugin], multihead=multihead)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        gc.collect()  # earlier runs' strategies (reference cycles) must not count here
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    probes = _probes(bm, device)
    recorded: list[torch.Tensor] = []
    identical = True
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else None
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        if kind != "tsn":
            continue
        now = _outputs(strategy.model, probes[: exp.current_experience + 1], autocast)
        identical &= all(
            torch.equal(a, b) for a, b in zip(recorded, now[: len(recorded)], strict=True)
        )
        recorded = now
    result = {
        "strategy": kind,
        "amp": amp,
        "epoch_s_median": statistics.median(clock.times),
        # what this run added at its peak, above what was allocated when it started
        "peak_cuda_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None,
    }
    if kind == "tsn":
        buf = io.BytesIO()
        strategy.export(buf)
        buf.seek(0)
        fresh = ReducedAlexNet(n_classes=10, multihead=multihead).to(device)
        loaded = load_compressed(buf, fresh)
        same = all(
            torch.equal(a, b)
            for a, b in zip(_outputs(loaded, probes, autocast), recorded, strict=True)
        )
        result.update(earlier_tasks_bit_identical=identical, export_load_identical=same)
        result["capacity_percent"] = strategy.capacity_report().percent
    return result


def _amp_multihead(args, device: str = "cuda") -> dict:
    """TSN with Avalanche's multi-head classifier under autocast: does it run, and is it exact?"""
    try:
        result = _run("tsn", True, args, device, multihead=True)
    except Exception as e:  # reported, not hidden: the summary says what failed
        return {"runs": False, "error": f"{type(e).__name__}: {e}"[:300]}
    keys = ("earlier_tasks_bit_identical", "export_load_identical", "capacity_percent")
    return {"runs": True, **{k: result[k] for k in keys}}


def _diverge(args, device: str = "cuda") -> dict:
    """A last task whose data holds a NaN must stop, move no earlier task, then retrain."""
    from avalanche_tsn import TSNStrategy

    torch.manual_seed(0)
    n = max(args.samples // 4, 2 * args.mb, 40)  # every class in every test set
    bm = _stream(args.tasks, n)
    poisoned = _stream(args.tasks, n, poison_last=True)
    strategy = _strategy(TSNStrategy, args, device, epochs=1)
    probes = _probes(bm, device)[:-1]
    *earlier, last = bm.train_stream
    for exp in earlier:
        strategy.train(exp, eval_streams=[])
    before = _outputs(strategy.model, probes)
    try:
        strategy.train(poisoned.train_stream[last.current_experience], eval_streams=[])
        stopped = False
    except FloatingPointError:
        stopped = True
    after_fault = _outputs(strategy.model, probes)
    strategy.train(last, eval_streams=[])
    after_retrain = _outputs(strategy.model, probes)
    return {
        "stopped_with_floating_point_error": stopped,
        "earlier_tasks_bit_identical_after_fault": all(map(torch.equal, before, after_fault)),
        "earlier_tasks_bit_identical_after_retrain": all(map(torch.equal, before, after_retrain)),
        "last_task_trained": last.task_label in strategy.tsn_model.trained_tasks(),
    }


def _kernels(make, shape, tsn: bool, mb: int, device: str) -> int | None:
    """Device kernels one training step launches (None off CUDA)."""
    from scale import training_step

    if torch.device(device).type != "cuda":
        return None
    step = training_step(make, shape, tsn, mb, device)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def _steps(args, device: str = "cuda") -> list[dict]:
    """Training-step times of the plain model and of TSN's second task (see ``scale.py``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import _step_times

    from avalanche_tsn.models import ReducedAlexNet, ReducedResNet18, single_head

    backbones = [
        ("MLP 784-100-100", lambda: single_head(784, (100, 100), 10), (784,)),
        ("ReducedAlexNet", lambda: ReducedAlexNet(multihead=False), (3, 32, 32)),
        ("ReducedResNet18", lambda: ReducedResNet18(multihead=False), (3, 32, 32)),
    ]
    # "tsn" and "tsn_no_check" train eagerly; each other kernel asked for adds "tsn_<kernel>"
    runs = [("plain", False, True, "eager"), ("tsn", True, True, "eager")]
    runs += [("tsn_no_check", True, False, "eager")]
    runs += [(f"tsn_{k}", True, True, k) for k in args.kernels if k != "eager"]
    rows = []
    for mb in args.step_mbs:
        for name, make, shape in backbones:
            times: dict[str, list[float]] = {key: [] for key, *_ in runs}
            compile_s: list[float] = []
            for _ in range(args.repeats):  # interleaved, so all of them see the same machine
                for key, tsn, check, kernel in runs:
                    times[key] += _step_times(
                        make, shape, tsn, args.steps, mb, device, check, kernel, compile_s
                    )
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"backbone": name, "minibatch": mb}
            for key, values in times.items():
                row[f"{key}_ms_min"] = 1000 * min(values)
                row[f"{key}_ms_median"] = 1000 * med[key]
                if key != "plain":
                    row[f"{key}_over_plain"] = med[key] / med["plain"]
            if compile_s:  # the first model of the process compiles; later ones find it cached
                row["compile_s_first_step"] = compile_s
            row["plain_kernels"] = _kernels(make, shape, False, mb, device)
            row["tsn_kernels"] = _kernels(make, shape, True, mb, device)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048, help="training samples a task")
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps a repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--step-mbs",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[64, 512],
        help="minibatch sizes of the step timings",
    )
    parser.add_argument(
        "--kernels",
        type=lambda v: [k for k in v.split(",") if k],
        default=["eager", "compiled"],
        help="TSN training kernels of the step timings (avalanche_tsn.kernels)",
    )
    parser.add_argument("--json", help="write the result here too")
    show_defaults(parser)
    args = parser.parse_args()
    for kernel in args.kernels:
        try:
            check_kernel(kernel)
        except ValueError as err:
            parser.error(str(err))
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped")
        return 0
    # cuBLAS reads this when it starts; the deterministic runs below need it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    steps = _steps(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import layer_sweep

    layers = layer_sweep(device="cuda")
    torch.use_deterministic_algorithms(True)
    runs = [_run(kind, amp, args) for amp in (False, True) for kind in ("naive", "tsn")]
    diverge = _diverge(args)
    amp_multihead = _amp_multihead(args)
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
        "diverging_task": diverge,
        "amp_multihead": amp_multihead,
        "steps": steps,
        "layer_sweep": layers,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    ok = all(r.get("earlier_tasks_bit_identical", True) and r.get("export_load_identical", True)
             for r in runs) and all(diverge.values())  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
