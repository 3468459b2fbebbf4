"""``TSNStrategy``: TinySubNets as an Avalanche strategy.

TinySubNets (Zurek et al., "TinySubNets: An efficient and low capacity continual learning
strategy", arXiv:2412.10869, 2024). The strategy wraps the user's model into a
:class:`~avalanche_tsn.model.TSNModel` and adds one plugin per TSN stage to a copy of the
user's plugin list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from os import PathLike
from typing import Any, BinaryIO

import torch
from avalanche.benchmarks import CLExperience
from avalanche.core import BasePlugin
from avalanche.distributed import DistributedHelper
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import Optimizer

from avalanche_tsn.activations import check_act_bits, task_accuracy
from avalanche_tsn.capacity import CapacityReport, capacity_report
from avalanche_tsn.compute import ComputeReport, compute_report
from avalanche_tsn.distributed import is_main_process, reporting, unwrap
from avalanche_tsn.distributed_training import DistributedTrainingMixin
from avalanche_tsn.export import export_model
from avalanche_tsn.inference import check_method
from avalanche_tsn.kernels import check_kernel
from avalanche_tsn.model import TSNModel, require_full
from avalanche_tsn.param_groups import ParamGroupsMixin
from avalanche_tsn.plugins import (
    ActivationCalibrationPlugin,
    MaskLearningPlugin,
    PruningPlugin,
    QuantizationPlugin,
    TaskRouterPlugin,
    TaskSimilarityPlugin,
    TensorBatchesPlugin,
    ValidationSplitPlugin,
)
from avalanche_tsn.plugins._common import strategy_batches
from avalanche_tsn.router import DEFAULT_OOD_WEIGHT, check_ood_weight
from avalanche_tsn.similarity import DEFAULT_KL_THRESHOLD, check_threshold
from avalanche_tsn.stages import StageSpec, assemble_plugins, check_plugins
from avalanche_tsn.streams import (
    check_stream,
    task_aware,
)
from avalanche_tsn.task_routing import TaskRoutingMixin
from avalanche_tsn.tiny import keeps_memory
from avalanche_tsn.validation import check_bool, check_float, check_float32, check_int

__all__ = ["TSNStrategy", "TSNSettings", "tsn_recipe", "reject_arguments"]


def _aware(items: Iterable[Any]) -> list[Any]:
    """Streams or experiences, with every experience made task-aware."""
    return [task_aware(x) if isinstance(x, CLExperience) else _aware(x) for x in items]


def reject_arguments(kwargs: dict[str, Any], names: Sequence[str], message: str) -> None:
    """Raise a TypeError naming the ``names`` (or ``prune_*``/``quant_*`` keys) in ``kwargs``.

    For strategies built on TSNStrategy that do not have some of its stages.

    :param kwargs: the keyword arguments given.
    :param names: arguments that are not accepted.
    :param message: what the strategy has instead, put before the list.
    """
    given = [n for n in names if n in kwargs]
    given += [n for n in kwargs if n.startswith(("prune_", "quant_"))]
    if given:
        raise TypeError(f"{message}; remove {', '.join(sorted(given))} (TSNStrategy's)")


@dataclass(frozen=True)
class TSNSettings:
    """The stage settings of a TSN-family strategy, as given (each stage checks its own)."""

    sparsity: float | Sequence[float] | None
    validation_fraction: float
    prune: bool
    prune_iterations: int
    prune_step: float
    prune_max_drop: float
    prune_search: str
    quantize: bool
    quant_min_bits: int
    quant_max_bits: int
    quant_max_drop: float
    quant_heads: bool
    task_matching: bool
    kl_threshold: float
    memory_size: int
    new_bank_below: float | None
    calibrate_activations: bool
    task_inference: str | bool | None
    tensor_batches: bool
    ood_weight: float = DEFAULT_OOD_WEIGHT
    train_kernel: str = "auto"

    def checked(self, user_plugins: Sequence[BasePlugin]) -> TSNSettings:
        """These settings, checked where no stage's plugin checks them (inference normalised).

        :param user_plugins: the user's plugins (a MaskLearningPlugin there sets the
            sparsity itself).
        """
        check_bool(self.prune, "prune")
        check_bool(self.quantize, "quantize")
        check_bool(self.task_matching, "task_matching")
        check_bool(self.calibrate_activations, "calibrate_activations")
        check_bool(self.tensor_batches, "tensor_batches")
        check_threshold(self.kl_threshold)
        check_ood_weight(self.ood_weight)
        check_kernel(self.train_kernel)
        inference = self.task_inference
        if inference is False:
            inference = None
        if any(isinstance(p, MaskLearningPlugin) for p in user_plugins) and (
            self.sparsity is not None or self.new_bank_below is not None
        ):
            raise ValueError(
                "sparsity or new_bank_below is set both on TSNStrategy and on the "
                "MaskLearningPlugin in plugins; set it in one place"
            )
        return replace(self, task_inference=None if inference is None else check_method(inference))


def _retrain_message(index: object, label: int, inferred: bool) -> str:
    """Why experience ``index`` (trained as task ``label``) cannot train, and the ways out."""
    if inferred:
        what = f"experience {index} was already learned by this model (as task {label})"
        hint = "train a fresh model"
    else:
        what = f"experience {index} has task label {label}, which this model has already learned"
        hint = (
            "give the experience a task label not used yet, or train a fresh model; if every "
            "experience has label 0, the stream has no task labels: pass task_inference"
        )
    return (
        f"{what}: a trained task is frozen and is never trained again. To learn it anew, {hint}. "
        "(strategy.abandon_task() forgets only a task whose training was interrupted.)"
    )


def _the(cls: type, plugins: Sequence[BasePlugin]) -> Any:
    return next(p for p in plugins if isinstance(p, cls))


def _check_arguments(
    model: object,
    optimizer: object,
    mb_size: object,
    epochs: object,
    eval_mb: object,
    every: object,
) -> None:
    # Avalanche's own arguments: its template takes any value and fails (or trains nothing)
    # later, after TSN has opened the task
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_float32(model, "model")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    check_int(mb_size, "train_mb_size", 1)
    check_int(epochs, "train_epochs", 1)
    if eval_mb is not None:
        check_int(eval_mb, "eval_mb_size (or None)", 1)
    check_int(every, "eval_every (-1 off, 0 after each experience, k every k epochs)", -1)


def _allowance(s: TSNSettings) -> float:
    """The smallest validation-accuracy drop the stages that read the split accept."""
    drops = [("prune_max_drop", s.prune_max_drop)] if s.prune else []
    drops += [("quant_max_drop", s.quant_max_drop)] if s.quantize else []
    # none: no stage with an allowance reads the split (its stage is off, or a recipe's)
    return min(
        (check_float(v, n, 0, 1, low_open=False, high_open=True) for n, v in drops), default=0.0
    )


def tsn_recipe(s: TSNSettings) -> list[StageSpec]:
    """TSN's stages in algorithm order, each on or off as ``s`` says.

    WSN and Ada-QPacknet are other recipes on the same stages (see :mod:`avalanche_tsn.recipes`).

    :param s: the strategy's settings, checked by each stage's plugin.
    """
    # The memory method reads the task memory that task matching keeps; without task
    # matching it never opens a bank (an infinite threshold).
    keep_memory = s.task_matching or s.task_inference in ("memory", "router")
    threshold = s.kl_threshold if s.task_matching else math.inf
    # memory_size=0 is a valid way to say "no memory" while no memory is kept.
    memory = 2 if s.memory_size == 0 and not keep_memory else s.memory_size
    return [
        StageSpec(
            TaskSimilarityPlugin,
            keep_memory,
            lambda: TaskSimilarityPlugin(memory, threshold),
            user_enables=True,  # task matching is off by default; a plugin turns it on
        ),
        StageSpec(
            MaskLearningPlugin,
            True,
            lambda: MaskLearningPlugin(
                0.5 if s.sparsity is None else s.sparsity, new_bank_below=s.new_bank_below
            ),
        ),
        StageSpec(
            ValidationSplitPlugin,
            s.prune or s.quantize,
            lambda: ValidationSplitPlugin(s.validation_fraction, allowance=_allowance(s)),
        ),
        StageSpec(
            PruningPlugin,
            s.prune,
            lambda: PruningPlugin(
                s.prune_iterations, s.prune_step, s.prune_max_drop, s.prune_search
            ),
        ),
        StageSpec(
            QuantizationPlugin,
            s.quantize,
            lambda: QuantizationPlugin(
                s.quant_min_bits, s.quant_max_bits, s.quant_max_drop, s.quant_heads
            ),
        ),
        StageSpec(
            ActivationCalibrationPlugin, s.calibrate_activations, ActivationCalibrationPlugin
        ),
        # after every stage that changes the task (the router reads its final subnetwork)
        StageSpec(
            TaskRouterPlugin,
            s.task_inference == "router",
            lambda: TaskRouterPlugin(s.ood_weight),
        ),
        # last, so that it sees a loader another plugin put in place (replay does)
        StageSpec(TensorBatchesPlugin, s.tensor_batches, TensorBatchesPlugin, user_enables=True),
    ]


class TSNStrategy(DistributedTrainingMixin, ParamGroupsMixin, TaskRoutingMixin, SupervisedTemplate):
    """TinySubNets: forget-free, low-capacity task-incremental learning.

    Use it where ``Naive`` or ``PackNet`` stood. The model is wrapped in place (its
    ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers become maskable, reusing the same parameters, so
    ``optimizer`` keeps working); ``strategy.model`` is the wrapped
    :class:`~avalanche_tsn.model.TSNModel`.

    Under ``torchrun`` (a process group initialised, e.g. by Avalanche's
    ``DistributedHelper.init_distributed``) it trains each experience through DDP and keeps one
    model on every rank; see :mod:`avalanche_tsn.distributed_training`.

    :param model: the user's ``nn.Module`` (single-head, or multi-head with
        ``MultiHeadClassifier``), or a ``TSNModel``.
    :param optimizer: an optimizer over the model's parameters.
    :param criterion: loss function (default: cross-entropy).
    :param train_mb_size: training minibatch size.
    :param train_epochs: epochs per experience.
    :param eval_mb_size: evaluation minibatch size (default: ``train_mb_size``).
    :param device: where the model and data live.
    :param plugins: extra Avalanche plugins; the list is copied, never modified. A
        :class:`MaskLearningPlugin` here replaces the default one.
    :param evaluator: Avalanche evaluation plugin or a factory of one.
    :param eval_every: periodic evaluation, as in Avalanche (-1 off, 0 after each experience).
    :param sparsity: fraction of each maskable layer that a task's mask leaves out, in
        [0, 1): one float, or one value per task in training order (default 0.5).
    :param validation_fraction: fraction of each experience's training data held out for
        pruning and quantization decisions, in (0, 1).
    :param prune: run post-training greedy pruning of each task's own weights.
    :param prune_iterations: pruning passes over the layers.
    :param prune_step: fraction of a layer's own weights dropped per attempt, in (0, 1).
    :param prune_max_drop: largest validation-accuracy drop pruning may cause, in [0, 1).
    :param prune_search: ``"joint"`` (everything at once first, then one pass fewer and so
        on down; then all layers at once, split where the drop is too large),
        ``"layerwise"`` (the paper's loop, one layer at a time) or ``"bisect"`` (one
        fraction for every layer, bisected); see :func:`avalanche_tsn.pruning.greedy_prune`.
    :param quantize: run adaptive k-means quantization of each task's own weights.
    :param quant_min_bits: first bit-width tried, in 1..16.
    :param quant_max_bits: largest bit-width, in ``quant_min_bits``..16.
    :param quant_max_drop: largest validation-accuracy drop quantization may cause.
    :param quant_heads: also quantize each task's heads (their own codebook and bit-width).
    :param task_matching: measure each new task's divergence from the earlier ones on a small
        task memory and give a task unlike all of them a fresh backbone copy (a bank).
    :param kl_threshold: largest divergence at which a task shares its closest task's bank, a
        float >= 0 (see :mod:`avalanche_tsn.similarity`).
    :param memory_size: samples kept per task for task matching or task inference
        (``"router"``, ``"memory"``), at least 2; stored losslessly in one byte a value for
        8-bit data (see :mod:`avalanche_tsn.task_memory`).
    :param new_bank_below: open a fresh backbone copy (a bank) for a task whose bank has less
        than this fraction of free weights in some layer, in (0, 1); None never does.
    :param calibrate_activations: after each task, record every masked layer's input range
        for :meth:`quantized_accuracy` (one pass over the validation split).
    :param task_inference: train a class-incremental stream (experiences without distinct
        task labels) one task per experience, and infer each test sample's task:
        ``"router"`` or ``True`` (a task router fitted after each task on the frozen
        subnetworks' features of the task memory; the best measured), ``"memory"`` (the task
        whose memory samples' features the sample's are closest to) or ``"entropy"`` (the
        trained task whose output is most confident); ``"router"`` and ``"memory"`` keep
        ``memory_size`` samples per task. None or False (default) needs task labels, as TSN
        does. See :mod:`avalanche_tsn.inference` and :mod:`avalanche_tsn.router`.
    :param ood_weight: with ``task_inference="router"``, weight of the outlier-exposure
        loss a training task gets on earlier tasks' memory samples, a float >= 0 (see
        :mod:`avalanche_tsn.router`).
    :param tensor_batches: read minibatches of tensor-backed datasets by indexing whole
        tensors (same samples, same order as Avalanche's loader; see
        :mod:`avalanche_tsn.batches`); other data always use Avalanche's loader.
    :param train_kernel: how the live subnetwork's masked weights are computed in training:
        ``"compiled"`` (each layer's elementwise work in one ``torch.compile`` pass forward
        and one backward, the eager values bit for bit; eager, with a warning, where it
        cannot build), ``"eager"``, or ``"auto"`` (compiled on CUDA and, on the CPU, for
        layers of 524,288 weights or more, below which eager measured faster; see
        :mod:`avalanche_tsn.kernels`). Trained tasks are bit-identical whichever runs.
    :param base_kwargs: passed on to :class:`SupervisedTemplate`.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        criterion: Any = None,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[BasePlugin] | None = None,
        evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] = default_evaluator,
        eval_every: int = -1,
        sparsity: float | Sequence[float] | None = None,
        validation_fraction: float = 0.1,
        prune: bool = True,
        prune_iterations: int = 5,
        prune_step: float = 0.2,
        prune_max_drop: float = 0.01,
        prune_search: str = "joint",
        quantize: bool = True,
        quant_min_bits: int = 2,
        quant_max_bits: int = 8,
        quant_max_drop: float = 0.01,
        quant_heads: bool = True,
        task_matching: bool = False,
        kl_threshold: float = DEFAULT_KL_THRESHOLD,
        memory_size: int = 100,
        new_bank_below: float | None = None,
        calibrate_activations: bool = True,
        task_inference: str | bool | None = None,
        ood_weight: float = DEFAULT_OOD_WEIGHT,
        tensor_batches: bool = True,
        train_kernel: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        _check_arguments(model, optimizer, train_mb_size, train_epochs, eval_mb_size, eval_every)
        user_plugins = check_plugins(plugins, evaluator)
        # every TSNSettings field is an argument of the same name
        named = {f.name for f in fields(TSNSettings)}
        settings = TSNSettings(**{k: v for k, v in locals().items() if k in named}).checked(
            user_plugins
        )
        # TSN stages run in algorithm order, after the user's plugins
        others, tsn_plugins = assemble_plugins(self.recipe(settings), user_plugins)
        self._init_routing()
        self._init_param_groups()
        self._init_distributed()
        self.mask_plugin: MaskLearningPlugin = _the(MaskLearningPlugin, tsn_plugins)
        # A model TSN already wraps (a strategy rebuilt around it) continues where it is.
        tsn = TSNModel.of(unwrap(model), self.mask_plugin.sparsity_for(0))
        require_full(tsn, "TSNStrategy")
        super().__init__(
            model=tsn,
            optimizer=optimizer,
            criterion=CrossEntropyLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=others + tsn_plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )
        tsn.task_inference = settings.task_inference
        tsn.use_kernel(settings.train_kernel, self.device)

    def recipe(self, s: TSNSettings) -> list[StageSpec]:
        """The stages this strategy runs (TSN's: :func:`tsn_recipe`).

        :param s: the strategy's settings.
        """
        return tsn_recipe(s)

    @property
    def tsn_model(self) -> TSNModel:
        """The wrapped multi-task model."""
        return self.model  # type: ignore[return-value]

    @property
    def task_inference(self) -> str | None:
        """How evaluation infers tasks (the model's ``task_inference``), or None."""
        return self.tsn_model.task_inference

    def capacity_report(self) -> CapacityReport:
        """Memory the trained tasks need for inference, against the dense model."""
        return capacity_report(self.tsn_model)

    def export(self, path: str | PathLike | BinaryIO, *, keep_memory: bool | None = None) -> int:
        """Write the trained tasks to a compact file (see :func:`avalanche_tsn.load_compressed`).

        Under ``torch.distributed`` only rank 0 writes (every rank waits for it).

        :param path: a file path or a writable binary file.
        :param keep_memory: write the task memory; None (default): only where tasks are
            inferred by it (``task_inference="memory"``).
        :return: bytes written (rank 0's count on every rank).
        """
        keeps_memory(self.tsn_model, keep_memory)  # refused on every rank, before any work
        written = 0
        with reporting("export"):  # (also the barrier: rank 0 has written when it returns)
            if is_main_process():
                written = export_model(self.tsn_model, path, keep_memory=keep_memory)
        return int(DistributedHelper.broadcast_object(written))  # rank 0's count everywhere

    def compute_report(
        self, input_shape: Sequence[int] | None = None, act_bits: int | None = None
    ) -> ComputeReport:
        """MACs and bit-operations per sample of every trained task against the dense model.

        :param input_shape: one sample's shape (default: that of the last minibatch seen).
        :param act_bits: activation word length for the bit-operations (None: float).
        """
        shape = input_shape if input_shape is not None else self.tsn_model.sample_shape
        if shape is None:
            raise ValueError("input_shape is needed: the model has not seen an input yet")
        return compute_report(self.tsn_model, shape, act_bits)

    def quantized_accuracy(
        self, experiences: CLExperience | Iterable[CLExperience], act_bits: int | None
    ) -> dict[int, float]:
        """Test accuracy of each experience's task with activations at ``act_bits`` bits.

        Weights stay at their own bit-widths; ``act_bits=None`` gives float activations.
        Tasks must be calibrated (``calibrate_activations``, on by default).

        :param experiences: an experience or a stream of them (task-aware; with
            ``task_inference``, each experience is routed to the task trained on its classes).
        :param act_bits: activation word length in 2..16, or None.
        :return: accuracy per task label (the slot's label with ``task_inference``).
        """
        check_act_bits(act_bits)
        exps = _aware([experiences] if isinstance(experiences, CLExperience) else experiences)
        labels = self._evaluated_labels(exps)
        untrained = [t for t in labels if not self.tsn_model.is_trained(t)]
        if untrained:
            raise ValueError(f"experiences hold tasks not trained yet: {untrained}")
        saved = self.mbatch
        out = {}
        try:
            for exp, label in zip(exps, labels, strict=True):
                batches = (
                    (x.to(self.device), y.to(self.device))
                    for x, y in strategy_batches(self, exp.dataset.eval(), self.eval_mb_size)
                )
                out[label] = task_accuracy(self.tsn_model, label, batches, act_bits)
        finally:
            self.mbatch = saved
        return out

    def abandon_task(self) -> int | None:
        """Forget the task whose training was interrupted (an exception, a non-finite loss).

        Trained tasks are untouched either way; the alternative is to train the same
        experience again, which restarts the task. Clears the optimizer's state.

        :return: the abandoned task's label, or None if no task was open.
        """
        label = self.tsn_model.abandon_task()
        if label is not None:
            self.optimizer.state.clear()
        return label

    def check_experiences(self, experiences: Iterable[CLExperience]) -> list[int]:
        """Check that ``experiences`` can be trained, before any work is done.

        The whole stream each experience comes from is checked too (one task label per
        experience, all distinct), so a stream without task labels is refused before its
        first experience trains, also in a ``for exp in stream: strategy.train(exp)`` loop.

        :param experiences: the experiences about to be trained, in order.
        :return: their task labels.
        """
        experiences = list(experiences)
        streams = {}
        # With task inference the experiences are relabelled one task each; their origin
        # stream (labels all 0) is not what trains.
        for exp in [] if self.task_inference else experiences:
            stream = getattr(exp, "origin_stream", None)
            if stream is not None and hasattr(stream, "__len__"):
                streams[id(stream)] = stream
        for stream in streams.values():
            check_stream(stream)
        labels = check_stream(experiences)
        model = self.tsn_model
        check_float32(model, "model")
        done = len(model.trained_tasks())
        for i, (exp, label) in enumerate(zip(experiences, labels, strict=True)):
            index = getattr(exp, "current_experience", i)
            if model.is_trained(label):
                raise ValueError(_retrain_message(index, label, self.task_inference is not None))
            if label < 0:
                raise ValueError(f"experience {index} has a negative task label {label}")
            self.mask_plugin.sparsity_for(done + i)
            for plugin in self.plugins:
                check = getattr(plugin, "check_experience", None)
                if check is not None:
                    check(index, exp)
        return labels

    def train(self, experiences, eval_streams=None, **kwargs):
        """Train on one experience or a sequence of them (see Avalanche's ``train``).

        Experiences whose task labels live on their dataset only are accepted.

        :param experiences: an experience or an iterable of experiences.
        :param eval_streams: streams evaluated by periodic evaluation.
        """
        single = isinstance(experiences, CLExperience)
        exps = self._route_training(_aware([experiences] if single else list(experiences)))
        self.check_experiences(exps)
        self._record_classes(exps)
        if eval_streams is not None:
            eval_streams = _aware(eval_streams)
        return super().train(exps, eval_streams, **kwargs)

    def eval(self, exp_list, **kwargs):
        """Evaluate on one experience or a sequence of them (see Avalanche's ``eval``).

        :param exp_list: an experience or an iterable of experiences.
        """
        single = isinstance(exp_list, CLExperience)
        exps = _aware([exp_list] if single else list(exp_list))
        return super().eval(exps, **kwargs)


# Avalanche re-wraps every strategy's __init__ to accept legacy positional arguments with a
# warning; TSNStrategy is keyword-only, so a positional call is a TypeError.
TSNStrategy.__init__ = TSNStrategy.__init__.__wrapped__  # type: ignore[method-assign]
