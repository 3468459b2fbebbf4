"""TinySubNets on several processes: ``torchrun`` with Avalanche's DistributedHelper.

Run: ``torchrun --standalone --nproc_per_node 2 examples/distributed.py`` (permuted digits,
scikit-learn's bundled data, no download; gloo on the CPU, NCCL with ``--device cuda`` and one
GPU per process). Each rank trains on its share of every experience; gradients are averaged
by DDP, which the strategy builds around each experience itself; every rank ends each task
with the same model (checked by a hash), evaluates the whole test stream, and rank 0 alone
writes the compact export and prints the summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_tsn import TSNStrategy
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import permuted_digits
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.plugins import TaskProgressPlugin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3, help="permuted-digits tasks")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per task")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--minibatch", type=int, default=32, help="per-rank minibatch")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and model")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    show_defaults(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda"
    # the timeout of a collective is torch's (30 minutes for gloo); a failure on one rank
    # stops every rank at once without waiting for it
    DistributedHelper.init_distributed(args.seed, backend=None, use_cuda=use_cuda)
    main_rank = DistributedHelper.is_main_process
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format=f"[rank {DistributedHelper.rank}] %(message)s",
        stream=sys.stdout,
    )
    # Avalanche warns of an evaluator without loggers; the summary prints what it records
    warnings.filterwarnings("ignore", message="No loggers specified")
    device = DistributedHelper.make_device()
    bm = permuted_digits(args.tasks, seed=args.seed)
    model = MultiHeadMLP(64, (100, 100), 10)
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        train_mb_size=args.minibatch,
        train_epochs=args.epochs,
        eval_mb_size=256,
        device=device,
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True), bwt_metrics(stream=True), loggers=[]
        ),
        plugins=[TaskProgressPlugin()],
    )
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    results = strategy.eval(bm.test_stream)
    with tempfile.TemporaryDirectory() as folder:
        written = strategy.export(Path(folder) / "model.tsn")
    if main_rank:
        acc = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/"))
        bwt = results["StreamBWT/eval_phase/test_stream"]
        world = DistributedHelper.world_size
        print(f"ranks: {world}, tasks: {args.tasks}, per-rank minibatch {args.minibatch}")
        print(f"stream accuracy: {acc:.4f}, backward transfer: {bwt:+.4f}")
        print(f"capacity: {strategy.capacity_report().percent:.2f}% of the dense model")
        print(f"compact export: {written} bytes")


if __name__ == "__main__":
    main()
