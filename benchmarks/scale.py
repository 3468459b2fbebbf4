"""Costs at the paper's scale, as ratios against a baseline measured in the same process.

Usage::

    python benchmarks/scale.py                       # every row, printed
    python benchmarks/scale.py --rows io,mixed       # some rows
    python benchmarks/scale.py --write BENCHMARKS.md # also replace the scale section there

Rows (issue 11):

- ``train``: one training step (zero_grad, forward, loss, backward, optimizer step) of TSN's
  second task (the first one frozen) against the same step of the plain model, SGD with
  momentum, minibatch 64: MLP 784-100-100, ReducedAlexNet, ReducedResNet18 (20 filters).
- ``layers``: forward and backward of one masked linear layer with its matrix product
  (minibatch 64), the eager live weight against the compiled passes, by layer size: where
  ``train_kernel="auto"``'s size threshold comes from (``gpu_check.py`` runs it on CUDA).
- ``compress``: pruning + quantization time as a % of training time, ReducedResNet18 on
  split Fashion-MNIST (3x32x32), 2 epochs a task; with the ACC and capacity they reach, for
  each pruning search (``--searches``) over ``--compress-seeds``.
- ``io``: ``capacity_report()``, ``export()`` and ``load_compressed()`` against
  ``torch.save(state_dict)`` on ResNet-18 (64 filters, 11M weights) with 10 tasks.
- ``state``: ``state_dict`` bytes against the capacity report's, and mask bits per weight
  per task (ResNet-18, 2 and 10 tasks).
- ``mixed``: a minibatch of 256 that mixes k tasks against one of a single task.
- ``eval``: the evaluation forward of a trained task against the unwrapped model.

Everything runs with a fixed thread count (printed); each figure is the min and the median
of repeats, and ratios are of medians. Synthetic tasks (``io``, ``state``, ``mixed``,
``eval``) are made by freezing random masks and quantizing at 4 bits: their costs depend on
sizes, not on what was learned.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

try:
    import resource
except ImportError:  # not a Unix: no page fault counts
    resource = None

from avalanche_tsn import TSNModel, load_compressed
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.capacity import capacity_report
from avalanche_tsn.export import export_model
from avalanche_tsn.kernels import LiveKernel
from avalanche_tsn.masks import LiveWorkspace, live_weight, topk_threshold
from avalanche_tsn.models import ReducedAlexNet, ReducedResNet18, single_head
from avalanche_tsn.quantization import quantize_task

sys.path.insert(0, str(Path(__file__).parent))  # the scripts' shared helpers
from _report import spread, timed, write_section  # noqa: E402


def _fmt(times: list[float], scale: float = 1000.0, digits: int = 1) -> str:
    return f"{scale * min(times):.{digits}f} / {scale * statistics.median(times):.{digits}f}"


def synthetic(make: Callable[[], nn.Module], tasks: int, bits: int = 4, seed: int = 0) -> TSNModel:
    """A TSN model with ``tasks`` frozen tasks of random masks, quantized at ``bits``."""
    torch.manual_seed(seed)
    model = TSNModel(make())
    for t in range(tasks):
        model.begin_task(t, 0.5)
        with torch.no_grad():
            for _, layer in model.masked_layers():
                layer.scores.normal_()
                layer.weight.normal_(std=0.05)
        model.end_task(t)
        if bits:
            quantize_task(model, t, bits)
    return model.eval()


# -- train -------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def training_step(make, shape, tsn: bool, mb: int = 64, device: str = "cpu", kernel: str = "eager"):
    """A function running one training step of the plain model or of TSN's second task.

    It takes ``finite_check``: whether TSN's per-step loss check (which waits for the device)
    runs. SGD with momentum and weight decay, a fixed random minibatch of ``mb``; TSN's live
    subnetwork trains with the ``kernel`` path (see avalanche_tsn.kernels); the step's
    ``model`` attribute is the model, its ``optimizer_seconds`` the time of each step's
    ``optimizer.step()`` (on the CPU; on a GPU it is the launches' time).
    """
    torch.manual_seed(0)
    net = make()
    model: nn.Module = net
    if tsn:
        model = TSNModel(net)
        model.begin_task(0, 0.5)
        model.train()
        model(torch.randn(mb, *shape), 0).sum().backward()
        model.end_task(0)
        model.begin_task(1, 0.5)
    model.to(device)
    if tsn:
        model.use_kernel(kernel, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(mb, *shape, device=device)
    y = torch.randint(0, 10, (mb,), device=device)
    model.train()

    def step(finite_check: bool = True) -> None:
        opt.zero_grad()
        out = model(x, 1) if tsn else model(x)
        loss = nn.functional.cross_entropy(out, y)
        if tsn and finite_check and not bool(torch.isfinite(loss)):  # TSN's per-step check
            raise FloatingPointError
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        optimizer_seconds.append(time.perf_counter() - t0)

    optimizer_seconds: list[float] = []
    step.model = model  # type: ignore[attr-defined]
    step.optimizer_seconds = optimizer_seconds  # type: ignore[attr-defined]
    return step


def _step_times(
    make,
    shape,
    tsn: bool,
    steps: int,
    mb: int = 64,
    device: str = "cpu",
    finite_check: bool = True,
    kernel: str = "eager",
    compile_seconds: list[float] | None = None,
    optimizer_seconds: list[float] | None = None,
    faults: list[int] | None = None,
) -> list[float]:
    """Seconds of each training step, the device synchronized around each one.

    The first 3 steps are left out (with ``kernel="compiled"`` the first one compiles; its
    compilation seconds are appended to ``compile_seconds``; the optimizer's seconds of the
    steps kept, to ``optimizer_seconds``; their minor page faults, to ``faults``).
    """
    step = training_step(make, shape, tsn, mb, device, kernel)
    times = []
    for i in range(steps + 3):
        _sync(device)
        f0 = minor_faults()
        t0 = time.perf_counter()
        step(finite_check)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
            if faults is not None:
                faults.append(minor_faults() - f0)
    if compile_seconds is not None and tsn and kernel == "compiled":
        compile_seconds.append(sum(step.model.kernel.compile_seconds.values()))
    if optimizer_seconds is not None:
        optimizer_seconds += step.optimizer_seconds[3:]
    return times


def minor_faults() -> int:
    """The process's minor page faults so far (0 where the OS does not count them).

    A minor fault is the kernel mapping a fresh page on first touch. glibc's allocator hands
    large tensors back to the OS and maps them again (see :func:`allocator`), so a step can
    spend more time in faults than in arithmetic, by amounts that depend on the process's
    allocation history: the train row reports them beside the times.
    """
    if resource is None:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


#: the environment variables that change how the C allocator reuses memory
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def allocator() -> str:
    """The C allocator's settings this process runs with, in words (for the report)."""
    settings = [f"{k}={os.environ[k]}" for k in ALLOCATOR_VARIABLES if os.environ.get(k)]
    return ", ".join(settings) if settings else "the C library's default allocator"


def row_train(args) -> list[str]:
    backbones = [
        ("MLP 784-100-100", lambda: single_head(784, (100, 100), 10), (784,), 60),
        ("ReducedAlexNet", lambda: ReducedAlexNet(multihead=False), (3, 32, 32), 16),
        ("ReducedResNet18", lambda: ReducedResNet18(multihead=False), (3, 32, 32), 8),
    ]
    kernels = [k for k in args.kernels.split(",") if k]
    head = " | ".join(f"TSN {k} ms/step | {k} / plain" for k in kernels)
    lines = [
        f"| backbone (minibatch 64) | plain ms/step (min / median) | {head} |",
        "|---|---|" + "---|---|" * len(kernels),
    ]
    compiled: list[str] = []
    optimizer: list[str] = []
    faults: list[str] = []
    for name, make, shape, steps in backbones:
        plain: list[float] = []
        tsn: dict[str, list[float]] = {k: [] for k in kernels}
        seconds: list[float] = []
        opt_plain: list[float] = []
        opt_tsn: list[float] = []
        faults_plain: list[int] = []
        faults_tsn: dict[str, list[int]] = {k: [] for k in kernels}
        for _ in range(args.repeats):  # interleaved, so all see the same machine
            plain += _step_times(
                make, shape, False, steps, optimizer_seconds=opt_plain, faults=faults_plain
            )
            for k in kernels:
                tsn[k] += _step_times(
                    make, shape, True, steps, kernel=k, compile_seconds=seconds,
                    optimizer_seconds=opt_tsn, faults=faults_tsn[k],
                )  # fmt: skip
        per_kernel = ", ".join(f"TSN {k} {statistics.median(faults_tsn[k]):.0f}" for k in kernels)
        faults.append(f"{name} plain {statistics.median(faults_plain):.0f}, {per_kernel}")
        extra = statistics.median(opt_tsn) - statistics.median(opt_plain)
        optimizer.append(
            f"{name} {_fmt(opt_plain)} / {_fmt(opt_tsn)} ms, the difference "
            f"{extra / statistics.median(plain):.2f} of the plain step"
        )
        cells = " | ".join(
            f"{_fmt(tsn[k])} | {statistics.median(tsn[k]) / statistics.median(plain):.2f}"
            for k in kernels
        )
        lines.append(f"| {name} | {_fmt(plain)} | {cells} |")
        if "compiled" in kernels:
            # each repeat builds a fresh model; torch.compile's cache serves the repeats after
            # the first, so the first repeat's figure is the cold first-step latency
            compiled.append(
                f"{name} {seconds[0]:.1f} s (later repeats {max(seconds[1:] or [0]):.1f} s)"
            )
    # the same optimizer steps the scores too: a floor under the ratio that no kernel lowers
    lines += [
        "",
        "The optimizer's step alone (the same SGD; TSN's parameters include every masked "
        "layer's scores), plain / TSN (min / median): " + "; ".join(optimizer) + ".",
        "",
        "Minor page faults a step (median): " + "; ".join(faults) + ".",
    ]
    if compiled:
        lines += ["", "Compilation in the first step (cold): " + "; ".join(compiled) + "."]
    return lines


# -- io and state ------------------------------------------------------------------------


def _resnet18() -> nn.Module:
    return ReducedResNet18(nf=64, multihead=False)


#: the layer sweep's linear layers (out x in features): 256 to 2,097,152 weights
LAYER_SIZES = (
    (16, 16),
    (100, 100),
    (100, 784),
    (256, 900),
    (512, 1024),
    (1024, 1024),
    (2048, 1024),
)


def _layer_step(layer: tuple, fused: LiveKernel | None, workspace: LiveWorkspace) -> None:
    x, w, s, b, threshold = layer
    y = nn.functional.linear(x, live_weight(w, s, threshold, workspace, fused), b)
    y.sum().backward()
    w.grad = s.grad = b.grad = None


def layer_sweep(
    sizes: tuple[tuple[int, int], ...] = LAYER_SIZES,
    mb: int = 64,
    device: str = "cpu",
    repeats: int = 5,
    budget: float = 2e7,
) -> list[dict]:
    """Microseconds of one masked linear layer's forward and backward, eager and compiled.

    Each size runs ``min(2000, budget / weights)`` calls a repeat (at least 5), the two
    kernels alternating; the device is synchronised around each repeat.

    :param sizes: (out, in) features of each layer.
    :param mb: minibatch size.
    :param device: where it runs.
    :param repeats: timed repeats of each kernel.
    :param budget: weights times calls a repeat.
    """
    kernel = LiveKernel("compiled", device)
    rows = []
    for out_f, in_f in sizes:
        g = torch.Generator().manual_seed(0)
        w = nn.Parameter((torch.randn(out_f, in_f, generator=g) * 0.05).to(device))
        s = nn.Parameter(torch.randn(out_f, in_f, generator=g).to(device))
        b = nn.Parameter(torch.zeros(out_f, device=device))
        x = torch.randn(mb, in_f, generator=g).to(device)
        threshold = topk_threshold(s.detach(), max(1, w.numel() // 2))
        layer = (x, w, s, b, threshold)
        calls = min(2000, max(5, int(budget // w.numel())))
        paths = {"eager": (None, LiveWorkspace()), "compiled": (kernel, LiveWorkspace())}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for fused, workspace in paths.values():
            for _ in range(3):  # the first compiled call compiles
                _layer_step(layer, fused, workspace)
        for _ in range(repeats):
            for k, (fused, workspace) in paths.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    _layer_step(layer, fused, workspace)
                _sync(device)
                times[k].append((time.perf_counter() - t0) / calls * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "weights": out_f * in_f,
                **{f"{k}_us_min": min(v) for k, v in times.items()},
                **{f"{k}_us_median": med[k] for k in times},
                "compiled_over_eager": med["compiled"] / med["eager"],
                "fallback": kernel.fallback,
            }
        )
    return rows


def row_layers(args) -> list[str]:
    lines = [
        "| weights (out x in) | eager us (min / median) | compiled us (min / median) | "
        "compiled / eager |",
        "|---|---|---|---|",
    ]
    for (out_f, in_f), r in zip(LAYER_SIZES, layer_sweep(repeats=args.repeats), strict=True):
        lines.append(
            f"| {r['weights']:,} ({out_f}x{in_f}) | {r['eager_us_min']:.0f} / "
            f"{r['eager_us_median']:.0f} | {r['compiled_us_min']:.0f} / "
            f"{r['compiled_us_median']:.0f} | {r['compiled_over_eager']:.2f} |"
        )
        if r["fallback"]:
            lines.append(f"(compiling failed, both columns eager: {r['fallback']})")
    return lines


def row_io(args) -> list[str]:
    model = synthetic(_resnet18, 10)
    n = sum(layer.weight.numel() for _, layer in model.masked_layers())
    state = model.state_dict()
    blob: dict[str, bytes] = {}

    def save():
        buf = io.BytesIO()
        torch.save(state, buf)

    def export():
        buf = io.BytesIO()
        export_model(model, buf)
        blob["file"] = buf.getvalue()

    export()
    fresh = [_resnet18() for _ in range(args.repeats)]

    def load():
        load_compressed(io.BytesIO(blob["file"]), fresh.pop())

    base = timed(save, args.repeats)
    rows = [("capacity_report()", timed(lambda: capacity_report(model), args.repeats))]
    rows += [("export()", timed(export, args.repeats)), ("load_compressed()", timed(load, 1))]
    rows[-1] = ("load_compressed()", rows[-1][1] + timed(load, len(fresh)))
    lines = [
        f"ResNet-18 (64 filters, {n:,} maskable weights), 10 tasks; export file "
        f"{len(blob['file']):,} bytes.",
        "",
        "| operation | s (min / median) | / torch.save(state_dict) |",
        "|---|---|---|",
        f"| torch.save(state_dict) | {_fmt(base, 1, 3)} | 1.00 |",
    ]
    for name, times in rows:
        ratio = statistics.median(times) / statistics.median(base)
        lines.append(f"| {name} | {_fmt(times, 1, 3)} | {ratio:.2f} |")
    return lines


def row_state(args) -> list[str]:
    lines = [
        "| ResNet-18, tasks | state_dict bytes | capacity report bytes | ratio | "
        "mask bits / weight / task |",
        "|---|---|---|---|---|",
    ]
    for tasks in (2, 10):
        model = synthetic(_resnet18, tasks)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        report = capacity_report(model)
        n = sum(layer.weight.numel() for _, layer in model.masked_layers())
        mask_bits = sum(8 * layer.task_masks.numel() for _, layer in model.masked_layers())
        lines.append(
            f"| {tasks} | {buf.tell():,} | {report.total_bits // 8:,} | "
            f"{8 * buf.tell() / report.total_bits:.1f} | {mask_bits / n / tasks:.3f} |"
        )
    return lines


# -- mixed and eval ----------------------------------------------------------------------


def row_mixed(args) -> list[str]:
    model = synthetic(lambda: single_head(784, (100, 100), 10), 30)
    x = torch.randn(256, 784)
    lines = [
        "MLP 784-100-100 with 30 trained tasks, minibatch 256.",
        "",
        "| tasks in the minibatch | ms (min / median) | / single-task minibatch |",
        "|---|---|---|",
    ]
    base = None
    with torch.no_grad():
        for k in (1, 9, 16, 30):
            labels = torch.arange(256) % k
            model(x, labels)  # warm the caches
            times = timed(lambda labels=labels: model(x, labels), args.repeats * 20)
            base = base or statistics.median(times)
            lines.append(f"| {k} | {_fmt(times)} | {statistics.median(times) / base:.2f} |")
    return lines


def row_eval(args) -> list[str]:
    lines = [
        "| backbone, minibatch 256 | unwrapped ms (min / median) | trained task ms | ratio |",
        "|---|---|---|---|",
    ]
    for name, make, shape in [
        ("MLP 784-100-100", lambda: single_head(784, (100, 100), 10), (784,)),
        ("ReducedAlexNet", lambda: ReducedAlexNet(multihead=False, norm=False), (3, 32, 32)),
    ]:
        torch.manual_seed(0)
        plain = make().eval()
        model = synthetic(make, 3)
        x = torch.randn(256, *shape)
        with torch.no_grad():
            model(x, 1)
            n = args.repeats * (20 if len(shape) == 1 else 3)
            a, b = [], []
            for _ in range(n):  # interleaved
                a += timed(lambda p=plain, x=x: p(x), 1)
                b += timed(lambda m=model, x=x: m(x, 1), 1)
        ratio = statistics.median(b) / statistics.median(a)
        lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {ratio:.2f} |")
    return lines


# -- compress ---------------------------------------------------------------------------


def _fashion_32(per_task: int, tasks: int = 3, seed: int = 0):
    """Split Fashion-MNIST as 3x32x32 images (ReducedResNet18's input), ``per_task`` samples."""
    from avalanche.benchmarks import nc_benchmark

    from avalanche_tsn.datasets import TensorTaskDataset, load_fashion_mnist

    x_train, y_train, x_test, y_test = load_fashion_mnist()

    def images(x):
        x = nn.functional.pad(x.view(-1, 1, 28, 28), (2, 2, 2, 2))
        return x.expand(-1, 3, -1, -1).contiguous()

    g = torch.Generator().manual_seed(seed)
    keep_train = torch.randperm(len(y_train), generator=g)[: per_task * 5]
    keep_test = torch.randperm(len(y_test), generator=g)[: per_task * 5 // 4]
    bm = nc_benchmark(
        TensorTaskDataset(images(x_train[keep_train]), y_train[keep_train]),
        TensorTaskDataset(images(x_test[keep_test]), y_test[keep_test]),
        n_experiences=5,
        task_labels=True,
        shuffle=True,
        seed=seed,
        class_ids_from_zero_in_each_exp=True,
    )
    return bm, tasks


def _compress_run(bm, tasks: int, pruning: dict, seed: int = 0) -> dict:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

    from avalanche_tsn import TSNStrategy
    from avalanche_tsn.plugins import PruningPlugin, QuantizationPlugin

    class Clock(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.train = 0.0

        def before_training_epoch(self, strategy, **kwargs):
            self._t = time.perf_counter()

        def after_training_epoch(self, strategy, **kwargs):
            self.train += time.perf_counter() - self._t

    torch.manual_seed(seed)
    model = ReducedResNet18(n_classes=2)
    clock = Clock()
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_mb_size=64,
        train_epochs=2,
        eval_mb_size=256,
        plugins=[clock],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        **pruning,
    )
    spent = {"prune": 0.0, "quantize": 0.0}
    for plugin in strategy.plugins:
        for kind, cls in (("prune", PruningPlugin), ("quantize", QuantizationPlugin)):
            if isinstance(plugin, cls):
                original = plugin.after_training_exp

                def timed(strategy, _original=original, _kind=kind, **kwargs):
                    t0 = time.perf_counter()
                    _original(strategy, **kwargs)
                    spent[_kind] += time.perf_counter() - t0

                plugin.after_training_exp = timed
    for exp in list(bm.train_stream)[:tasks]:
        strategy.train(exp, eval_streams=[])
    res = strategy.eval(list(bm.test_stream)[:tasks])
    acc = [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"] for t in range(tasks)]
    pruner = next((p for p in strategy.plugins if isinstance(p, PruningPlugin)), None)
    records = pruner.records if pruner is not None else []
    return {
        "passes": sum(r.evaluations for r in records) / max(len(records), 1),
        "train_s": clock.train,
        "prune_s": spent["prune"],
        "quantize_s": spent["quantize"],
        "acc": 100 * sum(acc) / len(acc),
        "capacity": strategy.capacity_report().percent,
    }


def row_compress(args) -> list[str]:
    seeds = [int(s) for s in args.compress_seeds.split(",")]
    try:
        streams = {seed: _fashion_32(per_task=args.compress_samples, seed=seed) for seed in seeds}
    except FileNotFoundError as err:
        return [f"skipped: {err}"]
    tasks = streams[seeds[0]][1]
    names = {"layerwise": "layerwise (the paper's loop)", "joint": "joint (default)"}
    configs = [(names.get(s, s), {"prune_search": s}) for s in args.searches.split(",")]
    lines = [
        f"ReducedResNet18 (20 filters) on split Fashion-MNIST as 3x32x32, {tasks} tasks of "
        f"{args.compress_samples} training samples (10% held out), 2 epochs a task, SGD 0.05; "
        f"seeds {args.compress_seeds} (each draws the samples, the class split and the "
        "initialisation). Times are totals over the seeds; ACC and capacity are means "
        "(min-max).",
        "",
        "| pruning | validation passes a task | train s | prune s | quantize s | "
        "(prune + quantize) / train | ACC % | capacity % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, extra in configs:
        runs = [_compress_run(*streams[seed], extra, seed=seed) for seed in seeds]
        total = {k: sum(r[k] for r in runs) for k in ("train_s", "prune_s", "quantize_s")}
        share = 100 * (total["prune_s"] + total["quantize_s"]) / total["train_s"]
        acc, cap = [r["acc"] for r in runs], [r["capacity"] for r in runs]
        lines.append(
            f"| {name} | {statistics.mean(r['passes'] for r in runs):.1f} | "
            f"{total['train_s']:.1f} | {total['prune_s']:.1f} | {total['quantize_s']:.1f} | "
            f"{share:.0f}% | {spread(acc)} | "
            f"{spread(cap)} |"
        )
    return lines


ROWS = {
    "train": ("Training step, TSN against the plain model", row_train),
    "layers": ("A masked layer's passes, eager against compiled, by size", row_layers),
    "io": ("Capacity report, export and load against torch.save", row_io),
    "state": ("State dict against the capacity report", row_state),
    "mixed": ("Minibatches that mix tasks", row_mixed),
    "eval": ("Evaluation forward of a trained task", row_eval),
    "compress": ("Pruning and quantization against training", row_compress),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kernels",
        default="eager,compiled",
        help="TSN training kernels of the train row (avalanche_tsn.kernels)",
    )
    parser.add_argument("--write", help="replace the scale section of this Markdown file")
    parser.add_argument("--compress-samples", type=int, default=2000)
    parser.add_argument(
        "--searches", default="layerwise,joint,bisect", help="pruning searches of the compress row"
    )
    parser.add_argument("--compress-seeds", default="0", help="seeds of the compress row")
    show_defaults(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("avalanche_tsn").setLevel(logging.ERROR)  # synthetic tasks fill up
    command = (
        f"python benchmarks/scale.py --rows {args.rows} --repeats {args.repeats} "
        f"--threads {args.threads}"
    )
    if "train" in args.rows.split(","):
        command += f" --kernels {args.kernels}"
    if "compress" in args.rows.split(","):
        command += f" --searches {args.searches} --compress-seeds {args.compress_seeds}"
    out = [
        f"Measured {date.today()} with `{command}`, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU, {allocator()}.",
    ]
    print(out[0], flush=True)
    for key in args.rows.split(","):
        title, fn = ROWS[key]
        section = ["", f"### {title}", ""] + fn(args)
        print("\n".join(section), flush=True)
        out += section
    text = "\n".join(out)
    if args.write:
        write_section(args.write, "scale", text, title="Costs at scale (issue 11)")


if __name__ == "__main__":
    main()
