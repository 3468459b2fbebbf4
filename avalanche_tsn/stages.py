"""Recipes: which TinySubNets stages a strategy runs, in which order, with which settings.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) is a pipeline of stages around each task:
task matching, mask learning, a validation split, pruning, quantization and activation
calibration. A strategy of the family (TSN, WSN, Ada-QPacknet) is a recipe over these
stages: a list of :class:`StageSpec` in algorithm order. :func:`assemble_plugins` turns a
recipe and the user's plugins into the strategy's plugin list, checking every argument first.

The stages hand each other values through one declared :class:`StageContext` per strategy
(:func:`stage_context`), not through attributes set on the strategy; a stage that needs a
value no stage produced raises and names the missing stage.

Order within an experience (each stage's hooks; TSNStrategy's recipe):

1. before training: task matching picks the bank; mask learning opens the task's slot;
   Ada-QPacknet's search fixes its mask; calibration checks its data (before anything is
   trained, so bad data leaves the task untouched);
2. after dataset adaptation: the validation split is held out;
3. after training: mask learning freezes the task; pruning, quantization (and Ada-QPacknet's
   halving) compress its own weights on the validation split; calibration records its
   activation ranges; task matching stores its memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from avalanche.core import BasePlugin
from torch import Tensor

from avalanche_tsn.plugin_support import check_evaluator, check_plugin

__all__ = ["StageSpec", "StageContext", "stage_context", "check_plugins", "assemble_plugins"]


@dataclass
class StageContext:
    """What the stages of one strategy hand each other during an experience.

    Each field names its producer and readers; :func:`stage_context` gives a strategy's.
    """

    #: bank for the task about to train; set by task matching, taken by mask learning
    bank: int | None = None
    #: the experience's held-out split; set by the validation split, read by pruning,
    #: quantization, Ada-QPacknet's stages and calibration
    validation: Any = None
    #: the split's minibatches on the strategy's device, read once per experience
    validation_batches: list[tuple[Tensor, Tensor]] | None = None
    #: the last validation pass: (state key, accuracy, the head's inputs or None)
    validation_memo: tuple | None = None
    #: whether ``validation_batches`` hold the samples hardest first (see
    #: :mod:`avalanche_tsn.early_stop`); set by :meth:`order_validation`
    validation_ordered: bool = False
    #: the validation passes' stage inputs: a (model, task, route) key, its
    #: :class:`~avalanche_tsn.prefix.PrefixCache` (or None: whole passes), the model and the
    #: minibatches it is for; read and set by the passes, emptied with the split
    validation_prefix: tuple | None = None
    #: whether validation inputs are read channels-last, per
    #: :func:`~avalanche_tsn.layout.layout_key` (kept across experiences); set by the passes
    layouts: dict = field(default_factory=dict)
    #: tasks inferred for the last evaluation minibatch; set by the strategy's forward,
    #: taken by the task-inference metric
    inferred_tasks: Tensor | None = None

    def new_validation(self, data: Any) -> None:
        """Hold ``data`` as the experience's validation split (its reads start afresh).

        :param data: an Avalanche dataset.
        """
        self.validation = data
        self.validation_batches = None
        self.validation_memo = None
        self.validation_ordered = False
        self.validation_prefix = None

    def order_validation(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        """Hold the split's samples in a new order, hardest first (once per experience).

        :param batches: the same samples as ``validation_batches``, reordered.
        """
        if self.validation_ordered:
            raise RuntimeError("the validation split is already ordered for this experience")
        self._hold_validation(batches)
        self.validation_ordered = True

    def promote_validation(
        self, batches: list[tuple[Tensor, Tensor]], changed: Sequence[int]
    ) -> None:
        """Hold the ordered split's samples in a new order (a pass found new hard ones).

        The minibatches keep their sizes and only those at positions ``changed`` hold other
        samples: the passes' stored stage inputs of the others still serve.

        :param batches: the same samples as ``validation_batches``, reordered.
        :param changed: the positions of the minibatches whose samples changed.
        """
        if not self.validation_ordered:
            raise RuntimeError("the validation split is not ordered yet: order it first")
        old = self.validation_batches or []
        if [len(y) for _, y in batches] != [len(y) for _, y in old]:
            raise ValueError("a promoted split must keep the minibatches' sizes")
        prefix = self.validation_prefix
        if prefix is not None and prefix[1] is not None:
            prefix[1].forget(changed)  # (checks ``changed`` first)
        self._hold_validation(batches)
        if prefix is not None:
            self.validation_prefix = (*prefix[:3], batches)

    def _hold_validation(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        # what was remembered of the minibatches in their old order no longer applies
        self.validation_batches = batches
        self.validation_memo = None
        self.validation_prefix = None

    def drop_validation_cache(self) -> None:
        """Let go of the validation passes' stored stage inputs (they are rebuilt if needed)."""
        self.validation_prefix = None

    def require_validation(self, stage: str) -> Any:
        """The validation split, or a RuntimeError naming ``stage`` and what it lacks.

        :param stage: the stage that needs it, for the message.
        """
        if self.validation is None:
            raise RuntimeError(
                f"{stage} needs a validation split: add a ValidationSplitPlugin before it "
                "(TSNStrategy's recipes do)"
            )
        return self.validation

    def take_bank(self) -> int | None:
        """The bank task matching chose for the task about to train, once (then None)."""
        bank, self.bank = self.bank, None
        return bank

    def take_inferred_tasks(self) -> Tensor | None:
        """The tasks inferred for the last evaluation minibatch, once (then None)."""
        tasks, self.inferred_tasks = self.inferred_tasks, None
        return tasks


