"""Task memory, KL divergence between tasks and backbone banks."""

from __future__ import annotations

import io

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from conftest import quiet_evaluator

from avalanche_tsn import TSNStrategy, load_compressed
from avalanche_tsn.datasets import TensorTaskDataset
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.similarity import choose_bank, gaussian_kl

DIM = 12


def shifted_stream(kinds: list[str], seed: int = 0):
    """Tasks from one blob family ("a": same input distribution, own labels) or far away ("b")."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, DIM, generator=g) * 2.0
    train, test = [], []
    for kind in kinds:
        parts = []
        for size in (96, 48):
            y = torch.randint(0, 3, (size,), generator=g)
            x = centres[y] + 0.5 * torch.randn(size, DIM, generator=g)
            if kind == "b":  # a synthetic task unlike the others: other scale and offset
                x = 25.0 * torch.randn(size, DIM, generator=g).abs() + 40.0 * (y[:, None] + 1)
            parts.append(TensorTaskDataset(x, y))
        train.append(parts[0])
        test.append(parts[1])
    return nc_benchmark(
        train,
        test,
        n_experiences=len(kinds),
        task_labels=True,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )


def make(**kw):
    model = MultiHeadMLP(DIM, (16, 16), 3)
    return TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
        task_matching=True,
        memory_size=32,
        kl_threshold=2.0,
        **kw,
    )


def x_of(exp):
    return torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])


def test_gaussian_kl_is_zero_for_the_same_sample_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(500, 8, generator=g)
    assert gaussian_kl(p, p) == 0.0
    shifts = [gaussian_kl(p + s, p) for s in (0.1, 0.5, 2.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    # KL of N(1, 1) from N(0, 1) is 0.5 nats per feature
    q = torch.randn(20000, 4, generator=g)
    assert gaussian_kl(q + 1.0, q) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="same d"):
        gaussian_kl(p, p[:, :3])


def test_choose_bank():
    assert choose_bank({}, {}, 1.0, 1) == 0
    assert choose_bank({0: 0.2, 1: 5.0}, {0: 0, 1: 1}, 1.0, 2) == 0
    assert choose_bank({0: 3.0, 1: 0.5}, {0: 0, 1: 1}, 1.0, 2) == 1
    assert choose_bank({0: 3.0, 1: 2.0}, {0: 0, 1: 1}, 1.0, 2) == 2


def test_unlike_task_opens_a_bank_and_nothing_is_forgotten_across_banks():
    bm = shifted_stream(["a", "a", "b", "a"])
    strategy = make()
    model = strategy.tsn_model
    seen = {}
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        model.eval()
        with torch.no_grad():
            for e in list(bm.test_stream)[: exp.current_experience + 1]:
                out = model(x_of(e), e.task_label)
                seen.setdefault(e.task_label, out)
                assert torch.equal(out, seen[e.task_label]), f"task {e.task_label} changed"
    assert [model.bank_of(t) for t in range(4)] == [0, 0, 1, 0]
    plugin = strategy.plugins[0]
    assert plugin.divergences[1][0] < 2.0 < min(plugin.divergences[2].values())
    assert len(model.memory(2)) == 32
    report = strategy.capacity_report()
    assert report.banks == 2 and [t.bank for t in report.tasks] == [0, 0, 1, 0]
    assert report.memory_bits == 32 * DIM * 32 * 4
    # the compact export carries the banks
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    loaded = load_compressed(buf, MultiHeadMLP(DIM, (16, 16), 3))
    with torch.no_grad():
        for e in bm.test_stream:
            assert torch.equal(loaded(x_of(e), e.task_label), seen[e.task_label])


def test_similar_tasks_share_one_bank():
    strategy = make()
    strategy.train(shifted_stream(["a", "a", "a"]).train_stream, eval_streams=[])
    assert strategy.tsn_model.n_banks == 1


def test_checkpoint_resume_keeps_banks_and_memory(tmp_path):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    bm = shifted_stream(["a", "b", "a"])
    ckpt = str(tmp_path / "c.pkl")
    strategy = make()
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp, eval_streams=[])
        save_checkpoint(strategy, ckpt)
    resumed, start = maybe_load_checkpoint(make(), ckpt)
    assert start == 2
    a, b = strategy.tsn_model, resumed.tsn_model
    assert [b.bank_of(t) for t in (0, 1)] == [a.bank_of(t) for t in (0, 1)] == [0, 1]
    assert torch.equal(a.memory(1), b.memory(1))
    resumed.train(list(bm.train_stream)[2], eval_streams=[])
    assert b.bank_of(2) == 0
    b.eval()
    a.eval()
    with torch.no_grad():
        for e in list(bm.test_stream)[:2]:
            assert torch.equal(b(x_of(e), e.task_label), a(x_of(e), e.task_label))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kl_threshold": -0.5}, "kl_threshold"),
        ({"kl_threshold": float("nan")}, "kl_threshold"),
        ({"memory_size": 0}, "memory_size"),
        ({"task_matching": "yes"}, "task_matching"),
    ],
)
def test_bad_matching_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(**kw)


def test_memory_size_is_free_when_matching_is_off():
    model = MultiHeadMLP(DIM, (16, 16), 3)
    TSNStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), memory_size=0)
