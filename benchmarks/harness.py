"""Run a scenario with TSN and Avalanche's baselines side by side; write tables and plots.

Usage::

    python benchmarks/harness.py --scenario split_fashion --out results/split_fashion
    python benchmarks/harness.py --scenario permuted_digits --strategies tsn,naive

Every strategy trains the same backbone (same seed, epochs, minibatch and optimizer) on the
same stream. Writes ``results.json``, ``results.md``, ``accuracy_matrices.png`` and
``tsn_capacity.png`` into ``--out``. Each strategy runs in a fresh process so its peak memory
is its own (``--in-process`` runs them here, without a memory figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import resource
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forward_transfer_metrics,
)
from avalanche.logging import InteractiveLogger
from avalanche.models.packnet import PackNetModel
from avalanche.training import (
    DER,
    ER_ACE,
    EWC,
    ICaRL,
    LwF,
    Naive,
    PackNet,
    SynapticIntelligence,
)
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin
from avalanche.training.supervised import JointTraining
from tqdm import tqdm

from avalanche_tsn import AdaQPacknetStrategy, TSNStrategy, WSNStrategy, datasets
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.inference import INFERENCE_METHODS
from avalanche_tsn.metrics import capacity_metrics, task_inference_metrics
from avalanche_tsn.models import (
    MultiHeadMLP,
    ReducedAlexNet,
    ReducedResNet18,
    TinyNet,
    single_head,
)
from avalanche_tsn.plugins import (
    PruningPlugin,
    QuantizationPlugin,
    TaskSimilarityPlugin,
    TensorBatchesPlugin,
)
from avalanche_tsn.pruning import SEARCHES
from avalanche_tsn.router import DEFAULT_OOD_WEIGHT
from avalanche_tsn.task_memory import coded_bytes, level_codes

STRATEGIES = (
    "tsn", "wsn", "adaqpacknet", "naive", "ewc", "lwf", "si", "replay", "packnet", "joint",
)  # fmt: skip
#: strategies that keep a buffer of --replay-size samples (Avalanche's own implementations)
REHEARSAL = ("replay", "er_ace", "der", "icarl")
#: strategies that run on class-incremental streams (no task labels at test time)
CLASS_INCREMENTAL = ("tsn", "naive", "ewc", "lwf", "si", *REHEARSAL, "joint")
ADAQ_NOTE = (
    "AdaQPacknetStrategy: searched per-layer magnitude pruning (2 candidates, 1 search epoch "
    "each), one bit-width per task by codebook halving; capacity as this package counts it; "
    "as bits used per 32-bit weight slot (Ada-QPacknet's count, backbone weights only): "
    "{adaq:.2f}%"
)
WSN_NOTE = (
    "WSNStrategy: TSN's mask learning alone (no pruning, float32 weights); capacity as this "
    "package counts it (heads included); by WSN's own formula (backbone only): {wsn:.2f}%"
)
PACKNET_NOTE = (
    "biased MLP/conv layers without BatchNorm and one shared output layer packed per task: "
    "Avalanche 0.6's PackNetModel cannot run bias-free layers, BatchNorm or MultiHeadClassifier"
)


@dataclass(frozen=True)
class Scenario:
    """A stream and its backbones."""

    build: Callable[[argparse.Namespace], Any]
    model: Callable[[], torch.nn.Module]
    packnet_model: Callable[[], torch.nn.Module]
    epochs: int
    mb: int
    lr: float
    optimizer: str  # "sgd" (momentum from --momentum, default 0.9) or "adam"
    #: no task labels at test time: TSN infers tasks, the baselines run a single head
    class_incremental: bool = False
    #: the dataset read from disk (checked before anything is spawned), None if bundled
    data: str | None = None


def _mlp(size: int) -> tuple[Callable, Callable]:
    return (
        lambda: MultiHeadMLP(input_size=size, hidden_sizes=(100, 100)),
        lambda: single_head(size, (100, 100), 10),
    )


SCENARIOS: dict[str, Scenario] = {
    "permuted_digits": Scenario(
        lambda a: datasets.permuted_digits(a.tasks or 5, seed=a.seed),
        *_mlp(64),
        epochs=10,
        mb=32,
        lr=0.1,
        optimizer="sgd",
    ),
    "permuted_fashion": Scenario(
        lambda a: datasets.permuted_fashion_mnist(
            a.tasks or 10, seed=a.seed, dataset_root=a.dataset_root, standardize=a.standardize
        ),
        *_mlp(784),
        epochs=2,
        mb=128,
        lr=0.05,
        optimizer="sgd",
        data="fashion_mnist",
    ),
    "split_fashion": Scenario(
        lambda a: datasets.split_fashion_mnist(
            a.tasks or 5, seed=a.seed, dataset_root=a.dataset_root
        ),
        *_mlp(784),
        epochs=2,
        mb=128,
        lr=0.05,
        optimizer="sgd",
        data="fashion_mnist",
    ),
    "split_digits_ci": Scenario(
        lambda a: datasets.split_digits(a.tasks or 5, seed=a.seed, task_labels=False),
        *_mlp(64),
        epochs=10,
        mb=32,
        lr=0.1,
        optimizer="sgd",
        class_incremental=True,
    ),
    "split_fashion_ci": Scenario(
        lambda a: datasets.split_fashion_mnist(
            a.tasks or 5, seed=a.seed, dataset_root=a.dataset_root, task_labels=False
        ),
        *_mlp(784),
        epochs=2,
        mb=128,
        lr=0.05,
        optimizer="sgd",
        class_incremental=True,
        data="fashion_mnist",
    ),
    "permuted_mnist": Scenario(
        lambda a: datasets.permuted_mnist(a.tasks or 10, seed=a.seed, dataset_root=_root(a)),
        *_mlp(784),
        epochs=100,
        mb=256,
        lr=0.3,
        optimizer="sgd",
        data="mnist",
    ),
    "split_cifar100": Scenario(
        lambda a: datasets.split_cifar100(a.tasks or 10, seed=a.seed, dataset_root=_root(a)),
        lambda: ReducedAlexNet(10),
        lambda: ReducedAlexNet(10, norm=False, multihead=False),
        epochs=400,
        mb=1024,
        lr=1e-3,
        optimizer="adam",
        data="cifar100",
    ),
    "tiny_imagenet": Scenario(
        lambda a: datasets.split_tiny_imagenet(a.tasks or 40, seed=a.seed, dataset_root=_root(a)),
        lambda: TinyNet(5),
        lambda: TinyNet(5, norm=False, multihead=False),
        epochs=200,
        mb=256,
        lr=1e-2,
        optimizer="adam",
        data="tiny_imagenet",
    ),
    "five_datasets": Scenario(
        lambda a: datasets.five_datasets(dataset_root=_root(a)),
        lambda: ReducedResNet18(10),
        lambda: ReducedResNet18(10, norm=False, multihead=False),
        epochs=100,
        mb=64,
        lr=1e-3,
        optimizer="adam",
        data="five_datasets",
    ),
}


def _root(args: argparse.Namespace) -> str:
    if args.dataset_root is None:
        raise SystemExit(f"--scenario {args.scenario} needs --dataset-root <folder with the data>")
    return args.dataset_root


def _subset(benchmark, n: int | None, class_incremental: bool = False):
    """At most ``n`` training and test samples per experience (smoke runs)."""
    if n is None:
        return benchmark
    from avalanche.benchmarks import nc_benchmark

    g = torch.Generator().manual_seed(0)

    def cut(stream, keep=None):
        out = []
        for i, e in enumerate(stream):
            order = torch.randperm(len(e.dataset), generator=g)[:n].tolist()
            items = [e.dataset[j] for j in order]
            if keep is not None:  # test classes must be among the training ones
                items = [it for it in items if int(it[1]) in keep[i]]
            x = torch.stack([it[0] for it in items])
            out.append(datasets.TensorTaskDataset(x, torch.tensor([int(it[1]) for it in items])))
        return out

    train = cut(benchmark.train_stream)
    test = cut(benchmark.test_stream, [set(d.targets.tolist()) for d in train])
    return nc_benchmark(
        train,
        test,
        n_experiences=len(benchmark.train_stream),
        task_labels=not class_incremental,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=not class_incremental,
    )


def _evaluator(name: str, interactive: bool) -> EvaluationPlugin:
    metrics = [accuracy_metrics(experience=True, stream=True)]
    if name != "joint":  # one training phase: no backward or forward transfer
        metrics.append(bwt_metrics(experience=True, stream=True))
        metrics.append(forward_transfer_metrics(experience=True, stream=True))
    if name in ("tsn", "wsn", "adaqpacknet"):
        metrics.append(capacity_metrics())
        metrics += task_inference_metrics()
    return EvaluationPlugin(*metrics, loggers=[InteractiveLogger()] if interactive else [])


def _optimizer(kind: str, params, lr: float, momentum: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def _strategy(name: str, sc: Scenario, args: argparse.Namespace, n_tasks: int):
    torch.manual_seed(args.seed)
    # Class-incremental baselines share one 10-way head (the multi-head model would need
    # task labels); TSN keeps a head per task and infers which one.
    single = name == "packnet" or (sc.class_incremental and name != "tsn")
    model = sc.packnet_model() if single else sc.model()
    if name == "packnet":
        model = PackNetModel(model)
    common = dict(
        optimizer=_optimizer(
            args.optimizer or sc.optimizer, model.parameters(), args.lr or sc.lr, args.momentum
        ),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=args.mb or sc.mb,
        train_epochs=args.epochs or sc.epochs,
        eval_mb_size=1024,
        device=args.device,
        evaluator=_evaluator(name, not args.quiet),
    )
    fast = not args.avalanche_loader
    # TSN's strategies add the tensor fetch themselves (tensor_batches); the others get it
    # as a plugin, so that every row reads its data the same way.
    plugins = [TensorBatchesPlugin()] if fast else []
    if name == "wsn":
        return WSNStrategy(
            model=model, sparsity=args.sparsity, eval_every=0, tensor_batches=fast, **common
        )
    if name == "adaqpacknet":
        return AdaQPacknetStrategy(model=model, eval_every=0, tensor_batches=fast, **common)
    if name == "tsn":
        return TSNStrategy(
            model=model,
            plugins=[FreeAtStart()],
            tensor_batches=fast,
            new_bank_below=args.new_bank_below,
            sparsity=args.sparsity,
            prune=not args.no_prune,
            prune_search=args.prune_search,
            quantize=not args.no_quantize,
            quant_heads=not args.no_quant_heads,
            task_matching=args.task_matching,
            kl_threshold=args.kl_threshold,
            task_inference=args.task_inference if sc.class_incremental else None,
            memory_size=args.memory_size,
            ood_weight=args.ood_weight,
            eval_every=0,
            **common,
        )
    if name == "joint":
        return JointTraining(model=model, plugins=plugins, **common)
    if name in REHEARSAL[1:]:
        return _rehearsal(name, model, args, common)
    extra: dict[str, Any] = {
        "naive": {},
        "ewc": {"ewc_lambda": args.ewc_lambda},
        "lwf": {"alpha": args.lwf_alpha, "temperature": 2.0},
        "si": {"si_lambda": args.si_lambda},
        "packnet": {"post_prune_epochs": 1, "prune_proportion": args.packnet_prune},
        "replay": {},
    }[name]
    if name == "replay":  # Naive with Avalanche's reservoir replay buffer
        plugins = [ReplayPlugin(mem_size=args.replay_size), *plugins]
    cls = {
        "naive": Naive,
        "ewc": EWC,
        "lwf": LwF,
        "si": SynapticIntelligence,
        "packnet": PackNet,
        "replay": Naive,
    }
    return cls[name](model=model, eval_every=0, plugins=plugins, **extra, **common)


def _rehearsal(name: str, model: torch.nn.Module, args: argparse.Namespace, common: dict):
    """ER-ACE, DER or iCaRL as Avalanche 0.6 builds them, with a --replay-size buffer.

    They read minibatches with their own loaders (the buffer's included), so no tensor fetch.
    Avalanche's ER-ACE and DER replay nothing while their buffer holds fewer samples than one
    memory minibatch, and their class-balanced buffer rounds each class's share down (fewer
    samples than classes lost): the memory minibatch is the training minibatch, or the buffer
    less one sample per class where that is smaller.
    """
    mb = min(common["train_mb_size"], max(1, args.replay_size - _outputs(model)))
    if name == "er_ace":
        return ER_ACE(
            model=model, mem_size=args.replay_size, batch_size_mem=mb, eval_every=0, **common
        )
    if name == "der":
        return DER(
            model=model, mem_size=args.replay_size, batch_size_mem=mb, eval_every=0, **common
        )
    common = {k: v for k, v in common.items() if k != "criterion"}  # iCaRL brings its loss
    return ICaRL(
        feature_extractor=model[:-1],
        classifier=model[-1],
        memory_size=args.replay_size,
        buffer_transform=None,
        fixed_memory=True,
        eval_every=0,
        **common,
    )


def stored_bytes(
    name: str, strategy: Any, args: argparse.Namespace, samples: tuple[int, int]
) -> dict:
    """What a strategy stores after the stream, in bytes: model, samples, the rest.

    Samples are counted for everyone as TSN's task memory stores them (lossless codes into
    the data's distinct values: :func:`avalanche_tsn.task_memory.coded_bytes`), models and
    logits in float32; labels are not counted for anyone. TSN: its capacity (compressed
    model), its task memory and its task router; the others: the float32 model and their
    buffer (DER's also keeps each sample's logits).

    :param samples: values per sample and the training data's distinct values.
    """
    if name in ("tsn", "wsn", "adaqpacknet"):
        model = strategy.tsn_model
        return {
            "model": strategy.capacity_report().total_bits // 8,
            "samples": model.memory_bits() // 8,
            "other": model.task_router.bits() // 8,
        }
    net = strategy.model
    buffer = args.replay_size if name in REHEARSAL else 0
    logits = 4 * buffer * _outputs(net) if name == "der" else 0
    stored = coded_bytes(buffer, *samples)
    return {"model": _model_bits(net) // 8, "samples": stored, "other": logits}


#: sample_levels of each benchmark (a pass over its training data, once per benchmark)
_LEVELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sample_levels(benchmark: Any) -> tuple[int, int]:
    """Values per sample and distinct values (bit patterns) in the training stream's samples.

    :param benchmark: an Avalanche benchmark.
    """
    if benchmark not in _LEVELS:
        patterns: set[int] = set()
        batches = (
            batch[0]
            for exp in benchmark.train_stream
            for batch in torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=4096)
        )
        for x in batches:
            patterns.update(
                level_codes(x.to(torch.float32).contiguous())[0].view(torch.int32).tolist()
            )
            if len(patterns) > 1 << 16:  # float32 values then: no need to count further
                break
        _LEVELS[benchmark] = benchmark.train_stream[0].dataset[0][0].numel(), len(patterns)
    return _LEVELS[benchmark]


def _outputs(net: torch.nn.Module) -> int:
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


class FreeAtStart(SupervisedPlugin):
    """The smallest free fraction over layers of the bank each task starts training in."""

    def __init__(self) -> None:
        super().__init__()
        self.free: list[float] = []

    def before_training_epoch(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_epochs == 0:
            self.free.append(min(strategy.model.free_fractions().values()))


def accuracy_matrix(
    evaluator: EvaluationPlugin, n: int, after: list[int] | None
) -> list[list[float | None]]:
    """Row i: test accuracy on every task after training task i (one row for joint).

    :param after: the training iteration count at the end of each task (None for joint); a
        task not evaluated then is None.
    """
    history = evaluator.get_all_metrics()
    columns = []
    for j in range(n):
        key = next(
            k for k in history if k.startswith("Top1_Acc_Exp/") and k.endswith(f"Exp{j:03d}")
        )
        xs, values = history[key]
        if after is None:
            columns.append(values[-1:])
            continue
        # An evaluation before the next task runs at the same count: the first one is the
        # one right after the task.
        first = {}
        for x, v in zip(xs, values, strict=True):
            first.setdefault(x, v)
        columns.append([first.get(x) for x in after])
    return [[columns[j][i] for j in range(n)] for i in range(len(columns[0]))]


def _model_bits(model: torch.nn.Module, packnet_tasks: int = 0) -> int:
    bits = 32 * sum(p.numel() for p in model.parameters())
    if packnet_tasks:  # PackNet stores which task owns each prunable weight
        index_bits = math.ceil(math.log2(packnet_tasks + 1))
        bits += index_bits * sum(
            m.weight.numel()
            for m in model.modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        )
    return bits


def run_one(
    name: str, args: argparse.Namespace, benchmark: Any = None, strategies: list | None = None
) -> dict[str, Any]:
    """Train and evaluate one strategy; returns its row of the results.

    :param benchmark: the scenario's stream, built here if None.
    :param strategies: if given, the trained strategy is appended to it (for a caller that
        studies the trained model further).
    """
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sc = SCENARIOS[args.scenario]
    if benchmark is None:
        benchmark = _subset(sc.build(args), args.subset, sc.class_incremental)
    n = len(benchmark.train_stream)
    strategy = _strategy(name, sc, args, n)
    if strategies is not None:
        strategies.append(strategy)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    test = benchmark.test_stream
    after: list[int] | None = None
    if name == "joint":
        strategy.train(benchmark.train_stream)
        res = strategy.eval(test)
    elif args.eval == "full":
        # Avalanche's periodic evaluation: the whole test stream before and after each task
        after = []
        for exp in benchmark.train_stream:
            strategy.train(exp, eval_streams=[test])
            after.append(strategy.clock.train_iterations)
        res = strategy.eval(test)
    else:
        # What the metrics read: forward transfer needs every task at initialisation and
        # task i+1 after task i; the accuracy matrix's lower triangle (and backward transfer)
        # needs tasks 0..i after task i; the last evaluation covers the whole stream.
        after = []
        strategy.eval(test)
        for i, exp in enumerate(benchmark.train_stream):
            strategy.train(exp, eval_streams=[])
            after.append(strategy.clock.train_iterations)
            res = strategy.eval(test[: i + 2])
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        "strategy": name,
        "ACC": next(v for k, v in res.items() if k.startswith("Top1_Acc_Stream/")),
        "BWT": None if name == "joint" else res.get("StreamBWT/eval_phase/test_stream"),
        "FWT": None if name == "joint" else res.get("StreamForwardTransfer/eval_phase/test_stream"),
        "train_seconds": round(seconds, 2),
        "accuracy_matrix": accuracy_matrix(strategy.evaluator, n, after),
        "note": PACKNET_NOTE if name == "packnet" else "",
    }
    if name == "replay":
        row["note"] = f"Naive with Avalanche's ReplayPlugin, buffer of {args.replay_size} samples"
    elif name in REHEARSAL:
        row["note"] = f"Avalanche's {type(strategy).__name__}, buffer of {args.replay_size} samples"
    # the data's levels matter only to a buffer's bytes (TSN counts its own memory)
    levels = sample_levels(benchmark) if name in REHEARSAL else (0, 0)
    row["stored_bytes"] = stored_bytes(name, strategy, args, levels)
    inferred = name == "tsn" and sc.class_incremental
    # forwards of the network per test sample: one per trained task when TSN infers tasks
    row["inference_forwards"] = len(strategy.tsn_model.trained_tasks()) if inferred else 1
    inference = res.get("TaskInference_Acc_Stream/eval_phase/test_stream")
    if inference is not None:
        row["task_inference_acc"] = inference
        row["note"] = (
            f"task inference ({args.task_inference}) right for {100 * inference:.2f}% of the "
            "test samples; each task's subnetwork stays bit-identical, the stream's accuracy "
            "can still change as tasks are added (inference sees more candidates)"
        )
    if name == "wsn":
        row["capacity_percent"] = strategy.capacity_report().percent
        row["capacity_wsn_percent"] = strategy.wsn_capacity().percent
        row["note"] = WSN_NOTE.format(wsn=row["capacity_wsn_percent"])
    elif name == "adaqpacknet":
        row["capacity_percent"] = strategy.capacity_report().percent
        row["capacity_adaq_percent"] = strategy.adaq_capacity().percent
        row["bits"] = strategy.quantization_plugin.bits
        row["note"] = ADAQ_NOTE.format(adaq=row["capacity_adaq_percent"])
    elif name == "tsn":
        report = strategy.capacity_report()
        row["capacity_percent"] = report.percent
        row["capacity_backbone_split"] = report.backbone_split()
        row["capacity_tasks"] = [vars(t) | {"total_bits": t.total_bits} for t in report.tasks]
        prune = next((p for p in strategy.plugins if isinstance(p, PruningPlugin)), None)
        quant = next((p for p in strategy.plugins if isinstance(p, QuantizationPlugin)), None)
        sim = next((p for p in strategy.plugins if isinstance(p, TaskSimilarityPlugin)), None)
        row["pruning"] = [vars(r) for r in prune.records] if prune else None
        row["bits"] = quant.bits if quant else None
        row["head_bits"] = quant.head_bits if quant else None
        row["banks"] = [strategy.tsn_model.bank_of(t) for t in strategy.tsn_model.trained_tasks()]
        free = next(p for p in strategy.plugins if isinstance(p, FreeAtStart))
        row["free_at_start"] = free.free
        row["divergences"] = {str(k): v for k, v in sim.divergences.items()} if sim else None
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            row["export_bytes"] = strategy.export(Path(args.out) / "tsn_model.tsn")
    else:
        # the model as trained, in float32 (PackNet adds its weight-to-task index)
        row["capacity_percent"] = (
            100.0
            * _model_bits(strategy.model, n if name == "packnet" else 0)
            / _model_bits(strategy.model)
        )
    if args.device.startswith("cuda"):
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["peak_memory_kind"] = "cuda allocated"
    elif not args.in_process:
        row["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["peak_memory_kind"] = "process max RSS"
    return row


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}" if pct else f"{v:.2f}"


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The results table in Markdown."""
    lines = [
        header,
        "",
        "| strategy | ACC % | BWT (points) | FWT (points) | capacity % of dense | train s | "
        "peak memory MB |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        name = r["strategy"] + (f" [{len(notes) + 1}]" if r.get("note") else "")
        if r.get("note"):
            notes.append(f"[{len(notes) + 1}] {r['strategy']}: {r['note']}")
        mem = r.get("peak_memory_mb")
        lines.append(
            f"| {name} | {_fmt(r['ACC'])} | {_fmt(r['BWT'])} | {_fmt(r['FWT'])} | "
            f"{r['capacity_percent']:.2f} | {r['train_seconds']:.1f} | "
            f"{'n/a' if mem is None else f'{mem:.0f}'} |"
        )
    return "\n".join(lines + [""] + notes) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Accuracy-matrix heatmaps of every strategy and TSN's capacity per task (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        m = (
            torch.tensor(
                [[math.nan if v is None else v for v in row] for row in r["accuracy_matrix"]]
            )
            * 100
        )
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{r['strategy']} (ACC {100 * r['ACC']:.1f})", fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training task" if r["strategy"] != "joint" else "joint")
        if m.numel() <= 100:
            for (i, j), v in zip(
                [(i, j) for i in range(m.shape[0]) for j in range(m.shape[1])],
                m.flatten(),
                strict=True,
            ):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy %")
    fig.savefig(out / "accuracy_matrices.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    tsn = next((r for r in rows if r["strategy"] == "tsn"), None)
    if tsn is None:
        return
    tasks = tsn["capacity_tasks"]
    parts = ["weight_bits", "codebook_bits", "mask_bits", "head_bits", "norm_bits"]
    parts += ["activation_bits"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(tasks)
    for part in parts:
        vals = [t[part] / 8 / 1024 for t in tasks]
        ax.bar([t["task"] for t in tasks], vals, bottom=bottom, label=part.replace("_bits", ""))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("task")
    ax.set_ylabel("KiB added")
    ax.set_title(f"TSN capacity per task (total {tsn['capacity_percent']:.2f}% of dense)")
    ax.legend(fontsize=7)
    fig.savefig(out / "tsn_capacity.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (defaults per scenario: the paper code's settings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="permuted_digits")
    p.add_argument(
        "--strategies",
        default=None,
        help="comma-separated (default: every one the scenario can run)",
    )
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--mb", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    p.add_argument(
        "--standardize",
        action="store_true",
        help="permuted_fashion: inputs (x - 0.1307) / 0.3081 as the TSN reference code makes them",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0: plain SGD)")
    p.add_argument(
        "--eval",
        choices=("needed", "full"),
        default="needed",
        help="needed: what ACC/BWT/FWT read; full: every test set before and after each task",
    )
    p.add_argument(
        "--avalanche-loader",
        action="store_true",
        help="read minibatches with Avalanche's per-sample loader (default: tensor gather)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=None, help="samples per experience (smoke)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--no-prune", action="store_true")
    p.add_argument("--prune-search", choices=SEARCHES, default="joint")
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--no-quant-heads", action="store_true")
    p.add_argument("--task-matching", action="store_true")
    p.add_argument("--kl-threshold", type=float, default=1.5)
    p.add_argument("--new-bank-below", type=float, default=None)
    p.add_argument("--ewc-lambda", type=float, default=100.0)
    p.add_argument("--lwf-alpha", type=float, default=1.0)
    p.add_argument("--si-lambda", type=float, default=1.0)
    p.add_argument("--packnet-prune", type=float, default=0.5)
    p.add_argument("--replay-size", type=int, default=200, help="replay buffer (samples)")
    p.add_argument(
        "--task-inference",
        choices=INFERENCE_METHODS,
        default="router",
        help="class-incremental scenarios: how TSN infers a test sample's task",
    )
    p.add_argument(
        "--memory-size", type=int, default=100, help="TSN: samples kept per task (task memory)"
    )
    p.add_argument(
        "--ood-weight",
        type=float,
        default=DEFAULT_OOD_WEIGHT,
        help="TSN with the router: outlier-exposure weight on earlier tasks' memory",
    )
    p.add_argument("--dataset-root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--in-process", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    p.add_argument("--out", default=None, help="folder for results.json/.md and PNGs")
    show_defaults(p, ("tasks", "epochs", "mb", "lr", "optimizer"))
    args = p.parse_args(argv)
    allowed = CLASS_INCREMENTAL if SCENARIOS[args.scenario].class_incremental else STRATEGIES
    names = args.strategies.split(",") if args.strategies else list(allowed)
    bad = [s for s in names if s not in allowed]
    if bad:
        p.error(
            f"--strategies: {', '.join(bad)} cannot run {args.scenario}; choose from "
            f"{', '.join(allowed)}"
        )
    args.strategy_list = names
    data = SCENARIOS[args.scenario].data
    if data is not None:
        # checked here, before a process is spawned: the loader's message, alone
        try:
            datasets.require_data(data, args.dataset_root)
        except FileNotFoundError as err:
            p.exit(2, f"{p.prog}: {err}\n")
    return args


def _optimizer_name(args: argparse.Namespace, sc: Scenario) -> str:
    kind = args.optimizer or sc.optimizer
    return f"sgd (momentum {args.momentum})" if kind == "sgd" else kind


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every chosen strategy, print the table, write the files."""
    args = parse(argv)
    rows = []
    pool = None if args.in_process else ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
    # In one process the data are built once for every strategy; a process per strategy
    # builds its own (and a missing dataset stops the first one before it trains).
    benchmark = (
        _subset(
            SCENARIOS[args.scenario].build(args),
            args.subset,
            SCENARIOS[args.scenario].class_incremental,
        )
        if pool is None
        else None
    )
    for name in tqdm(args.strategy_list, desc=f"{args.scenario}: strategies", unit="strategy"):
        if pool is None:
            rows.append(run_one(name, args, benchmark))
        else:  # a fresh process per strategy: its peak memory is its own
            rows.append(pool.submit(run_one, name, args).result())
            pool.shutdown()
            pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
    if pool is not None:
        pool.shutdown()
    sc = SCENARIOS[args.scenario]
    header = (
        f"### {args.scenario} ({datetime.now(timezone.utc):%Y-%m-%d}; epochs "
        f"{args.epochs or sc.epochs}, minibatch {args.mb or sc.mb}, "
        f"{_optimizer_name(args, sc)} lr {args.lr or sc.lr}, seed {args.seed}, "
        f"device {args.device}, threads {args.threads or torch.get_num_threads()}, "
        f"{args.eval} evaluation, "
        f"{'Avalanche loader' if args.avalanche_loader else 'tensor minibatches'})"
    )
    table = markdown(rows, header)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        public = {k: v for k, v in vars(args).items() if k != "strategy_list"}
        (out / "results.json").write_text(json.dumps({"args": public, "rows": rows}, indent=2))
        (out / "results.md").write_text(table)
        plot(rows, out)
    return rows


if __name__ == "__main__":
    main()
