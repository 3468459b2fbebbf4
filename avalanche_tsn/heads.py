"""Heads of trained tasks: frozen out of every optimizer's reach, and rebuilt on load.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) gives each task its own head. Avalanche's
``MultiHeadClassifier`` keeps them as ``IncrementalClassifier`` modules whose parameters sit in
the user's optimizer, so momentum, weight decay or an interrupted step could still move a
trained task's head. When a task is frozen its head's parameters become buffers of the same
names (the optimizer keeps stepping orphaned copies that nothing reads) and the head stops
growing; the state dict keys do not change.
"""

from __future__ import annotations

import re

import torch
from avalanche.benchmarks import CLExperience
from avalanche.models import IncrementalClassifier, MultiHeadClassifier
from avalanche.models.dynamic_modules import DynamicModule
from torch import Tensor, nn

from avalanche_tsn.layers import module_device

__all__ = [
    "FrozenClassifier",
    "params_to_buffers",
    "freeze_head",
    "thaw_head",
    "rebuild_heads",
    "new_head",
]


def params_to_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` (recursively) into a buffer holding a copy.

    :param module: the module, changed in place; state dict keys stay the same.
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            # A copy: the optimizer may still step the old parameter object.
            m.register_buffer(name, p.detach().clone())


class FrozenClassifier(IncrementalClassifier):
    """The head of a trained task: its weights are buffers and it never grows.

    :param head: the task's ``IncrementalClassifier``; its modules are taken over.
    """

    def __init__(self, head: IncrementalClassifier) -> None:
        DynamicModule.__init__(self, auto_adapt=False)
        self.masking = head.masking
        self.mask_value = head.mask_value
        self.classifier = head.classifier
        self.register_buffer("active_units", head.active_units)
        params_to_buffers(self)
        # Avalanche finds a module's device from its first parameter (MultiHeadClassifier
        # does so on every forward); an empty one keeps that working when every head is
        # frozen. It is left out of the state dict, whose keys stay those of a plain head.
        self._device_anchor = nn.Parameter(
            torch.zeros(0, device=self.classifier.weight.device), requires_grad=False
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "_device_anchor", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *a):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *a)
        if prefix + "_device_anchor" in missing:
            missing.remove(prefix + "_device_anchor")

    def adaptation(self, experience: CLExperience) -> None:
        """A trained task's head keeps its units (Avalanche would grow it on new classes)."""


def freeze_head(heads: MultiHeadClassifier, key: str) -> None:
    """Freeze the head ``key`` of ``heads`` in place (see :class:`FrozenClassifier`).

    :param heads: a multi-head classifier.
    :param key: the head's task label, as a string.
    """
    head = heads.classifiers[key]
    if isinstance(head, FrozenClassifier):
        return
    if isinstance(head, IncrementalClassifier):
        heads.classifiers[key] = FrozenClassifier(head)
    else:
        params_to_buffers(head)


def thaw_head(heads: MultiHeadClassifier, key: str) -> None:
    """Undo :func:`freeze_head`: the head gets trainable parameters again.

    :param heads: a multi-head classifier.
    :param key: the head's task label, as a string.
    """
    head = heads.classifiers[key]
    if not isinstance(head, FrozenClassifier):
        return
    linear = head.classifier
    fresh = new_head(heads, linear.weight.shape[0], head.active_units.shape[0])
    with torch.no_grad():
        fresh.classifier.weight.copy_(linear.weight)
        if linear.bias is not None:
            fresh.classifier.bias.copy_(linear.bias)
        fresh.active_units.copy_(head.active_units)
    heads.classifiers[key] = fresh.to(linear.weight.device)


def new_head(heads: MultiHeadClassifier, out: int, units: int) -> IncrementalClassifier:
    """A head for ``heads`` as Avalanche builds them, with ``out`` units.

    :param heads: the multi-head classifier it is for.
    :param out: its number of output units.
    :param units: length of its ``active_units`` buffer (it may lag behind ``out``).
    """
    # Avalanche builds every head this way (MultiHeadClassifier.adaptation).
    head = IncrementalClassifier(heads.in_features, out, masking=False, auto_adapt=False)
    if units != head.active_units.shape[0]:
        head.active_units = torch.zeros(units, dtype=torch.int8)
    return head


def rebuild_heads(
    heads: MultiHeadClassifier, prefix: str, state_dict: dict[str, Tensor], frozen: set[str]
) -> None:
    """Give ``heads`` exactly the heads a saved state holds, sized and frozen as saved.

    A freshly built model has only its first head at its initial width, while a trained one
    has a head per task, grown to its classes; this runs before the state is loaded.

    :param heads: the multi-head classifier to change in place.
    :param prefix: its key prefix in ``state_dict`` (ending with ``.``).
    :param state_dict: the state about to be loaded.
    :param frozen: task labels (strings) whose heads are frozen in that state.
    """
    pattern = re.compile(re.escape(prefix) + r"classifiers\.([^.]+)\.classifier\.weight$")
    saved = {m.group(1): k for k in state_dict if (m := pattern.match(k))}
    if not saved:
        return
    device = module_device(heads)
    for key in list(heads.classifiers.keys()):
        if key not in saved:
            del heads.classifiers[key]
    for name in [n for n in heads._buffers if n.startswith("active_units_T")]:
        if prefix + name not in state_dict:
            del heads._buffers[name]
    for key, weight_key in saved.items():
        out = state_dict[weight_key].shape[0]
        units_key = f"{prefix}classifiers.{key}.active_units"
        units = state_dict[units_key].shape[0] if units_key in state_dict else out
        current = heads.classifiers[key] if key in heads.classifiers else None
        fits = (
            isinstance(current, IncrementalClassifier)
            and current.classifier.weight.shape == state_dict[weight_key].shape
            and current.active_units.shape[0] == units
        )
        if not fits:
            heads.classifiers[key] = new_head(heads, out, units).to(device)
        if key in frozen:
            freeze_head(heads, key)
        else:
            thaw_head(heads, key)
        au = f"active_units_T{key}"
        if prefix + au in state_dict:
            heads.register_buffer(au, torch.zeros_like(state_dict[prefix + au], device=device))
    heads.known_train_tasks_labels = {int(k) for k in frozen if k.lstrip("-").isdigit()}
    # Avalanche sizes a mixed-task output by this (it grows it during adaptation only).
    widths = [h.classifier.out_features for h in heads.classifiers.values()]
    heads.max_class_label = max([heads.max_class_label, *widths])
