"""Options, strategies, plugins and optimizers drawn together at random: every guarantee holds.

Each seed draws one combination (TSN, WSN or Ada-QPacknet; a model, multi-head or one head
for all tasks; an optimizer and a loss; one of Avalanche's plugins, and early stopping;
periodic evaluation; minibatch sizes and epochs; TSN's options, one sparsity per task
included; task- or class-incremental with each task-inference method; a task whose training
fails once and is abandoned) and checks, on 3 tasks of small synthetic data: earlier tasks
bit-identical after each later one and after the failure; mixed-task minibatches; quantized
activations; a state dict, the compact export (both forms) and the tiny model predicting and
routing identically; a fourth task trained on the loaded export; an Avalanche checkpoint
resumed mid-stream. Four seeds run in the default suite; ``-m slow`` runs 60 more. The sweep
found four bugs, fixed in 0.8.0: LwF with task inference, EWC on models of masked layers
only, routing by the memory after export, and training on from an export without the memory.
"""

from __future__ import annotations

import copy
import io
import random
import warnings
from typing import Any

import pytest
import torch
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    EWCPlugin,
    FromScratchTrainingPlugin,
    LwFPlugin,
    MASPlugin,
    ReplayPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from conftest import (
    Signal1d,
    SmallConvNet,
    TextConv,
    TokenBag,
    Volume3d,
    blob_stream,
    mlp,
    normed_mlp,
    quiet_evaluator,
    sloped_mlp,
    token_stream,
)
from test_task_inference import class_incremental

from avalanche_tsn import AdaQPacknetStrategy, TSNModel, TSNStrategy, WSNStrategy
from avalanche_tsn.compute import compute_report
from avalanche_tsn.export import export_model, load_compressed
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.tiny import to_tiny

STRATEGIES = {"tsn": TSNStrategy, "wsn": WSNStrategy, "adaq": AdaQPacknetStrategy}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}
PLUGINS = {
    "none": list,
    "replay": lambda: [ReplayPlugin(mem_size=40)],
    "lwf": lambda: [LwFPlugin()],
    "ewc": lambda: [EWCPlugin(ewc_lambda=0.1)],
    "si": lambda: [SynapticIntelligencePlugin(si_lambda=0.001)],
    "mas": lambda: [MASPlugin(lambda_reg=0.1)],
    "scratch": lambda: [FromScratchTrainingPlugin()],
}
#: TSN's options that WSN and Ada-QPacknet refuse (they have stages of their own)
_NOT_WSN = ("task_matching",)
_NOT_ADAQ = ("sparsity", "task_matching", "new_bank_below")


