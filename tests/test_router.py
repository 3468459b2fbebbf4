"""The learned task router (issue 26): fitting, guarantees, checkpoints, features together."""

from __future__ import annotations

import io

import pytest
import torch
from test_task_inference import _strategy, class_incremental

from avalanche_tsn import TSNStrategy
from avalanche_tsn.export import export_model, load_compressed
from avalanche_tsn.model import TSNModel
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.router import RouterSettings, TaskRouter, fit_samples, noisy_copies
from avalanche_tsn.tiny import to_tiny


def _trained(method="router", tasks=3, separable=True, **kwargs):
    torch.manual_seed(0)
    bm = class_incremental(separable=separable, n_tasks=tasks)
    strategy = _strategy(MultiHeadMLP(12, (16, 16)), method, **kwargs)
    fitted = []
    for exp in bm.train_stream:
        strategy.train(exp)
        fitted.append(strategy.tsn_model.task_router.fitted_tasks())
    return strategy, bm, fitted


def _test_x(bm):
    return torch.cat(
        [torch.stack([e.dataset[i][0] for i in range(len(e.dataset))]) for e in bm.test_stream]
    )


def test_router_is_the_default_refitted_after_every_task_and_routes_separable_tasks_exactly():
    strategy, bm, fitted = _trained(True)
    assert strategy.task_inference == "router"
    assert fitted == [[0], [0, 1], [0, 1, 2]]
    results = strategy.eval(bm.test_stream)
    assert results["TaskInference_Acc_Stream/eval_phase/test_stream"] == 1.0
    # what the router stores is counted: float32 statistics and weights
    router = strategy.tsn_model.task_router
    assert router.bits() == 32 * sum(b.numel() for n, b in router.named_buffers() if n != "labels")
    assert router.bits() > 0
    report = strategy.capacity_report()
    assert report.router_bits == router.bits() and "task router" in report.table()


def test_outlier_exposure_changes_what_a_new_task_learns_and_zero_turns_it_off():
    outs = {}
    for weight in (0.0, 0.5):
        strategy, bm, _ = _trained("router", separable=False, ood_weight=weight)
        model = strategy.tsn_model.eval()
        with torch.no_grad():
            outs[weight] = [model(_test_x(bm), t) for t in (0, 2)]
    # task 0 trains before any memory exists: the same with or without the loss
    assert torch.equal(outs[0.0][0], outs[0.5][0])
    assert not torch.equal(outs[0.0][1], outs[0.5][1])


def test_checkpoint_restores_the_same_routing_and_old_state_dicts_load_unfitted():
    strategy, bm, _ = _trained("router", separable=False)
    model = strategy.tsn_model.eval()
    x = _test_x(bm)
    out, tasks = strategy.infer(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = TSNModel(MultiHeadMLP(12, (16, 16)))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval().task_inference = "router"
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    # a state dict from before the router (0.5): loads, and the router refuses by name
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("task_router.")}
    older = TSNModel(MultiHeadMLP(12, (16, 16)))
    older.load_state_dict(old)
    assert older.task_router.fitted_tasks() == []
    older.eval().task_inference = "router"
    with pytest.raises(ValueError, match="router was fitted for tasks"):
        older(x)
    older.task_inference = "memory"
    older(x)  # the memory rule still works on it


def test_the_tiny_model_routes_as_the_full_one():
    strategy, bm, _ = _trained("router", separable=False)
    x = _test_x(bm)
    out, _ = strategy.infer(x)
    tiny = to_tiny(strategy.tsn_model)
    with torch.no_grad():
        assert torch.equal(tiny(x), out)


def test_bad_fit_inputs_are_refused_before_the_router_changes():
    strategy, _, _ = _trained("router", tasks=2)
    router = strategy.tsn_model.task_router
    before = {k: v.clone() for k, v in router.state_dict().items()}
    f = torch.randn(10, 16)
    good = torch.tensor([0] * 5 + [1] * 5)
    bad = [
        ([f], good, [0, 1]),  # one feature tensor for two tasks
        ([f, f], good.float(), [0, 1]),  # float targets
        ([f, f[:9]], good, [0, 1]),  # different sample counts
        ([f, f], torch.tensor([0] * 9 + [2]), [0, 1]),  # a target out of range
        ([f, f], torch.tensor([0] * 9 + [1]), [0, 1]),  # one sample of task 1
    ]
    for features, targets, labels in bad:
        with pytest.raises(ValueError):
            router.fit(features, targets, labels)
        for k, v in router.state_dict().items():
            assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"ood_weight": -0.1}, ValueError),
        ({"ood_weight": "0.5"}, TypeError),
        ({"ood_weight": float("nan")}, ValueError),
        ({"ood_weight": float("inf")}, ValueError),  # every loss would be nan
        ({"task_inference": "routers"}, ValueError),
        ({"task_inference": 1}, TypeError),
    ],
)
def test_router_arguments_are_checked_up_front(kwargs, error):
    net = MultiHeadMLP(12, (16, 16))
    with pytest.raises(error):
        TSNStrategy(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), **kwargs)


