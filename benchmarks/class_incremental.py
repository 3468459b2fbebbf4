"""Class-incremental TSN against Avalanche's rehearsal baselines at equal memory, over seeds.

Usage::

    python benchmarks/class_incremental.py --scenario split_digits_ci --seeds 0,1,2 \\
        --threads 2 --out results/class_incremental_digits

Each seed is its own class order (the scenario's builder shuffles the classes by seed).
TSN (task inference by the router, and by the nearest-memory rule for reference) keeps
``--memory-size`` samples per task; the rehearsal baselines (Replay, ER-ACE, DER, iCaRL)
run twice: with the same number of stored samples as TSN, and with the same stored bytes
(their float32 model plus buffer equal to TSN's compressed model, task memory and router;
DER's buffer also holds logits). Every store of samples, TSN's memory and the baselines'
buffers alike, is counted as the task memory stores it: lossless codes into the training
data's distinct values (8 bits a value for 8-bit images; ``avalanche_tsn.task_memory``).
Naive and Joint bound the range. Every run is the harness's (``benchmarks/harness.py``:
same backbone, epochs, minibatch and optimizer); the table gives
mean (min-max) of the final stream accuracy, TSN's task-inference accuracy, stored bytes and
forwards per test sample. TSN's forgetting of each task's own predictions is checked, not
assumed: the harness's accuracy matrix of each task under its true label would show it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avalanche_tsn._cli import show_defaults  # noqa: E402
from avalanche_tsn.task_memory import code_bits, coded_bytes  # noqa: E402
from benchmarks import harness  # noqa: E402

BASELINES = ("replay", "er_ace", "der", "icarl")


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options; the rest go to the harness (``--epochs``, ``--optimizer``...)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenario", choices=("split_digits_ci", "split_fashion_ci"), default="split_digits_ci"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each is a class order")
    p.add_argument("--memory-size", type=int, default=100, help="TSN samples per task")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--subset", type=int, default=None, help="samples per experience (smoke)")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    show_defaults(p)
    return p.parse_known_args(argv)


def _args(ours: argparse.Namespace, rest: list[str], seed: int, **kw: Any) -> argparse.Namespace:
    argv = ["--scenario", ours.scenario, "--seed", str(seed), "--in-process", "--quiet"]
    argv += ["--threads", str(ours.threads), "--memory-size", str(ours.memory_size)]
    argv += [] if ours.subset is None else ["--subset", str(ours.subset)]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return harness.parse([*rest, *argv])


def run_seed(ours: argparse.Namespace, rest: list[str], seed: int) -> list[dict[str, Any]]:
    """Every row of one seed (one class order)."""
    base = _args(ours, rest, seed)
    sc = harness.SCENARIOS[ours.scenario]
    torch.manual_seed(seed)
    benchmark = harness._subset(sc.build(base), base.subset, True)
    rows = []
    for method in ("router", "memory"):
        row = harness.run_one("tsn", _args(ours, rest, seed, task_inference=method), benchmark)
        rows.append(row | {"label": f"tsn ({method})"})
    tsn = rows[0]
    stored = sum(tsn["stored_bytes"].values())
    n_tasks = len(benchmark.train_stream)
    same_samples = ours.memory_size * n_tasks
    numel, levels = harness.sample_levels(benchmark)
    # a buffer's samples coded as TSN's memory codes its own (the same bytes per value)
    bits = code_bits(levels, same_samples * numel)
    table = coded_bytes(same_samples, numel, levels) - same_samples * numel * bits // 8
    for name in BASELINES:
        row = harness.run_one(name, _args(ours, rest, seed, replay_size=same_samples), benchmark)
        rows.append(row | {"label": f"{name} (equal samples)", "buffer": same_samples})
        # the buffer whose bytes, with the model's (and DER's logits), equal TSN's
        model_bytes = row["stored_bytes"]["model"]
        per_sample = numel * bits // 8 + row["stored_bytes"]["other"] // same_samples
        size = (stored - model_bytes - table) // per_sample
        label = f"{name} (equal bytes)"
        if size < 1:  # its float32 model alone takes more than TSN stores: no run
            empty = {"model": model_bytes, "samples": 0, "other": 0}
            rows.append({"label": label, "strategy": name, "ACC": None, "buffer": 0})
            rows[-1] |= {"stored_bytes": empty, "inference_forwards": 1}
            continue
        row = harness.run_one(name, _args(ours, rest, seed, replay_size=size), benchmark)
        rows.append(row | {"label": label, "buffer": size})
    for name in ("naive", "joint"):
        rows.append(harness.run_one(name, base, benchmark) | {"label": name})
    return rows


def _span(values: list[float | None], scale: float = 100.0) -> str:
    vs = [scale * v for v in values if v is not None]
    if not vs:
        return "n/a (model alone above TSN's bytes)"
    if len(vs) == 1:
        return f"{vs[0]:.1f}"
    return f"{statistics.mean(vs):.1f} ({min(vs):.1f}-{max(vs):.1f})"


def table(by_seed: dict[int, list[dict[str, Any]]], ours: argparse.Namespace) -> str:
    """Mean (min-max) over seeds of each row: ACC, task inference, bytes, forwards."""
    labels = [r["label"] for r in next(iter(by_seed.values()))]
    lines = [
        f"### {ours.scenario}, seeds {ours.seeds} (each a class order), threads {ours.threads}",
        "",
        "| strategy | ACC % | task inferred right % | stored KiB (model + samples + other) "
        "| buffer samples | forwards per test sample |",
        "|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(labels):
        rows = [rs[i] for rs in by_seed.values()]
        acc = _span([r["ACC"] for r in rows])
        inf = [r["task_inference_acc"] for r in rows if "task_inference_acc" in r]
        kib = statistics.mean(sum(r["stored_bytes"].values()) for r in rows) / 1024
        parts = "/".join(
            f"{statistics.mean(r['stored_bytes'][k] for r in rows) / 1024:.0f}"
            for k in ("model", "samples", "other")
        )
        buffer = [r.get("buffer") for r in rows]
        buffer_text = "-" if buffer[0] is None else "/".join(str(b) for b in buffer)
        lines.append(
            f"| {label} | {acc} | {_span(inf) if inf else '-'} | {kib:.0f} ({parts}) "
            f"| {buffer_text} | {rows[0]['inference_forwards']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[int, list[dict[str, Any]]]:
    """Run every seed, print the table, write the files."""
    ours, rest = parse(argv)
    seeds = [int(s) for s in ours.seeds.split(",")]
    by_seed = {seed: run_seed(ours, rest, seed) for seed in seeds}
    text = table(by_seed, ours)
    print(text)
    if ours.out:
        out = Path(ours.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({str(k): v for k, v in by_seed.items()}))
        (out / "results.md").write_text(text)
    return by_seed


if __name__ == "__main__":
    main()
