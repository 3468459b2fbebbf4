"""The whole TSN pipeline on every device at hand: the guarantees hold on a GPU too.

Each test runs on the CPU and, where CUDA is available, on the GPU (skipped otherwise, as in
CI); ``benchmarks/gpu_check.py`` adds timings and mixed precision on a GPU.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import (
    Signal1d,
    SmallConvNet,
    TextConv,
    TokenBag,
    Volume3d,
    adam_strategy,
    blob_stream,
    mlp,
    normed_mlp,
    sloped_mlp,
    token_stream,
)

from avalanche_tsn import (
    AdaQPacknetStrategy,
    TSNModel,
    TSNStrategy,
    WSNStrategy,
    load_compressed,
    to_tiny,
)
from avalanche_tsn.activations import quantized_activations
from avalanche_tsn.compute import compute_report
from avalanche_tsn.models import MultiHeadMLP

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_NO_CUDA)])
def device(request) -> str:
    return request.param


def _blobs():
    return blob_stream(n_tasks=3, dim=16)


def _tokens():
    return token_stream(n_tasks=3)


#: each model and the stream of 3 tasks it trains on
MODELS = {
    "mlp": (lambda: mlp(16), _blobs),
    "conv_bn": (lambda: SmallConvNet(), _blobs),
    "multihead": (lambda: MultiHeadMLP(16, (16, 16), n_classes=3), _blobs),
    "conv1d": (Signal1d, _blobs),
    "conv3d": (Volume3d, _blobs),
    "layernorm": (lambda: normed_mlp(16), _blobs),
    "groupnorm": (lambda: SmallConvNet(group_norm=True), _blobs),
    "prelu": (lambda: sloped_mlp(16), _blobs),
    "embedding": (TokenBag, _tokens),
    "textconv": (TextConv, _tokens),
}


def _strategy(cls, model, device: str, **kwargs):
    return adam_strategy(model, cls, device=device, **kwargs)


def _probes(bm, device: str) -> list[tuple[torch.Tensor, int]]:
    return [
        (torch.stack([e.dataset[i][0] for i in range(20)]).to(device), e.task_label)
        for e in bm.test_stream
    ]


def _outputs(model, probes) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(x, t) for x, t in probes]


def _train_checking(strategy, bm) -> list[torch.Tensor]:
    """Train every experience; after each, every earlier task's outputs must be unchanged."""
    probes = _probes(bm, str(strategy.device))
    recorded: list[torch.Tensor] = []
    for i, exp in enumerate(bm.train_stream):
        strategy.train(exp, eval_streams=[])
        now = _outputs(strategy.model, probes[: i + 1])
        for t, (a, b) in enumerate(zip(recorded, now[: len(recorded)], strict=True)):
            assert torch.equal(a, b), f"task {t} moved while task {i} trained"
        recorded = now
    return recorded


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_full_pipeline_is_forget_free_and_round_trips(kind, device):
    make, stream = MODELS[kind]
    bm = stream()
    strategy = _strategy(TSNStrategy, make(), device, task_matching=True, new_bank_below=0.3)
    out = _train_checking(strategy, bm)
    probes = _probes(bm, device)
    model = strategy.tsn_model
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert 0 < strategy.capacity_report().percent < 100
    acc = strategy.eval(bm.test_stream)
    assert acc["Top1_Acc_Stream/eval_phase/test_stream/Task002"] > 0.5

    # a mixed-task minibatch gives each sample its own task's outputs
    x = torch.cat([x for x, _ in probes])
    labels = torch.cat([torch.full((len(x),), t, device=device) for x, t in probes])
    with torch.no_grad():
        mixed = model(x, labels)
        for xt, t in probes:
            assert torch.equal(mixed[labels == t], model(xt, t))

    # state_dict and the compact export restore the same predictions on the device
    restored = TSNModel(make())
    restored.load_state_dict(model.state_dict())
    restored.to(device)
    assert all(map(torch.equal, _outputs(restored, probes), out))
    already_there = TSNModel(make().to(device))  # loaded into a model wrapped on the device
    already_there.load_state_dict(model.state_dict())
    assert all(map(torch.equal, _outputs(already_there, probes), out))
    buf = io.BytesIO()
    strategy.export(buf)
    buf.seek(0)
    loaded = load_compressed(buf, make().to(device))
    assert all(map(torch.equal, _outputs(loaded, probes), out))
    buf.seek(0)
    coded = load_compressed(buf, make().to(device), dequantize=False)
    assert all(map(torch.equal, _outputs(coded, probes), out))
    # on the CPU the same file predicts the same classes, up to the devices' rounding
    buf.seek(0)
    on_cpu = load_compressed(buf, make())
    for got, want in zip(_outputs(on_cpu, [(x.cpu(), t) for x, t in probes]), out, strict=True):
        torch.testing.assert_close(got, want.cpu(), rtol=1e-4, atol=1e-4)
    # the compute report and quantized activations run where the model is
    report = compute_report(model, tuple(probes[0][0].shape[1:]), act_bits=8)
    assert len(report.tasks) == 3
    with quantized_activations(model, 8):
        coarse = _outputs(model, probes)
    assert all(c.device.type == torch.device(device).type for c in coarse)
    assert all(map(torch.equal, _outputs(model, probes), out))
    tiny = to_tiny(model)
    assert all(map(torch.equal, _outputs(tiny, probes), out))


