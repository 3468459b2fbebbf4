"""The TinySubNets multi-task model: the user's module with maskable layers and task slots.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), algorithm steps 1 and 6: each task label
selects its own subnetwork; samples of a trained task run with that task's frozen mask, its
own biases, normalisation statistics and head, so later tasks never change its outputs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator

import torch
from avalanche.benchmarks import CLExperience
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn
from torch.nn.utils import parametrize

from avalanche_tsn._avalanche import PackNetModule
from avalanche_tsn.dispatch import TaskDispatchMixin
from avalanche_tsn.distributed import leave_to_tsn
from avalanche_tsn.heads import rebuild_heads
from avalanche_tsn.kernels import KernelChoice
from avalanche_tsn.layers import (
    MaskedLayer,
    TaskAffineNorm,
    TaskBatchNorm,
    TaskNorm,
    TaskPReLU,
    TSNConv1d,
    TSNConv2d,
    TSNConv3d,
    TSNEmbedding,
    TSNLinear,
    module_device,
)
from avalanche_tsn.lifecycle import LOW_FREE_FRACTION, TaskLifeCycleMixin
from avalanche_tsn.masks import check_sparsity
from avalanche_tsn.router import TaskRouter
from avalanche_tsn.routing import TaskRouted
from avalanche_tsn.streams import experience_task_labels
from avalanche_tsn.tasks import TaskTable, calibrated, uncalibrated
from avalanche_tsn.validation import check_int

__all__ = [
    "TSNModel",
    "wrap_model",
    "LOW_FREE_FRACTION",
    "uncalibrated",
    "calibrated",
    "require_full",
    "MASKED_KINDS",
]

log = logging.getLogger(__name__)

_MASKED = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d and nn.Embedding layers"
_SUPPORTED = (
    "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, "
    "nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.PReLU and MultiHeadClassifier heads"
)

#: Default memory budget of the evaluation cache (see ``TSNModel.eval_cache_bytes``).
EVAL_CACHE_BYTES = 256 * 2**20


# Attribute set on the user's module that points to its TSNModel (plain attribute, not a
# submodule, so the user's state dict is unaffected).
_OWNER_ATTR = "_tsn_model"


def _convert(module: nn.Module) -> nn.Module:
    new: nn.Module
    if isinstance(module, MaskedLayer | TaskNorm):
        return module
    # (lazy layers never get here: the model's check refuses them first)
    conv = next((c for c in _CONVS if isinstance(module, c)), None)
    if isinstance(module, nn.Linear):
        new = TSNLinear(module)
    elif isinstance(module, nn.Embedding):
        new = TSNEmbedding(module)
    elif conv is not None:
        new = _CONVS[conv](module)
    elif isinstance(module, _NORMS):
        new = TaskBatchNorm(module)
    elif isinstance(module, _AFFINE_NORMS):
        new = TaskAffineNorm(module)
    elif isinstance(module, nn.PReLU):
        new = TaskPReLU(module)
    else:
        return module
    _carry_hooks(module, new)
    return new


#: the hook tables a converted layer takes over from the layer it replaces
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward and backward hooks registered on ``old``.

    The tables themselves are shared, so a handle the user kept still removes its hook.
    """
    for table in _HOOK_TABLES:
        if table in vars(old):
            vars(new)[table] = vars(old)[table]


