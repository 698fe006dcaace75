"""What a variant is fed and how it is judged: the model's input, its quality metric and the budget.

Feeding lives in ``model_input`` alone: an ONNX file's metadata says whether normalization is inside
the graph (then it takes the raw stored input, in its ``input.dtype``) or not (then it takes the
normalized float32 split). Calibration, sensitivity and evaluation all go through it.

The budget is "points of accuracy" for classification (``accuracy_budget``, default 0.5) and a
relative loss of the primary metric for other tasks (``relative_budget``, e.g. 0.02 = 2 % of fp32's
r2 or reconstruction MSE), as the team contract fixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.predictors import OrtPredictor


def onnx_props(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (weights not loaded)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def model_input(props: dict[str, str], data, split: str) -> np.ndarray:
    """The array an ONNX file with these metadata_props expects for ``split`` of ``data``.

    The one place quantize decides what to feed (calibration, sensitivity, evaluation)."""
    pre = json.loads(props.get("preprocessing") or "{}")
    if pre.get("applied_in_graph"):
        x, _ = data.split(split, normalized=False)
        return np.ascontiguousarray(x.astype(props.get("input.dtype") or "float32"))
    x, _ = data.split(split)
    return np.ascontiguousarray(x.astype(np.float32))


def task_of(props: dict[str, str], dataset_info: dict) -> str:
    return props.get("task") or dataset_info.get("task") or "classification"


def evaluate(path: Path, task: str, x: np.ndarray, y: np.ndarray, labels: list[str],
             x_target: np.ndarray | None = None) -> dict:
    """The task's primary metric (stages.metrics.score: classification accuracy ↑, regression r2 ↑,
    vae reconstruction MSE ↓) of an ONNX file on (x, y), with ONNX Runtime on the CPU. For a vae the
    truth is ``x_target``, the normalized inputs, whatever the file is fed."""
    from stages.metrics import score

    predictor = OrtPredictor(path, device="cpu")
    parts = [predictor.run({predictor.input_name: x[i:i + 256]}) for i in range(0, len(x), 256)]
    outputs = {n: np.concatenate([p[n] for p in parts]) for n in predictor.output_names}
    if task == "vae":
        return score(task, x_target if x_target is not None else x, outputs, labels)["primary"]
    return score(task, y, outputs[predictor.output_names[0]], labels)["primary"]


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
