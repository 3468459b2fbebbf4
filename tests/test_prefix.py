"""Validation passes that resume at the first changed stage: the same outputs, fewer forwards."""

from __future__ import annotations

import pytest
import torch
from conftest import adam_strategy, compression_outcome, image_stream, same_outcome
from torch import nn

from avalanche_tsn.models import MultiHeadMLP, ReducedAlexNet, ReducedResNet18
from avalanche_tsn.prefix import PrefixCache, staged_forward
from avalanche_tsn.stages import stage_context


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)
    )


def _pass(cache: PrefixCache, batches: list[torch.Tensor], commit: bool = True):
    start = cache.begin()
    with torch.no_grad():
        outs = [cache.forward(i, x) for i, x in enumerate(batches)]
    if commit:
        cache.commit()
    return start, outs


def _same_as_whole(net: nn.Module, outs: list[torch.Tensor], batches: list[torch.Tensor]) -> bool:
    with torch.no_grad():
        return all(torch.equal(o, net(x)) for o, x in zip(outs, batches, strict=True))


def test_a_pass_resumes_at_the_first_changed_stage_with_the_whole_forwards_outputs():
    net, batches = _net(), list(torch.randn(12, 6).split(4))
    cache = PrefixCache(list(net), lambda h: h, len(batches))
    start, outs = _pass(cache, batches)
    assert start == 0 and cache.stage_runs == 6 * 3 and _same_as_whole(net, outs, batches)
    assert cache.stored_points == [2, 4, 5, 6]  # in front of each stage with state, and the head
    with torch.no_grad():
        net[4].weight[0, 0] += 1.0  # the fifth stage changes
    runs = cache.stage_runs
    start, outs = _pass(cache, batches)
    assert start == 4 and cache.stage_runs - runs == 2 * 3
    assert _same_as_whole(net, outs, batches)
    # a try that changes an earlier stage, stops early, and is put back: the stored inputs
    # are still those of the state it returns to (values compared, not version counters)
    saved = net[2].weight.clone()
    with torch.no_grad():
        net[2].weight.mul_(-1.0)
    start, outs = _pass(cache, batches[:1], commit=False)
    assert start == 2 and _same_as_whole(net, outs, batches[:1])
    with torch.no_grad():
        net[2].weight.copy_(saved)
    runs = cache.stage_runs
    start, outs = _pass(cache, batches)
    assert start == 6 and cache.stage_runs == runs  # only the head ran
    assert _same_as_whole(net, outs, batches)
    with pytest.raises(RuntimeError, match="every minibatch"):
        cache.begin()
        cache.commit()


def test_minibatches_given_other_samples_run_whole_until_a_complete_pass_stores_them():
    net, batches = _net(), list(torch.randn(12, 6).split(4))
    cache = PrefixCache(list(net), lambda h: h, len(batches))
    _pass(cache, batches)
    stored = net[4].weight.clone()
    with torch.no_grad():
        net[4].weight.add_(0.1)  # stages 0-3 as stored
    moved = [batches[0].flip(0), batches[1], torch.randn(4, 6)]  # minibatches 0 and 2 change
    cache.forget([0, 2])
    runs = cache.stage_runs
    # a stopped pass reads the changed one from its input; its inputs up to the pass's
    # start (stages 0-3 are as stored) are stored again at once
    seen = []
    hook = net[4].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    start, outs = _pass(cache, moved[:1], commit=False)
    hook.remove()
    assert start == 4 and cache.stage_runs - runs == 6 and _same_as_whole(net, outs, moved[:1])
    seen[0].zero_()  # a hook that kept its input writes into it: that one is not used again
    with torch.no_grad():
        net[4].weight.copy_(stored)  # stages 0-4 as stored: the next pass starts at stage 5
        net[5].weight.add_(0.1)
    runs = cache.stage_runs
    start, outs = _pass(cache, moved)
    # the unchanged one resumes at stage 5, the first at 2 (stored again that far, its
    # input of stage 4 written into), the other changed one runs every stage
    assert start == 5 and cache.stage_runs - runs == 4 + 1 + 6
    assert _same_as_whole(net, outs, moved)
    runs = cache.stage_runs
    start, outs = _pass(cache, moved)  # nothing changed: only the head runs, for all three
    assert start == 6 and cache.stage_runs == runs and _same_as_whole(net, outs, moved)
    # stored again, before and after the pass's start: the next passes resume for all three
    with torch.no_grad():
        net[2].weight.add_(0.1)
    runs = cache.stage_runs
    start, outs = _pass(cache, moved)
    assert start == 2 and cache.stage_runs - runs == 3 * 4 and _same_as_whole(net, outs, moved)
    with pytest.raises(ValueError, match="minibatch indices"):
        cache.forget([3])
    with pytest.raises(TypeError, match="minibatch indices"):
        cache.forget([1.0])


