"""The capacity report as Avalanche metrics, so Avalanche's loggers record it.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), "Capacity" and appendix Table 1: after each
training experience (pruning and quantization included) the metric emits the model's capacity
as % of the dense float32 model, its total bits, the backbone split (weights, codebooks,
masks as % of the dense backbone) and the bits each trained task adds.
"""

from __future__ import annotations

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from avalanche_tsn.capacity import CapacityReport, capacity_report
from avalanche_tsn.model import TSNModel

__all__ = ["CapacityMetric", "capacity_metrics"]


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
