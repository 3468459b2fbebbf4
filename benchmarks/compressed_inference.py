"""Compressed inference (issue 13): accuracy with quantized activations, MACs and BOPs, and
the runnable integer-code model's memory and latency against the dense float model.

Trains TSN (harness settings of each scenario) on permuted digits and permuted Fashion-MNIST,
then, in the same process:

- test accuracy with weights at their own bit-widths and activations at 4, 8, 16 bits and
  float (``strategy.quantized_accuracy``);
- MACs and BOPs per sample (``strategy.compute_report``), mean over tasks;
- ``load_compressed(..., dequantize=False)``: resident bytes (every tensor the model holds)
  and forward latency on 256 test samples of task 0, against the dense float model (the same
  architecture as plain ``nn.Linear`` layers holding task 0's weights, every task's head).

Usage::

    python benchmarks/compressed_inference.py --threads 1 --repeats 20 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_tsn import TSNStrategy, datasets, load_compressed
from avalanche_tsn._cli import show_defaults
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.tiny import resident_bytes

sys.path.insert(0, str(Path(__file__).parent))  # the scripts' shared helpers
from _report import publish, timed  # noqa: E402

SCENARIOS = {
    # name: (stream, input size, epochs, minibatch, lr) as the harness runs them
    "permuted digits": (lambda: datasets.permuted_digits(5), 64, 10, 32, 0.1),
    "permuted Fashion-MNIST": (lambda: datasets.permuted_fashion_mnist(10), 784, 2, 128, 0.05),
}
ACT_BITS = (4, 8, 16, None)
SECTION = "compressed_inference"


def _dense(tsn, size: int, n_tasks: int) -> tuple[nn.Module, nn.Module]:
    """The dense float model: task 0's effective weights in plain layers, all tasks' heads."""
    layers = [layer for _, layer in tsn.masked_layers()]
    body = []
    for layer in layers:
        weight, bias = layer.frozen_params(tsn.slot_of(0))
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight)
        body += [lin, nn.ReLU()]
    heads = nn.ModuleList(
        nn.Linear(layers[-1].weight.shape[0], 10) for _ in range(n_tasks)
    )  # float heads of every task, as the dense multi-task model holds them
    return nn.Sequential(*body), heads


@torch.no_grad()
def run(name: str, repeats: int) -> list[str]:
    build, size, epochs, mb, lr = SCENARIOS[name]
    torch.manual_seed(0)
    bm = build()
    n = len(bm.train_stream)
    net = MultiHeadMLP(input_size=size, hidden_sizes=(100, 100))
    strategy = TSNStrategy(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9),
        train_mb_size=mb,
        train_epochs=epochs,
        eval_mb_size=1024,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    with torch.enable_grad():
        for exp in bm.train_stream:
            strategy.train(exp)
    bits = [int(b) for b in next(strategy.tsn_model.masked_layers())[1].task_bits]
    acc = {b: strategy.quantized_accuracy(bm.test_stream, b) for b in ACT_BITS}
    lines = [
        f"#### {name} ({n} tasks, MLP {size}-100-100, {epochs} epochs, minibatch {mb}, SGD "
        f"{lr} with momentum 0.9; weight bits per task in the first layer: {bits})",
        "",
        "| activations | 4 bits | 8 bits | 16 bits | float |",
        "|---|---|---|---|---|",
        "| mean test ACC % | "
        + " | ".join(f"{100 * statistics.mean(acc[b].values()):.2f}" for b in ACT_BITS)
        + " |",
        "",
        "| per sample, mean over tasks | dense float | TSN subnetwork | % of dense |",
        "|---|---|---|---|",
    ]
    report = strategy.compute_report((size,))
    dense_macs = statistics.mean(t.dense_macs for t in report.tasks)
    macs = statistics.mean(t.macs for t in report.tasks)
    lines.append(f"| MACs | {dense_macs:,.0f} | {macs:,.0f} | {100 * macs / dense_macs:.2f} |")
    for b in ACT_BITS:
        r = strategy.compute_report((size,), b)
        bops = statistics.mean(t.bops for t in r.tasks)
        dense_bops = statistics.mean(t.dense_bops for t in r.tasks)
        label = "float" if b is None else f"{b}-bit"
        lines.append(
            f"| BOPs, own weight bits x {label} activations | {dense_bops:,.0f} (32 x 32) | "
            f"{bops:,.0f} | {100 * bops / dense_bops:.3f} |"
        )
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    fresh = MultiHeadMLP(input_size=size, hidden_sizes=(100, 100))
    tiny = load_compressed(buf, fresh, dequantize=False)
    body, heads = _dense(strategy.tsn_model, size, n)
    test0 = bm.test_stream[0].dataset.eval()
    x = torch.stack([test0[i][0] for i in range(min(256, len(test0)))])
    assert torch.equal(tiny(x, 0).argmax(1), strategy.tsn_model.eval()(x, 0).argmax(1))
    t_tiny = timed(lambda: tiny(x, 0), repeats, warmup=1)
    t_dense = timed(lambda: heads[0](body(x)), repeats, warmup=1)
    dense_bytes = resident_bytes(body) + resident_bytes(heads)
    tiny_bytes = resident_bytes(tiny)
    head_bytes = sum(resident_bytes(h) for h in tiny.classifier_heads())
    owner_bytes = sum(
        getattr(m, name).numel()
        for m in tiny.routed_layers()
        for name, _ in m.named_buffers()
        if name.startswith("owner_")
    )
    cap = strategy.capacity_report()
    lines += [
        "",
        "| model | resident bytes | / dense | forward ms, 256 samples (min / median) | / dense |",
        "|---|---|---|---|---|",
        f"| dense float ({n} heads) | {dense_bytes:,} | 1.00 | {1e3 * min(t_dense):.2f} / "
        f"{1e3 * statistics.median(t_dense):.2f} | 1.00 |",
        f"| integer codes (`dequantize=False`) | {tiny_bytes:,} | {tiny_bytes / dense_bytes:.3f} | "
        f"{1e3 * min(t_tiny):.2f} / {1e3 * statistics.median(t_tiny):.2f} | "
        f"{statistics.median(t_tiny) / statistics.median(t_dense):.2f} |",
        f"| of which heads / ownership maps | {head_bytes:,} / {owner_bytes:,} | "
        f"{head_bytes / dense_bytes:.3f} / {owner_bytes / dense_bytes:.3f} | | |",
        f"| training form (`TSNModel`) | {resident_bytes(strategy.tsn_model):,} | "
        f"{resident_bytes(strategy.tsn_model) / dense_bytes:.3f} | | |",
        f"| capacity report | {cap.total_bits // 8:,} | {cap.total_bits / 8 / dense_bytes:.3f} "
        f"| | |",
        "",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--write", help="replace the compressed-inference section of this file")
    show_defaults(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `python "
        f"benchmarks/compressed_inference.py --threads {args.threads} --repeats {args.repeats}`"
        f", torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU.",
        "",
    ]
    for name in SCENARIOS:
        lines += run(name, args.repeats)
    publish("\n".join(lines), args.write, SECTION)


if __name__ == "__main__":
    main()