def test_a_cache_refuses_a_count_or_budget_that_is_not_an_int_in_range():
    stages = list(_net())
    for kwargs, error in (
        ({"n_batches": 0}, ValueError),
        ({"n_batches": 2.0}, TypeError),
        ({"n_batches": 2, "budget": -1}, ValueError),
        ({"n_batches": 2, "budget": 1.5}, TypeError),
    ):
        with pytest.raises(error, match="n_batches|budget"):
            PrefixCache(stages, lambda h: h, **kwargs)


def test_changes_the_cache_cannot_trust_make_it_run_again():
    net, batches = _net(), list(torch.randn(12, 6).split(4))
    cache = PrefixCache(list(net), lambda h: h, len(batches))
    _pass(cache, batches)
    with torch.no_grad():
        net[0].weight[1, 1] = float("nan")  # NaN is not equal to itself: the stage reruns
    for _ in range(2):
        start, outs = _pass(cache, batches)
        assert start == 0
        for o, x in zip(outs, batches, strict=True):
            torch.testing.assert_close(o, net(x).detach(), rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        net[0].weight[1, 1] = 0.0
    seen = []
    hook = net[5].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _pass(cache, batches)
    hook.remove()
    seen[0].zero_()  # a hook that kept the last stage's input writes into it: not used again
    with torch.no_grad():
        net[5].weight.add_(0.5)
    start, outs = _pass(cache, batches)
    assert start == 4 and _same_as_whole(net, outs, batches)


def test_a_stage_that_writes_into_its_input_is_never_resumed_from():
    class AddsInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.add_(self.shift)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), AddsInPlace(), nn.Linear(8, 3))
    batches = list(torch.randn(8, 6).split(4))
    cache = PrefixCache(list(net), lambda h: h, len(batches))
    _pass(cache, batches)
    with torch.no_grad():
        net[2].weight.add_(0.5)
        expected = [net(x) for x in batches]
        net[1].shift.add_(1.0)  # the in-place stage itself changes: it must read fresh inputs
        expected2 = [net(x) for x in batches]
        net[1].shift.sub_(1.0)
    assert all(map(torch.equal, _pass(cache, batches)[1], expected))
    with torch.no_grad():
        net[1].shift.add_(1.0)
    start, outs = _pass(cache, batches)
    assert start == 0 and all(map(torch.equal, outs, expected2))


def test_a_stage_input_that_is_not_a_tensor_is_not_stored():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.a(pair[0]) + pair[1]

    torch.manual_seed(0)
    split, pair, last = nn.Linear(4, 4), Pair(), nn.Linear(4, 2)
    stages = [split, lambda h: (h, h.relu()), pair, last]
    batches = list(torch.randn(6, 4).split(3))
    cache = PrefixCache(stages, lambda h: h, len(batches))
    _pass(cache, batches)
    with torch.no_grad():
        pair.a.weight.add_(0.5)
        expected = [last(pair((split(x), split(x).relu()))) for x in batches]
    start, outs = _pass(cache, batches)
    assert start == 0 and all(map(torch.equal, outs, expected))
    with torch.no_grad():
        last.weight.add_(0.5)
        expected = [last(pair((split(x), split(x).relu()))) for x in batches]
    start, outs = _pass(cache, batches)
    assert start == 3 and all(map(torch.equal, outs, expected))


