"""A long stream: TSN and PackNet on 40 tasks, per task capacity, free weights and accuracy.

Usage: ``python benchmarks/long_stream.py [--tasks 40] [--epochs 5] [--new-bank-below 0.05]``.

Runs the harness's ``permuted_digits`` scenario (embedded data) with TSN and Avalanche's
PackNet on the same stream, backbone width, optimizer, epochs and seed, in this process, and
prints one Markdown table: for each task its final test accuracy under both strategies, and
for TSN the bits it added, the smallest free fraction of its bank's layers when it started,
and its bank. PackNet's capacity is a fixed 100% plus its per-weight task index.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avalanche_tsn._cli import show_defaults
from benchmarks import harness  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--new-bank-below", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    show_defaults(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    argv = [
        "--scenario", "permuted_digits", "--tasks", str(args.tasks), "--epochs",
        str(args.epochs), "--in-process", "--quiet", "--device", "cpu",
    ]  # fmt: skip
    if args.new_bank_below is not None:
        argv += ["--new-bank-below", str(args.new_bank_below)]
    logging.getLogger("avalanche_tsn").setLevel(logging.ERROR)  # one warning a task
    hargs = harness.parse(argv + ["--strategies", "tsn,packnet"])
    tsn, packnet = (harness.run_one(name, hargs) for name in ("tsn", "packnet"))
    last_tsn, last_pn = tsn["accuracy_matrix"][-1], packnet["accuracy_matrix"][-1]
    dense = 32 * (64 * 100 + 100 * 100)  # bits of the two hidden layers, for scale
    print(
        f"permuted digits, {args.tasks} tasks, MLP 64-100-100, {args.epochs} epochs, "
        f"{torch.get_num_threads()} thread(s); TSN ACC {100 * tsn['ACC']:.2f}% "
        f"(BWT {100 * tsn['BWT']:+.2f}), capacity {tsn['capacity_percent']:.2f}%; PackNet "
        f"ACC {100 * packnet['ACC']:.2f}% (BWT {100 * packnet['BWT']:+.2f}), capacity "
        f"{packnet['capacity_percent']:.2f}%"
    )
    print()
    print("| task | TSN acc % | PackNet acc % | TSN bits added | TSN free at start % | bank |")
    print("|---|---|---|---|---|---|")
    for t in range(args.tasks):
        bits = tsn["capacity_tasks"][t]["total_bits"]
        print(
            f"| {t} | {100 * last_tsn[t]:.2f} | {100 * last_pn[t]:.2f} | {bits:,} "
            f"({100 * bits / dense:.2f}% of the dense hidden layers) | "
            f"{100 * tsn['free_at_start'][t]:.1f} | {tsn['banks'][t]} |"
        )


if __name__ == "__main__":
    main()
