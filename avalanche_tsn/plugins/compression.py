"""Post-training stages of TinySubNets as Avalanche plugins: validation split, greedy
pruning and adaptive quantization (Zurek et al., arXiv:2412.10869, 2024, steps 2 and 3).
Each plugin only wires callbacks to :mod:`avalanche_tsn.pruning` and
:mod:`avalanche_tsn.quantization`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor

from avalanche_tsn.distributed import is_main_process
from avalanche_tsn.early_stop import margins, moved_batches, promote, ramp, reorder
from avalanche_tsn.layout import channels_last_batches, layout_key
from avalanche_tsn.model import TSNModel
from avalanche_tsn.plugins._common import current_task, strategy_batches, tsn_model
from avalanche_tsn.prefix import PrefixCache, model_cache
from avalanche_tsn.pruning import PruneRecord, check_search, greedy_prune
from avalanche_tsn.quantization import adaptive_bits, check_bits, quantize_head, quantize_task
from avalanche_tsn.stages import stage_context
from avalanche_tsn.validation import check_bool, check_float, check_int

__all__ = [
    "ValidationSplitPlugin",
    "PruningPlugin",
    "QuantizationPlugin",
    "validation_accuracy",
    "head_validation",
]

log = logging.getLogger(__name__)

#: Largest minibatch of a validation pass (see :func:`validation_accuracy`).
_FLOOR_BATCH = 64


def _fraction(value: object, name: str, low_open: bool = True) -> float:
    return check_float(value, name, 0, 1, low_open=low_open, high_open=True)


class ValidationSplitPlugin(SupervisedPlugin, supports_distributed=True):
    """Holds out a validation split of each experience's training data (never trained on).

    The split is the strategy's :class:`~avalanche_tsn.stages.StageContext` ``validation``;
    pruning and quantization measure accuracy on it.

    :param fraction: fraction of the training data held out, in (0, 1).
    :param seed: seed of the split.
    :param allowance: the smallest accuracy drop the stages reading the split accept, in
        [0, 1) (pruning's and quantization's ``max_drop``): a split whose one sample weighs
        more is logged as too coarse for it.
    """

    def __init__(self, fraction: float = 0.1, seed: int = 0, allowance: float = 0.01) -> None:
        super().__init__()
        self.fraction = _fraction(fraction, "validation_fraction")
        self.seed = seed
        self.allowance = _fraction(allowance, "allowance", low_open=False)

    def check_experience(self, index: int, experience) -> None:
        """Raise if ``experience`` is too small to split.

        :param index: the experience's position in the call.
        :param experience: the experience.
        """
        n = len(experience.dataset)
        n_val = int(round(self.fraction * n))
        if n_val < 1 or n_val >= n:
            raise ValueError(
                f"validation_fraction={self.fraction} leaves an empty split of experience "
                f"{index} ({n} samples); use a fraction that keeps both sides non-empty"
            )

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        data = strategy.adapted_dataset
        n = len(data)
        g = torch.Generator().manual_seed(self.seed + strategy.clock.train_exp_counter)
        order = torch.randperm(n, generator=g).tolist()
        n_val = int(round(self.fraction * n))
        # one line for the run: every rank holds the same split size
        if self.allowance > 0 and n_val * self.allowance < 1 and is_main_process():
            log.warning(
                "the validation split of experience %d holds %d samples: one sample is %.1f "
                "points of validation accuracy, coarser than the %.1f-point drop pruning and "
                "quantization accept, so their decisions rest on a few samples and test "
                "accuracy can drop by more; hold out more (validation_fraction=%s) or train "
                "this experience with prune=False and quantize=False",
                strategy.clock.train_exp_counter,
                n_val,
                100 / n_val,
                100 * self.allowance,
                self.fraction,
            )
        stage_context(strategy).new_validation(data.subset(order[:n_val]).eval())
        strategy.adapted_dataset = data.subset(order[n_val:])

    def after_training(self, strategy, **kwargs) -> None:
        # the passes' stored stage inputs (up to avalanche_tsn.prefix.BUDGET) are not kept
        # beyond the train call that made them
        stage_context(strategy).drop_validation_cache()


@torch.no_grad()
def validation_accuracy(
    strategy, task_label: int, floor: float | None = None, model: torch.nn.Module | None = None
) -> float:
    """Accuracy of ``strategy.model`` (or ``model``) on the held-out split, as ``task_label``.

    The split is read once per experience (with the strategy's own minibatch conventions)
    and kept on the strategy's device, so repeated evaluations cost only forwards. Passes
    reorder its samples so that early stops come sooner (hardest first, then the samples
    they found wrong; see :mod:`avalanche_tsn.early_stop`): a complete pass's accuracy does
    not depend on the order.

    :param strategy: a strategy with a :class:`ValidationSplitPlugin`.
    :param task_label: the task whose subnetwork runs.
    :param floor: stop as soon as the accuracy cannot reach ``floor`` any more, and return
        a value below it (searches only need to know which side of the floor it is).
    :param model: the model to evaluate (default: the strategy's).
    """
    ctx = stage_context(strategy)
    model = strategy.model if model is None else model
    batches = _validation_batches(strategy, ctx, model, task_label)
    total = sum(len(y) for _, y in batches)
    # The same model state gives the same accuracy: searches re-ask for their baselines.
    state = (task_label, id(batches), _state_key(model))
    memo = ctx.validation_memo
    if memo is not None and memo[0] == state:
        return memo[1]
    head = _sole_head(model)
    captured: list[tuple[tuple, dict, Tensor]] = []
    hook = None
    if head is not None:
        hook = head.register_forward_hook(
            lambda _m, args, kwargs, out: captured.append((args, kwargs, out)), with_kwargs=True
        )
    cache = _prefix_cache(ctx, model, task_label, batches)
    was_training = model.training
    model.eval()
    correct = seen = 0
    outputs: list[Tensor] = []
    missed: list[Tensor] = []
    # the first complete pass of the split orders it hardest first, for later early stops
    hardness: list[Tensor] | None = None if ctx.validation_ordered else []
    try:
        if cache is not None:
            cache.begin()
        for i, (x, y) in enumerate(batches):
            out = model(x, task_label) if cache is None else cache.forward(i, x)
            if head is not None:
                outputs.append(out)
            if hardness is not None:
                hardness.append(margins(out, y))
            missed.append(out.argmax(1) != y)
            correct += len(y) - int(missed[-1].sum())
            seen += len(y)
            if floor is not None and correct + (total - seen) < floor * total:
                _promote(ctx, batches, None, missed, floor, total)
                return (correct + total - seen) / total  # an upper bound, below the floor
        if cache is not None:
            cache.commit()
        if hook is not None:
            hook.remove()
            hook = None
        features = _head_inputs(outputs, captured) if head is not None else None
        if hardness:
            order = torch.sort(torch.cat(hardness), stable=True).indices
            # the samples this pass got wrong lead the first minibatch (see ramp)
            sizes = ramp(total, len(batches[0][1]), lead=total - correct)
            batches, features = reorder(batches, features, order, sizes)
            ctx.order_validation(batches)
        else:
            batches, features = _promote(ctx, batches, features, missed, floor, total)
        state = (task_label, id(batches), state[2])
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    ctx.validation_memo = (state, correct / total, features)
    return correct / total


def _head_inputs(outputs: list[Tensor], captured: list[tuple[tuple, dict, Tensor]]) -> list | None:
    # the head's inputs, minibatch by minibatch, if the model's output was its head's output
    if len(captured) != len(outputs):
        return None
    pairs = zip(outputs, captured, strict=True)
    if not all(isinstance(c, Tensor) and torch.equal(o, c) for o, (_, _, c) in pairs):
        return None
    return [(args, kwargs) for args, kwargs, _ in captured]


def _promote(
    ctx, batches: list, features: list | None, missed: list[Tensor], floor: float | None, total: int
) -> tuple:
    # the samples a pass of the ordered split got wrong after its first minibatch move into
    # it (see avalanche_tsn.early_stop.promote); the minibatches that changed run from the
    # input until a pass reads the whole split, the others resume from their stored stage
    # inputs. Only where the first minibatch can hold a rejection: more samples than the
    # floor lets be wrong.
    if not ctx.validation_ordered or floor is None or len(batches[0][1]) <= total * (1 - floor):
        return batches, features
    order = promote(torch.cat(missed), len(batches[0][1]), total)
    if order is None:
        return batches, features
    sizes = [len(y) for _, y in batches]
    batches, features = reorder(batches, features, order, sizes)
    ctx.promote_validation(batches, moved_batches(order, sizes))
    return batches, features


def _validation_batches(strategy, ctx, model, task_label: int) -> list[tuple[Tensor, Tensor]]:
    data = ctx.require_validation("measuring validation accuracy")
    if ctx.validation_batches is None:
        # Small batches: a search that only needs to know whether a floor is reached stops
        # after the first batch that rules it out.
        size = min(strategy.eval_mb_size, _FLOOR_BATCH)
        batches = [
            (x.to(strategy.device), y.to(strategy.device))
            for x, y in strategy_batches(strategy, data, size)
        ]
        if batches:
            # every pass, the first included, reads images in the CPU's faster layout
            # (decided once per model and input shape: the trial is two forwards)
            layout = layout_key(model, batches[0][0])
            was_training = model.training
            model.eval()  # the trial's forwards, as the passes' (batch norm's statistics kept)
            try:
                batches, ctx.layouts[layout] = channels_last_batches(
                    batches, model, lambda x: model(x, task_label), ctx.layouts.get(layout)
                )
            finally:
                model.train(was_training)
        ctx.validation_batches = batches
    return ctx.validation_batches


def _prefix_cache(
    ctx, model: torch.nn.Module, task_label: int, batches: list
) -> PrefixCache | None:
    # one cache per model, task, route and minibatches (see avalanche_tsn.prefix; a
    # promotion hands it on to the reordered minibatches: StageContext.promote_validation)
    route = model.task_table.frozen_slot(task_label) if isinstance(model, TSNModel) else None
    key = (id(model), task_label, route)
    prefix = ctx.validation_prefix
    if prefix is None or prefix[0] != key or prefix[3] is not batches:
        cache = model_cache(model, task_label, len(batches))
        # (the model and minibatches are held with it: their ids are not reused meanwhile)
        ctx.validation_prefix = (key, cache, model, batches)
    return ctx.validation_prefix[1]


def _sole_head(model: torch.nn.Module) -> torch.nn.Module | None:
    heads = model.classifier_heads() if isinstance(model, TSNModel) else []
    return heads[0] if len(heads) == 1 else None


def head_validation(strategy, task_label: int) -> Callable[..., float] | None:
    """Validation accuracy as a function of the task's head alone, or None.

    Available right after a complete :func:`validation_accuracy` pass of the model as it is
    now, when the model has one ``MultiHeadClassifier`` whose output was the model's output
    for every batch: the heads' inputs of that pass are reused, so changing only the head
    (quantizing it) is evaluated without running the backbone again, with the very logits
    a full pass would give.

    :param strategy: the strategy, as for :func:`validation_accuracy`.
    :param task_label: the task whose head is evaluated.
    :return: ``evaluate(floor=None)`` like :func:`validation_accuracy`'s, or None.
    """
    ctx = stage_context(strategy)
    memo, batches = ctx.validation_memo, ctx.validation_batches
    model = strategy.model
    head = _sole_head(model)
    if memo is None or memo[2] is None or batches is None or head is None:
        return None
    if memo[0] != (task_label, id(batches), _state_key(model)):
        return None
    features = memo[2]
    total = sum(len(y) for _, y in batches)

    @torch.no_grad()
    def evaluate(floor: float | None = None) -> float:
        was_training = head.training
        head.eval()
        correct = seen = 0
        try:
            for (args, kwargs), (_, y) in zip(features, batches, strict=True):
                correct += int((head(*args, **kwargs).argmax(1) == y).sum())
                seen += len(y)
                if floor is not None and correct + (total - seen) < floor * total:
                    return (correct + total - seen) / total
        finally:
            head.train(was_training)
        return correct / total

    return evaluate


def _state_key(model: torch.nn.Module) -> tuple:
    """Identity and version of every tensor of ``model``: any change alters it."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


class PruningPlugin(SupervisedPlugin, supports_distributed=True):
    """Greedy post-training pruning of each task's own weights.

    :param iterations: passes over the layers.
    :param step: fraction of a layer's own weights dropped per attempt, in (0, 1).
    :param max_drop: largest accepted validation-accuracy drop, in [0, 1).
    :param search: ``"joint"`` tries every pass's drop at once, then every layer at once,
        splitting the layers only where the drop is too large; ``"layerwise"`` tries each
        layer on its own (the paper's loop, one validation pass per layer and pass);
        ``"bisect"`` bisects one fraction for every layer. See :func:`greedy_prune`.
    """

    def __init__(
        self,
        iterations: int = 5,
        step: float = 0.2,
        max_drop: float = 0.01,
        search: str = "joint",
    ) -> None:
        super().__init__()
        self.iterations = check_int(iterations, "prune_iterations", 1)
        self.step = _fraction(step, "prune_step")
        self.max_drop = _fraction(max_drop, "prune_max_drop", low_open=False)
        self.search = check_search(search)
        self.records: list[PruneRecord] = []

    def after_training_exp(self, strategy, **kwargs) -> None:
        label = current_task(strategy)
        record = greedy_prune(
            tsn_model(strategy),
            label,
            lambda floor=None: validation_accuracy(strategy, label, floor),
            iterations=self.iterations,
            step=self.step,
            max_drop=self.max_drop,
            search=self.search,
        )
        self.records.append(record)
        log.info(
            "task %d pruned: sparsity %.4f -> %.4f (%d validation passes)",
            label,
            record.sparsity_before,
            record.sparsity_after,
            record.evaluations,
        )


class QuantizationPlugin(SupervisedPlugin, supports_distributed=True):
    """Adaptive k-means quantization of each task's own weights.

    :param min_bits: first bit-width tried, in 1..16.
    :param max_bits: largest bit-width, in ``min_bits``..16.
    :param max_drop: largest accepted validation-accuracy drop, in [0, 1).
    :param heads: also quantize the task's heads (their own codebook and bit-width, chosen
        the same way after the backbone's).
    """

    def __init__(
        self, min_bits: int = 2, max_bits: int = 8, max_drop: float = 0.01, heads: bool = True
    ) -> None:
        super().__init__()
        self.min_bits = check_bits(min_bits, "quant_min_bits")
        self.max_bits = check_bits(max_bits, "quant_max_bits")
        if self.max_bits < self.min_bits:
            raise ValueError(
                f"quant_max_bits ({max_bits}) must be at least quant_min_bits ({min_bits})"
            )
        self.max_drop = _fraction(max_drop, "quant_max_drop", low_open=False)
        self.heads = check_bool(heads, "quant_heads")
        self.bits: dict[int, int] = {}
        self.head_bits: dict[int, int] = {}

    def after_training_exp(self, strategy, **kwargs) -> None:
        label = current_task(strategy)
        model = tsn_model(strategy)
        slot = model.slot_of(label)
        layers = [layer for _, layer in model.masked_layers()]
        own = [layer.own_values(slot).clone() for layer in layers]

        def restore_backbone() -> None:
            for layer, values in zip(layers, own, strict=True):
                layer.set_own_values(slot, values)
                layer.set_codebook(slot, values.new_zeros(0), 0)

        self.bits[label] = self._search(
            strategy, label, restore_backbone, lambda b: quantize_task(model, slot, b)
        )
        heads = model.head_weights(label) if self.heads else []
        if heads:
            saved = [w.detach().clone() for w in heads]

            def restore_heads() -> None:
                with torch.no_grad():
                    for w, values in zip(heads, saved, strict=True):
                        w.copy_(values)
                model.set_head_codebook(slot, saved[0].new_zeros(0), 0)

            self.head_bits[label] = self._search(
                strategy,
                label,
                restore_heads,
                lambda b: quantize_head(model, label, b),
                heads_only=True,
            )
        log.info(
            "task %d quantized: backbone %d bits, heads %s bits",
            label,
            self.bits[label],
            self.head_bits.get(label, "float32"),
        )

    def _search(self, strategy, label: int, restore, quantize, heads_only: bool = False) -> int:
        baseline = validation_accuracy(strategy, label)
        # Only the head changes in a head search: its inputs from the baseline pass serve.
        fast = head_validation(strategy, label) if heads_only else None
        return adaptive_bits(
            quantize,
            restore,
            fast or (lambda floor=None: validation_accuracy(strategy, label, floor)),
            baseline,
            min_bits=self.min_bits,
            max_bits=self.max_bits,
            max_drop=self.max_drop,
        )
