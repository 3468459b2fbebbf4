"""Validation passes over channels-last images: faster on the CPU, the same decisions."""

from __future__ import annotations

import torch
from conftest import adam_strategy, image_stream
from torch import nn

from avalanche_tsn.layout import channels_last_batches


def _convnet(flatten_by_view: bool = False) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.BatchNorm2d(8)
            self.head = nn.Linear(8 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.norm(self.conv(x)))
            # x.view(n, -1) needs NCHW strides: such a model must keep its layout
            x = x.view(len(x), -1) if flatten_by_view else x.flatten(1)
            return self.head(x)

    torch.manual_seed(0)
    return Net().eval()


def _batches(channels: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, channels, 4, 4, generator=g), torch.arange(5) % 3) for _ in range(3)]


def _nhwc(x: torch.Tensor) -> bool:
    return x.stride()[1] == 1 and x.is_contiguous(memory_format=torch.channels_last)


def test_images_on_the_cpu_become_channels_last_with_the_same_values_and_outputs():
    model, batches = _convnet(), _batches()
    moved, changed = channels_last_batches(batches, model, model)
    assert changed and all(_nhwc(x) for x, _ in moved)
    assert all(torch.equal(x, m) and y is t for (x, y), (m, t) in zip(batches, moved, strict=True))
    with torch.no_grad():
        for (x, _), (m, _) in zip(batches, moved, strict=True):
            out, out_moved = model(x), model(m)
            assert torch.allclose(out, out_moved, rtol=1e-5, atol=1e-6)
            assert torch.equal(out.argmax(1), out_moved.argmax(1))


def test_one_channel_images_get_channels_last_strides_too():
    conv = nn.Conv2d(1, 4, 3).eval()
    moved, changed = channels_last_batches(_batches(channels=1), conv, conv)
    assert changed and all(x.stride()[1] == 1 for x, _ in moved)
    with torch.no_grad():
        assert conv(moved[0][0]).is_contiguous(memory_format=torch.channels_last)


def test_models_that_refuse_or_depend_on_the_layout_keep_their_inputs():
    batches = _batches()
    by_view = _convnet(flatten_by_view=True)
    kept, changed = channels_last_batches(batches, by_view, by_view)
    assert not changed and all(x is k for (x, _), (k, _) in zip(batches, kept, strict=True))

    def memory_order(x: torch.Tensor) -> torch.Tensor:
        # reads the storage as it lies: the same logical tensor gives other values
        return torch.as_strided(x, (len(x), x[0].numel()), (x[0].numel(), 1)) * 1.0

    kept, changed = channels_last_batches(batches, _convnet(), memory_order)
    assert not changed and all(x is k for (x, _), (k, _) in zip(batches, kept, strict=True))


def test_other_inputs_are_returned_without_running_the_model():
    def never(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model must not run for inputs that keep their layout")

    flat = [(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))]
    assert channels_last_batches(flat, _convnet(), never) == (flat, False)


def _image_stream():
    return image_stream(2, 4, (60, 30), spread=2.0, noise=0.5)


def test_validation_passes_read_channels_last_images_and_agree():
    from avalanche_tsn.plugins.compression import validation_accuracy
    from avalanche_tsn.stages import stage_context

    def flat_mlp() -> nn.Module:  # no convolution: nothing to gain, the layout is kept
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3))

    cases = [(_convnet, True), (lambda: _convnet(flatten_by_view=True), False), (flat_mlp, False)]
    for make, nhwc in cases:
        torch.manual_seed(0)
        bm = _image_stream()
        strategy = adam_strategy(make(), prune=True, quantize=True)
        strategy.train(bm.train_stream, eval_streams=[])  # prunes and quantizes through it
        strategy.experience = bm.train_stream[1]
        ctx = stage_context(strategy)
        ctx.new_validation(bm.test_stream[1].dataset.eval())
        first = validation_accuracy(strategy, 1)
        assert ctx.validation_ordered
        assert all(_nhwc(x) == nhwc for x, _ in ctx.validation_batches)
        x = torch.cat([x.contiguous() for x, _ in ctx.validation_batches])
        y = torch.cat([y for _, y in ctx.validation_batches])
        with torch.no_grad():
            nchw = (strategy.model(x, 1).argmax(1) == y).float().mean().item()
        ctx.validation_memo = None  # a fresh pass over the channels-last split
        assert validation_accuracy(strategy, 1) == first == nchw


def test_the_layout_is_tried_once_per_model_and_applied_to_later_experiences(monkeypatch):
    from avalanche_tsn.models import ReducedResNet18
    from avalanche_tsn.plugins import compression
    from avalanche_tsn.stages import stage_context

    real = compression.channels_last_batches
    known, layouts = [], []

    def recorded(batches, model, run, known_layout=None):
        known.append(known_layout)
        out = real(batches, model, run, known_layout)
        layouts.append(all(_nhwc(x) for x, _ in out[0]))
        return out

    cases = [
        (_convnet, True),
        (lambda: _convnet(flatten_by_view=True), False),
        (lambda: ReducedResNet18(n_classes=3, nf=4), True),  # a head more each experience
    ]
    for make, nhwc in cases:
        torch.manual_seed(0)
        known.clear()
        layouts.clear()
        bm = _image_stream()
        strategy = adam_strategy(make(), prune=True, quantize=False)
        monkeypatch.setattr(compression, "channels_last_batches", recorded)
        strategy.train(bm.train_stream, eval_streams=[])
        monkeypatch.undo()
        # the first experience tries both layouts; the second applies that decision
        assert known == [None, nhwc] and layouts == [nhwc, nhwc]
        assert all(_nhwc(x) == nhwc for x, _ in stage_context(strategy).validation_batches)


def test_the_first_pass_reads_the_chosen_layout_and_the_trial_keeps_batch_norm_statistics():
    from avalanche_tsn.plugins.compression import validation_accuracy
    from avalanche_tsn.stages import stage_context

    torch.manual_seed(0)
    bm = _image_stream()
    strategy = adam_strategy(_convnet(), prune=False, quantize=False)
    strategy.train(bm.train_stream[0], eval_streams=[])
    strategy.experience = bm.train_stream[0]
    ctx = stage_context(strategy)
    ctx.new_validation(bm.test_stream[0].dataset.eval())
    ctx.layouts.clear()  # a model seen for the first time: the layouts are tried
    model = strategy.model
    model.train()  # as a plugin finds it after training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs: list[bool] = []
    modes: list[bool] = []

    def seen(module: nn.Module, args: tuple) -> None:
        inputs.append(_nhwc(args[0]))
        modes.append(module.training)

    hook = model.register_forward_pre_hook(seen)
    try:
        validation_accuracy(strategy, 0)
    finally:
        hook.remove()
    after = model.state_dict()
    # every forward ran in evaluation mode (batch norm's statistics kept), and the model is
    # left in the mode it was in
    assert not any(modes) and model.training
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the trial's two forwards (NHWC, then NCHW), then every minibatch of the first pass
    n = sum(len(y) for _, y in ctx.validation_batches)
    minibatches = -(-n // min(strategy.eval_mb_size, 64))
    assert inputs == [True, False] + [True] * minibatches and minibatches > 1
