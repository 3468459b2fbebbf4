"""Quickstart: TinySubNets on permuted digits (scikit-learn's bundled data, no download).

Run: ``python examples/quickstart.py`` (add ``--device cuda`` on a GPU). It shows one progress
bar per task and the stage lines (pruning, quantization) in order, then the summary;
``--quiet`` prints the summary alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forward_transfer_metrics,
)
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import DataLoader

from avalanche_tsn import TSNStrategy, load_compressed
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import permuted_digits
from avalanche_tsn.metrics import capacity_metrics
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.plugins import TaskProgressPlugin
from avalanche_tsn.tiny import resident_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5, help="permuted-digits tasks")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task")
    parser.add_argument("--sparsity", type=float, default=0.5, help="mask sparsity")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=device, help="cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    show_defaults(parser)
    args = parser.parse_args()
    # stage lines on standard output, so that they stay in order with the summary when piped
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Avalanche warns of an evaluator without loggers; the summary prints what it records
    warnings.filterwarnings("ignore", message="No loggers specified")

    benchmark = permuted_digits(args.tasks, seed=args.seed)
    model = MultiHeadMLP(input_size=64, hidden_sizes=(100, 100), n_classes=10)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        forward_transfer_metrics(experience=True, stream=True),
        capacity_metrics(),
        loggers=[],  # the summary below prints what they record
    )
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        train_mb_size=32,
        train_epochs=args.epochs,
        eval_mb_size=256,
        device=args.device,
        evaluator=evaluator,
        eval_every=0,
        sparsity=args.sparsity,
        plugins=[TaskProgressPlugin(disable=True if args.quiet else None)],
    )
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[benchmark.test_stream])
    results = strategy.eval(benchmark.test_stream)

    print(f"\n{args.tasks} tasks, {args.epochs} epochs each, {torch.get_num_threads()} threads")
    print("Per-task test accuracy after the whole stream:")
    for key in sorted(results):
        if key.startswith("Top1_Acc_Exp/"):
            print(f"  task {key.split('/Task')[1][:3]}: {100 * results[key]:6.2f}%")
    acc = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/"))
    print(f"ACC {100 * acc:.2f}%")
    print(f"BWT {100 * results['StreamBWT/eval_phase/test_stream']:+.2f}")
    print(f"FWT {100 * results['StreamForwardTransfer/eval_phase/test_stream']:+.2f}")
    print("\nCapacity (bits):")
    report = strategy.capacity_report()
    print(report.table())
    print("\nCompute per sample (weights at their own bits, 8-bit activations):")
    print(strategy.compute_report(act_bits=8).table())
    print("\nMean test accuracy with quantized activations:")
    for bits in (4, 8, 16, None):
        acc_bits = strategy.quantized_accuracy(benchmark.test_stream, bits)
        mean = 100 * sum(acc_bits.values()) / len(acc_bits)
        print(f"  {'float' if bits is None else f'{bits:>2} bits'}: {mean:6.2f}%")

    # The compact export holds what the report counts; loading it gives the same predictions.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tsn_digits.tsn"
        size = strategy.export(path)
        tiny = load_compressed(path, MultiHeadMLP(input_size=64, hidden_sizes=(100, 100)))
        coded = load_compressed(
            path, MultiHeadMLP(input_size=64, hidden_sizes=(100, 100)), dequantize=False
        )
    tiny, coded = tiny.to(args.device), coded.to(args.device)
    x, _, t = next(iter(DataLoader(benchmark.test_stream[0].dataset, batch_size=512)))
    x, t = x.to(args.device), t.to(args.device)
    live = strategy.model.eval()
    with torch.no_grad():
        same = torch.equal(tiny(x, t), live(x, t))
        same_coded = torch.equal(coded(x, t), tiny(x, t))
    print(
        f"\nExport: {size} bytes on disk (report: {report.total_bits // 8} bytes); "
        f"loaded model predicts identically: {same}; integer-code model "
        f"({resident_bytes(coded):,} bytes in memory against {resident_bytes(tiny):,}) "
        f"predicts identically: {same_coded}"
    )


if __name__ == "__main__":
    main()