def test_over_the_budget_the_earliest_inputs_go_and_outputs_stay_exact():
    net, batches = _net(), list(torch.randn(12, 6).split(4))
    one_point = sum(t.nbytes for t in torch.randn(12, 8).split(4))
    cache = PrefixCache(list(net), lambda h: h, len(batches), budget=2 * one_point)
    held = []
    for stage in net:
        stage.register_forward_pre_hook(lambda *_: held.append(cache.held_bytes))
    _pass(cache, batches)
    # chosen from the first minibatch: the pass never gathered what it would not keep
    assert 0 < max(held) <= 2 * one_point
    assert cache.stored_points == [5, 6]  # (the two latest of 2, 4, 5, 6)
    with torch.no_grad():
        net[4].weight.add_(0.1)
    start, outs = _pass(cache, batches)
    assert start == 0 and _same_as_whole(net, outs, batches)
    assert cache.held_bytes <= 2 * one_point


def _image_net_cases() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        (MultiHeadMLP(12, (8, 8), 3), torch.randn(5, 12)),
        (ReducedResNet18(n_classes=3, nf=4), torch.randn(5, 3, 8, 8)),
        (ReducedResNet18(n_classes=3, nf=4, multihead=False), torch.randn(5, 3, 8, 8)),
        (ReducedAlexNet(n_classes=3), torch.randn(5, 3, 32, 32)),
    ]


def test_the_packages_models_stages_and_head_are_their_forward():
    for net, x in _image_net_cases():
        net.eval()
        stages, head = staged_forward(net, 0)
        h = x
        for stage in stages:
            h = stage(h)
        with torch.no_grad():
            assert torch.equal(head(h), net(x, 0))


