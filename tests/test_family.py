"""TSN's family as strategies of this package: WSN (issue 12)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import adam_strategy, blob_stream
from torch import nn

from avalanche_tsn import TSNModel, WSNStrategy, load_compressed
from avalanche_tsn.capacity import WSN_GROUP, wsn_capacity
from avalanche_tsn.huffman import encoded_bits
from avalanche_tsn.models import MultiHeadMLP

DIM = 12


def build(cls, model=None, **kw):
    return adam_strategy(model if model is not None else MultiHeadMLP(DIM, (16, 16), 3), cls, **kw)


def test_wsn_forgets_nothing_and_keeps_float32_weights():
    bm = blob_stream(n_tasks=3, dim=DIM)
    strategy = build(WSNStrategy, sparsity=0.5)
    x = torch.randn(20, DIM)
    recorded: dict[int, torch.Tensor] = {}
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        model = strategy.model.eval()
        with torch.no_grad():
            for t, out in recorded.items():
                assert torch.equal(model(x, t), out)
            recorded[exp.task_label] = model(x, exp.task_label)
    model = strategy.tsn_model
    assert all(int(b) == 0 for _, layer in model.masked_layers() for b in layer.task_bits)
    assert model.head_bits.tolist() == [0, 0, 0]
    report = strategy.capacity_report()
    assert all(t.weight_bits == 32 * t.own_weights for t in report.tasks)
    acc = strategy.eval(bm.test_stream)
    assert acc["Top1_Acc_Stream/eval_phase/test_stream/Task002"] > 0.6
    loaded = load_compressed(io.BytesIO(_export(strategy)), MultiHeadMLP(DIM, (16, 16), 3))
    with torch.no_grad():
        assert all(torch.equal(loaded(x, t), out) for t, out in recorded.items())


def _export(strategy) -> bytes:
    buf = io.BytesIO()
    strategy.export(buf)
    return buf.getvalue()


def test_wsn_capacity_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False))
    model = TSNModel(net)
    layer = net[0]
    masks = []
    for t in range(9):  # more than one group of 7 tasks
        model.begin_task(t, 0.6)
        with torch.no_grad():
            layer.scores.normal_()
        model.end_task(t)
        masks.append(layer.task_mask(t).flatten().numpy())
    cap = wsn_capacity(model)
    used = int(np.count_nonzero(np.any(masks, axis=0)))
    groups = [sum(m.astype(np.int64) << b for b, m in enumerate(masks[g : g + WSN_GROUP]))
              for g in range(0, 9, WSN_GROUP)]  # fmt: skip
    bits = sum(encoded_bits(np.bincount(g)) for g in groups)
    assert (cap.used_weights, cap.weights, cap.tasks, cap.mask_bits) == (used, 30, 9, bits)
    assert cap.percent == pytest.approx(100 * (32 * used + bits) / (32 * 30))
    # the paper's CAP = (1 - S) + (1 - alpha) T / 32 is the same quantity
    assert cap.paper_formula == pytest.approx(cap.percent)


def test_wsn_is_keyword_only_and_has_no_compression_stages():
    model = MultiHeadMLP(DIM, (16, 16), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError):
        WSNStrategy(model, opt)  # keyword-only
    for bad in ({"prune": True}, {"quant_max_bits": 4}, {"task_matching": True}):
        with pytest.raises(TypeError, match="WSNStrategy has no"):
            WSNStrategy(model=model, optimizer=opt, **bad)
    with pytest.raises(ValueError, match="sparsity"):
        WSNStrategy(model=model, optimizer=opt, sparsity=1.5)
    assert type(model.features[0]) is nn.Linear  # nothing converted by the rejected calls


# -- Ada-QPacknet ------------------------------------------------------------------------

from avalanche_tsn import AdaQPacknetStrategy  # noqa: E402
from avalanche_tsn.adaqpacknet import (  # noqa: E402
    adaq_capacity,
    fitness,
    halving_bits,
    search_fractions,
)
from avalanche_tsn.layers import FREE  # noqa: E402
from avalanche_tsn.plugins.adaqpacknet import (  # noqa: E402
    HalvingQuantizationPlugin,
    MaskSearchPlugin,
)


def test_adaqpacknet_forgets_nothing_and_packs_tasks():
    bm = blob_stream(n_tasks=3, dim=DIM)
    strategy = build(AdaQPacknetStrategy, population_size=2, search_epochs=1)
    x = torch.randn(20, DIM)
    recorded: dict[int, torch.Tensor] = {}
    owned_before = None
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        model = strategy.model.eval()
        slot = model.slot_of(exp.task_label)
        with torch.no_grad():
            for t, out in recorded.items():
                assert torch.equal(model(x, t), out)
            recorded[exp.task_label] = model(x, exp.task_label)
        best, tried = strategy.search_plugin.searches[exp.task_label]
        assert best is max(tried, key=lambda c: c.fitness) and len(tried) == 2
        for (_, layer), fraction in zip(model.masked_layers(), best.fractions, strict=True):
            assert 0.4 <= fraction <= 0.7
            mask = layer.task_mask(slot)
            if owned_before is not None:  # every weight of earlier tasks is read (PackNet)
                assert mask[owned_before[layer]].all()
            free_before = int((~owned_before[layer]).sum()) if owned_before else mask.numel()
            own = int(layer.own_mask(slot).sum())
            assert own == free_before - round(fraction * free_before)
        owned_before = {layer: layer.owner != FREE for _, layer in model.masked_layers()}
        # one bit-width for every layer of the task, from the halving search
        bits = {int(layer.task_bits[slot]) for _, layer in model.masked_layers()}
        assert bits == {strategy.quantization_plugin.bits[exp.task_label]}
    cap = strategy.adaq_capacity()
    expected = sum(
        (int(layer.task_bits[s]) or 32) * int(layer.own_mask(s).sum())
        for _, layer in strategy.tsn_model.masked_layers()
        for s in range(3)
    )
    assert cap.bits_used == expected and cap.percent < 100
    loaded = load_compressed(io.BytesIO(_export(strategy)), MultiHeadMLP(DIM, (16, 16), 3))
    with torch.no_grad():
        assert all(torch.equal(loaded(x, t), out) for t, out in recorded.items())
    assert adaq_capacity(loaded).bits_used == cap.bits_used


def test_search_uses_the_best_candidate_not_the_last():
    model = TSNModel(nn.Sequential(nn.Linear(4, 4, bias=False)))
    model.begin_task(0, 0.5)
    accuracies = iter([0.9, 0.1, 0.2])  # the first candidate is the best

    best, tried = search_fractions(
        model,
        lambda trial: None,
        lambda trial: next(accuracies),
        population=3,
        low=0.4,
        high=0.7,
        accuracy_weight=0.8,
        generator=torch.Generator().manual_seed(0),
    )
    assert best is tried[0] and tried[-1] is not best
    assert best.fitness == pytest.approx(fitness(0.9, best.fractions, [16], 0.8))
    assert model.open_task() == 0  # the search works on copies


def test_halving_keeps_the_last_width_under_the_threshold():
    state = {"bits": 0}
    accuracy = {6: 0.90, 5: 0.89, 4: 0.885, 3: 0.85, 2: 0.95}  # 2 bits is never reached

    def quantize(b):
        state["bits"] = b

    def restore():
        state["bits"] = 0

    bits = halving_bits(
        quantize, restore, lambda: accuracy[state["bits"]], 0.90, start_bits=6, max_drop=0.02
    )
    assert bits == 4 and state["bits"] == 4
    assert halving_bits(quantize, restore, lambda: 0.5, 0.9, start_bits=6, max_drop=0.02) == 0
    assert state["bits"] == 0  # not even 6 bits: float32


def test_adaqpacknet_arguments_are_checked_before_any_work():
    model = MultiHeadMLP(DIM, (16, 16), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError):
        AdaQPacknetStrategy(model, opt)  # keyword-only
    for bad, error in [
        ({"sparsity": 0.5}, TypeError),
        ({"prune_step": 0.2}, TypeError),
        ({"population_size": 0}, ValueError),
        ({"prune_low": 0.8, "prune_high": 0.5}, ValueError),
        ({"start_bits": 0}, ValueError),
        ({"quant_max_drop": 1.5}, ValueError),
        ({"validation_fraction": 2.0}, ValueError),
    ]:
        with pytest.raises(error):
            AdaQPacknetStrategy(model=model, optimizer=opt, **bad)
    assert type(model.features[0]) is nn.Linear
    # the plugins check their own arguments too, when used without the strategy
    for bad in [{"population": 0}, {"low": 0.8, "high": 0.5}, {"low": 1.0}]:
        with pytest.raises(ValueError):
            MaskSearchPlugin(**bad)
    for bad in [{"epochs": 1.5}, {"population": True}, {"low": "0.4"}]:  # a type: no coercion
        with pytest.raises(TypeError, match="epochs|population|low"):
            MaskSearchPlugin(**bad)
    with pytest.raises(ValueError, match="quant_max_drop"):
        HalvingQuantizationPlugin(max_drop=1.5)
