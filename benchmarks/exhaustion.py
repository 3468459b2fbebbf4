"""Capacity exhaustion: a long stream on a small backbone, with and without automatic banks.

Usage: ``python benchmarks/exhaustion.py [--tasks 40] [--sparsity 0.1] [--out results/x.json]``.

Trains TSN on permuted digits (embedded, no download) with a 64-32-32 MLP and one head per
task, at a low sparsity so that the backbone's free weights run out after a few tasks. Runs
the same stream twice in one process: once in one bank (today's default), once with
``new_bank_below`` (a fresh bank when the task's bank has less than that fraction free in some
layer). Prints per task the free fraction it started with, its bank and its final accuracy,
then ACC, BWT and capacity of both runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

from avalanche_tsn import TSNStrategy
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import permuted_digits
from avalanche_tsn.models import MultiHeadMLP


class FreeAtStart(SupervisedPlugin):
    """Smallest free fraction over layers of the bank each task starts in."""

    def __init__(self) -> None:
        super().__init__()
        self.free: list[float] = []

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.clock.train_exp_epochs == 0:
            self.free.append(min(strategy.model.free_fractions().values()))


def run(args, new_bank_below: float | None) -> dict:
    torch.manual_seed(args.seed)
    bm = permuted_digits(args.tasks, seed=args.seed)
    model = MultiHeadMLP(input_size=64, hidden_sizes=(32, 32))
    free = FreeAtStart()
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        train_mb_size=args.mb,
        train_epochs=args.epochs,
        eval_mb_size=512,
        plugins=[free],
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            bwt_metrics(experience=False, stream=True),
            loggers=[],
        ),
        sparsity=args.sparsity,
        new_bank_below=new_bank_below,
    )
    start = time.perf_counter()
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    seconds = time.perf_counter() - start
    res = strategy.eval(bm.test_stream)
    per_task = [
        res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"]
        for t in range(args.tasks)
    ]
    report = strategy.capacity_report()
    tsn = strategy.tsn_model
    return {
        "new_bank_below": new_bank_below,
        "acc": 100 * sum(per_task) / len(per_task),
        "bwt": 100 * res["StreamBWT/eval_phase/test_stream"],
        "capacity_percent": report.percent,
        "banks": tsn.n_banks,
        "per_task_acc": [round(100 * a, 2) for a in per_task],
        "free_at_start": [round(f, 4) for f in free.free],
        "bank_of_task": [tsn.bank_of(t) for t in range(args.tasks)],
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--sparsity", type=float, default=0.1)
    parser.add_argument("--new-bank-below", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the results as JSON here too")
    show_defaults(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("avalanche_tsn").setLevel(logging.ERROR)  # one warning per task
    results = [run(args, None), run(args, args.new_bank_below)]
    print(f"threads {torch.get_num_threads()}, {args.tasks} tasks, sparsity {args.sparsity}")
    print("task | free at start, bank, acc (one bank) | free at start, bank, acc (auto banks)")
    for t in range(args.tasks):
        cells = [
            f"{100 * r['free_at_start'][t]:5.1f}% {r['bank_of_task'][t]:2d} "
            f"{r['per_task_acc'][t]:6.2f}"
            for r in results
        ]
        print(f"{t:4d} | {cells[0]} | {cells[1]}")
    for r in results:
        print(
            f"new_bank_below={r['new_bank_below']}: ACC {r['acc']:.2f}%, BWT {r['bwt']:+.2f}, "
            f"capacity {r['capacity_percent']:.2f}%, banks {r['banks']}, "
            f"training {r['train_seconds']} s"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
