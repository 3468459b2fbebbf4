"""Where TSN's accuracy goes at the reference code's own settings (issue 12, item 7).

Permuted Fashion-MNIST, 10 tasks, 2 epochs, SGD lr 0.3, minibatch 256, sparsity 0.5 (the TSN
reference code's p-MNIST settings), over several seeds: TSN whole and its stages (mask learning
alone, + pruning), with the reference's plain SGD or momentum 0.9, on [0, 1] inputs or on
inputs standardized as the reference's loader does. Each run is ``benchmarks/harness.py`` in
its own process (``--jobs`` at a time, one thread each).

Usage::

    python benchmarks/reference_gap.py --seeds 0,1,2 --jobs 2 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the scripts' shared helpers
from _report import harness_row, publish, spread  # noqa: E402

from avalanche_tsn._cli import show_defaults

SETTINGS = [
    "--scenario", "permuted_fashion", "--strategies", "tsn", "--epochs", "2", "--mb", "256",
    "--lr", "0.3", "--optimizer", "sgd", "--sparsity", "0.5", "--in-process", "--quiet",
    "--threads", "1",
]  # fmt: skip
CONFIGS = {
    "TSN, plain SGD": ["--momentum", "0"],
    "TSN, momentum 0.9": ["--momentum", "0.9"],
    "TSN, plain SGD, standardized inputs": ["--momentum", "0", "--standardize"],
    "mask learning only, plain SGD": ["--momentum", "0", "--no-prune", "--no-quantize"],
    "+ pruning, plain SGD": ["--momentum", "0", "--no-quantize"],
    "mask learning only, plain SGD, standardized": [
        "--momentum",
        "0",
        "--no-prune",
        "--no-quantize",
        "--standardize",
    ],  # fmt: skip
    "mask learning only, momentum 0.9": ["--momentum", "0.9", "--no-prune", "--no-quantize"],
}
SECTION = "reference_gap"


def run(config: str, seed: int) -> dict:
    """One harness run; its TSN row."""
    return harness_row([*SETTINGS, *CONFIGS[config], "--seed", str(seed)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--write", help="replace the reference-gap section of this Markdown file")
    show_defaults(p)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(c, s) for c in CONFIGS for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run(*job), jobs))
    by_config: dict[str, list[dict]] = {}
    for (config, _), row in zip(jobs, rows, strict=True):
        by_config.setdefault(config, []).append(row)
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `python benchmarks/reference_gap.py "
        f"--seeds {args.seeds} --jobs {args.jobs}` (torch {torch.__version__}, CPU, 1 thread a "
        "run); seeds set the permutations and the initialisation.",
        "",
        "| configuration | ACC % mean (min-max) | per seed | BWT | capacity % mean |",
        "|---|---|---|---|---|",
    ]
    for config, runs in by_config.items():
        acc = [100 * r["ACC"] for r in runs]
        cap = [r["capacity_percent"] for r in runs]
        bwt = max(abs(r["BWT"] or 0.0) for r in runs)
        lines.append(
            f"| {config} | {spread(acc)} | "
            f"{' / '.join(f'{a:.2f}' for a in acc)} | {'0' if bwt == 0 else f'{bwt:.4f}'} | "
            f"{statistics.mean(cap):.2f} |"
        )
    publish("\n".join(lines), args.write, SECTION)


if __name__ == "__main__":
    main()