def test_a_forward_without_a_staged_form_is_not_staged():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) + x

    class Overrides(ReducedResNet18):  # a new forward: the inherited stages may be wrong
        def forward(self, x, task_labels=None):
            return super().forward(x * 2, task_labels)

    class SequentialWithForward(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    assert staged_forward(Custom(), 0) is None
    assert staged_forward(Overrides(nf=4), 0) is None
    assert staged_forward(SequentialWithForward(nn.Linear(2, 2)), 0) is None
    assert staged_forward(nn.Sequential(nn.Linear(2, 2)), 0) is not None


def _images():
    return image_stream(3, 8, (240, 60), spread=3.0, noise=1.0)


@pytest.mark.parametrize("search, passes", [("joint", 3), ("layerwise", 2)])
def test_pruning_and_quantization_decide_the_same_with_fewer_stage_runs(
    monkeypatch, search, passes
):
    from avalanche_tsn.plugins import compression

    def run(cached: bool):
        if not cached:
            monkeypatch.setattr(compression, "model_cache", lambda *args: None)
        torch.manual_seed(0)
        bm = _images()
        strategy = adam_strategy(
            ReducedResNet18(n_classes=3, nf=4), prune_search=search, prune_iterations=passes,
            prune_max_drop=0.05,
            quant_max_drop=0.05, eval_mb_size=8, validation_fraction=0.3,
        )  # fmt: skip
        convs = {"n": 0}
        strategy.model.net.features[0].register_forward_pre_hook(
            lambda *_: convs.__setitem__("n", convs["n"] + 1)
        )
        strategy.train(bm.train_stream, eval_streams=[])
        monkeypatch.undo()
        assert stage_context(strategy).validation_prefix is None  # let go after train()
        return compression_outcome(strategy, bm), convs["n"]

    outcome, n = run(cached=True)
    outcome_w, n_w = run(cached=False)
    assert same_outcome(outcome, outcome_w)
    records = outcome[0]
    assert any(r.evaluations > 3 for r in records)
    assert any(r.own_after < r.own_before for r in records)
    assert n < n_w  # the first stage ran in fewer passes (training runs it alike in both)


def test_passes_as_different_tasks_never_share_stored_inputs():
    from avalanche_tsn.plugins.compression import validation_accuracy

    torch.manual_seed(0)
    bm = _images()
    strategy = adam_strategy(ReducedResNet18(n_classes=3, nf=4), prune=False, quantize=False)
    strategy.train(bm.train_stream[:2], eval_streams=[])
    ctx = stage_context(strategy)
    ctx.new_validation(bm.test_stream[1].dataset.eval())
    validation_accuracy(strategy, 1)  # the first pass orders the split
    x = torch.cat([x for x, _ in ctx.validation_batches])
    y = torch.cat([y for _, y in ctx.validation_batches])
    with torch.no_grad():
        whole = {t: int((strategy.model(x, t).argmax(1) == y).sum()) / len(y) for t in (0, 1)}
    assert whole[0] != whole[1]
    for t in (0, 1, 0, 1):
        ctx.validation_memo = None  # (the memo would answer before any stage runs)
        assert validation_accuracy(strategy, t) == whole[t]


def test_the_live_subnetwork_always_runs_whole_passes(monkeypatch):
    # (its forward also depends on its sparsity, an int no tensor comparison would see)
    from avalanche.models.utils import avalanche_model_adaptation

    from avalanche_tsn.plugins import compression

    torch.manual_seed(0)
    bm = _images()
    strategy = adam_strategy(ReducedResNet18(n_classes=3, nf=4), prune=False, quantize=False)
    strategy.train(bm.train_stream[:1], eval_streams=[])
    avalanche_model_adaptation(strategy.model, bm.train_stream[1])  # task 1's head
    made = []
    real = compression.model_cache

    def recorded(*args):
        cache = real(*args)
        made.append((args[1], cache is not None))
        return cache

    monkeypatch.setattr(compression, "model_cache", recorded)
    stage_context(strategy).new_validation(bm.test_stream[0].dataset.eval())
    for task in (1, 0, 1):  # task 1 is not trained: its live subnetwork runs
        compression.validation_accuracy(strategy, task)
    # the passes as task 1 have no cache; the one as task 0 has
    assert [task for task, cached in made if cached] == [0]
    assert {task for task, _ in made} == {0, 1}


@pytest.mark.parametrize("family", ["TSNStrategy", "AdaQPacknetStrategy"])  # (WSN: no passes)
def test_every_strategy_of_the_family_learns_the_same_with_the_cache(monkeypatch, family):
    import avalanche_tsn
    from avalanche_tsn.plugins import compression

    cls = getattr(avalanche_tsn, family)
    made = []
    real = compression.model_cache

    def run(cached: bool):
        if not cached:
            monkeypatch.setattr(compression, "model_cache", lambda *args: None)
        else:
            monkeypatch.setattr(compression, "model_cache", lambda *a: made.append(a) or real(*a))
        torch.manual_seed(0)
        bm = image_stream(3, 4, (120, 45), spread=1.0, noise=1.0)
        strategy = adam_strategy(MultiHeadMLP(48, (16, 16), 3), cls=cls)
        strategy.train(bm.train_stream, eval_streams=[])
        monkeypatch.undo()
        x = torch.cat([torch.stack([d[0] for d in e.dataset]) for e in bm.test_stream])
        with torch.no_grad():
            outputs = [strategy.model(x, t) for t in range(3)]
        return outputs, strategy.capacity_report().total_bits

    (outputs, bits), (outputs_w, bits_w) = run(cached=True), run(cached=False)
    assert made and bits == bits_w and all(map(torch.equal, outputs, outputs_w))
