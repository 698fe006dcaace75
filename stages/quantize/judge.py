"""How a variant is judged: its quality metric against fp32's, within the budget.

Feeding and scoring belong to ``stages.onnx_model.OnnxModel``: every variant is fed as fp32's
metadata says (raw input when the normalization is in the graph, else the normalized float32 split)
and scored with the task's primary metric (``stages.metrics.score``). This module compares the two.

The budget is "points of accuracy" for classification (``accuracy_budget``, default 0.5) and a
relative loss of the primary metric for other tasks (``relative_budget``, e.g. 0.02 = 2 % of fp32's
r2 or reconstruction MSE), as the team contract fixes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    delta: float  # classification: accuracy points (variant - fp32); else relative change of the metric
    loss: float  # how much worse than fp32, in budget units (>0: worse)
    budget: float
    unit: str

    @property
    def within(self) -> bool:
        return self.loss <= self.budget + 1e-9


def verdict(task: str, fp32: dict, variant: dict, accuracy_budget: float, relative_budget: float) -> Verdict:
    if task == "classification":
        delta = (variant["value"] - fp32["value"]) * 100.0
        return Verdict(delta=delta, loss=-delta, budget=accuracy_budget, unit="points")
    sign = 1.0 if fp32["higher_is_better"] else -1.0
    rel = (variant["value"] - fp32["value"]) / max(abs(fp32["value"]), 1e-12)
    return Verdict(delta=rel, loss=-sign * rel, budget=relative_budget, unit="relative")