def draw(seed: int) -> dict[str, Any]:
    """One combination, drawn from ``seed``."""
    rng = random.Random(seed)
    ci = rng.random() < 0.3
    c: dict[str, Any] = {
        "ci": ci,
        "model": rng.choice(["multihead"] if ci else ["mlp", "mlp_nobias", "multihead", "conv"]),
        "optimizer": rng.choice(["sgd", "adam", "adamw", "rmsprop", "nesterov"]),
    }
    kw: dict[str, Any] = {
        "sparsity": rng.choice([None, 0.3, 0.7]),
        "prune": rng.random() < 0.6,
        "prune_search": rng.choice(["joint", "layerwise", "bisect"]),
        "quantize": rng.random() < 0.6,
        "quant_heads": rng.random() < 0.5,
        "quant_min_bits": rng.choice([2, 3]),
        "task_matching": rng.random() < 0.3,
        "new_bank_below": rng.choice([None, None, 0.6]),
        "calibrate_activations": rng.random() < 0.5,
        "tensor_batches": rng.random() < 0.7,
        "train_kernel": rng.choice(["eager", "auto"]),
        "validation_fraction": rng.choice([0.1, 0.2]),
        "memory_size": rng.choice([10, 30]),
    }
    if ci:
        kw["task_inference"] = rng.choice(["router", "memory", "entropy", True])
    c["strategy"] = rng.choice(["tsn", "tsn", "wsn", "adaq"])
    c["plugin"] = rng.choice(["none", "none", "replay", "lwf", "ewc", "si"])
    if c["strategy"] != "tsn":
        drop = _NOT_WSN if c["strategy"] == "wsn" else _NOT_ADAQ
        kw = {k: v for k, v in kw.items() if k not in drop and not k.startswith(("prune", "quant"))}
    # drawn last, so that the draws above stay those the seeds below were chosen for
    if ci and rng.random() < 0.4:  # one head of all the classes, masked per task
        c["model"] = rng.choice(["mlp", "conv"])
    if rng.random() < 0.2:
        kw["memory_size"] = 2
    kw["eval_every"] = rng.choice([-1, 0, 1])
    c["label_smoothing"] = rng.choice([0.0, 0.1])
    c["early_stopping"] = rng.random() < 0.2
    kw["train_mb_size"] = rng.choice([7, 16])
    kw["train_epochs"] = rng.choice([1, 2])
    kw["eval_mb_size"] = rng.choice([1, 5, 64])
    if c["strategy"] != "adaq" and rng.random() < 0.3:  # one sparsity per task
        kw["sparsity"] = [rng.choice([0.2, 0.5, 0.8]) for _ in range(4)]
    if c["strategy"] == "tsn" and rng.random() < 0.3:
        kw.update(quant_min_bits=2, quant_max_bits=rng.choice([2, 3]))
        kw.update(prune_iterations=rng.choice([1, 2]), prune_step=rng.choice([0.1, 0.5]))
    if ci and rng.random() < 0.3:
        kw["ood_weight"] = 0.0
    c["interrupt"] = rng.random() < 0.3  # the second task fails once, is abandoned, retrains
    if rng.random() < 0.2:  # Avalanche's plugins added after the seeds above were chosen
        c["plugin"] = rng.choice(["mas", "scratch"])
    if c["model"] == "conv" and rng.random() < 0.5:  # 1-d and 3-d convolutions, added later
        c["model"] = rng.choice(["conv1d", "conv3d"])
    if c["model"] in ("mlp", "conv") and rng.random() < 0.3:  # LayerNorm, GroupNorm: later too
        c["model"] = {"mlp": "mlp_layernorm", "conv": "conv_groupnorm"}[c["model"]]
    # token ids looked up in an embedding table, on token data: added later, drawn apart so
    # that the seeds above keep their draws
    tokens = random.Random(f"tokens-4-{seed}")
    if tokens.random() < 0.15:
        c["model"] = tokens.choice(["tokens", "textconv"])
    elif c["model"] == "mlp" and random.Random(f"prelu-4-{seed}").random() < 0.5:  # PReLU: later
        c["model"] = "mlp_prelu"
    c["kw"] = kw
    return c


def _model(c: dict[str, Any]) -> torch.nn.Module:
    out = 8 if c["ci"] else 3  # class-incremental: 8 classes in all
    return {
        "mlp": lambda: mlp(12, 16, out),
        "mlp_nobias": lambda: mlp(12, 16, out, bias=False),
        "multihead": lambda: MultiHeadMLP(12, (16, 16)),
        "conv": lambda: SmallConvNet(out),
        "conv1d": lambda: Signal1d(out),
        "conv3d": lambda: Volume3d(out),
        "mlp_layernorm": lambda: normed_mlp(12, 16, out),
        "mlp_prelu": lambda: sloped_mlp(12, 16, out),
        "conv_groupnorm": lambda: SmallConvNet(out, group_norm=True),
        "tokens": lambda: TokenBag(out=out),
        "textconv": lambda: TextConv(out=out),
    }[c["model"]]()


def _stream(c: dict[str, Any], seed: int):
    if c["model"] in ("tokens", "textconv"):
        return token_stream(4, 2 if c["ci"] else 3, seed=seed, class_incremental=c["ci"])
    dim = 16 if c["model"].startswith("conv") else 12
    if c["ci"]:
        return class_incremental(separable=False, n_tasks=4, dim=dim, seed=seed)
    return blob_stream(4, 3, dim, 64, seed=seed)


def _strategy(c: dict[str, Any], model: torch.nn.Module):
    return STRATEGIES[c["strategy"]](
        model=model,
        optimizer=OPTIMIZERS[c["optimizer"]](model.parameters()),
        evaluator=quiet_evaluator(),
        plugins=PLUGINS[c["plugin"]]()
        + ([EarlyStoppingPlugin(1, "test_stream")] if c["early_stopping"] else []),
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"]),
        **c["kw"],
    )


def _probes(bm) -> list[torch.Tensor]:
    return [torch.stack([e.dataset[i][0] for i in range(8)]) for e in bm.test_stream]


