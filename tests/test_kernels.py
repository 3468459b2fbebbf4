"""The compiled training kernel (issue 28): same results as eager, one graph, a clean fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import adam_strategy, blob_stream, mlp
from torch._dynamo.utils import counters

from avalanche_tsn import TSNStrategy
from avalanche_tsn import kernels as kernels_module
from avalanche_tsn.kernels import CPU_AUTO_MIN_WEIGHTS, LiveKernel, live_weight_ste
from avalanche_tsn.masks import LiveWorkspace, live_weight, topk_threshold


def test_the_pure_function_matches_the_eager_autograd_function() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=g)
    s = torch.randn(20, 30, generator=g)
    t = topk_threshold(s, 300)
    outs, grads = [], []
    for fn in (live_weight, live_weight_ste):
        wi, si = w.clone().requires_grad_(), s.clone().requires_grad_()
        out = fn(wi, si, t)
        out.backward(torch.ones_like(out) * torch.arange(30.0))
        outs.append(out.detach())
        grads.append((wi.grad, si.grad))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-6, atol=0)
    assert int((outs[0] != 0).sum()) == 300


def test_auto_compiles_on_cuda_and_large_cpu_layers_and_bad_kinds_are_refused() -> None:
    cpu = LiveKernel("auto", "cpu")
    big, small = torch.empty(512, 1024), torch.empty(511, 1024)
    assert cpu.active == "compiled" and cpu.min_weights == CPU_AUTO_MIN_WEIGHTS == 1 << 19
    assert cpu.fuses(big) and not cpu.fuses(small)
    assert not cpu.fuses(big.t())  # flat views need the weights in order
    cuda = LiveKernel("auto", "cuda")  # (built without touching CUDA)
    assert cuda.active == "compiled" and cuda.min_weights == 0 and cuda.fuses(small)
    assert LiveKernel("compiled", "cpu").fuses(torch.empty(3, 2))
    assert not LiveKernel("eager", "cuda").fuses(big)
    net = mlp(12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for bad, error in (("fast", ValueError), (True, TypeError), (None, TypeError)):
        with pytest.raises(error, match="train_kernel must be one of 'auto', 'eager'"):
            adam_strategy(net, train_kernel=bad)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _train(kernel: str, tasks: int = 3):
    torch.manual_seed(0)
    bm = blob_stream(n_tasks=tasks, dim=12)
    strategy = adam_strategy(mlp(12), train_kernel=kernel)
    x0 = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(24)])
    outs, graphs = [], []
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        with torch.no_grad():
            outs.append(strategy.model(x0, 0).clone())
        graphs.append(counters["stats"]["unique_graphs"])
    return strategy, outs, graphs


def test_compiled_training_keeps_old_tasks_bit_identical_and_compiles_once(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="avalanche_tsn.kernels"):
        strategy, outs, graphs = _train("compiled")
    kernel = strategy.model.kernel
    assert kernel.active == "compiled" and kernel.fallback is None
    # one graph for every layer shape and every task: nothing compiled after the first task
    assert graphs[0] == graphs[1] == graphs[2]
    assert list(kernel.compile_seconds) == [(torch.float32, torch.device("cpu"))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert "TSN training kernel: compiled (asked compiled" in caplog.text
    # the same training as eager, bit for bit: the passes compute the same values
    eager_strategy, eager, _ = _train("eager")
    assert eager_strategy.model.kernel.active == "eager"
    assert all(torch.equal(a, b) for a, b in zip(outs, eager, strict=True))


def test_a_kernel_that_cannot_build_falls_back_to_eager(monkeypatch, caplog) -> None:
    def broken():
        def fail(*args):
            raise RuntimeError("no C++ compiler\nmore detail")

        return fail, fail

    monkeypatch.setattr(kernels_module, "_compiled", broken)
    with caplog.at_level(logging.WARNING, logger="avalanche_tsn.kernels"):
        strategy, outs, _ = _train("compiled", tasks=2)
    kernel = strategy.model.kernel
    assert kernel.active == "eager"
    assert kernel.fallback == "RuntimeError: no C++ compiler"
    assert "compiling failed (RuntimeError: no C++ compiler); eager" in caplog.text
    assert torch.equal(outs[0], outs[1])
    assert isinstance(strategy, TSNStrategy)


def test_compiled_training_with_the_task_router_and_class_incremental_streams() -> None:
    from test_task_inference import _strategy, class_incremental

    from avalanche_tsn.models import MultiHeadMLP

    bm = class_incremental(separable=True, n_tasks=3)
    strategy = _strategy(MultiHeadMLP(12, (16, 16)), "router", train_kernel="compiled")
    x0 = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(20)])
    first = None
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
        with torch.no_grad():
            out = strategy.model(x0, 0).clone()
        first = out if first is None else first
        assert torch.equal(out, first)  # task 0 bit-identical whatever trains after it
    assert strategy.model.kernel.active == "compiled"
    results = strategy.eval(bm.test_stream)
    # separable tasks: the router infers every test sample's task (as with the eager kernel)
    assert results["TaskInference_Acc_Stream/eval_phase/test_stream"] == 1.0


@pytest.mark.parametrize("fn", [live_weight, live_weight_ste])
def test_a_broadcast_gradient_reaches_both_weight_and_scores(fn) -> None:
    # out.sum() hands the backward a stride-0 gradient, which cannot be written in place
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g).requires_grad_()
    s = torch.randn(6, 5, generator=g).requires_grad_()
    t = topk_threshold(s.detach(), 12)
    fn(w, s, t).sum().backward()
    mask = s.detach().abs() >= t
    assert torch.equal(w.grad, mask.float())
    assert torch.equal(s.grad, w.detach() * torch.sign(s.detach()))


def _live_pair(shape, fused, workspace=None, grad_seed=2):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).requires_grad_()
    s = torch.randn(shape, generator=g).requires_grad_()
    t = topk_threshold(s.detach(), max(1, w.numel() // 3))
    out = live_weight(w, s, t, workspace, fused)
    out.backward(torch.randn(shape, generator=torch.Generator().manual_seed(grad_seed)))
    return out.detach(), w.grad, s.grad


@pytest.mark.parametrize("shape", [(7, 5), (16, 3, 3, 3), (1, 1)])
def test_the_compiled_passes_give_the_eager_values_bit_for_bit(shape) -> None:
    kernel = LiveKernel("compiled", "cpu")
    eager = _live_pair(shape, None, LiveWorkspace())
    for workspace in (LiveWorkspace(), None):  # reused buffers, and fresh tensors
        fused = _live_pair(shape, kernel, workspace)
        assert all(torch.equal(a, b) for a, b in zip(eager, fused, strict=True))
        # no weight-sized mask is kept between the passes: the backward recomputes it
        assert workspace is None or (workspace.mask is None and workspace.out is not None)
    assert kernel.fallback is None and kernel.compile_seconds


def test_a_backward_that_cannot_compile_runs_eagerly_from_the_recomputed_mask(monkeypatch) -> None:
    forward, _ = kernels_module._compiled()

    def fail(*args):
        raise RuntimeError("backward does not build")

    monkeypatch.setattr(kernels_module, "_compiled", lambda: (forward, fail))
    kernel = LiveKernel("compiled", "cpu")
    fused = _live_pair((9, 4), kernel, LiveWorkspace())
    assert kernel.active == "eager" and kernel.fallback == "RuntimeError: backward does not build"
    eager = _live_pair((9, 4), None, LiveWorkspace())
    assert all(torch.equal(a, b) for a, b in zip(eager, fused, strict=True))


def test_two_compiled_forwards_before_one_backward_keep_their_own_buffers() -> None:
    # LwF-style: a second forward while the first graph still reads the workspace's buffers
    kernel, workspace = LiveKernel("compiled", "cpu"), LiveWorkspace()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 8, generator=g).requires_grad_()
    s = torch.randn(6, 8, generator=g).requires_grad_()
    t = topk_threshold(s.detach(), 20)
    first = live_weight(w, s, t, workspace, kernel)
    kept = first.detach().clone()
    second = live_weight(w, s * 2, t, workspace, kernel)  # another mask: twice the scores
    assert torch.equal(first, kept)
    (first.sum() + second.sum()).backward()
    mask1, mask2 = s.detach().abs() >= t, (2 * s.detach()).abs() >= t
    assert torch.equal(w.grad, mask1.float() + mask2.float())
    sign = torch.sign(s.detach())
    assert torch.equal(s.grad, w.detach() * sign + 2 * (w.detach() * sign))


def test_frozen_scores_take_the_compiled_forward_and_the_eager_backward() -> None:
    # Ada-QPacknet fixes the mask: the scores get no gradient, the weights get grad * mask
    g = torch.Generator().manual_seed(4)
    w0, s0 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    t = topk_threshold(s0, 16)
    grads = []
    for fused in (None, LiveKernel("compiled", "cpu")):
        w = w0.clone().requires_grad_()
        out = live_weight(w, s0.clone(), t, LiveWorkspace(), fused)
        out.backward(torch.ones_like(out))
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[1], (s0.abs() >= t).float())


def test_mixed_task_minibatches_train_the_same_compiled_as_eager() -> None:
    # replay puts earlier tasks' rows in every training minibatch: only the live rows run
    # through the compiled passes, the frozen rows select their weights (features together)
    from avalanche.training.plugins import ReplayPlugin
    from test_avalanche_compat import MODELS, fast_benchmark, outputs, probe, same, tsn

    finals = []
    for kernel in ("compiled", "eager"):
        torch.manual_seed(0)
        bm = fast_benchmark()
        inputs = probe(bm.test_stream)
        strategy = tsn(
            MODELS["MultiHeadMLP"](), plugins=[ReplayPlugin(mem_size=60)], train_kernel=kernel
        )
        recorded: dict[int, torch.Tensor] = {}
        for exp in list(bm.train_stream)[:3]:
            strategy.train(exp, eval_streams=[], num_workers=0)
            assert same(strategy.model, inputs, recorded)  # earlier tasks bit-identical
            recorded.update(outputs(strategy.model, inputs, [exp.task_label]))
        assert strategy.model.kernel.active == kernel
        finals.append(recorded)
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][t], finals[1][t]) for t in finals[0])


def test_an_embedding_table_trains_the_same_compiled_as_eager() -> None:
    from conftest import TextConv, quiet_evaluator, token_stream

    finals = []
    for kernel in ("compiled", "eager"):
        torch.manual_seed(0)
        bm = token_stream()
        net = TextConv()
        strategy = TSNStrategy(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
            train_mb_size=16,
            evaluator=quiet_evaluator(),
            train_kernel=kernel,
        )
        x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(16)])
        outs = []
        for exp in list(bm.train_stream)[:2]:
            strategy.train(exp)
            with torch.no_grad():
                outs.append(strategy.model.eval()(x, 0))
        assert torch.equal(outs[0], outs[1]) and strategy.model.kernel.active == kernel
        finals.append(outs[-1])
    assert torch.equal(finals[0], finals[1])
