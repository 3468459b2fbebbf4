"""TSN training time per epoch as a ratio to Naive's, same model, stream and process.

Usage: ``python benchmarks/time_ratio.py [--scenario permuted_fashion|permuted_digits]
[--threads 1]``. Runs Naive, Naive with the package's tensor minibatches and TSN alternately
(to share any machine drift) with a fixed torch thread count and reports the min and median
seconds per epoch of each and the ratios of the medians (and of the minima). TSN reads its
minibatches by indexing whole tensors by default (``tensor_batches=True``), which Naive does
not, so TSN / Naive also measures Avalanche's data loader; TSN / (Naive with
:class:`~avalanche_tsn.plugins.TensorBatchesPlugin`) is the training step's own cost.
``--flush-denormal`` reads subnormal floats as zero: on x86 CPUs they slow matrix products,
and the plain model's training meets more of them than TSN's, which flatters the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

from avalanche_tsn import TSNStrategy
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import permuted_digits, permuted_fashion_mnist
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.plugins import TensorBatchesPlugin

KINDS = ("naive", "naive_tensor", "tsn")


class EpochTimer(SupervisedPlugin):
    """Wall time of every training epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.device.type == "cuda":
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def after_training_epoch(self, strategy, **kwargs):
        if strategy.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def run(kind: str, benchmark, input_size: int, args) -> list[float]:
    torch.manual_seed(args.seed)
    model = MultiHeadMLP(input_size=input_size, hidden_sizes=(100, 100))
    timer = EpochTimer()
    common = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train_mb_size=args.mb,
        train_epochs=args.epochs,
        device=args.device,
        plugins=[timer, TensorBatchesPlugin()] if kind == "naive_tensor" else [timer],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    # Pruning and quantization run after training; switching them off also keeps the
    # validation split off, so both strategies train on exactly the same data.
    if kind == "tsn":
        strategy = TSNStrategy(**common, prune=False, quantize=False)
    else:
        strategy = Naive(**common)
    for exp in list(benchmark.train_stream)[: args.tasks]:
        strategy.train(exp, eval_streams=[])
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="permuted_fashion")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mb", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True): subnormal floats read as zero (x86 CPUs)",
    )
    parser.add_argument("--json", help="write the result here too")
    show_defaults(parser)
    args = parser.parse_args()
    # On 2 shared cores the default thread count makes epoch times swing by 10x.
    torch.set_num_threads(args.threads)
    # Subnormal floats slow the CPU's matrix products; the plain model meets more of them.
    flushing = torch.set_flush_denormal(True) if args.flush_denormal else False
    if args.scenario == "permuted_fashion":
        benchmark, size = permuted_fashion_mnist(args.tasks, seed=args.seed), 784
    elif args.scenario == "permuted_digits":
        benchmark, size = permuted_digits(args.tasks, seed=args.seed), 64
    else:
        parser.error("--scenario must be permuted_fashion or permuted_digits")
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for _ in range(args.repeats):
            for kind in KINDS:
                times[kind] += run(kind, benchmark, size, args)
    finally:
        if flushing:  # a process-wide switch: leave it as it was (off) for the caller
            torch.set_flush_denormal(False)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    result = {
        "scenario": args.scenario,
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "flush_denormal": flushing,
        "epochs_timed": {k: len(v) for k, v in times.items()},
        **{
            f"{k}_s_per_epoch": {"min": round(low[k], 3), "median": round(med[k], 3)} for k in KINDS
        },
        "ratio": round(med["tsn"] / med["naive"], 3),
        "ratio_of_minima": round(low["tsn"] / low["naive"], 3),
        "ratio_same_minibatches": round(med["tsn"] / med["naive_tensor"], 3),
        "ratio_same_minibatches_of_minima": round(low["tsn"] / low["naive_tensor"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
