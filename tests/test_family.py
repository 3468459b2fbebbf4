"""TSN's family as strategies of this package: WSN (issue 12)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import blob_stream, quiet_evaluator
from torch import nn

from avalanche_tsn import TSNModel, WSNStrategy, load_compressed
from avalanche_tsn.capacity import WSN_GROUP, wsn_capacity
from avalanche_tsn.huffman import encoded_bits
from avalanche_tsn.models import MultiHeadMLP

DIM = 12


def wsn(model=None, **kw) -> WSNStrategy:
    model = model if model is not None else MultiHeadMLP(DIM, (16, 16), 3)
    return WSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
        **kw,
    )


def test_wsn_forgets_nothing_and_keeps_float32_weights():
    bm = blob_stream(n_tasks=3, dim=DIM)
    strategy = wsn(sparsity=0.5)
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