_CONTEXTS: WeakKeyDictionary[Any, StageContext] = WeakKeyDictionary()


def stage_context(strategy: Any) -> StageContext:
    """The :class:`StageContext` of ``strategy`` (a new one on first use).

    Kept beside the strategy, not on it: the plugins work on any Avalanche strategy.

    :param strategy: an Avalanche strategy.
    """
    ctx = _CONTEXTS.get(strategy)
    if ctx is None:
        ctx = _CONTEXTS[strategy] = StageContext()
    return ctx


@dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe.

    :param plugin: the stage's plugin class (a user's instance of it replaces the built one).
    :param enabled: whether the stage runs.
    :param build: makes the stage's plugin; it is called even for a stage that is off, so its
        arguments are always checked.
    :param user_enables: a user's instance in ``plugins`` turns the stage on (task matching).
    """

    plugin: type[BasePlugin]
    enabled: bool
    build: Callable[[], BasePlugin]
    user_enables: bool = False


def check_plugins(plugins: object, evaluator: object = None) -> list[BasePlugin]:
    """A copy of the user's plugin list, every item checked, and the evaluator checked.

    :param plugins: None, or a list or tuple of Avalanche plugins, none of those TSN refuses
        (:func:`~avalanche_tsn.plugin_support.check_plugin`).
    :param evaluator: the strategy's evaluator, or a factory of one (see
        :func:`~avalanche_tsn.plugin_support.check_evaluator`).
    """
    check_evaluator(evaluator)
    if plugins is None:
        return []
    if not isinstance(plugins, list | tuple):
        raise TypeError(
            f"plugins must be a list (or tuple) of Avalanche plugins, got {type(plugins).__name__}"
        )
    for p in plugins:
        if not isinstance(p, BasePlugin):
            raise TypeError(f"plugins must hold Avalanche plugins only, got a {type(p).__name__}")
        check_plugin(p)
    return list(plugins)


def assemble_plugins(
    recipe: Sequence[StageSpec], user_plugins: Sequence[BasePlugin]
) -> tuple[list[BasePlugin], list[BasePlugin]]:
    """The user's other plugins and the recipe's stages, in the recipe's order.

    :param recipe: the stages, in algorithm order.
    :param user_plugins: the user's plugins (checked by :func:`check_plugins`).
    :return: (the user's plugins that are no stage, the stages that run).
    """
    classes = tuple(spec.plugin for spec in recipe)
    others = [p for p in user_plugins if not isinstance(p, classes)]
    stages: list[BasePlugin] = []
    for spec in recipe:
        given = [p for p in user_plugins if isinstance(p, spec.plugin)]
        if len(given) > 1:
            raise ValueError(f"plugins holds more than one {spec.plugin.__name__}")
        enabled = spec.enabled or (bool(given) and spec.user_enables)
        if given and not enabled:
            raise ValueError(
                f"plugins holds a {spec.plugin.__name__} but its stage is switched off"
            )
        built = spec.build()
        if enabled:
            stages.append(given[0] if given else built)
    return others, stages
