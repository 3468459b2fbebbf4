"""What the README and the examples promise, run as written; Avalanche's loggers on TSN."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import CSVLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin
from conftest import fast_benchmark

from avalanche_tsn import TSNStrategy
from avalanche_tsn.metrics import capacity_metrics
from avalanche_tsn.models import MultiHeadMLP

ROOT = Path(__file__).resolve().parents[1]


def test_readme_drop_in_snippet_runs_as_written(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use it in place") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    results = namespace["results"]
    assert results["StreamBWT/eval_phase/test_stream"] == 0.0
    assert results["Top1_Acc_Stream/eval_phase/test_stream/Task004"] > 0.8


def _run_example(name: str, *args: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    return capsys.readouterr().out


def test_class_incremental_example_infers_tasks_and_keeps_the_first_task(monkeypatch, capsys):
    out = _run_example(
        "class_incremental.py", "--epochs", "1", "--threads", "1",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    acc = float(re.search(r"ACC ([\d.]+)%", out).group(1))
    inferred = float(re.search(r"task inferred right for ([\d.]+)%", out).group(1))
    # a sample sent to another task's head cannot get its class: accuracy <= inference
    assert 50 < acc <= inferred <= 100
    assert "first task's outputs bit-identical after the last task: True" in out
    stored = re.search(r"task memory ([\d.]+) KiB \(100 samples a task, 8-bit values\)", out)
    # 5 tasks x 100 samples x 64 one-byte values, plus each task's 17 levels at most (the
    # figure printed to 0.1 KiB)
    kib = float(stored.group(1))
    assert 5 * 100 * 64 / 1024 < kib <= (5 * 100 * 64 + 5 * 17 * 4) / 1024 + 0.05


def test_checkpoint_example_resumes_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys):
    def run(*args):
        return _run_example(
            "checkpoint_resume.py",
            "--tasks",
            "3",
            "--epochs",
            "1",
            *args,
            monkeypatch=monkeypatch,
            capsys=capsys,
        )

    full = run("--checkpoint", str(tmp_path / "a.pkl"))
    cut = run("--checkpoint", str(tmp_path / "b.pkl"), "--stop-after", "0")
    assert "outputs digest" not in cut
    resumed = run("--checkpoint", str(tmp_path / "b.pkl"))
    assert "resumed from" in resumed and "at experience 1" in resumed
    digest = re.compile(r"outputs digest: (\w+)")
    assert digest.search(full).group(1) == digest.search(resumed).group(1)


def test_avalanche_loggers_record_tsn_runs(tmp_path):
    bm = fast_benchmark()
    text = tmp_path / "log.txt"
    with open(text, "w") as f:
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            loss_metrics(epoch=True),
            capacity_metrics(),
            loggers=[
                TextLogger(f),
                TensorboardLogger(str(tmp_path / "tb")),
                CSVLogger(str(tmp_path / "csv")),
            ],
        )
        model = MultiHeadMLP(6, (32, 32), n_classes=2)
        strategy = TSNStrategy(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            train_mb_size=16,
            evaluator=evaluator,
            eval_every=0,
        )
        for exp in list(bm.train_stream)[:2]:
            strategy.train(exp, eval_streams=[bm.test_stream])
        strategy.eval(bm.test_stream)
    logged = text.read_text()
    assert "Capacity/percent" in logged and "Capacity/free_fraction_min" in logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "Capacity/percent" in tags
    assert any(t.startswith("Top1_Acc_Stream") for t in tags)
    # Avalanche's CSVLogger writes its fixed columns (no capacity), for TSN as for any strategy
    csv = (tmp_path / "csv" / "eval_results.csv").read_text()
    assert csv.splitlines()[0].startswith("metric_name") or "eval_exp" in csv.splitlines()[0]
    assert len(csv.splitlines()) > 1


def test_slow_marker_selects_tests():
    # README: `python -m pytest -m slow` runs the long runs on real data
    marked = [p for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.slow" in p.read_text()]
    assert marked, "no test is marked slow"


def test_quickstart_prints_stage_lines_in_order_then_the_summary_and_quiet_the_summary_only():
    import subprocess

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--tasks", "2"]
            + ["--epochs", "1", "--threads", "1", *extra],
            capture_output=True,
            text=True,
            check=True,
        )

    loud, quiet = run(), run("--quiet")
    lines = loud.stdout.splitlines()
    stages = [i for i, line in enumerate(lines) if line.startswith("task ")]
    summary = lines.index("Per-task test accuracy after the whole stream:")
    assert [lines[i].split(":")[0] for i in stages] == [
        "task 0 pruned",
        "task 0 quantized",
        "task 1 pruned",
        "task 1 quantized",
    ]
    assert max(stages) < summary and lines[-1].startswith("Export:")
    assert "predicts identically: True" in lines[-1] and len(lines) < 80
    assert "pruned" not in quiet.stdout and quiet.stderr == ""
    assert quiet.stdout.splitlines()[-1] == lines[-1]  # the same run, the same summary


SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for folder in ("examples", "benchmarks")
    for p in (ROOT / folder).glob("*.py")
    if "parse_args(" in p.read_text()
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_help_states_each_options_default(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / Path(script).parent))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    text = capsys.readouterr().out
    assert stop.value.code == 0
    options = re.findall(r"^  (-\S+)", text.split("options:")[1], re.M)
    documented = re.findall(r"\(?default", text.split("options:")[1])
    assert len(options) > 1 and len(documented) >= len(options) - 1  # all but -h/--help
