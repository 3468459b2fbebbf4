"""End-to-end time of a continual-learning run at the TSN reference code's settings (issue 15).

Permuted Fashion-MNIST, 10 tasks, 2 epochs, plain SGD (no momentum) lr 0.3, minibatch 256,
sparsity 0.5, the bias-free 784-100-100 MLP: ``benchmarks/harness.py`` in a fresh process per
run, TSN and Avalanche's Naive, each with this package's data path (tensor minibatches, the
evaluations the metrics read) and with Avalanche's (per-sample loader, every test set before
and after each task). The loop time is the harness's ``train_seconds`` (training, compression
stages and evaluations); the command time is the whole process, imports and data included.

Usage::

    python benchmarks/end_to_end.py --threads 2 --repeats 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the scripts' shared helpers
from _report import publish  # noqa: E402

from avalanche_tsn._cli import show_defaults

HARNESS = Path(__file__).with_name("harness.py")
SETTINGS = [
    "--scenario", "permuted_fashion", "--epochs", "2", "--mb", "256", "--lr", "0.3",
    "--optimizer", "sgd", "--momentum", "0", "--sparsity", "0.5", "--in-process", "--quiet",
]  # fmt: skip
PATHS = {
    "this package's": [],
    "Avalanche's": ["--avalanche-loader", "--eval", "full"],
}
SECTION = "end_to_end"


def run(strategy: str, path: list[str], threads: int) -> tuple[float, float, float]:
    """One harness process: (loop seconds, command seconds, ACC)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(HARNESS), *SETTINGS, "--strategies", strategy]
        cmd += ["--threads", str(threads), "--out", out, *path]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        command = time.perf_counter() - t0
        row = json.loads((Path(out) / "results.json").read_text())["rows"][0]
    return row["train_seconds"], command, row["ACC"]


def _mm(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--strategies", default="tsn,naive")
    p.add_argument("--write", help="replace the end-to-end section of this Markdown file")
    show_defaults(p)
    args = p.parse_args()
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    # Interleaved repeats: a slow spell of the machine hits every configuration alike.
    for _ in range(args.repeats):
        for strategy in args.strategies.split(","):
            for name, path in PATHS.items():
                results.setdefault((strategy, name), []).append(run(strategy, path, args.threads))
    command = f"python benchmarks/end_to_end.py --threads {args.threads} --repeats {args.repeats}"
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `{command}`: torch "
        f"{torch.__version__}, {args.threads} thread(s), CPU, {args.repeats} runs each "
        "(min / median seconds).",
        "",
        "| strategy | data path | loop s | command s | ACC % |",
        "|---|---|---|---|---|",
    ]
    for (strategy, name), runs in results.items():
        loop, cmd, acc = zip(*runs, strict=True)
        lines.append(
            f"| {strategy} | {name} | {_mm(list(loop))} | {_mm(list(cmd))} | "
            f"{100 * statistics.median(acc):.2f} |"
        )
    for strategy in args.strategies.split(","):
        ours = statistics.median(r[0] for r in results[(strategy, "this package's")])
        theirs = statistics.median(r[0] for r in results[(strategy, "Avalanche's")])
        lines.append("")
        lines.append(f"{strategy}: loop {theirs / ours:.2f}x faster with this package's data path.")
    publish("\n".join(lines), args.write, SECTION)


if __name__ == "__main__":
    main()
