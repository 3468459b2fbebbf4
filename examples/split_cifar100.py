"""TinySubNets on split CIFAR-100 with the paper code's settings.

Scenario: 10 tasks of 10 classes, reduced AlexNet.
Needs the data on disk (nothing is downloaded):
``python examples/split_cifar100.py --dataset-root <folder>``; meant for a GPU (``--device cuda``,
the default when one is present). Epochs, minibatch, optimiser, learning rate, validation
fraction and pruning follow the paper's public code (README, "Benchmarks and examples"). The
learning rate halves after 6 epochs without improvement (of the training loss here; the
reference scripts watch a validation split and restore the best epoch).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forward_transfer_metrics,
)
from avalanche.logging import InteractiveLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

from avalanche_tsn import TSNStrategy
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import require_data, split_cifar100
from avalanche_tsn.metrics import capacity_metrics
from avalanche_tsn.models import ReducedAlexNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-root", required=True)
    parser.add_argument(
        "--tasks", type=int, default=None, help="train only the first N tasks (a smoke run)"
    )
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", default="results/split_cifar100", help="folder for the log and the compact model"
    )
    show_defaults(parser)
    args = parser.parse_args()
    try:  # before any work: the loader's message alone, exit status 2
        require_data("cifar100", args.dataset_root)
    except FileNotFoundError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "split_cifar100.log", "w")  # noqa: SIM115 -- the text logger writes to it throughout
    torch.manual_seed(args.seed)

    benchmark = split_cifar100(10, seed=args.seed, dataset_root=args.dataset_root)
    model = ReducedAlexNet(n_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=6, min_lr=1e-5
    )
    strategy = TSNStrategy(
        model=model,
        optimizer=optimizer,
        train_mb_size=1024,
        train_epochs=args.epochs,
        eval_mb_size=256,
        device=args.device,
        plugins=[LRSchedulerPlugin(scheduler, metric="train_loss")],
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            forward_transfer_metrics(experience=True, stream=True),
            capacity_metrics(),
            loggers=[InteractiveLogger(), TextLogger(log)],
        ),
        eval_every=0,
        sparsity=0.5,
        validation_fraction=0.05,
    )
    train = list(benchmark.train_stream)[: args.tasks]
    test = list(benchmark.test_stream)[: args.tasks]
    for experience in train:
        strategy.train(experience, eval_streams=[test])
    strategy.eval(test)
    print(strategy.capacity_report().table())
    export = out / "split_cifar100.tsn"
    print(f"export: {strategy.export(export)} bytes in {export}")
    log.close()


if __name__ == "__main__":
    main()
