"""Recipes: which TinySubNets stages a strategy runs, in which order, with which settings.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) is a pipeline of stages around each task:
task matching, mask learning, a validation split, pruning, quantization and activation
calibration. A strategy of the family (TSN, WSN, Ada-QPacknet) is a recipe over these
stages: a list of :class:`StageSpec` in algorithm order. :func:`assemble_plugins` turns a
recipe and the user's plugins into the strategy's plugin list, checking every argument first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from avalanche.core import BasePlugin

__all__ = ["StageSpec", "check_plugins", "assemble_plugins"]


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


def check_plugins(plugins: object) -> list[BasePlugin]:
    """A copy of the user's plugin list, every item checked.

    :param plugins: None, or a list or tuple of Avalanche plugins.
    """
    if plugins is None:
        return []
    if not isinstance(plugins, list | tuple):
        raise TypeError(
            f"plugins must be a list (or tuple) of Avalanche plugins, got {type(plugins).__name__}"
        )
    for p in plugins:
        if not isinstance(p, BasePlugin):
            raise TypeError(f"plugins must hold Avalanche plugins only, got a {type(p).__name__}")
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