def _check_plain(layer: nn.Module, where: str) -> None:
    """Raise a TypeError if ``layer``'s weight is computed from other tensors."""
    what = f"{where} ({type(layer).__name__})"
    base = next(c for c in _MASKABLE if isinstance(layer, c))
    for method in ("forward", "_conv_forward"):
        if getattr(type(layer), method, None) is not getattr(base, method, None):
            raise TypeError(
                f"{what} overrides {base.__name__}.{method}; TSN replaces the layer with its "
                f"own, which computes as {base.__name__} does, so yours would be lost: use "
                f"{base.__name__} itself (the extra work in a module around it)"
            )
    if parametrize.is_parametrized(layer):
        raise TypeError(
            f"{what} is parametrized ({', '.join(layer.parametrizations)}: e.g. "
            "weight_norm or spectral_norm); TSN masks the layer's weight tensor itself: remove "
            "the parametrization first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    if isinstance(layer, nn.Embedding):
        _check_embedding(layer, what)
    extra = [n for n, _ in layer.named_parameters(recurse=False) if n not in ("weight", "bias")]
    if extra:
        raise TypeError(
            f"{what} holds parameters {extra} besides weight and bias (torch.nn.utils.prune's "
            "weight_orig, weight_norm's weight_g and weight_v); TSN masks the weight tensor "
            "itself: make it permanent first (torch.nn.utils.prune.remove, "
            "torch.nn.utils.remove_weight_norm)"
        )


def _check_embedding(layer: nn.Embedding, what: str) -> None:
    """Raise a TypeError for the embedding options TSN's lookup cannot keep."""
    if layer.max_norm is not None:
        raise TypeError(
            f"{what} has max_norm={layer.max_norm}: it renormalises the rows it looks up in "
            "place, which would write into weights TSN's trained tasks own; use max_norm=None (a "
            "normalisation after the lookup, e.g. F.normalize, does the same without writing)"
        )
    if layer.sparse:
        raise TypeError(
            f"{what} has sparse=True; TSN trains the table's mask with dense gradients: use "
            "sparse=False (and a dense optimizer)"
        )


def _plan(module: nn.Module, path: str, plan: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Collect the layers to replace under ``module``; raise before anything changes."""
    # not named_children(): it lists a module registered under two names once, and the
    # second name would keep the unconverted layer, which the optimizer then trains
    for name, child in module._modules.items():
        if child is None:
            continue
        where = f"{path}.{name}" if path else name
        if isinstance(child, MultiHeadClassifier):
            continue  # one head per task already: forget-free by construction
        if isinstance(child, IncrementalClassifier):
            raise TypeError(
                f"{where} is an IncrementalClassifier, which grows one shared output layer; "
                "TSN needs a fixed layer or a MultiHeadClassifier"
            )
        if isinstance(child, MaskedLayer | TaskNorm):
            continue
        _check_not_lazy(child, where)
        if _is_maskable(child):
            _check_plain(child, where)
            plan.append((module, name, child))
            continue
        if any(True for _ in child.parameters(recurse=False)):
            raise TypeError(
                f"{where} ({type(child).__name__}) has parameters that TSN cannot mask or keep "
                f"per task; supported layers: {_SUPPORTED}"
            )
        _plan(child, where, plan)


def _check_untied(module: nn.Module) -> None:
    """Raise a TypeError if two layers hold one parameter (tied weights)."""
    owners: dict[int, str] = {}
    layers: dict[int, nn.Module] = {}
    for where, m in module.named_modules(remove_duplicate=False):
        for name, p in m.named_parameters(recurse=False):
            path = f"{where}.{name}" if where else name
            if id(p) in owners and layers[id(p)] is not m:
                raise TypeError(
                    f"model parameters {owners[id(p)]} and {path} are one tensor (tied "
                    "weights); TSN masks, freezes and stores each layer's weights apart, so "
                    "untie them (give each layer its own parameter) or use one layer at both "
                    "places (a layer called twice is supported)"
                )
            owners.setdefault(id(p), path)
            layers.setdefault(id(p), m)


#: each convolution TSN masks, and its masked form
_CONVS: dict[type[nn.Module], type[MaskedLayer]] = {
    nn.Conv1d: TSNConv1d,
    nn.Conv2d: TSNConv2d,
    nn.Conv3d: TSNConv3d,
}
#: the normalisations TSN keeps per task: statistics and affine terms
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: ... and those that normalise each sample by itself: affine terms only (when they have any)
_AFFINE_NORMS = (nn.LayerNorm, nn.GroupNorm)
#: layers whose shape is not known until their first call (not converted, so refused)
_LAZY = (nn.LazyLinear, nn.LazyConv1d, nn.LazyConv2d, nn.LazyConv3d)
#: the layers TSN converts (subclasses too, if they compute as these do)
#: the layers TSN keeps per task that are not normalisations (learned slopes)
_PER_TASK = (nn.PReLU,)
#: the layers whose weights TSN masks (the export's architecture lists them by these kinds)
MASKED_KINDS = (nn.Linear, nn.Embedding, *_CONVS)
_MASKABLE = (*MASKED_KINDS, *_NORMS, *_AFFINE_NORMS, *_PER_TASK)


def _check_not_lazy(layer: nn.Module, where: str) -> None:
    """Raise a TypeError for a lazy layer, whose weight has no shape yet to mask."""
    if isinstance(layer, _LAZY):
        raise TypeError(
            f"{where} ({type(layer).__name__}) is a lazy layer: its weight has no shape until "
            "its first forward, so TSN has nothing to mask yet; run one forward of the model "
            "(a minibatch of your inputs) before passing it to TSN"
        )


def _is_maskable(module: nn.Module) -> bool:
    # (called after _check_not_lazy: lazy layers, which subclass these, are refused first)
    if isinstance(module, _AFFINE_NORMS) and module.weight is None:
        return False  # without affine terms: nothing learned, so nothing to keep per task
    return isinstance(module, _MASKABLE)


def _check_model(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """The layers of ``module`` to replace; raises for an unsupported model, changing nothing."""
    for where, m in module.named_modules():
        # torch.compile's wrapper (OptimizedModule) keeps the module as ``_orig_mod``
        if isinstance(getattr(m, "_orig_mod", None), nn.Module) and type(m).__name__ == (
            "OptimizedModule"
        ):
            raise TypeError(
                f"model{' (at ' + where + ')' if where else ''} is compiled by torch.compile; "
                "TSN routes each sample to its task's subnetwork in Python, which a compiled "
                "module does not trace: pass the module as it was before torch.compile (its "
                "_orig_mod); TSN compiles each masked layer's work itself (train_kernel)"
            )
        if isinstance(m, PackNetModule):
            raise TypeError(
                f"model{' (at ' + where + ')' if where else ''} is wrapped for Avalanche's "
                f"PackNet ({type(m).__name__}), whose masks run in its own forward; TSN masks "
                "the layers itself: pass the model built without PackNet (e.g. SimpleMLP or "
                "MTSimpleMLP instead of packnet_simple_mlp, no PackNetModel)"
            )
    if isinstance(module, (TaskNorm, *_NORMS, *_AFFINE_NORMS, *_PER_TASK)):
        raise ValueError(
            f"model has no maskable layer: {type(module).__name__} alone holds only terms kept "
            f"per task; TSN masks {_MASKED}"
        )
    if isinstance(module, MaskedLayer):
        return []
    _check_not_lazy(module, "model")
    if _is_maskable(module):
        _check_plain(module, "model")
        return []
    if isinstance(module, IncrementalClassifier | MultiHeadClassifier):
        raise ValueError(f"model has no maskable layer: {type(module).__name__} is only a head")
    if any(True for _ in module.parameters(recurse=False)):
        raise TypeError(
            f"model ({type(module).__name__}) has parameters of its own that TSN cannot mask; "
            f"supported layers: {_SUPPORTED}"
        )
    plan: list[tuple[nn.Module, str, nn.Module]] = []
    _plan(module, "", plan)
    _check_untied(module)
    masked = [m for m in module.modules() if isinstance(m, MaskedLayer)]
    if not masked and not any(isinstance(c, MASKED_KINDS) for _, _, c in plan):
        raise ValueError(
            f"model ({type(module).__name__}) has no maskable layer; TSN masks {_MASKED}"
        )
    return plan


def wrap_model(module: nn.Module) -> nn.Module:
    """Replace the maskable layers of ``module`` in place and return it.

    The whole model is checked first: an unsupported layer raises a ``TypeError`` and leaves
    ``module`` untouched. The new layers reuse the original ``weight`` and ``bias``
    parameters, so an optimizer built on ``module.parameters()`` keeps optimising them.
    Layers that are already converted are kept as they are.

    :param module: the user's model.
    """
    plan = _check_model(module)
    if _is_maskable(module):
        return _convert(module)
    # A layer with nothing of its own to go by (BatchNorm without affine terms or running
    # statistics) is put where the rest of the model is.
    device = module_device(module)
    converted: dict[int, nn.Module] = {}
    for parent, name, child in plan:
        # a layer used at several places stays one layer: one mask and one owner per weight
        if id(child) not in converted:
            converted[id(child)] = _convert(child).to(device)
        setattr(parent, name, converted[id(child)])
    return module


def _replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` under every name that holds ``old`` in ``root`` (a layer used twice)."""
    for parent in list(root.modules()):
        # _modules, not named_children(), which lists a module registered twice once
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def _takes_task_labels(module: nn.Module) -> bool:
    if isinstance(module, MultiTaskModule):
        return True
    return "task_labels" in inspect.signature(module.forward).parameters


def require_full(model: nn.Module, what: str) -> None:
    """Raise a TypeError unless ``model`` is a full (trainable) :class:`TSNModel`.

    :param model: the model given.
    :param what: the feature asked for, for the message.
    """
    if isinstance(model, TSNModel) and not model.compressed:
        return
    if isinstance(model, TSNModel):
        raise TypeError(
            f"{what} needs a full TSNModel; {type(model).__name__} (made by to_tiny or "
            "load_compressed(..., dequantize=False)) holds codes for inference only. Use the "
            "model it was made from, or load_compressed(..., dequantize=True)."
        )
    raise TypeError(f"{what} needs a TSNModel, got {type(model).__name__}")


def _known_tasks_after_load(model: TSNModel, _incompatible: object) -> None:
    model.known_train_tasks_labels = set(model.trained_tasks())


class TSNModel(TaskLifeCycleMixin, TaskDispatchMixin, KernelChoice, MultiTaskModule):
    """A user's module turned into a TinySubNets multi-task model.

    Call it as ``model(x, task_labels)`` (a tensor with one label per sample, or an int).
    Trained tasks run with their frozen subnetworks; a task not trained yet (forward transfer
    evaluates those) runs with the live subnetwork: the mask the current scores select, with
    the current biases and normalisation statistics.

    Task labels are mapped to slots in training order; ``task_labels_by_slot`` and
    ``slot_frozen`` are buffers, so ``state_dict`` holds everything. Slots ``0..k-1`` hold the
    trained tasks; slot ``k``, if any, the task being trained (or whose training was
    interrupted: train it again, or :meth:`abandon_task`).

    :param module: the user's model (converted in place) or one already converted.
    :param sparsity: sparsity of the live subnetwork until a task sets its own.
    """

    #: True for the inference-only compressed form (:class:`avalanche_tsn.tiny.TinyTSN`)
    compressed: bool = False

    def __init__(self, module: nn.Module, sparsity: float = 0.5) -> None:
        super().__init__()
        sparsity = check_sparsity(sparsity)
        if isinstance(module, TSNModel):
            raise TypeError("module is already a TSNModel; use it directly")
        owner = getattr(module, _OWNER_ATTR, None)
        if owner is not None:
            raise ValueError(
                f"{type(module).__name__} is already wrapped by a TSNModel, which holds its "
                "trained tasks; use TSNModel.of(module) (TSNStrategy does) to continue with it"
            )
        self.net = wrap_model(module)
        self._layers: list[MaskedLayer] = [
            m for m in self.net.modules() if isinstance(m, MaskedLayer)
        ]
        self._norms: list[TaskNorm] = [m for m in self.net.modules() if isinstance(m, TaskNorm)]
        self._heads = [m for m in self.net.modules() if isinstance(m, MultiHeadClassifier)]
        self._routed_modules: list[TaskRouted] = [*self._layers, *self._norms]
        self._pass_labels = _takes_task_labels(self.net)
        #: the per-task records (labels, frozen, sparsity, head codebooks, activation ranges,
        #: memory), on the wrapped model's device so a model wrapped on a GPU works there
        self.task_table = TaskTable(len(self._layers), module_device(self.net))
        #: which trained task a sample belongs to (``task_inference="router"``), fitted
        #: after each task by the strategy's router stage
        self.task_router = TaskRouter(module_device(self.net))
        # after the table (a child) has loaded too
        self.register_load_state_dict_post_hook(_known_tasks_after_load)
        #: shape of one input sample, as last seen by forward (None before any)
        self.sample_shape: tuple[int, ...] | None = None
        #: how ``forward(x)`` without task labels runs: None returns every task's output (a
        #: dict, Avalanche's contract), "router", "memory" or "entropy" infers each sample's task
        #: (see avalanche_tsn.inference)
        self.task_inference: str | None = None
        self.live_sparsity = sparsity
        self.eval_cache_bytes = EVAL_CACHE_BYTES
        leave_to_tsn(self)
        for target in {id(module): module, id(self.net): self.net}.values():
            object.__setattr__(target, _OWNER_ATTR, self)

    @classmethod
    def of(cls, module: nn.Module, sparsity: float = 0.5) -> TSNModel:
        """The TSNModel of ``module``: itself, the one that already wraps it, or a new one.

        :param module: a TSNModel, a module a TSNModel wraps, or a user's module.
        :param sparsity: sparsity of the live subnetwork of a new TSNModel.
        """
        if isinstance(module, TSNModel):
            return module
        owner = getattr(module, _OWNER_ATTR, None)
        if isinstance(owner, TSNModel):
            return owner
        return cls(module, sparsity)

    # -- bookkeeping --------------------------------------------------------------------
    @property
    def live_sparsity(self) -> float:
        """Sparsity of the live subnetwork (the task in training, or untrained ones)."""
        return self._live_sparsity

    @live_sparsity.setter
    def live_sparsity(self, value: float) -> None:
        self._live_sparsity = check_sparsity(value)
        for layer in self._layers:
            layer.set_live_sparsity(self._live_sparsity)

    def masked_layers(self) -> Iterator[tuple[str, MaskedLayer]]:
        """The maskable layers with their names, in module order."""
        for name, module in self.net.named_modules():
            if isinstance(module, MaskedLayer):
                yield name, module

    def routed_layers(self) -> list[nn.Module]:
        """The layers that run each task with its own weights (masked or coded), in order."""
        return list(self._layers)

    def norm_layers(self) -> list[TaskNorm]:
        """The per-task normalisation layers, in module order."""
        return list(self._norms)

    @torch.no_grad()
    def restore_tasks(
        self,
        labels: list[int],
        sparsity: list[float],
        head_bits: list[int],
        act_range: Tensor,
    ) -> None:
        """Record trained tasks read back from an export in an untrained model's table.

        The layers restore their own parts (``restore_tasks`` of each masked layer and
        normalisation); :func:`avalanche_tsn.export.load_compressed` drives both.

        :param labels: the task labels in slot order.
        :param sparsity: their sparsities.
        :param head_bits: their head codebooks' bit-widths.
        :param act_range: their activation ranges, ``[slots, masked layers, 2]``.
        """
        self.task_table.restore(labels, sparsity, head_bits, act_range)
        self.known_train_tasks_labels = set(self.trained_tasks())

    def classifier_heads(self) -> list[MultiHeadClassifier]:
        """The model's multi-head classifiers (one head per task each), in module order."""
        return list(self._heads)

    @torch.no_grad()
    def replace_routed_layers(self, new: dict[str, nn.Module]) -> None:
        """Swap each masked layer named in ``new`` for its replacement (a conversion).

        :param new: replacement module by the layer's name in ``net``; every masked layer.
        """
        layers = dict(self.masked_layers())
        names = list(layers)
        if sorted(new) != sorted(names):
            raise ValueError(f"replacements must name every masked layer: {names}")
        for name, module in new.items():
            if not name:  # the model is this one layer
                self.net = module
            _replace_everywhere(self.net, layers[name], module)
        self._layers = [new[name] for name in names]  # type: ignore[misc]
        self._routed_modules: list[TaskRouted] = [*self._layers, *self._norms]

    def _routed(self) -> list[TaskRouted]:
        # kept, not rebuilt: every forward routes these
        return self._routed_modules

    def slot_of(self, task_label: int) -> int | None:
        """Slot of ``task_label``, or None if it never started training.

        :param task_label: a task label.
        """
        return self.task_table.slot_of(task_label)

    def trained_tasks(self) -> list[int]:
        """Task labels whose subnetworks are frozen, in training order."""
        return self.task_table.trained_tasks()

    def open_task(self) -> int | None:
        """Label of the task being trained (or whose training was interrupted), or None."""
        return self.task_table.open_task()

    def is_trained(self, task_label: int) -> bool:
        """Whether ``task_label`` has a frozen subnetwork.

        :param task_label: a task label.
        """
        return self.task_table.is_trained(task_label)

    @property
    def act_range(self) -> Tensor:
        """Calibrated activation ranges, ``[slots, masked layers, 2]`` (see the task table)."""
        return self.task_table.act_range

    @property
    def head_bits(self) -> Tensor:
        """Bit-width of each slot's head codebook (0: float32; see the task table)."""
        return self.task_table.head_bits

    def store_memory(self, task_label: int, x: Tensor) -> None:
        """Keep ``x`` (a few input samples) as the memory of ``task_label``.

        :param task_label: a task that started training.
        :param x: the samples, ``[m, *input_shape]``.
        """
        self.task_table.store_memory(task_label, x)

    def memory(self, task_label: int) -> Tensor:
        """A copy of the memory samples of ``task_label`` (empty if none were kept).

        :param task_label: a task label.
        """
        return self.task_table.memory(task_label)

    def memory_bits(self) -> int:
        """Bits the task memory stores (lossless 8- or 16-bit codes where the data allow)."""
        return self.task_table.memory_bits()

    @property
    def n_banks(self) -> int:
        """Number of backbone copies (banks)."""
        return self._layers[0].n_banks

    def bank_of(self, task_label: int) -> int:
        """Bank of a task that started training.

        :param task_label: a task label.
        """
        slot = self.slot_of(task_label)
        if slot is None:
            raise ValueError(f"task {task_label} has no bank: it never started training")
        return self._layers[0].bank_of_slot(slot)

    def free_fractions(self, bank: int | None = None) -> dict[str, float]:
        """Fraction of each maskable layer's weights that no task owns, in ``bank``.

        :param bank: a bank index (default: the loaded one, where the next task trains).
        """
        return {name: layer.free_fraction(bank) for name, layer in self.masked_layers()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # 0.4 and older kept the task table's buffers on the model itself
        for name in (*TaskTable.BUFFERS, *TaskTable.LEGACY_BUFFERS):
            if prefix + name in state_dict:
                state_dict[f"{prefix}task_table.{name}"] = state_dict.pop(prefix + name)
        labels = state_dict.get(f"{prefix}task_table.task_labels_by_slot")
        frozen = state_dict.get(f"{prefix}task_table.slot_frozen")
        if labels is not None and frozen is not None and len(labels) == len(frozen):
            trained = {str(int(t)) for t, f in zip(labels, frozen, strict=True) if bool(f)}
            for name, heads in self.net.named_modules():
                if isinstance(heads, MultiHeadClassifier):
                    head_prefix = f"{prefix}net.{name}." if name else f"{prefix}net."
                    rebuild_heads(heads, head_prefix, state_dict, trained)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def head_modules(self, task_label: int) -> list[nn.Module]:
        """The heads of ``task_label`` in every ``MultiHeadClassifier`` (may be empty).

        :param task_label: a task label.
        """
        key = str(int(task_label))
        return [h.classifiers[key] for h in self._heads if key in h.classifiers]

    def head_weights(self, task_label: int) -> list[Tensor]:
        """The weight matrices of ``task_label``'s heads (quantized with the task).

        :param task_label: a task label.
        """
        return [
            m.weight
            for head in self.head_modules(task_label)
            for m in head.modules()
            if isinstance(m, nn.Linear)
        ]

    @torch.no_grad()
    def set_head_codebook(self, slot: int, centroids: Tensor, bits: int) -> None:
        """Record the head codebook of the task in ``slot`` (``bits == 0``: not quantized).

        :param slot: a trained task's slot.
        :param centroids: the ``2^bits`` centroids.
        :param bits: the bit-width.
        """
        self.task_table.set_head_codebook(slot, centroids, bits)

    def adaptation(self, experience: CLExperience) -> None:
        """Avalanche's adaptation before an experience, for experiences of any kind.

        Avalanche's multi-task modules read the experience's classes; one built by hand on a
        dataset without targets (dictionaries, Naive runs those) has none to give.

        :param experience: the experience about to be trained or evaluated.
        """
        try:
            classes = list(experience.classes_in_this_experience)
        except (AttributeError, TypeError, KeyError):
            classes = []
        if classes:
            self.max_class_label = max(self.max_class_label, max(classes) + 1)
        if self.training:
            labels = experience_task_labels(experience)
            self.known_train_tasks_labels = self.known_train_tasks_labels | set(labels)

    @property
    def eval_cache_bytes(self) -> int:
        """Memory budget of the evaluation cache (trained tasks' effective weights).

        Each masked layer keeps the effective weights of as many trained tasks as the budget
        holds for the whole backbone (at least 2), so minibatches that mix tasks, and
        evaluation loops over tasks, do not rebuild them.
        """
        return self._eval_cache_bytes

    @eval_cache_bytes.setter
    def eval_cache_bytes(self, value: int) -> None:
        self._eval_cache_bytes = check_int(value, "eval_cache_bytes", 0)
        per_task = sum(layer.weight.numel() * layer.weight.element_size() for layer in self._layers)
        for layer in self._layers:
            layer.eval_cache_size = max(2, value // max(per_task, 1))
