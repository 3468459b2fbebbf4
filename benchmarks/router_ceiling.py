"""How far the learned task router can go on TSN's frozen subnetworks: the ceiling of issue 26.

Usage::

    python benchmarks/router_ceiling.py --scenario split_fashion_ci --seeds 0,1,2 --threads 2

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) infers a test sample's task on
class-incremental streams with a router over the frozen subnetworks' features
(:mod:`avalanche_tsn.router`), fitted on the task memory. This script trains TSN as the
harness does (``task_inference="router"``), then fits routers on the final model's frozen
features from other data, to tell the memory's limit from the features' limit:

- ``as trained``: the router the strategy fitted (task memory with noisy copies, plus the last
  task's training data), with the confidence term inference adds: the strategy's own figure;
- ``full training data``: every task's whole training set, which no run keeps (a ceiling);
- the same with a larger router (``hidden=32``, 1000 steps, weight decay 1e-3), on the full
  training data and on the memory;
- ``+ Mahalanobis``: the trained router plus each task's standardised Mahalanobis distance to
  its own class means under its subnetwork (class means and covariance of its full training
  features, as TPL's likelihood-ratio score uses them; Lin et al., ICLR 2024);
- ``joint``: not TSN at all but the harness's Joint row (the same MLP with one 10-way head,
  trained on every task's data at once), whose task identification is the share of test
  samples whose predicted class belongs to their own task: what a model that saw all the data
  together gets, the reference for a task-inference goal.

Each row: share of test samples routed to their own task and the stream's accuracy, mean
(min-max) over seeds (each a class order). The subnetworks are the same in every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avalanche_tsn._cli import show_defaults  # noqa: E402
from avalanche_tsn.inference import _widen  # noqa: E402
from avalanche_tsn.router import RouterSettings, TaskRouter, fit_samples  # noqa: E402
from avalanche_tsn.similarity import feature_module, task_features  # noqa: E402
from avalanche_tsn.streams import experience_classes  # noqa: E402
from benchmarks import _report, harness  # noqa: E402

LARGE = {"hidden": 32, "steps": 1000, "weight_decay": 1e-3}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenario", choices=("split_digits_ci", "split_fashion_ci"), default="split_digits_ci"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each is a class order")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--subset", type=int, default=None, help="samples per experience (smoke)")
    p.add_argument("--epochs", type=int, default=None, help="(default: the scenario's)")
    p.add_argument("--write", default=None, help="Markdown file to update (default: print)")
    show_defaults(p)
    return p.parse_args(argv)


def _stack(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=2048):
        xs.append(batch[0])
        ys.append(batch[1])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _features(model, label: int, x: Tensor) -> Tensor:
    return torch.cat([task_features(model, label, x[i : i + 2048]) for i in range(0, len(x), 2048)])


def _hargs(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    argv = ["--scenario", args.scenario, "--seed", str(seed), "--in-process", "--quiet"]
    argv += ["--threads", str(args.threads), "--task-inference", "router"]
    argv += [] if args.subset is None else ["--subset", str(args.subset)]
    argv += [] if args.epochs is None else ["--epochs", str(args.epochs)]
    return harness.parse(argv)


def _train(args: argparse.Namespace, seed: int) -> tuple[Any, Any, dict]:
    """TSN trained by the harness on ``seed``: its model, the stream and the harness's row."""
    hargs = _hargs(args, seed)
    sc = harness.SCENARIOS[args.scenario]
    torch.manual_seed(seed)
    stream = harness._subset(sc.build(hargs), hargs.subset, True)
    built: list = []
    row = harness.run_one("tsn", hargs, stream, strategies=built)
    return built[0].tsn_model.eval(), stream, row


def _joint(args: argparse.Namespace, seed: int, stream, x: Tensor, y: Tensor, t: Tensor):
    """Joint's (task identification, accuracy) on the test samples, and its harness row's ACC."""
    built: list = []
    row = harness.run_one("joint", _hargs(args, seed), stream, strategies=built)
    model = built[0].model.eval()
    task_of = torch.full((int(y.max()) + 1,), -1)
    for i, e in enumerate(stream.train_stream):
        task_of[experience_classes(e)] = i
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 2048]) for i in range(0, len(x), 2048)]).argmax(1)
    pred = pred.cpu()
    inferred = float((task_of[pred] == t).float().mean())
    return (inferred, float((pred == y).float().mean())), row["ACC"]


