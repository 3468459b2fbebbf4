"""Pruning searches compared: ACC, capacity and validation passes on several streams.

Each pruning search of :func:`avalanche_tsn.pruning.greedy_prune` (``joint``, ``bisect`` and,
with ``--searches``, the paper's ``layerwise`` loop) runs TSN through ``benchmarks/harness.py``
at each scenario's harness defaults, one process a run (``--jobs`` at a time, one thread each),
over several seeds. What pruning costs in time is measured by ``scale.py --rows compress``.

Usage::

    python benchmarks/prune_search.py --seeds 0,1,2 --jobs 2 --write BENCHMARKS.md
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

SECTION = "prune_search"


def run(scenario: str, search: str, seed: int) -> dict:
    """One harness run; its TSN row."""
    args = ["--scenario", scenario, "--strategies", "tsn", "--prune-search", search]
    args += ["--seed", str(seed), "--in-process", "--quiet", "--threads", "1"]
    return harness_row(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="permuted_digits,split_fashion,permuted_fashion")
    p.add_argument("--searches", default="joint,bisect")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--write", help="replace the prune-search section of this Markdown file")
    show_defaults(p)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        (sc, se, seed)
        for sc in args.scenarios.split(",")
        for se in args.searches.split(",")
        for seed in seeds
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run(*job), jobs))
    grouped: dict[tuple[str, str], list[dict]] = {}
    for (scenario, search, _), row in zip(jobs, rows, strict=True):
        grouped.setdefault((scenario, search), []).append(row)
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `python benchmarks/prune_search.py "
        f"--scenarios {args.scenarios} --searches {args.searches} --seeds {args.seeds}` (torch "
        f"{torch.__version__}, CPU, 1 thread a run, each scenario's harness defaults).",
        "",
        "| stream | search | ACC % mean (min-max) | capacity % mean (min-max) | "
        "validation passes a task | train s mean |",
        "|---|---|---|---|---|---|",
    ]
    for (scenario, search), runs in grouped.items():
        acc = [100 * r["ACC"] for r in runs]
        cap = [r["capacity_percent"] for r in runs]
        passes = [rec["evaluations"] for r in runs for rec in r["pruning"]]
        seconds = [r["train_seconds"] for r in runs]
        lines.append(
            f"| {scenario} | {search} | {spread(acc)}"
            f" | {spread(cap)} | "
            f"{statistics.mean(passes):.1f} | {statistics.mean(seconds):.1f} |"
        )
    publish("\n".join(lines), args.write, SECTION)


if __name__ == "__main__":
    main()
