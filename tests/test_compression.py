"""Pruning, quantization, Huffman coding and the capacity report."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import (
    blob_stream,
    compression_outcome,
    mlp,
    quiet_evaluator,
    same_outcome,
    train_tsn,
)
from torch import nn

from avalanche_tsn import TSNModel, TSNStrategy
from avalanche_tsn.capacity import FLOAT_BITS, capacity_report, owner_symbols, shared_bitmap
from avalanche_tsn.huffman import decode_mask, decode_symbols, encode_mask, encode_symbols
from avalanche_tsn.layers import FREE
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.pruning import greedy_prune
from avalanche_tsn.quantization import kmeans_1d


def train(model=None, tasks=3, **kw):
    return train_tsn(model, tasks=tasks, **kw)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_kmeans_has_at_most_2b_values_and_is_a_fixed_point(bits):
    v = torch.randn(5000)
    book = kmeans_1d(v, bits)
    q = book.values()
    assert len(torch.unique(q)) <= 2**bits
    # Lloyd fixed point: each centroid is the mean of its members, members nearest to it
    for c in range(2**bits):
        members = v[book.codes == c]
        if len(members):
            assert torch.isclose(members.double().mean().float(), book.centroids[c], atol=1e-4)
    nearest = (v[:, None] - book.centroids[None]).abs().argmin(1)
    assert (book.centroids[nearest] - v).abs().le((q.flatten() - v).abs() + 1e-6).all()


def test_quantized_layers_hold_at_most_2b_values_per_task():
    strategy, _ = train(prune=False, quant_min_bits=2, quant_max_bits=3, quant_max_drop=0.5)
    model = strategy.tsn_model
    quant = next(p for p in strategy.plugins if type(p).__name__ == "QuantizationPlugin")
    for label in model.trained_tasks():
        slot = model.slot_of(label)
        for _, layer in model.masked_layers():
            b = int(layer.task_bits[slot])
            assert b == quant.bits[label]
            own = layer.own_values(slot)
            assert len(torch.unique(own)) <= 2**b
            assert set(torch.unique(own).tolist()) <= set(layer.task_centroids[slot].tolist())


def test_pruned_weights_are_free_and_out_of_the_mask():
    strategy, _ = train(quantize=False, prune_max_drop=0.5, prune_iterations=2)
    model = strategy.tsn_model
    prune = next(p for p in strategy.plugins if type(p).__name__ == "PruningPlugin")
    assert any(r.own_after < r.own_before for r in prune.records)
    for r in prune.records:
        assert r.sparsity_after >= r.sparsity_before
    for _, layer in model.masked_layers():
        for slot in range(3):
            own = layer.owner == slot
            # every weight a task owns is in its mask; nothing outside its mask is owned by it
            assert not (own & ~layer.task_mask(slot)).any()
            # a task's mask holds only its own weights and weights of earlier tasks
            others = layer.task_mask(slot) & ~own
            assert ((layer.owner[others] >= 0) & (layer.owner[others] < slot)).all()


def test_pruning_frees_weights_for_later_tasks():
    strategy, _ = train(tasks=2, quantize=False, prune_max_drop=0.9, prune_step=0.5)
    model = strategy.tsn_model
    prune = next(p for p in strategy.plugins if type(p).__name__ == "PruningPlugin")
    assert prune.records[0].own_after < prune.records[0].own_before
    # after task 0 was pruned some weights were free; task 1 may own some of them, and
    # task 0's mask never contains a weight owned by task 1
    for _, layer in model.masked_layers():
        assert not (layer.task_mask(0) & (layer.owner == 1)).any()


def _own_counts(model, slot):
    return [int(layer.own_mask(slot).sum()) for _, layer in model.masked_layers()]


@pytest.mark.parametrize("search", ["joint", "layerwise", "bisect"])
def test_pruning_searches_drop_what_the_validation_allows(search):
    """Layer 0 tolerates losing at most 30% of its own weights; the others anything."""
    strategy, _ = train(tasks=1, prune=False, quantize=False)
    model = strategy.tsn_model
    first = next(layer for _, layer in model.masked_layers())
    start = _own_counts(model, 0)
    owned = [layer.own_mask(0).clone() for _, layer in model.masked_layers()]
    calls = []

    def evaluate():
        calls.append(1)
        return 1.0 if int(first.own_mask(0).sum()) >= 0.7 * start[0] else 0.0

    record = greedy_prune(model, 0, evaluate, iterations=4, step=0.25, max_drop=0.01, search=search)
    after = _own_counts(model, 0)
    assert record.evaluations == len(calls) and record.own_after == sum(after)
    assert record.own_before == sum(start) and record.sparsity_after > record.sparsity_before
    assert 0.7 * start[0] <= after[0] < start[0]
    most = 1 - 0.75**4  # four accepted steps of 25%
    if search == "bisect":
        # one fraction for every layer, bisected to most / 2**4 below the 30% limit
        assert calls and len(calls) <= 4 + 2
        fraction = 1 - after[0] / start[0]
        assert 0.3 - most / 2**4 <= fraction <= 0.3 + 1 / start[0]
        for n0, n1 in zip(start[1:], after[1:], strict=True):
            assert abs((n0 - n1) - int(n0 * fraction)) <= max(1, 0.02 * n0)
    else:
        # the other layers lose their 25% four times over
        for n0, n1 in zip(start[1:], after[1:], strict=True):
            assert n1 <= n0 * (1 - most) + 4
    # what is dropped is each layer's smallest magnitudes, and the mask follows ownership
    for (_, layer), before in zip(model.masked_layers(), owned, strict=True):
        values = layer.bank_weights[0].abs()
        own = layer.own_mask(0)
        dropped = before & ~own
        assert (layer.owner[dropped] == FREE).all() and not (own & ~before).any()
        assert torch.equal(layer.task_mask(0), own)
        if dropped.any() and own.any() and search != "layerwise":
            assert values[dropped].max() <= values[own].min()


def test_joint_search_drops_everything_allowed_in_one_pass_when_it_can():
    masks = {}
    for search in ("layerwise", "joint"):
        torch.manual_seed(0)
        strategy, _ = train(tasks=1, prune=False, quantize=False)
        model = strategy.tsn_model
        record = greedy_prune(
            model, 0, lambda: 1.0, iterations=5, step=0.2, max_drop=0.0, search=search
        )
        masks[search] = [layer.task_mask(0) for _, layer in model.masked_layers()]
        passes = record.evaluations
    assert passes == 2  # the baseline and every pass's drop at once
    # the same weights as five accepted passes of every layer
    assert all(torch.equal(a, b) for a, b in zip(*masks.values(), strict=True))


def test_joint_search_starts_its_passes_from_the_largest_drop_every_layer_takes():
    """Every layer can lose three passes' worth, none a fourth: found from the top down."""
    strategy, _ = train(tasks=1, prune=False, quantize=False)
    model = strategy.tsn_model
    start = _own_counts(model, 0)
    limits = [n - n * 0.8**3 for n in start]  # 3 accepted drops of 20% (rounded down each)

    def evaluate():
        dropped = [n0 - n1 for n0, n1 in zip(start, _own_counts(model, 0), strict=True)]
        return 1.0 if all(d <= lim + 1 for d, lim in zip(dropped, limits, strict=True)) else 0.0

    record = greedy_prune(model, 0, evaluate, iterations=5, step=0.2, max_drop=0.0)
    layers = len(start)
    assert layers >= 2
    # the baseline, five and four passes' drops rejected, three accepted, then the fourth
    # pass's halves down to single layers (2 * layers - 2 tries), all rejected; passes from
    # the bottom spend two tries more (five passes' drop, three accepted, the fourth's whole)
    assert record.evaluations == 1 + 3 + 2 * layers - 2
    for n0, n1 in zip(start, _own_counts(model, 0), strict=True):
        n = n0
        for _ in range(3):
            n -= int(n * 0.2)
        assert n1 == n  # each layer's three passes' drop, as the passes from the bottom


