"""TSN under torchrun: two gloo processes on the CPU keep one model (issue 27).

Each scenario is one ``torchrun --nproc_per_node 2`` run of tests/distributed_worker.py;
the tests read what each rank wrote.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import blob_stream, mlp
from distributed_worker import Fault
from test_task_inference import class_incremental

from avalanche_tsn import TSNModel, TSNStrategy
from avalanche_tsn.distributed import (
    agree,
    broadcast_state,
    check_same_state,
    is_distributed,
    reporting,
    unwrap,
)
from avalanche_tsn.metrics import task_inference_metrics
from avalanche_tsn.models import MultiHeadMLP

HERE = Path(__file__).parent


def _torchrun(out: Path, scenario: str) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(HERE / "distributed_worker.py"), str(out), scenario],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # the worker's process group times out after 60 s: never a hang
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def task_ranks(tmp_path_factory) -> list[dict]:
    return _torchrun(tmp_path_factory.mktemp("task"), "task")


@pytest.fixture(scope="module")
def class_ranks(tmp_path_factory) -> list[dict]:
    return _torchrun(tmp_path_factory.mktemp("class"), "class")


def test_ranks_hold_the_same_state_after_every_task(task_ranks, class_ranks) -> None:
    for ranks in (task_ranks, class_ranks):
        zero, one = ranks
        assert len(zero["digests"]) == len(one["digests"]) >= 3
        for a, b in zip(zero["digests"], one["digests"], strict=True):
            assert a == b
    # the tasks changed the state: equal hashes are not those of an untouched model
    assert task_ranks[0]["digests"][0] != task_ranks[0]["digests"][-1]
    assert [r["memory_bits"] for r in class_ranks] == [8, 8]  # coded memories kept together
    assert task_ranks[0]["after_faults"] == task_ranks[1]["after_faults"]


def test_each_rank_trains_on_its_share_of_the_data(task_ranks) -> None:
    bm = blob_stream(n_tasks=1, dim=12)
    net = mlp(12)
    counter = Fault()
    TSNStrategy(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=8,
        train_epochs=2,
        evaluator=EvaluationPlugin(loggers=[]),
        plugins=[counter],
    ).train(bm.train_stream[0], eval_streams=[])
    alone = counter.samples // 2  # per epoch
    # DistributedSampler: each rank half of the epoch (padded to an equal share)
    assert task_ranks[0]["samples"][0] == task_ranks[1]["samples"][0] == 2 * math.ceil(alone / 2)


def test_no_forgetting_across_tasks_and_faults(task_ranks) -> None:
    for rank in task_ranks:
        assert torch.equal(rank["task0_first"], rank["task0_last"])
        assert torch.equal(rank["task0_first"], rank["task0_after_faults"])


def test_metrics_are_those_of_a_single_process_evaluation(task_ranks) -> None:
    zero, one = task_ranks
    assert zero["metrics"] == one["metrics"]
    model = TSNModel(mlp(12))
    model.load_state_dict(zero["state"])
    alone = TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        eval_mb_size=16,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]),
    )
    bm = blob_stream(n_tasks=4, dim=12)
    metrics = {k: v for k, v in alone.eval(bm.test_stream[:3]).items() if "Top1_Acc" in k}
    assert metrics == zero["metrics"]
    assert len(metrics) == 4
    # each rank ran the model on its half of every evaluation minibatch
    total = sum(len(e.dataset) for e in bm.test_stream[:3])
    assert zero["eval_samples"] + one["eval_samples"] == total
    assert abs(zero["eval_samples"] - one["eval_samples"]) <= 3


def test_task_inference_metrics_are_those_of_a_single_process_evaluation(class_ranks) -> None:
    zero, one = class_ranks
    assert zero["metrics"] == one["metrics"]
    model = TSNModel(MultiHeadMLP(12, (16, 16)))
    model.load_state_dict(zero["state"])
    alone = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True), *task_inference_metrics(), loggers=[]
        ),
        task_inference="router",
    )
    metrics = alone.eval(class_incremental(separable=False, n_tasks=3).test_stream)
    wanted = {k: v for k, v in zero["metrics"].items() if "Top1_Acc" in k}
    assert len(wanted) == 4 and all(metrics[k] == v for k, v in wanted.items())
    # the task-inference metric read the gathered inferred tasks of whole minibatches
    inference = [v for k, v in zero["metrics"].items() if k.startswith("TaskInference_Acc")]
    assert len(inference) == 4 and all(0 < v <= 1 for v in inference)


def test_export_written_by_rank_zero_loads_on_every_rank(task_ranks) -> None:
    zero, one = task_ranks
    assert zero["export_bytes"] == one["export_bytes"] > 0
    assert zero["export_matches"] and one["export_matches"]


def test_a_fault_on_one_rank_stops_every_rank_with_the_same_error(task_ranks) -> None:
    zero, one = task_ranks
    assert zero["errors"] == one["errors"]
    assert "rank 1: ValueError: injected fault" in zero["errors"]["raise"]
    assert "rank 1:" in zero["errors"]["nan"] and "nan" in zero["errors"]["nan"]
    assert "rank 0" not in zero["errors"]["nan"]


def test_a_rank_whose_structure_differs_takes_rank_zeros_state(task_ranks) -> None:
    zero, one = task_ranks
    assert zero["restructured"] == one["restructured"]
    assert zero["restructured_matches"] and one["restructured_matches"]


def test_a_diverging_rank_is_named_on_every_rank(task_ranks) -> None:
    for rank in task_ranks:
        assert "rank 1's 'net.0.bias' differs from rank 0's" in rank["divergence"]


def test_a_model_the_user_wrapped_in_ddp_trains_unwrapped(class_ranks) -> None:
    assert class_ranks[0]["wrapped"] == class_ranks[1]["wrapped"] == "TSNModel"


def test_the_compiled_kernel_trains_under_ddp_with_one_model(class_ranks) -> None:
    # (the state hashes after every task are compared in the first test)
    auto_on_cpu = "compiled for layers of 524288 weights or more, eager below"
    assert class_ranks[0]["kernels"] == class_ranks[1]["kernels"] == ["compiled", auto_on_cpu]


def test_tsn_plugins_on_another_strategy_are_refused_when_distributed(class_ranks) -> None:
    for rank in class_ranks:
        assert "need a TSN strategy" in rank["naive"] and "Naive" in rank["naive"]


def test_alone_the_collectives_are_no_ops() -> None:
    assert not is_distributed()
    model = TSNModel(mlp(12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    agree(None, "nothing")
    broadcast_state(model, "nothing")
    check_same_state(model, "nothing")
    with reporting("nothing"):
        pass
    with pytest.raises(ValueError, match="raised as is"), reporting("x"):
        raise ValueError("raised as is")
    assert unwrap(model) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the buffers no backend carries are left out of any DDP wrapper of the model
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert {k for k, v in model.state_dict().items() if v.dtype == torch.int16} == ignored
    assert ignored


def test_the_example_runs_under_torchrun() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    example = str(HERE.parent / "examples" / "distributed.py")
    done = subprocess.run(
        [*cmd, example, "--tasks", "2", "--epochs", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # rank 0 alone prints the summary
    assert sum(line.startswith("ranks: 2, tasks: 2") for line in lines) == 1
    assert any(line.startswith("compact export: ") for line in lines)
    assert "[rank 1]" not in done.stdout
