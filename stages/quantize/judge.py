"""How a variant is judged: its quality metric against fp32's, within the budget.

Feeding and scoring belong to ``stages.onnx_model.OnnxModel``: every variant is fed as fp32's
metadata says (raw input when the normalization is in the graph, else the normalized float32 split)
and scored with the task's primary metric (``stages.metrics.score``). This module compares the two.

The budget is "points of accuracy" for classification (``accuracy_budget``, default 0.5) and a
relative loss of the primary metric for other tasks (``relative_budget``, e.g. 0.02 = 2 % of fp32's
r2 or reconstruction MSE), as the team contract fixes.

Without labels (an imported file with ``unlabeled`` data, or one whose task is unknown) there is no
metric to lose, so a variant is judged by how closely it agrees with the fp32 file on the same inputs
(``agreement``): for a classifier, the share of inputs whose top-1 class is fp32's (``top1_agreement``;
fp32 agrees with itself at 1.0, and ``accuracy_budget`` is the points of agreement a variant may lose);
for anything else, the largest relative error of any output, ``||variant - fp32|| / ||fp32||`` over the
split (``relative_error``; integer and boolean outputs count the share of elements that differ), which
must stay within ``relative_budget``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

TOP1_AGREEMENT = "top1_agreement"
RELATIVE_ERROR = "relative_error"
AGREEMENT_METRICS = (TOP1_AGREEMENT, RELATIVE_ERROR)


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
    if variant.get("name") == RELATIVE_ERROR:  # agreement without labels: the error itself is the loss
        return Verdict(delta=variant["value"], loss=variant["value"], budget=relative_budget, unit="relative error")
    if task == "classification":  # accuracy, or top-1 agreement with fp32 (fp32: 1.0): points either way
        delta = (variant["value"] - fp32["value"]) * 100.0
        return Verdict(delta=delta, loss=-delta, budget=accuracy_budget, unit="points")
    sign = 1.0 if fp32["higher_is_better"] else -1.0
    rel = (variant["value"] - fp32["value"]) / max(abs(fp32["value"]), 1e-12)
    return Verdict(delta=rel, loss=-sign * rel, budget=relative_budget, unit="relative")


def by_agreement(task: str, labeled: bool) -> bool:
    """Whether variants are judged by agreement with fp32 rather than by a metric against labels: when the
    data has no labels (a VAE needs none), or the file's task has no metric (an imported file's unknown)."""
    if task == "vae":
        return False
    return not labeled or task not in ("classification", "regression")


def relative_error(reference: np.ndarray, outputs: np.ndarray) -> float:
    """``||outputs - reference|| / ||reference||`` (float outputs, float64), or the share of elements that
    differ (integer, boolean outputs)."""
    ref, got = np.asarray(reference), np.asarray(outputs)
    if ref.shape != got.shape:
        return float("inf")
    if ref.dtype.kind not in "fc":
        return float(np.mean(ref != got)) if ref.size else 0.0
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    norm = float(np.linalg.norm(ref64))
    err = float(np.linalg.norm(got64 - ref64))
    return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))


def agreement(task: str, reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
              primary: str) -> dict:
    """A variant's outputs against fp32's on the same inputs, as a metric dict (``name``, ``value``,
    ``higher_is_better``) plus the relative error of every output (``per_output``)."""
    errors = {name: relative_error(ref, outputs[name]) for name, ref in reference.items()}
    if task == "classification":
        ref, got = np.asarray(reference[primary]), np.asarray(outputs[primary])
        n = len(ref)
        same = ref.reshape(n, -1).argmax(axis=1) == got.reshape(n, -1).argmax(axis=1) if n else np.ones(0, bool)
        return {"name": TOP1_AGREEMENT, "value": float(same.mean()) if n else 1.0, "higher_is_better": True,
                "samples": int(n), "per_output": errors}
    return {"name": RELATIVE_ERROR, "value": max(errors.values()) if errors else 0.0, "higher_is_better": False,
            "samples": int(len(next(iter(reference.values())))) if reference else 0, "per_output": errors}
