"""One rank of the distributed tests (run by ``torchrun``; see tests/test_distributed.py).

``python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py OUT
SCENARIO`` trains on the gloo backend and writes what this rank saw to ``OUT/rank{r}.pt``.

- ``task``: TSN on a task-labelled stream: the state hash after every task, task 0's outputs
  after it and at the end, the samples each rank trained on, the evaluation metrics, the
  final state, the rank-0 export loaded here, the errors of faults injected on rank 1 only (a
  plugin's exception, a non-finite loss), and a divergence made on rank 1 on purpose.
- ``class``: a model the user wrapped in DDP, class-incremental TSN with the task router and
  task matching, then WSN and Ada-QPacknet: the state hash after every task.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

sys.path.insert(0, str(Path(__file__).parent))

from conftest import blob_stream, mlp  # noqa: E402
from test_task_inference import class_incremental  # noqa: E402

from avalanche_tsn import (  # noqa: E402
    AdaQPacknetStrategy,
    TSNModel,
    TSNStrategy,
    WSNStrategy,
    load_compressed,
)
from avalanche_tsn.distributed import (  # noqa: E402
    DistributedFault,
    DivergenceError,
    broadcast_state,
    check_same_state,
    state_digest,
)
from avalanche_tsn.metrics import task_inference_metrics  # noqa: E402
from avalanche_tsn.models import MultiHeadMLP  # noqa: E402


class Fault(SupervisedPlugin, supports_distributed=True):
    """On rank 1 only, at the third iteration: raise, or make the loss NaN; counts samples."""

    def __init__(self) -> None:
        super().__init__()
        self.kind = "off"
        self.samples = 0

    def before_backward(self, strategy, **kwargs) -> None:
        self.samples += len(strategy.mb_x)
        if self.kind == "off" or DistributedHelper.rank != 1:
            return
        if strategy.clock.train_epoch_iterations != 2:
            return
        if self.kind == "raise":
            raise ValueError("injected fault")
        strategy.loss = strategy.loss * float("nan")


class Drift(SupervisedPlugin, supports_distributed=True):
    """On rank 1 only, after experience 1 trained: move the weights before TSN's stages run,
    so that its pruning and quantization would decide otherwise than rank 0's."""

    def after_training_exp(self, strategy, **kwargs) -> None:
        if DistributedHelper.rank == 1 and strategy.clock.train_exp_counter == 1:
            with torch.no_grad():
                g = torch.Generator().manual_seed(1)
                for p in strategy.model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)


def evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def task_scenario(out: Path) -> dict:
    bm = blob_stream(n_tasks=4, dim=12)
    model = mlp(12)
    fault = Fault()
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=8,
        train_epochs=2,
        eval_mb_size=16,
        evaluator=evaluator(),
        plugins=[fault, Drift()],
    )
    x0 = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(24)])
    result: dict = {"digests": [], "errors": {}, "samples": []}
    for exp in bm.train_stream[:3]:
        fault.samples = 0
        strategy.train(exp, eval_streams=[])
        result["samples"].append(fault.samples)
        result["digests"].append(state_digest(strategy.model))
        if not result["samples"][1:]:
            with torch.no_grad():
                result["task0_first"] = strategy.model(x0, 0).clone()
    with torch.no_grad():
        result["task0_last"] = strategy.model(x0, 0).clone()
    seen: list[int] = []
    hook = strategy.model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    result["metrics"] = {
        k: v for k, v in strategy.eval(bm.test_stream[:3]).items() if "Top1_Acc" in k
    }
    hook.remove()
    result["eval_samples"] = sum(seen)
    path = out / "model.tsn"
    result["export_bytes"] = strategy.export(path)
    # every rank loads rank 0's file into a fresh model of its own
    loaded = load_compressed(path, mlp(12))
    with torch.no_grad():
        result["export_matches"] = bool(torch.equal(loaded(x0, 0), strategy.model(x0, 0)))
    result["state"] = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    for kind in ("raise", "nan"):
        fault.kind = kind
        try:
            strategy.train(bm.train_stream[3], eval_streams=[])
            result["errors"][kind] = None
        except DistributedFault as err:
            result["errors"][kind] = str(err)
        strategy.abandon_task()
    with torch.no_grad():
        result["task0_after_faults"] = strategy.model(x0, 0).clone()
    result["after_faults"] = state_digest(strategy.model)
    # ranks whose structure differs (rank 1 has no trained task at all) take rank 0's
    other = TSNModel(mlp(12))
    if DistributedHelper.rank == 0:
        other.load_state_dict(strategy.model.state_dict())
    broadcast_state(other, "test")
    result["restructured"] = state_digest(other)
    with torch.no_grad():
        result["restructured_matches"] = bool(torch.equal(other(x0, 0), strategy.model(x0, 0)))
    # a rank that drifts (here on purpose) is named, on every rank
    if DistributedHelper.rank == 1:
        with torch.no_grad():
            strategy.model.net[0].bias.add_(1.0)
    try:
        check_same_state(strategy.model, "test")
        result["divergence"] = None
    except DivergenceError as err:
        result["divergence"] = str(err)
    return result


def class_scenario() -> dict:
    # inputs on a grid: the task memory is coded (8-bit codes travel between the ranks)
    bm = class_incremental(separable=False, n_tasks=3, grid=0.25)
    # a model the user wrapped themselves, the way Avalanche's examples do
    model = DistributedHelper.wrap_model(MultiHeadMLP(12, (16, 16)))
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train_mb_size=16,
        train_epochs=2,
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True), *task_inference_metrics(), loggers=[]
        ),
        task_inference="router",
        task_matching=True,
        memory_size=20,
    )
    result: dict = {"digests": [], "wrapped": type(strategy.model).__name__}
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        result["digests"].append(state_digest(strategy.model))
    result["metrics"] = strategy.eval(bm.test_stream)
    result["state"] = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    result["memory_bits"] = strategy.tsn_model.task_table.samples.bits_per_value()
    # TSN's plugins on a strategy that does not keep the ranks together: refused
    from avalanche.training import Naive

    from avalanche_tsn.plugins import MaskLearningPlugin

    net = TSNModel(mlp(12))
    naive = Naive(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        evaluator=evaluator(),
        plugins=[MaskLearningPlugin(0.5)],
    )
    try:
        naive.train(blob_stream(n_tasks=1, dim=12).train_stream[0], eval_streams=[])
        result["naive"] = None
    except TypeError as err:
        result["naive"] = str(err)
    # WSN trains through the compiled kernel inside DDP (features against each other)
    for cls, kernel in ((WSNStrategy, "compiled"), (AdaQPacknetStrategy, "auto")):
        net = mlp(12)
        family = cls(
            model=net,
            optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
            train_mb_size=8,
            train_epochs=1,
            evaluator=evaluator(),
            train_kernel=kernel,
        )
        tasks = blob_stream(n_tasks=2, dim=12)
        for exp in tasks.train_stream:
            family.train(exp, eval_streams=[])
            result["digests"].append(state_digest(family.model))
        result.setdefault("kernels", []).append(family.model.kernel.describe())
    return result


def main(out: Path, scenario: str) -> None:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    DistributedHelper.set_random_seeds(0)
    torch.set_num_threads(1)
    result = task_scenario(out) if scenario == "task" else class_scenario()
    torch.save(result, out / f"rank{DistributedHelper.rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    os._exit(0)