@pytest.mark.parametrize("name", ["lr", "weight_decay", "noise"])
def test_router_settings_refuse_infinite_values(name):
    with pytest.raises(ValueError, match=rf"router {name} must be a float in .*, inf\)"):
        RouterSettings(**{name: float("inf")})


def test_an_unfitted_router_scores_nothing():
    router = TaskRouter()
    assert router.fitted_tasks() == [] and router.bits() == 0
    with pytest.raises(ValueError, match="one feature tensor per task"):
        router.scores([torch.randn(3, 4)])


def test_the_compact_export_carries_the_router_and_loads_routing_the_same():
    strategy, bm, _ = _trained("router", separable=False)
    x = _test_x(bm)
    out, tasks = strategy.infer(x)
    buf = io.BytesIO()
    export_model(strategy.tsn_model, buf)
    for dequantize in (True, False):
        buf.seek(0)
        loaded = load_compressed(buf, MultiHeadMLP(12, (16, 16)), dequantize=dequantize)
        assert loaded.task_router.fitted_tasks() == [0, 1, 2]
        loaded.task_inference = "router"
        with torch.no_grad():
            assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("method", ["router", "memory"])
def test_an_avalanche_checkpoint_mid_stream_resumes_as_an_uninterrupted_run(tmp_path, method):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    def run(path, crash_after):
        torch.manual_seed(0)
        bm = class_incremental(separable=False, n_tasks=3)
        strategy = _strategy(MultiHeadMLP(12, (16, 16)), method)
        strategy, start = maybe_load_checkpoint(strategy, str(path))
        for exp in list(bm.train_stream)[start:]:
            torch.manual_seed(exp.current_experience)
            strategy.train(exp, eval_streams=[])
            save_checkpoint(strategy, str(path))
            if exp.current_experience == crash_after:
                return None
        return strategy.infer(_test_x(bm)), strategy.tsn_model.memory(0)

    (out, tasks), memory = run(tmp_path / "full.pkl", crash_after=-1)
    assert run(tmp_path / "cut.pkl", crash_after=1) is None
    (out_resumed, tasks_resumed), memory_resumed = run(tmp_path / "cut.pkl", crash_after=-1)
    # the third task trained after the resume: its outlier exposure, memory and routing
    # read the restored memory and router exactly
    assert torch.equal(tasks, tasks_resumed) and torch.equal(out, out_resumed)
    assert torch.equal(memory, memory_resumed)
    assert len(set(tasks.tolist())) == 3


def test_noisy_copies_keep_the_memory_and_are_seeded() -> None:
    memory = torch.randn(10, 6)
    copies = noisy_copies(memory, 4, 0.5, torch.Generator().manual_seed(0))
    again = noisy_copies(memory, 4, 0.5, torch.Generator().manual_seed(0))
    assert copies.shape == (50, 6) and torch.equal(copies, again)
    assert torch.equal(copies[:10], memory)  # the memory itself, first
    noise = (copies[10:].view(4, 10, 6) - memory).flatten()
    assert 0.3 < float(noise.std() / memory.std()) < 0.7  # 0.5 of the memory's spread
    assert noisy_copies(memory, 0, 0.5, torch.Generator()) is memory
    assert torch.equal(noisy_copies(memory, 2, 0.0, torch.Generator())[10:20], memory)
    for bad in ({"copies": -1}, {"noise": -0.5}):
        with pytest.raises(ValueError):
            RouterSettings(**bad)
    with pytest.raises(TypeError):
        RouterSettings(copies=2.5)


def test_fit_samples_copy_only_the_memories_in_task_order() -> None:
    settings = RouterSettings(copies=3, noise=0.5, seed=4)
    memory, current = torch.randn(5, 2), torch.randn(7, 2)
    x, targets = fit_samples([memory, current], [True, False], settings)
    assert targets.tolist() == [0] * 20 + [1] * 7
    assert torch.equal(x[:5], memory) and torch.equal(x[20:], current)
    assert not torch.equal(x[5:10], memory)  # the copies are noisy
    expected = noisy_copies(memory, 3, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(x[:20], expected)  # seeded by the settings
    with pytest.raises(ValueError, match="one memories flag per task"):
        fit_samples([memory, current], [True], settings)


def test_noisy_copies_of_token_ids_are_exact_copies() -> None:
    ids = torch.randint(0, 40, (5, 7), generator=torch.Generator().manual_seed(0))
    copies = noisy_copies(ids, 3, 0.5, torch.Generator().manual_seed(0))
    assert copies.dtype == torch.long and torch.equal(copies, ids.repeat(4, 1))