def test_a_pass_where_most_layers_fail_tries_the_rest_one_by_one():
    """Eight layers, none of which may lose a fourth pass: after the first two single layers
    are rejected the others are tried alone, not split in halves (Hwang's rule)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(7):
        layers += [nn.Linear(12, 12), nn.ReLU()]
    strategy, _ = train(nn.Sequential(*layers, nn.Linear(12, 3)), tasks=1, prune=False)
    model = strategy.tsn_model
    start = _own_counts(model, 0)
    assert len(start) == 8
    limits = [n - n * 0.8**3 for n in start]

    def evaluate():
        dropped = [n0 - n1 for n0, n1 in zip(start, _own_counts(model, 0), strict=True)]
        return 1.0 if all(d <= lim + 1 for d, lim in zip(dropped, limits, strict=True)) else 0.0

    record = greedy_prune(model, 0, evaluate, iterations=5, step=0.2, max_drop=0.0)
    # the baseline, five and four passes' drops rejected, three accepted; then the fourth
    # pass: its first half, that half's first half, its two layers (rejected: two of two),
    # then the six others one by one (halving to the end: 2 * 8 - 2 = 14 tries, not 10)
    assert record.evaluations == 1 + 3 + (1 + 1 + 2 + 6)
    for n0, n1 in zip(start, _own_counts(model, 0), strict=True):
        n = n0
        for _ in range(3):
            n -= int(n * 0.2)
        assert n1 == n


def test_release_and_reclaim_check_ownership_and_later_reads_before_changing_anything():
    strategy, _ = train(tasks=2, prune=False, quantize=False)
    layer = next(layer for _, layer in strategy.tsn_model.masked_layers())
    state = [t.clone() for t in layer.slot_state(0)]
    owner = layer.slot_owner(0).flatten()
    read_later = (layer.task_mask(1).flatten() & (owner == 0)).nonzero().squeeze(1)
    only_mine = (~layer.task_mask(1).flatten() & (owner == 0)).nonzero().squeeze(1)
    not_mine = (owner != 0).nonzero().squeeze(1)
    assert len(read_later) and len(only_mine) and len(not_mine)
    mixed = torch.cat([only_mine[:3], read_later[:1]])
    with pytest.raises(ValueError, match="slot 1 reads"):
        layer.release(0, mixed)
    with pytest.raises(ValueError, match="only weights the task in slot 0 owns"):
        layer.release(0, torch.cat([only_mine[:3], not_mine[:1]]))
    with pytest.raises(ValueError, match="only free weights"):
        layer.reclaim(0, only_mine[:3])
    assert all(torch.equal(a, b) for a, b in zip(state, layer.slot_state(0), strict=True))
    layer.release(0, only_mine[:3])
    assert (layer.slot_owner(0).flatten()[only_mine[:3]] == FREE).all()
    assert not layer.task_mask(0).flatten()[only_mine[:3]].any()
    layer.reclaim(0, only_mine[:3])
    assert all(torch.equal(a, b) for a, b in zip(state, layer.slot_state(0), strict=True))


def test_bisect_search_stops_after_two_passes_when_everything_can_go():
    strategy, _ = train(tasks=1, prune=False, quantize=False)
    model = strategy.tsn_model
    start = _own_counts(model, 0)
    record = greedy_prune(
        model, 0, lambda: 1.0, iterations=5, step=0.2, max_drop=0.0, search="bisect"
    )
    assert record.evaluations == 2  # the baseline and the largest drop
    for n0, n1 in zip(start, _own_counts(model, 0), strict=True):
        assert n0 - n1 == int(n0 * (1 - 0.8**5))


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_huffman_mask_round_trip(density):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(37, 29, generator=g) < density
    code = encode_mask(mask)
    assert torch.equal(decode_mask(code, mask.shape), mask)
    restored, end = type(code).from_bytes(code.to_bytes())
    assert restored == code and end == len(code.to_bytes())


def test_huffman_symbols_round_trip_and_corruption():
    symbols = np.random.RandomState(0).randint(0, 12, size=999)
    code = encode_symbols(symbols)
    assert (decode_symbols(code) == symbols).all()
    with pytest.raises(ValueError):
        type(code).from_bytes(code.to_bytes()[:-5])


def test_capacity_arithmetic_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    model = TSNModel(net, sparsity=0.5)
    l1, l2 = net[0], net[2]
    # task 0 (slot 0): trained by hand
    model.begin_task(0, 0.5)
    model.end_task(0)
    l1.set_codebook(0, torch.tensor([0.1, 0.2, 0.3, 0.4]), 2)
    l2.set_codebook(0, torch.tensor([0.5, 0.6, 0.7, 0.8]), 2)
    report = capacity_report(model)
    own1, own2 = int((l1.owner == 0).sum()), int((l2.owner == 0).sum())
    assert (own1, own2) == (6, 3)  # keep_count(12, .5), keep_count(6, .5)
    t = report.tasks[0]
    assert t.own_weights == 9 and t.shared_weights == 0 and t.bits == 2
    assert t.weight_bits == 9 * 2
    assert t.codebook_bits == 2 * 4 * 32
    assert t.mask_bits == 0  # nothing earlier to share
    assert t.head_bits == 0 and t.norm_bits == 0
    # one trained task: ownership maps are coded as pairs of (owner + 1) in {0, 1}
    owner_bits = sum(
        encode_symbols(owner_symbols(layer.owner.flatten().numpy(), 1)).nbits for layer in (l1, l2)
    )
    assert report.ownership_bits == owner_bits
    assert report.total_bits == 18 + 256 + owner_bits
    assert report.dense_bits == report.backbone_dense_bits == 18 * FLOAT_BITS
    assert report.percent == pytest.approx(100 * report.total_bits / (18 * 32))
    split = report.backbone_split()
    assert split["weights"] == pytest.approx(100 * 18 / 576)
    assert split["masks"] == pytest.approx(100 * owner_bits / 576)


def test_capacity_counts_heads_norms_and_shared_masks():
    strategy, _ = train(model=MultiHeadMLP(12, (16, 16), 3, bias=True), tasks=2)
    report = strategy.capacity_report()
    model = strategy.tsn_model
    head = model.net.classifier.classifiers["1"].classifier
    hb = int(model.head_bits[model.slot_of(1)])
    assert 1 <= hb <= 8
    # quantized head: codes + one codebook, bias in float32
    assert report.tasks[1].head_bits == head.weight.numel() * hb + 2**hb * 32 + 32 * 3
    assert len(torch.unique(head.weight)) <= 2**hb
    assert report.tasks[1].norm_bits == 32 * (16 + 16)
    slot = model.slot_of(1)
    expected = sum(
        encode_mask(shared_bitmap(layer.owner, layer.task_mask(slot), slot)).nbits
        for _, layer in model.masked_layers()
    )
    assert report.tasks[1].mask_bits == expected > 0
    assert report.total_bits == sum(t.total_bits for t in report.tasks) + report.ownership_bits


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"validation_fraction": 0.0}, "validation_fraction"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"prune_step": 1.5}, "prune_step"),
        ({"prune_max_drop": -0.1}, "prune_max_drop"),
        ({"prune_iterations": 0}, "prune_iterations"),
        ({"quant_min_bits": 0}, "quant_min_bits"),
        ({"quant_max_bits": 17}, "quant_max_bits"),
        ({"quant_min_bits": 6, "quant_max_bits": 4}, "quant_max_bits"),
        ({"quant_max_drop": 1.0}, "quant_max_drop"),
    ],
)
def test_bad_compression_arguments(kwargs, match):
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_validation_fraction_leaving_an_empty_split_fails_before_training():
    bm = blob_stream(n_tasks=2, n=6)
    model = mlp()
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        evaluator=quiet_evaluator(),
        validation_fraction=0.05,
    )
    with pytest.raises(ValueError, match="empty split"):
        strategy.train(bm.train_stream, eval_streams=[])
    assert strategy.tsn_model.trained_tasks() == []
    assert all((layer.owner == FREE).all() for _, layer in strategy.tsn_model.masked_layers())


def test_heads_stay_float_when_quant_heads_is_off():
    strategy, _ = train(model=MultiHeadMLP(12, (16, 16), 3, bias=True), tasks=2, quant_heads=False)
    model = strategy.tsn_model
    assert model.head_bits.tolist() == [0, 0]
    head = model.net.classifier.classifiers["1"]
    weight, bias = head.classifier.weight, head.classifier.bias
    assert strategy.capacity_report().tasks[1].head_bits == 32 * (weight.numel() + bias.numel())


def test_capacity_metrics_reach_avalanche_loggers(tmp_path):
    from avalanche.logging import TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_tsn.metrics import capacity_metrics

    log_file = tmp_path / "log.txt"
    with open(log_file, "w") as f:
        evaluator = EvaluationPlugin(capacity_metrics(), loggers=[TextLogger(f)])
        model = MultiHeadMLP(12, (16, 16), 3)
        strategy = TSNStrategy(
            model=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
            train_mb_size=16,
            evaluator=evaluator,
        )
        strategy.train(blob_stream(n_tasks=2).train_stream, eval_streams=[])
    report = strategy.capacity_report()
    history = evaluator.get_all_metrics()
    assert history["Capacity/percent"][1][-1] == pytest.approx(report.percent)
    assert len(history["Capacity/percent"][1]) == 2  # one value per experience
    assert history["Capacity/Task001/bits"][1][-1] == report.tasks[1].total_bits
    assert "Capacity/backbone_masks_percent" in log_file.read_text()


def _head_search_run(monkeypatch, fast: bool):
    from avalanche_tsn.plugins import compression

    calls = {"full": 0}
    full = compression.validation_accuracy

    def counted(*args, **kwargs):
        calls["full"] += 1
        return full(*args, **kwargs)

    monkeypatch.setattr(compression, "validation_accuracy", counted)
    if not fast:
        monkeypatch.setattr(compression, "head_validation", lambda *a: None)
    torch.manual_seed(0)
    net = MultiHeadMLP(12, (16, 16), 3)
    strategy, bm = train(net, prune=False, quant_max_drop=0.02, quant_max_bits=6)
    monkeypatch.undo()
    quant = next(p for p in strategy.plugins if type(p).__name__ == "QuantizationPlugin")
    data = [bm.test_stream[t].dataset for t in range(3)]
    x = torch.stack([d[i][0] for d in data for i in range(len(d))])
    outputs = [strategy.model(x, t) for t in range(3)]
    return quant.head_bits, outputs, calls["full"]


def test_head_search_from_cached_features_chooses_and_computes_the_same(monkeypatch):
    fast_bits, fast_out, fast_calls = _head_search_run(monkeypatch, fast=True)
    slow_bits, slow_out, slow_calls = _head_search_run(monkeypatch, fast=False)
    assert fast_bits == slow_bits and len(fast_bits) == 3
    assert all(map(torch.equal, fast_out, slow_out))
    # each head bit-width tried is one full pass fewer
    assert slow_calls - fast_calls == sum(b - 1 for b in fast_bits.values()) > 0


def test_head_validation_matches_a_full_pass_and_expires_when_the_model_changes():
    from avalanche_tsn.plugins.compression import head_validation, validation_accuracy
    from avalanche_tsn.quantization import quantize_head
    from avalanche_tsn.stages import stage_context

    strategy, bm = train(MultiHeadMLP(12, (16, 16), 3), tasks=1, prune=False, quantize=False)
    strategy.experience = bm.train_stream[0]
    stage_context(strategy).new_validation(bm.test_stream[0].dataset.eval())
    assert head_validation(strategy, 0) is None  # no complete pass yet
    validation_accuracy(strategy, 0)
    evaluate = head_validation(strategy, 0)
    model = strategy.tsn_model
    for bits in (1, 2, 4):
        quantize_head(model, 0, bits)
        full = validation_accuracy(strategy, 0)
        assert evaluate() == full
        assert (evaluate(full) >= full) and (evaluate(min(1.0, full + 0.01)) < full + 0.01)
    assert head_validation(strategy, 0) is not None  # the last full pass is of this state
    with torch.no_grad():
        next(model.masked_layers())[1].bank_weights.add_(0.1)  # the backbone moved
    assert head_validation(strategy, 0) is None
    plain, _ = train(mlp(), tasks=1, prune=False, quantize=False)
    stage_context(plain).new_validation(stage_context(strategy).validation)
    validation_accuracy(plain, 0)
    assert head_validation(plain, 0) is None  # no multi-head classifier: no shortcut


def test_the_first_full_validation_pass_orders_the_split_hardest_first():
    from avalanche_tsn.early_stop import margins
    from avalanche_tsn.plugins.compression import validation_accuracy
    from avalanche_tsn.stages import stage_context

    strategy, bm = train(MultiHeadMLP(12, (16, 16), 3), tasks=1, prune=False, quantize=False)
    strategy.experience = bm.train_stream[0]
    ctx = stage_context(strategy)
    ctx.new_validation(bm.test_stream[0].dataset.eval())
    before = validation_accuracy(strategy, 0, floor=1.1)  # stopped early: not ordered
    assert before < 1.1 and not ctx.validation_ordered
    unordered = [(x.clone(), y.clone()) for x, y in ctx.validation_batches]
    acc = validation_accuracy(strategy, 0)
    assert ctx.validation_ordered
    ordered = ctx.validation_batches
    # the same samples in ascending margin, minibatches growing to the split's size
    assert [len(y) for _, y in unordered] == [16, 16, 16]
    assert [len(y) for _, y in ordered] == [4, 4, 8, 16, 16]
    x_old, y_old = (torch.cat(t) for t in zip(*unordered, strict=True))
    x_new, y_new = (torch.cat(t) for t in zip(*ordered, strict=True))
    old_rows = sorted(map(tuple, torch.cat([x_old, y_old[:, None]], 1).tolist()))
    assert old_rows == sorted(map(tuple, torch.cat([x_new, y_new[:, None]], 1).tolist()))
    with torch.no_grad():
        m = margins(strategy.model(x_new, 0), y_new)
    assert bool((m[1:] >= m[:-1]).all()) and bool((m[:3] < m[-3:]).all())
    # the accuracy does not depend on the order; the memo is for the ordered split
    assert (
        validation_accuracy(strategy, 0)
        == acc
        == (strategy.model(x_old, 0).argmax(1) == y_old).float().mean().item()
    )
    with pytest.raises(RuntimeError, match="already ordered"):
        ctx.order_validation(ordered)


def test_ordered_minibatches_grow_to_the_split_size_and_cover_every_sample():
    from avalanche_tsn.early_stop import ramp

    assert ramp(200, 64) == [16, 16, 32, 64, 64, 8]
    assert ramp(20, 64) == [16, 4] and ramp(16, 64) == [16] and ramp(0, 64) == []
    assert ramp(7, 3) == [3, 3, 1] and ramp(9, 5) == [1, 1, 3, 4]
    for n in range(0, 40):
        for size in range(1, 12):
            sizes = ramp(n, size)
            assert sum(sizes) == n and all(0 < s <= size for s in sizes)
            # the first three end where the first full minibatch would have ended
            if size >= 4 and n >= size:
                assert sum(sizes[:3]) == size
    # a lead (the samples the unpruned model got wrong) joins the first minibatch
    assert ramp(200, 64, lead=10) == [26, 16, 32, 64, 62]
    assert ramp(20, 64, lead=30) == [20] and ramp(7, 3, lead=2) == [2, 3, 2]
    for n in range(0, 40):
        for lead in range(0, 12):
            sizes = ramp(n, 8, lead)
            assert sum(sizes) == n and sizes[:1] == [min(n, lead + 2)][: len(sizes)]
            if n >= lead + 8:
                assert sum(sizes[:3]) == lead + 8 and all(s <= 8 for s in sizes[1:])


def test_the_first_ordered_minibatch_holds_the_samples_the_pass_got_wrong():
    from avalanche_tsn.plugins.compression import validation_accuracy
    from avalanche_tsn.stages import stage_context

    strategy, bm = train(MultiHeadMLP(12, (16, 16), 3), tasks=2, prune=False, quantize=False)
    strategy.experience = bm.train_stream[0]
    ctx = stage_context(strategy)
    # task 1's samples read as task 0: many wrong
    ctx.new_validation(bm.test_stream[1].dataset.eval())
    acc = validation_accuracy(strategy, 0)
    x, y = (torch.cat(t) for t in zip(*ctx.validation_batches, strict=True))
    with torch.no_grad():
        wrong = strategy.model(x, 0).argmax(1) != y
    n_wrong = int(wrong.sum())
    assert 0 < n_wrong < len(y) - 4 and acc == 1 - n_wrong / len(y)
    sizes = [len(b) for _, b in ctx.validation_batches]
    assert sizes[0] == n_wrong + 4 and sum(sizes[:3]) == n_wrong + 16
    assert bool(wrong[:n_wrong].all()) and not bool(wrong[n_wrong:].any())


def _ordered_split():
    """A trained task with its test set as the validation split, read once (so ordered)."""
    from avalanche_tsn.plugins.compression import validation_accuracy
    from avalanche_tsn.stages import stage_context

    strategy, bm = train(
        MultiHeadMLP(12, (16, 16), 3), tasks=1, prune=False, quantize=False, eval_mb_size=64
    )
    strategy.experience = bm.train_stream[0]
    ctx = stage_context(strategy)
    ctx.new_validation(bm.test_stream[0].dataset.eval())
    validation_accuracy(strategy, 0)
    return strategy, ctx


def test_a_pass_brings_the_samples_it_got_wrong_after_the_first_minibatch_into_it():
    from avalanche_tsn.early_stop import promote
    from avalanche_tsn.plugins.compression import head_validation, validation_accuracy
    from avalanche_tsn.stages import StageContext

    missed = torch.tensor([0, 1, 0, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)  # 10 of 12 read
    expected = torch.arange(12)
    for late, right in ((5, 3), (7, 2), (8, 0)):  # the front's last right ones give way
        expected[late], expected[right] = right, late
    assert torch.equal(promote(missed, 4, 12), expected)
    assert promote(torch.tensor([True, True, False, False]), 2, 4) is None  # none late
    assert promote(torch.tensor([True, True, True, False]), 2, 4) is None  # no room
    assert torch.equal(
        promote(torch.tensor([True, False, True, True]), 2, 4),
        torch.tensor([0, 2, 1, 3]),
    )

    strategy, ctx = _ordered_split()
    ordered = ctx.validation_batches
    model, slot = strategy.model, strategy.model.slot_of(0)
    layer = next(model.masked_layers())[1]
    own = layer.own_mask(slot).flatten().nonzero().squeeze(1)
    unpruned = layer.slot_state(slot)

    def drop(share: float) -> None:  # a share of the layer's own weights dropped, as a try
        layer.restore_slot_state(slot, unpruned)
        layer.release(slot, own[: int(len(own) * share)])

    def wrong_ones(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (torch.cat(t) for t in zip(*batches, strict=True))
        with torch.no_grad():
            return model(x, 0).argmax(1) != y, torch.cat([x, y[:, None]], 1)

    sizes = [len(y) for _, y in ordered]
    front, n, ends = sizes[0], sum(sizes), torch.tensor(sizes).cumsum(0).tolist()
    drop(0.6)
    wrong, rows = wrong_ones(ordered)
    total_wrong = int(wrong.sum())
    # (seeded case: fewer wrong ones than the front holds, all of them after it)
    assert int(wrong[:front].sum()) == 0 < total_wrong < front
    # a floor the first minibatch cannot decide (more may be wrong than it holds): no move
    assert validation_accuracy(strategy, 0, 1 - (front + 0.5) / n) == 1 - total_wrong / n
    assert ctx.validation_batches is ordered
    # a complete pass brings every wrong one it found into the front
    ctx.validation_memo = None  # (the same state: a fresh pass, not the memo)
    acc = validation_accuracy(strategy, 0, 1 - (total_wrong + 0.5) / n)
    promoted = ctx.validation_batches
    assert acc == (n - total_wrong) / n and promoted is not ordered
    # the stored stage inputs carry over, for the minibatches that kept their samples
    assert ctx.validation_prefix is not None and ctx.validation_prefix[3] is promoted
    assert [len(y) for _, y in promoted] == sizes
    wrong_now, rows_now = wrong_ones(promoted)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, rows_now.tolist()))
    assert int(wrong_now[:front].sum()) == total_wrong
    # the heads' inputs were kept in the new order: the head alone gives the same accuracy
    fast = head_validation(strategy, 0)
    assert fast is not None and fast() == acc
    head, seen = model.classifier_heads()[0], []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        for x, _ in promoted:
            model(x, 0)
    hook.remove()
    kept = [args[0] for args, _ in ctx.validation_memo[2]]
    assert len(kept) == len(seen) and all(map(torch.equal, kept, seen))
    # a pass stopped at the first later minibatch with a wrong one brings what it found
    drop(0.75)
    wrong, _ = wrong_ones(promoted)
    first = int(wrong[:front].sum())
    two = next(int(wrong[:e].sum()) for e in ends[1:] if int(wrong[:e].sum()) > first)
    assert first < front  # (seeded case: room in the front)
    floor = 1 - (first + 0.5) / n
    assert validation_accuracy(strategy, 0, floor) < floor
    stopped = ctx.validation_batches
    assert stopped is not promoted and [len(y) for _, y in stopped] == sizes
    assert int(wrong_ones(stopped)[0][:front].sum()) == min(front, two) > first
    with pytest.raises(RuntimeError, match="not ordered"):
        StageContext().promote_validation(promoted, [0])
    with pytest.raises(ValueError, match="sizes"):
        ctx.promote_validation(promoted[1:], [0])
    with pytest.raises(ValueError, match="minibatch indices"):
        ctx.promote_validation(promoted, [len(promoted)])
    assert ctx.validation_batches is stopped


def test_a_promoted_split_resumes_from_stored_inputs_where_its_samples_stayed():
    from avalanche_tsn.early_stop import moved_batches, reorder
    from avalanche_tsn.plugins.compression import validation_accuracy
    from avalanche_tsn.prefix import staged_forward

    strategy, ctx = _ordered_split()
    ctx.validation_memo = None  # (the same state: a fresh pass, which stores its inputs)
    validation_accuracy(strategy, 0)
    ordered = ctx.validation_batches
    sizes = [len(y) for _, y in ordered]
    order = torch.arange(sum(sizes))
    order[0], order[-1] = len(order) - 1, 0  # the first and last samples change places
    batches, _ = reorder(ordered, None, order, sizes)
    ctx.promote_validation(batches, moved_batches(order, sizes))
    cache = ctx.validation_prefix[1]
    model, slot = strategy.model, strategy.model.slot_of(0)
    layer = list(model.masked_layers())[-1][1]  # only the last masked layer changes
    own = layer.own_mask(slot).flatten().nonzero().squeeze(1)
    layer.release(slot, own[: len(own) // 2])
    runs = cache.stage_runs
    acc = validation_accuracy(strategy, 0)
    head, seen = model.classifier_heads()[0], []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        whole = [model(x, 0) for x, _ in batches]
    hook.remove()
    # the heads' inputs are those of the samples in their new places, and so the accuracy
    kept = [args[0] for args, _ in ctx.validation_memo[2]]
    assert len(kept) == len(seen) and all(map(torch.equal, kept, seen))
    y = torch.cat([b for _, b in batches])
    assert acc == int((torch.cat(whole).argmax(1) == y).sum()) / len(y)
    # the minibatches that kept their samples resumed after the unchanged stages
    assert 0 < cache.stage_runs - runs < len(batches) * len(staged_forward(model.net, 0)[0])


def test_a_new_order_names_the_minibatches_whose_samples_changed():
    from avalanche_tsn.early_stop import moved_batches

    order = torch.tensor([0, 1, 5, 3, 4, 2, 6])
    assert moved_batches(order, [2, 2, 3]) == [1, 2]
    assert moved_batches(torch.arange(7), [2, 2, 3]) == []
    assert moved_batches(torch.tensor([1, 0, 2, 3]), [2, 2]) == [0]


@pytest.mark.parametrize("search", ["joint", "bisect"])
def test_ordering_the_validation_split_changes_no_pruning_or_quantization_decision(
    monkeypatch, search
):
    from avalanche_tsn.plugins import compression

    def run(ordered: bool, promoted: bool):
        forwards = {"n": 0}
        full = compression.validation_accuracy

        def counted(strategy, *args, **kwargs):
            # the head runs once a minibatch, whether a pass runs the whole model or resumes
            # at a changed stage (avalanche_tsn.prefix)
            hook = strategy.model.net.classifier.register_forward_hook(
                lambda *_: forwards.__setitem__("n", forwards["n"] + 1)
            )
            try:
                return full(strategy, *args, **kwargs)
            finally:
                hook.remove()

        monkeypatch.setattr(compression, "validation_accuracy", counted)
        if not ordered:  # equal keys: the stable sort keeps the split's order
            monkeypatch.setattr(compression, "margins", lambda out, y: torch.zeros(len(y)))
        if not promoted:
            monkeypatch.setattr(compression, "promote", lambda *_: None)
        torch.manual_seed(0)
        strategy, bm = train(
            MultiHeadMLP(12, (16, 16), 3), prune_search=search, prune_max_drop=0.02,
            quant_max_drop=0.02, eval_mb_size=2, validation_fraction=0.3,
        )  # fmt: skip
        monkeypatch.undo()
        return compression_outcome(strategy, bm), forwards["n"]

    outcome, n = run(ordered=True, promoted=True)
    outcome_o, n_o = run(ordered=True, promoted=False)
    outcome_u, n_u = run(ordered=False, promoted=False)
    assert same_outcome(outcome, outcome_u) and same_outcome(outcome_o, outcome_u)
    assert any(r.evaluations > 2 for r in outcome[0])  # searches that tried and rejected
    # (seeded case, minibatches of 2: the rejected tries stop sooner, hardest samples first;
    # bringing the samples found wrong to the front is tested on its own below)
    assert 0 < n <= n_o < n_u


@pytest.mark.parametrize(
    ("kwargs", "warned"),
    [
        ({}, "holds 10 samples: one sample is 10.0 points"),  # 1-point allowances
        ({"validation_fraction": 0.5}, "holds 48 samples: one sample is 2.1 points"),
        ({"prune_max_drop": 0.05, "quant_max_drop": 0.2}, "holds 10 samples"),  # the least
        ({"validation_fraction": 0.5, "prune_max_drop": 0.05, "quant_max_drop": 0.03}, None),
        ({"prune": False, "quant_max_drop": 0.11}, None),  # only quantization's allowance
        ({"prune_max_drop": 0.0, "quant_max_drop": 0.0}, None),  # nothing may drop at all
    ],
)
def test_a_split_too_small_for_the_allowance_is_logged_before_training(caplog, kwargs, warned):
    with caplog.at_level(logging.WARNING, logger="avalanche_tsn"):
        strategy, _ = train_tsn(tasks=1, **kwargs)  # 96 samples an experience
    messages = [r.getMessage() for r in caplog.records if "validation split" in r.getMessage()]
    assert len(messages) == (warned is not None)
    if warned:
        assert warned in messages[0] and "experience 0" in messages[0]
    assert strategy.tsn_model.trained_tasks() == [0]  # a log line, not a refusal
