"""Task-inference scores compared on one trained model (issue 14).

Trains TSN with task inference on class-incremental split digits (harness settings), then
scores every test sample under every task's subnetwork in several ways and prints the share
whose task is inferred right by each: entropy, the largest logit, and distances of the
sample's features (the heads' input) to the task's memory features (nearest memory sample
over the memory's median nearest-neighbour distance, as ``avalanche_tsn.inference`` does;
over the median pairwise distance; cosine similarity; a diagonal Gaussian).

Usage::

    python benchmarks/inference_scores.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

from avalanche_tsn._cli import show_defaults
from avalanche_tsn.inference import SPREAD_FLOOR  # noqa: E402
from avalanche_tsn.similarity import task_features  # noqa: E402


def _scales(memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gaps = torch.cdist(memory, memory)
    pairwise = gaps[~torch.eye(len(gaps), dtype=torch.bool)].median()
    gaps.fill_diagonal_(float("inf"))
    return gaps.min(1).values.median(), pairwise


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    show_defaults(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    args = harness.parse(["--scenario", "split_digits_ci", "--strategies", "tsn", "--quiet"])
    args.seed = a.seed
    sc = harness.SCENARIOS[args.scenario]
    bm = sc.build(args)
    strategy = harness._strategy("tsn", sc, args, len(bm.train_stream))
    with torch.enable_grad():
        for exp in bm.train_stream:
            strategy.train(exp, eval_streams=[])
    model = strategy.tsn_model.eval()
    tasks = model.trained_tasks()
    xs = [torch.stack([e.dataset[i][0] for i in range(len(e.dataset))]) for e in bm.test_stream]
    truth = torch.cat([torch.full((len(x),), k) for k, x in enumerate(xs)])
    x = torch.cat(xs)
    memory = {t: task_features(model, t, model.memory(t)).double() for t in tasks}
    feats = {t: task_features(model, t, x).double() for t in tasks}

    def share(scores: list[torch.Tensor]) -> float:
        return float((torch.stack(scores).argmax(0) == truth).double().mean())

    rows = {}
    nearest = {t: torch.cdist(feats[t], memory[t]).min(1).values for t in tasks}
    scales = {t: _scales(memory[t]) for t in tasks}
    rows["nearest memory / (nn scale + 1% spread) (the package's)"] = share(
        [-nearest[t] / (scales[t][0] + SPREAD_FLOOR * scales[t][1]) for t in tasks]
    )
    for floor in (0.0, 0.05, 0.1):  # the spread floor, against the package's SPREAD_FLOOR
        rows[f"nearest memory / (nn scale + {100 * floor:g}% spread)"] = share(
            [-nearest[t] / (scales[t][0] + floor * scales[t][1] + 1e-12) for t in tasks]
        )
    rows["nearest memory / median pairwise distance"] = share(
        [-nearest[t] / scales[t][1] for t in tasks]
    )
    rows["cosine similarity to the nearest memory sample"] = share(
        [
            (F.normalize(feats[t], dim=1) @ F.normalize(memory[t], dim=1).T).max(1).values
            for t in tasks
        ]
    )
    gauss = []
    for t in tasks:
        mean, var = memory[t].mean(0), memory[t].var(0)
        var = var + 0.1 * var.mean() + 1e-9
        gauss.append(-(((feats[t] - mean) ** 2) / var).mean(1))
    rows["diagonal Gaussian (mean z^2, variance floor 10%)"] = share(gauss)
    logp = [torch.log_softmax(model(x, t).double(), 1) for t in tasks]
    rows["lowest entropy"] = share([(lp.exp() * lp).sum(1) for lp in logp])
    rows["largest logit"] = share([model(x, t).max(1).values.double() for t in tasks])
    print(f"split digits, class-incremental, {len(tasks)} tasks, seed {a.seed}, {len(x)} samples")
    print("| score | task inferred right % |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {100 * value:.2f} |")


if __name__ == "__main__":
    main()
