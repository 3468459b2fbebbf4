"""Class-incremental TinySubNets: no task labels at test time, the task inferred by the router.

Run: ``python examples/class_incremental.py`` (split digits, scikit-learn's bundled data, no
download; about 20 s on 2 cores) or ``--dataset fashion_mnist`` (the idx files of the Debian
package ``dataset-fashion-mnist``, or ``--dataset-root``). Every experience holds two new
classes and task label 0, as ``nc_benchmark(task_labels=False)`` makes them; TSN trains one
subnetwork per experience and, at test time, a small router fitted on the task memory picks
the subnetwork for each sample (``task_inference=True``). The summary gives Avalanche's
accuracy, the share of test samples sent to their own task, a check that the first task's
predictions did not change by one bit after the later tasks, and what the strategy stores:
its compressed model, its task memory (lossless 8-bit codes for these 8-bit inputs) and its
router. Settings as ``benchmarks/class_incremental.py`` runs TSN (BENCHMARKS.md,
"Class-incremental at equal memory").
"""

from __future__ import annotations

import argparse
import warnings

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import DataLoader

from avalanche_tsn import TSNStrategy
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.datasets import require_data, split_digits, split_fashion_mnist
from avalanche_tsn.metrics import task_inference_metrics
from avalanche_tsn.models import MultiHeadMLP

#: dataset -> (input size, epochs, minibatch, SGD learning rate), the harness's settings
SETTINGS = {"digits": (64, 10, 32, 0.1), "fashion_mnist": (784, 2, 128, 0.05)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=tuple(SETTINGS), default="digits")
    parser.add_argument("--dataset-root", default=None, help="Fashion-MNIST's idx files")
    parser.add_argument("--epochs", type=int, default=None, help="(default: the dataset's)")
    parser.add_argument("--memory-size", type=int, default=100, help="samples kept per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class order and model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=device, help="cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    show_defaults(parser)
    args = parser.parse_args()
    if args.dataset == "fashion_mnist":
        try:  # before any work: the loader's message alone, exit status 2
            require_data("fashion_mnist", args.dataset_root)
        except FileNotFoundError as err:
            parser.exit(2, f"{parser.prog}: {err}\n")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message="No loggers specified")

    size, epochs, mb, lr = SETTINGS[args.dataset]
    if args.dataset == "digits":
        benchmark = split_digits(5, seed=args.seed, task_labels=False)
    else:
        benchmark = split_fashion_mnist(
            5, seed=args.seed, dataset_root=args.dataset_root, task_labels=False
        )
    model = MultiHeadMLP(input_size=size, hidden_sizes=(100, 100))
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
        train_mb_size=mb,
        train_epochs=args.epochs or epochs,
        eval_mb_size=1024,
        device=args.device,
        evaluator=EvaluationPlugin(
            accuracy_metrics(stream=True), *task_inference_metrics(), loggers=[]
        ),
        eval_every=0,
        task_inference=True,
        memory_size=args.memory_size,
    )
    first = benchmark.test_stream[0]
    x, *_ = next(iter(DataLoader(first.dataset, batch_size=512)))
    x = x.to(args.device)
    label = None
    before = None
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[])
        tsn = strategy.tsn_model.eval()
        if before is None:  # the first task's subnetwork, read through its own slot
            label = tsn.trained_tasks()[0]
            with torch.no_grad():
                before = tsn(x, label)
    results = strategy.eval(benchmark.test_stream)
    with torch.no_grad():
        unchanged = torch.equal(strategy.tsn_model.eval()(x, label), before)

    acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]  # every experience: task 0
    inferred = results["TaskInference_Acc_Stream/eval_phase/test_stream"]
    report = strategy.capacity_report()
    model_kib, memory_kib = report.total_bits / 8192, report.memory_bits / 8192
    router_kib = report.router_bits / 8192
    print(f"\nsplit {args.dataset}, 5 experiences of 2 classes, no task labels")
    print(f"ACC {100 * acc:.2f}% (Avalanche's stream accuracy)")
    print(f"task inferred right for {100 * inferred:.2f}% of the test samples")
    print(f"first task's outputs bit-identical after the last task: {unchanged}")
    print(
        f"stored: model {model_kib:.1f} KiB + task memory {memory_kib:.1f} KiB "
        f"({args.memory_size} samples a task, "
        f"{strategy.tsn_model.task_table.samples.bits_per_value()}-bit values) + router "
        f"{router_kib:.1f} KiB = {model_kib + memory_kib + router_kib:.1f} KiB "
        f"(the dense float32 model: {report.dense_bits / 8192:.1f} KiB)"
    )


if __name__ == "__main__":
    main()
