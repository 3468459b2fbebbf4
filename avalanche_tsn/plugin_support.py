"""Which of Avalanche 0.6's training plugins run beside TinySubNets, and why the others cannot.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) keeps every learned task in a frozen
subnetwork: nothing trained later may change one bit of its outputs. Most of Avalanche's
plugins run beside it as they run beside ``Naive`` (replay, LwF, EWC, SI, MAS, RWalk, CWR*,
learning-rate schedulers, early stopping, training from scratch: the guarantee holds whatever
they do to the weights). The ones below cannot: they replace the model, need gradients of the
frozen tasks, or rely on a model contract TSN's task-routed model does not offer. They are
refused when the strategy is built, before any work, with the reason and what to use instead.
"""

from __future__ import annotations

from avalanche.core import BasePlugin
from avalanche.evaluation.metrics import EpochMAC, ExperienceMAC, MinibatchMAC
from avalanche.training.plugins import (
    AGEMPlugin,
    BiCPlugin,
    CoPEPlugin,
    EWCPlugin,
    FeatureDistillationPlugin,
    GDumbPlugin,
    GEMPlugin,
    GenerativeReplayPlugin,
    GSS_greedyPlugin,
    LFLPlugin,
    MIRPlugin,
    RARPlugin,
)

__all__ = ["REFUSED_PLUGINS", "check_plugin", "check_evaluator"]

_FROZEN = "TSN keeps every earlier task in a frozen subnetwork, which cannot forget"
_REPLAY = "use ReplayPlugin to rehearse samples"
_PROJECTS = (
    "it projects each step's gradient against earlier tasks' memory gradients, and those "
    f"tasks' outputs have no gradient: {_FROZEN}; remove it"
)

#: Avalanche plugins TSN's strategies refuse, with the reason and what to do instead
REFUSED_PLUGINS: dict[type[BasePlugin], str] = {
    GDumbPlugin: "it trains a fresh copy of the initial model at every experience, which would "
    "discard every task TSN has learned; remove it",
    GEMPlugin: _PROJECTS,
    AGEMPlugin: _PROJECTS,
    LFLPlugin: "it pulls the features toward the previous model's through "
    f"BaseModel.get_features, which a task-routed model does not have; {_FROZEN}; remove it",
    FeatureDistillationPlugin: "it distils the features a model leaves on `model.features`, "
    f"which a task-routed model does not have; {_FROZEN}; remove it",
    MIRPlugin: "it picks replay samples by a virtual SGD step on a copy of every parameter, "
    f"which masked layers (scores, frozen weights) do not follow; {_REPLAY}",
    RARPlugin: "it traces the model with torch.fx to perturb its features, and a task-routed "
    f"model does not trace; {_REPLAY}",
    GSS_greedyPlugin: "it scores samples by gradients of the model called without task "
    f"labels over every parameter; {_REPLAY}",
    BiCPlugin: "it corrects one shared head's bias toward new classes, and TSN gives each task "
    "a head of its own (and infers the task on class-incremental streams); remove it",
    GenerativeReplayPlugin: "it labels generated samples with the previous model's one-head "
    "predictions and tags them with float task labels, which per-task subnetworks do not "
    f"read; {_REPLAY}",
    CoPEPlugin: "it replaces the classifier by prototypes in the model's output space and the "
    f"loss by its own, which per-task heads do not fit; {_REPLAY}",
}


def check_plugin(plugin: BasePlugin) -> None:
    """Raise if ``plugin`` cannot run beside a TSN strategy; do nothing otherwise.

    :param plugin: one of the user's plugins.
    :raises TypeError: for a plugin class in :data:`REFUSED_PLUGINS` (or a subclass of one).
    :raises ValueError: for ``EWCPlugin(mode="online")``.
    """
    for cls, reason in REFUSED_PLUGINS.items():
        if isinstance(plugin, cls):
            raise TypeError(
                f"plugins holds {type(plugin).__name__}, which TSN cannot run: {reason}"
            )
    if isinstance(plugin, EWCPlugin) and plugin.mode == "online":
        raise ValueError(
            "plugins holds an EWCPlugin with mode='online', which pairs each experience's "
            "importances with the previous ones by parameter position, and TSN moves the "
            "positions when it freezes a task's head; use mode='separate' (allowed: "
            f"'separate'), or no EWC: {_FROZEN}"
        )


def check_evaluator(evaluator: object) -> None:
    """Raise if ``evaluator`` holds a metric that would measure a TSN model wrongly.

    Avalanche's MAC metric recognises layers by their class name (``Linear``, ``Conv2d``), so
    it does not see TSN's masked layers and counts the heads alone. A factory of an evaluator
    is not called here (Avalanche calls it when the strategy is built).

    :param evaluator: the strategy's ``evaluator`` argument.
    :raises TypeError: for an evaluation plugin holding Avalanche's MAC metric.
    """
    for metric in getattr(evaluator, "metrics", ()):
        if isinstance(metric, MinibatchMAC | EpochMAC | ExperienceMAC):
            raise TypeError(
                f"evaluator holds Avalanche's {type(metric).__name__}, which counts layers by "
                "their class name and misses TSN's masked layers (TSNLinear, TSNConv2d); "
                "remove it and use strategy.compute_report() for MACs and BOPs per task"
            )
