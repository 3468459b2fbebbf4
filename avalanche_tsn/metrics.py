"""The capacity report as Avalanche metrics, so Avalanche's loggers record it.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), "Capacity" and appendix Table 1: after each
training experience (pruning and quantization included) the metric emits the model's capacity
as % of the dense float32 model, its total bits, the backbone split (weights, codebooks,
masks as % of the dense backbone) and the bits each trained task adds.
"""

from __future__ import annotations

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from avalanche_tsn.capacity import CapacityReport, capacity_report
from avalanche_tsn.model import TSNModel
from avalanche_tsn.stages import stage_context

__all__ = [
    "CapacityMetric",
    "capacity_metrics",
    "TaskInferenceAccuracy",
    "task_inference_metrics",
]


class CapacityMetric(PluginMetric[float]):
    """Capacity of the TSN model after each training experience.

    Emits ``Capacity/percent``, ``Capacity/total_bits``,
    ``Capacity/backbone_{weights,codebooks,masks}_percent``, ``Capacity/Task{t:03d}/bits``,
    and the free weights left for later tasks: ``Capacity/free_fraction_min`` (the smallest
    over layers, in the newest bank) and ``Capacity/FreeFraction/<layer>``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._report: CapacityReport | None = None

    def result(self) -> float | None:
        """The last capacity in % of the dense model (None before the first experience)."""
        return None if self._report is None else self._report.percent

    def reset(self) -> None:
        """Forget the last report."""
        self._report = None

    def after_training_exp(self, strategy) -> list[MetricValue]:
        model = strategy.model
        if not isinstance(model, TSNModel):
            raise TypeError(
                "CapacityMetric measures TSN models; the strategy's model is "
                f"{type(model).__name__}"
            )
        report = capacity_report(model)
        self._report = report
        x = strategy.clock.train_iterations
        values = {
            "Capacity/percent": report.percent,
            "Capacity/total_bits": float(report.total_bits),
        }
        for part, value in report.backbone_split().items():
            values[f"Capacity/backbone_{part}_percent"] = value
        for task in report.tasks:
            values[f"Capacity/Task{task.task:03d}/bits"] = float(task.total_bits)
        values["Capacity/free_fraction_min"] = report.min_free_fraction()
        for layer, fractions in report.free_fractions.items():
            values[f"Capacity/FreeFraction/{layer}"] = fractions[-1]
        return [MetricValue(self, name, value, x) for name, value in values.items()]

    def __str__(self) -> str:
        return "Capacity"


def capacity_metrics() -> list[PluginMetric]:
    """Metrics for an ``EvaluationPlugin``: the TSN capacity report after each experience."""
    return [CapacityMetric()]


class TaskInferenceAccuracy(PluginMetric[float]):
    """Fraction of evaluated samples whose task was inferred right (``task_inference``).

    A sample's true task is the one its class was trained in. Emits
    ``TaskInference_Acc_Exp/eval_phase/<stream>/Exp<k>`` after each evaluated experience and
    ``TaskInference_Acc_Stream/eval_phase/<stream>`` after the stream (``<stream>`` as
    Avalanche names it, e.g. ``test_stream``); nothing for strategies
    that do not infer tasks.
    """

    def __init__(self) -> None:
        super().__init__()
        self._exp = [0, 0]
        self._stream = [0, 0]

    def result(self) -> float | None:
        """The stream's task-inference accuracy so far (None before any sample)."""
        correct, total = self._stream
        return correct / total if total else None

    def reset(self) -> None:
        """Forget every count."""
        self._exp, self._stream = [0, 0], [0, 0]

    def before_eval(self, strategy) -> None:
        self.reset()

    def before_eval_exp(self, strategy) -> None:
        self._exp = [0, 0]

    def after_eval_iteration(self, strategy) -> None:
        inferred = stage_context(strategy).take_inferred_tasks()
        classes = getattr(strategy, "task_classes", None)  # TSNStrategy's; None elsewhere
        if inferred is None or not classes:
            return
        table = torch.full((max(max(c) for c in classes.values()) + 1,), -1, dtype=torch.long)
        for task, cs in classes.items():
            table[cs] = task
        y = strategy.mb_y.cpu().long()
        known = y < len(table)
        truth = torch.full_like(y, -1)
        truth[known] = table[y[known]]
        correct = int((inferred.cpu() == truth).sum())
        for counts in (self._exp, self._stream):
            counts[0] += correct
            counts[1] += len(y)

    def _value(self, strategy, name: str, counts: list[int]) -> list[MetricValue]:
        if not counts[1]:
            return []
        x = strategy.clock.train_iterations
        return [MetricValue(self, name, counts[0] / counts[1], x)]

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        stream = f"{strategy.experience.origin_stream.name}_stream"  # Avalanche's naming
        k = strategy.experience.current_experience
        name = f"TaskInference_Acc_Exp/eval_phase/{stream}/Exp{k:03d}"
        return self._value(strategy, name, self._exp)

    def after_eval(self, strategy) -> list[MetricValue]:
        stream = f"{strategy.experience.origin_stream.name}_stream"
        return self._value(strategy, f"TaskInference_Acc_Stream/eval_phase/{stream}", self._stream)

    def __str__(self) -> str:
        return "TaskInferenceAccuracy"


def task_inference_metrics() -> list[PluginMetric]:
    """Metrics for an ``EvaluationPlugin``: task-inference accuracy per experience and stream."""
    return [TaskInferenceAccuracy()]