def rows_for_seed(args: argparse.Namespace, seed: int) -> dict[str, tuple[float | None, float]]:
    """Each row's (task inference, accuracy) on one seed, plus the harness's own figures."""
    model, stream, row = _train(args, seed)
    labels = model.trained_tasks()
    trains = [_stack(e.dataset.eval()) for e in stream.train_stream]
    tests = [_stack(e.dataset.eval()) for e in stream.test_stream]
    x_test = torch.cat([x for x, _ in tests])
    y_test = torch.cat([y for _, y in tests])
    t_test = torch.cat([torch.full((len(x),), i) for i, (x, _) in enumerate(tests)])
    # the inference module's own forward: every task's outputs and features, in one pass
    feats, outs = [], []
    for label in labels:
        hook = feature_module(model).register_forward_pre_hook(
            lambda _m, a: feats.append(a[0].flatten(1).float())
        )
        try:
            with torch.no_grad():
                outs.append(model(x_test, label))
        finally:
            hook.remove()
    outputs = _widen(outs)
    confidence = torch.log_softmax(outputs.double(), 2).max(2).values

    def figures(score: Tensor) -> tuple[float, float]:
        best = score.argmax(0)
        pred = outputs[best, torch.arange(len(best))].argmax(1)
        return float((best == t_test).float().mean()), float((pred == y_test).float().mean())

    def refit(samples: list[Tensor], memories: list[bool], settings: RouterSettings) -> Tensor:
        x, targets = fit_samples(samples, memories, settings)
        router = TaskRouter()
        router.fit([_features(model, t, x) for t in labels], targets, labels, settings)
        return torch.log_softmax(router.scores(feats).T.double(), 0)

    # what the plugin fitted on after the last task: the memories, the last task's data
    memory = [model.memory(t) for t in labels[:-1]] + [trains[-1][0]]
    is_memory = [True] * (len(labels) - 1) + [False]
    full = [x for x, _ in trains]
    default, large = RouterSettings(), RouterSettings(**LARGE)
    trained = torch.log_softmax(model.task_router.scores(feats).T.double(), 0)
    joint, joint_harness = _joint(args, seed, stream, x_test, y_test, t_test)
    return {
        "as trained (memory + copies)": figures(trained + confidence),
        "harness figures (Avalanche's metrics)": (row["task_inference_acc"], row["ACC"]),
        "refitted on memory + copies (check)": figures(
            refit(memory, is_memory, default) + confidence
        ),
        "full training data (ceiling)": figures(
            refit(full, [False] * len(full), default) + confidence
        ),
        "full training data, larger router": figures(
            refit(full, [False] * len(full), large) + confidence
        ),
        "memory + copies, larger router": figures(refit(memory, is_memory, large) + confidence),
        "as trained + Mahalanobis": figures(
            trained + confidence - _mahalanobis(model, labels, trains, feats)
        ),
        "joint (not TSN: one model, all data at once)": joint,
        "joint, harness figure (Avalanche's metric)": (None, joint_harness),
    }


def _mahalanobis(model, labels: list[int], trains: list, feats: list[Tensor]) -> Tensor:
    """Each task's Mahalanobis distance to its nearest class mean, standardised on its data."""
    scores = []
    for i, label in enumerate(labels):
        f = _features(model, label, trains[i][0]).double()
        y = trains[i][1]
        classes = y.unique()
        means = torch.stack([f[y == c].mean(0) for c in classes])
        centred = torch.cat([f[y == c] - m for c, m in zip(classes, means, strict=True)])
        cov = centred.T @ centred / len(centred)
        eye = torch.eye(len(cov), dtype=cov.dtype)
        precision = torch.linalg.inv(cov + 1e-3 * cov.diagonal().mean() * eye)

        def distance(z: Tensor, means: Tensor = means, precision: Tensor = precision) -> Tensor:
            d = z.double()[:, None, :] - means[None]
            return torch.einsum("ncd,de,nce->nc", d, precision, d).min(1).values

        own = distance(f)
        scores.append((distance(feats[i]) - own.mean()) / own.std())
    return torch.stack(scores)


def table(by_seed: dict[int, dict[str, tuple[float | None, float]]], cmd: str) -> str:
    """The Markdown table of every row, mean (min-max) over seeds."""
    names = next(iter(by_seed.values())).keys()
    spread: Callable[[list], str] = lambda v: (  # noqa: E731
        "-"
        if None in v
        else f"{100 * statistics.mean(v):.1f} ({100 * min(v):.1f}-{100 * max(v):.1f})"
    )
    lines = [
        f"`{cmd}`, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU.",
        "",
        "| router | task inferred right % | ACC % |",
        "|---|---|---|",
    ]
    for name in names:
        inf = [rows[name][0] for rows in by_seed.values()]
        acc = [rows[name][1] for rows in by_seed.values()]
        lines.append(f"| {name} | {spread(inf)} | {spread(acc)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[int, dict[str, tuple[float | None, float]]]:
    """Run every seed and print (or write) the table."""
    args = parse(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    torch.set_num_threads(args.threads)
    by_seed = {seed: rows_for_seed(args, seed) for seed in seeds}
    cmd = "python benchmarks/router_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    _report.publish(table(by_seed, cmd), args.write, f"router_ceiling_{args.scenario}")
    return by_seed


if __name__ == "__main__":
    main()
