"""Run a scenario with TSN and report ACC, BWT, FWT and the accuracy matrix as JSON.

Usage: ``python benchmarks/harness.py --scenario permuted_fashion --out results/pf``.
Scenarios: ``permuted_digits`` (embedded), ``permuted_fashion`` (10 tasks) and
``split_fashion`` (5 tasks) from local idx files (``--dataset-root``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forward_transfer_metrics,
)
from avalanche.logging import InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin

from avalanche_tsn import TSNStrategy
from avalanche_tsn.datasets import permuted_digits, permuted_fashion_mnist, split_fashion_mnist
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.plugins import PruningPlugin, QuantizationPlugin, TaskSimilarityPlugin

SCENARIOS = {
    "permuted_digits": lambda a: (permuted_digits(a.tasks or 5, seed=a.seed), 64),
    "permuted_fashion": lambda a: (
        permuted_fashion_mnist(a.tasks or 10, seed=a.seed, dataset_root=a.dataset_root),
        784,
    ),
    "split_fashion": lambda a: (
        split_fashion_mnist(a.tasks or 5, seed=a.seed, dataset_root=a.dataset_root),
        784,
    ),
}


def accuracy_matrix(evaluator: EvaluationPlugin, n: int) -> list[list[float]]:
    """Row i: test accuracy on every task after training task i."""
    history = evaluator.get_all_metrics()
    rows = []
    for j in range(n):
        key = next(
            k for k in history if k.startswith("Top1_Acc_Exp/") and k.endswith(f"Exp{j:03d}")
        )
        # one value per eval call: the first is the initial eval, then one after each task
        rows.append(history[key][1][1 : n + 1])
    return [[rows[j][i] for j in range(n)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="permuted_digits")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mb", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-prune", action="store_true")
    parser.add_argument("--no-quantize", action="store_true")
    parser.add_argument("--no-quant-heads", action="store_true")
    parser.add_argument("--task-matching", action="store_true")
    parser.add_argument("--kl-threshold", type=float, default=1.0)
    parser.add_argument("--memory-size", type=int, default=100)
    parser.add_argument("--dataset-root", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    benchmark, size = SCENARIOS[args.scenario](args)
    n = len(benchmark.train_stream)
    model = MultiHeadMLP(input_size=size, hidden_sizes=(100, 100))
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        forward_transfer_metrics(experience=True, stream=True),
        loggers=[InteractiveLogger()],
    )
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        train_mb_size=args.mb,
        train_epochs=args.epochs,
        eval_mb_size=1024,
        device=args.device,
        evaluator=evaluator,
        eval_every=0,
        sparsity=args.sparsity,
        prune=not args.no_prune,
        quantize=not args.no_quantize,
        quant_heads=not args.no_quant_heads,
        task_matching=args.task_matching,
        kl_threshold=args.kl_threshold,
        memory_size=args.memory_size,
    )
    t0 = time.perf_counter()
    for exp in benchmark.train_stream:
        strategy.train(exp, eval_streams=[benchmark.test_stream])
    seconds = time.perf_counter() - t0
    res = strategy.eval(benchmark.test_stream)
    result = {
        "scenario": args.scenario,
        "args": vars(args),
        "ACC": next(v for k, v in res.items() if k.startswith("Top1_Acc_Stream/")),
        "BWT": res["StreamBWT/eval_phase/test_stream"],
        "FWT": res["StreamForwardTransfer/eval_phase/test_stream"],
        "train_seconds": round(seconds, 1),
        "accuracy_matrix": accuracy_matrix(evaluator, n),
    }
    report = strategy.capacity_report()
    prune = next((p for p in strategy.plugins if isinstance(p, PruningPlugin)), None)
    quant = next((p for p in strategy.plugins if isinstance(p, QuantizationPlugin)), None)
    result["capacity_percent"] = report.percent
    result["capacity_backbone_split"] = report.backbone_split()
    result["capacity_tasks"] = [vars(t) | {"total_bits": t.total_bits} for t in report.tasks]
    result["pruning"] = [vars(r) for r in prune.records] if prune else None
    result["bits"] = quant.bits if quant else None
    result["head_bits"] = quant.head_bits if quant else None
    result["capacity_total_bits"] = report.total_bits
    result["capacity_with_memory_percent"] = report.percent_with_memory
    sim = next((p for p in strategy.plugins if isinstance(p, TaskSimilarityPlugin)), None)
    if sim is not None:
        result["divergences"] = {str(k): v for k, v in sim.divergences.items()}
        result["banks"] = [
            strategy.tsn_model.bank_of(t) for t in strategy.tsn_model.trained_tasks()
        ]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result["export_bytes"] = strategy.export(Path(args.out) / "model.tsn")
    print(report.table())
    summary = {
        k: result[k]
        for k in ("scenario", "ACC", "BWT", "FWT", "train_seconds", "capacity_percent", "bits")
        + ("head_bits", "capacity_total_bits", "export_bytes", "banks")
        if k in result
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