@torch.no_grad()
def _outputs(model, xs: list[torch.Tensor], ci: bool) -> dict[int, torch.Tensor]:
    """Every trained task's outputs: on all probes (class-incremental) or its own."""
    model.eval()
    if ci:
        return {t: model(torch.cat(xs), t) for t in model.trained_tasks()}
    return {t: model(xs[t], t) for t in model.trained_tasks()}


def _same(now: dict[int, torch.Tensor], then: dict[int, torch.Tensor]) -> bool:
    return all(t in now and torch.equal(now[t], then[t]) for t in then)


def _train_three(c: dict[str, Any], seed: int, checks: list[str]):
    """Train 3 of the 4 tasks; the earlier tasks are checked after each."""
    torch.manual_seed(seed)
    bm = _stream(c, seed)
    strategy = _strategy(c, _model(c))
    xs, history = _probes(bm), []
    for exp in list(bm.train_stream)[:3]:
        if c["interrupt"] and exp.current_experience == 1:
            _interrupted(strategy, exp, xs, c["ci"], history[-1], checks)
        # (periodic evaluation and early stopping read the test stream)
        strategy.train(exp, eval_streams=[list(bm.test_stream)[:3]])
        now = _outputs(strategy.tsn_model, xs, c["ci"])
        if history and not _same(now, history[-1]):
            checks.append(f"an earlier task changed after task {exp.current_experience}")
        history.append(now)
    strategy.eval(list(bm.test_stream)[:3])
    return strategy, bm, xs, history[-1]


class _Interrupt(SupervisedPlugin):
    """Fails the training at its third iteration (as a crash or a KeyboardInterrupt would)."""

    def after_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == 2:
            raise RuntimeError("interrupted")


def _interrupted(strategy, exp, xs, ci: bool, before, checks: list[str]) -> None:
    """Train ``exp`` until it fails, then abandon the task: earlier tasks never move."""
    interrupt = _Interrupt()
    strategy.plugins.append(interrupt)
    try:
        strategy.train(exp, eval_streams=[])
        checks.append("the interrupted training ran to its end")
    except RuntimeError:
        pass
    finally:
        strategy.plugins.remove(interrupt)
    if not _same(_outputs(strategy.tsn_model, xs, ci), before):
        checks.append("an interrupted task changed an earlier one")
    if strategy.abandon_task() != exp.current_experience:
        checks.append("abandon_task did not name the interrupted task")


def _check_reports(c, strategy, bm, xs, final, checks: list[str]) -> str:
    calibrated = c["kw"]["calibrate_activations"]
    try:
        accuracy = strategy.quantized_accuracy(list(bm.test_stream)[:3], 8)
        if not calibrated:
            checks.append("quantized accuracy ran on uncalibrated tasks")
        elif sorted(accuracy) != sorted(final):
            checks.append(f"quantized accuracy for tasks {sorted(accuracy)}")
    except ValueError:
        if calibrated:
            checks.append("quantized accuracy refused calibrated tasks")
    if not c["ci"]:
        labels = sorted(final)
        x = torch.cat([xs[t] for t in labels])
        t = torch.cat([torch.full((len(xs[t]),), t) for t in labels])
        with torch.no_grad():
            mixed = strategy.tsn_model(x, t)
        if not torch.equal(mixed, torch.cat([final[t] for t in labels])):
            checks.append("a mixed-task minibatch differs from its tasks' own outputs")
    return compute_report(
        strategy.tsn_model, tuple(xs[0].shape[1:]), 8 if calibrated else None
    ).table()


def _check_copies(c, strategy, xs, final, checks: list[str]) -> None:
    """A state dict, the export in both forms and the tiny model: the same outputs, routing."""
    model = strategy.tsn_model
    routed = strategy.infer(torch.cat(xs))[0] if c["ci"] else None
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = TSNModel(_model(c))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    copies = {"state dict": fresh}
    buf = io.BytesIO()
    export_model(model, buf)
    for dequantize in (True, False):
        buf.seek(0)
        copies[f"export ({dequantize})"] = load_compressed(buf, _model(c), dequantize=dequantize)
    copies["tiny model"] = to_tiny(copy.deepcopy(model))
    for name, other in copies.items():
        if not _same(_outputs(other, xs, c["ci"]), final):
            checks.append(f"the {name} predicts differently")
        if routed is not None:
            other.task_inference = model.task_inference
            with torch.no_grad():
                if not torch.equal(other(torch.cat(xs)), routed):
                    checks.append(f"the {name} routes differently")