def test_diverging_task_stops_and_moves_nothing(device):
    bm = blob_stream(n_tasks=2, dim=12)
    strategy = _strategy(TSNStrategy, mlp(12), device)
    exps = list(bm.train_stream)
    strategy.train(exps[0], eval_streams=[])
    probes = _probes(bm, device)[:1]
    before = _outputs(strategy.model, probes)
    faulty = list(blob_stream(n_tasks=2, dim=12, poison={1: float("nan")}).train_stream)[1]
    with pytest.raises(FloatingPointError, match="task 1"):
        strategy.train(faulty, eval_streams=[])
    assert all(map(torch.equal, _outputs(strategy.model, probes), before))
    strategy.train(exps[1], eval_streams=[])
    assert all(map(torch.equal, _outputs(strategy.model, probes), before))
    assert strategy.tsn_model.trained_tasks() == [0, 1]


@pytest.mark.parametrize("cls", [WSNStrategy, AdaQPacknetStrategy])
def test_family_strategies_are_forget_free(cls, device):
    kwargs = {"population_size": 2, "search_epochs": 1} if cls is AdaQPacknetStrategy else {}
    bm = blob_stream(n_tasks=2, dim=12)
    _train_checking(_strategy(cls, mlp(12), device, **kwargs), bm)


@pytest.mark.parametrize("method", ["entropy", "memory"])
def test_task_inference_runs_on_the_device(method, device):
    from avalanche.benchmarks import nc_benchmark

    from avalanche_tsn.datasets import TensorTaskDataset

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 12, generator=g) * 3

    def data(n: int) -> TensorTaskDataset:
        y = torch.arange(n) % 6
        return TensorTaskDataset(centres[y] + 0.3 * torch.randn(n, 12, generator=g), y)

    bm = nc_benchmark(data(300), data(120), n_experiences=3, task_labels=False, shuffle=False)
    net = MultiHeadMLP(12, (16, 16))
    strategy = _strategy(TSNStrategy, net, device, task_inference=method)
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    acc = strategy.eval(bm.test_stream)
    assert acc["Top1_Acc_Stream/eval_phase/test_stream/Task000"] > 1 / 6


def test_model_moved_to_the_device_mid_stream_keeps_its_tasks(device):
    bm = blob_stream(n_tasks=2, dim=12)
    net = mlp(12)
    cpu = adam_strategy(net)
    exps = list(bm.train_stream)
    cpu.train(exps[0], eval_streams=[])
    probes = _probes(bm, device)[:1]
    strategy = _strategy(TSNStrategy, cpu.model, device)
    before = _outputs(cpu.model.to(device), probes)
    strategy.train(exps[1], eval_streams=[])
    assert all(map(torch.equal, _outputs(strategy.model, probes), before))
