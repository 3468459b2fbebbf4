"""Resume a TSN run from an Avalanche checkpoint (``avalanche.checkpointing``).

Run ``python examples/checkpoint_resume.py --stop-after 1`` (it stops after experience 1, as a
crash would), then ``python examples/checkpoint_resume.py``: the second run resumes at
experience 2 and ends exactly where an uninterrupted run ends (the script prints a digest of
the final model's outputs; compare it with a run on a fresh checkpoint path).

Importing ``avalanche_tsn`` also makes Avalanche's ``save_checkpoint`` work for every other
strategy in the same process (with torch >= 2.1 it fails without it: torch.optim hides its
submodules from dill).
"""

from __future__ import annotations

import argparse
import hashlib

import torch
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_tsn import TSNStrategy
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import permuted_digits
from avalanche_tsn.models import MultiHeadMLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="tsn_checkpoint.pkl")
    parser.add_argument("--stop-after", type=int, default=-1, help="experience to stop after")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    show_defaults(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    benchmark = permuted_digits(args.tasks, seed=0)
    model = MultiHeadMLP(input_size=64, hidden_sizes=(100, 100))
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train_mb_size=32,
        train_epochs=args.epochs,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    # Either a fresh strategy and 0, or the checkpointed one and the next experience's index.
    strategy, start = maybe_load_checkpoint(strategy, args.checkpoint)
    if start:
        print(f"resumed from {args.checkpoint} at experience {start}")
    for experience in benchmark.train_stream[start:]:
        # Seeding per experience makes a resumed run draw what an uninterrupted one draws.
        torch.manual_seed(100 + experience.current_experience)
        strategy.train(experience, eval_streams=[])
        save_checkpoint(strategy, args.checkpoint)
        print(f"experience {experience.current_experience} trained and checkpointed")
        if experience.current_experience == args.stop_after:
            return
    results = strategy.eval(benchmark.test_stream)
    x = torch.stack([benchmark.test_stream[0].dataset[i][0] for i in range(64)])
    digest = hashlib.sha256()
    with torch.no_grad():
        for t in range(args.tasks):
            digest.update(strategy.model.eval()(x, t).numpy().tobytes())
    key = "Top1_Acc_Exp/eval_phase/test_stream/Task{0:03d}/Exp{0:03d}"
    acc = [results[key.format(t)] for t in range(args.tasks)]
    print("accuracy per task:", ", ".join(f"{100 * a:.2f}%" for a in acc))
    print("outputs digest:", digest.hexdigest()[:16])


if __name__ == "__main__":
    main()