def _check_training_on(c, strategy, bm, xs, final, checks: list[str]) -> None:
    """A fourth task trained on the loaded export (memory kept): earlier tasks unchanged."""
    buf = io.BytesIO()
    export_model(strategy.tsn_model, buf, keep_memory=True)
    buf.seek(0)
    loaded = load_compressed(buf, _model(c))
    further = _strategy(c, loaded)
    further.train(list(bm.train_stream)[3], eval_streams=[])
    further.eval(bm.test_stream)
    if not _same(_outputs(further.tsn_model, xs, c["ci"]), final):
        checks.append("training a task on the loaded export changed an earlier task")


def _checkpointed(c: dict[str, Any], seed: int, path: str, stop_after: int):
    """3 tasks through Avalanche's checkpoints; None when stopped after ``stop_after``."""
    torch.manual_seed(seed)
    bm = _stream(c, seed)
    strategy, start = maybe_load_checkpoint(_strategy(c, _model(c)), path)
    for exp in list(bm.train_stream)[start:3]:
        torch.manual_seed(100 + exp.current_experience)
        strategy.train(exp, eval_streams=[])
        save_checkpoint(strategy, path)
        if exp.current_experience == stop_after:
            return None
    return _outputs(strategy.tsn_model, _probes(bm), c["ci"])


def sweep(seed: int, tmp_path) -> list[str]:
    """Every check of one drawn combination; the failed ones, named."""
    c = draw(seed)
    checks: list[str] = []
    strategy, bm, xs, final = _train_three(c, seed, checks)
    report = _check_reports(c, strategy, bm, xs, final, checks)
    _check_copies(c, strategy, xs, final, checks)
    tiny_report = compute_report(
        to_tiny(copy.deepcopy(strategy.tsn_model)),
        tuple(xs[0].shape[1:]),
        8 if c["kw"]["calibrate_activations"] else None,
    ).table()
    if tiny_report != report:
        checks.append("the tiny model's compute report differs")
    _check_training_on(c, strategy, bm, xs, final, checks)
    whole = _checkpointed(c, seed, str(tmp_path / "whole.pkl"), -1)
    assert _checkpointed(c, seed, str(tmp_path / "cut.pkl"), 1) is None
    if not _same(_checkpointed(c, seed, str(tmp_path / "cut.pkl"), -1), whole):
        checks.append("an Avalanche checkpoint resumed mid-stream ends elsewhere")
    return [f"{c}: {check}" for check in checks]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche's and numpy's deprecations, per plugin
        yield


@pytest.mark.parametrize("seed", [8, 21, 22, 39])
def test_drawn_combinations_keep_every_guarantee(seed, tmp_path):
    # draws that met the bugs the sweep found: 21 LwF with the memory rule (and its export's
    # routing), 22 EWC on a model without biases or heads; 8 Ada-QPacknet with the router;
    # 39 one head for all classes, LwF and the router, a task interrupted and abandoned
    assert sweep(seed, tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1060))
def test_many_drawn_combinations_keep_every_guarantee(seed, tmp_path):
    assert sweep(seed, tmp_path) == []


def test_the_draws_cover_each_strategy_plugin_and_inference_method():
    draws = [draw(seed) for seed in range(1000, 1060)]
    assert {c["strategy"] for c in draws} == set(STRATEGIES)
    assert {c["plugin"] for c in draws} == set(PLUGINS)
    assert {c["optimizer"] for c in draws} == set(OPTIMIZERS)
    methods = {c["kw"].get("task_inference") for c in draws}
    assert methods == {None, "router", "memory", "entropy", True}
    assert {c["model"] for c in draws} == {
        "mlp",
        "mlp_nobias",
        "multihead",
        "conv",
        "conv1d",
        "conv3d",
        "mlp_layernorm",
        "mlp_prelu",
        "conv_groupnorm",
        "tokens",
        "textconv",
    }
    ci_models = {c["model"] for c in draws if c["ci"]}
    assert ci_models >= {"mlp", "multihead"} and ci_models & {"conv", "conv1d", "conv3d"}
    assert {c["kw"]["eval_every"] for c in draws} == {-1, 0, 1}
    assert any(c["early_stopping"] for c in draws) and any(c["label_smoothing"] for c in draws)
    assert any(c["kw"]["memory_size"] == 2 for c in draws)
    assert any(c["interrupt"] for c in draws) and any(c["kw"]["eval_mb_size"] == 1 for c in draws)
    assert any(isinstance(c["kw"].get("sparsity"), list) for c in draws)
