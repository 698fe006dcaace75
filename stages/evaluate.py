"""evaluate: the trained PyTorch model on the test split -> metrics.json + a plot for its task.

classification: accuracy, macro F1, per-class precision/recall/F1, confusion matrix (confusion_matrix.png);
regression: r2, MSE, MAE overall and per target, predicted-vs-true scatter (predictions.png);
vae: reconstruction MSE (per input element, normalized units), KL and ELBO, and originals above their
reconstructions (reconstructions.png). metrics.json always holds ``task`` and ``primary``
(stages.metrics.score), which quantize's budget and register compare on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

import models
from stages import checkpoint, dataset
from stages.common import StageError, write_json
from stages.metrics import plot_confusion, plot_reconstructions, plot_regression, score
from stages.predictors import TorchPredictor
from stages.contract import RunDir, Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Result:
    task: str
    metric: str  # the primary metric's name
    value: float
    accuracy: float | None = None  # classification only
    macro_f1: float | None = None
    unfinished_training: str = ""  # set when the checkpoint is the best-so-far of a training that did not finish

    def summary(self) -> str:
        note = f" ({self.unfinished_training})" if self.unfinished_training else ""
        if self.task == "classification":
            return f"test_acc {self.accuracy:.4f}, macro F1 {self.macro_f1:.4f}{note}"
        return f"test {self.metric} {self.value:.4f} ({self.task}){note}"


def run_task(meta: dict, data: "dataset.Data") -> str:
    """The task the checkpoint was trained for (stored by train; older checkpoints: from the family)."""
    if meta.get("task"):
        return meta["task"]
    try:
        return models.resolve_task(meta["model"]["family"], data.task)
    except models.TaskError as e:
        raise StageError(str(e)) from None


def unfinished_training(rundir: "RunDir", meta: dict) -> dict | None:
    """When checkpoint.pt is the best-so-far of a training that did not finish (killed or interrupted
    mid-way; train_state.pt, saved every ``train.checkpoint_every`` epochs, says so and belongs to the
    same training): its best epoch, the epochs run and the epochs planned. None when it finished or
    nothing says otherwise."""
    if not rundir.train_state.is_file():
        return None
    try:
        state = checkpoint.load_state(rundir.train_state)
    except StageError:
        return None
    if state.get("finished"):
        return None
    same = state.get("run_id") == meta.get("run_id") or (state.get("best") or {}).get("epoch") == meta.get("epoch")
    if not same:
        return None
    epochs = ((meta.get("recipe") or {}).get("train") or {}).get("epochs")
    return {"best_epoch": meta.get("epoch"), "epochs_run": state.get("epoch"), "epochs": epochs}


def outputs_batched(predictor: TorchPredictor, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, ...]:
    chunks = [predictor.outputs(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return tuple(np.concatenate(parts) for parts in zip(*chunks))


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params(config.__dict__)
    data = dataset.load(rundir.data, rundir.dataset)
    model, meta = checkpoint.load(rundir.checkpoint)
    task = run_task(meta, data)
    unfinished = unfinished_training(rundir, meta)
    note = ""
    if unfinished:
        note = (f"best-so-far checkpoint of an unfinished training: epoch {unfinished['best_epoch']}, "
                f"training stopped after epoch {unfinished['epochs_run']} of {unfinished['epochs'] or '?'}")
        log.warning("scoring the %s; `pipeline train --resume` (or `pipeline run --resume`) finishes the training", note)
    x, y = data.split("test")
    outputs = outputs_batched(TorchPredictor(model, config.device), x, config.batch_size)

    if task == "vae":
        metrics = score(task, x, outputs, [])
        plot = rundir.reconstructions
        plot_reconstructions(x, outputs[0], plot,
                             f"test split, reconstruction MSE {metrics['reconstruction_mse']:.4f}")
    elif task == "regression":
        metrics = score(task, y, outputs[0], data.labels)
        plot = rundir.predictions_plot
        plot_regression(y, outputs[0], data.labels, plot, f"test split, r2 {metrics['r2']:.4f}")
    else:
        metrics = score(task, y, outputs[0], data.labels)
        plot = rundir.confusion_matrix
        plot_confusion(metrics["confusion_matrix"], data.labels, plot,
                       f"test split, accuracy {metrics['accuracy']:.4f}")
    metrics["checkpoint_epoch"] = meta["epoch"]
    if unfinished:
        metrics["unfinished_training"] = unfinished
        tracker.set_tags({"evaluate.unfinished_training": note})
    write_json(rundir.metrics, metrics)

    primary = metrics["primary"]
    logged = {f"test_{primary['name']}": primary["value"]}
    if task == "classification":
        logged.update({"test_macro_f1": metrics["macro_f1"],
                       **{f"test_f1.{label}": m["f1"] for label, m in metrics["per_class"].items()}})
    elif task == "regression":
        logged.update({"test_mse": metrics["mse"], "test_mae": metrics["mae"]})
    else:
        logged.update({"test_kl": metrics["kl"], "test_elbo": metrics["elbo"]})
    tracker.log_metrics(logged)
    tracker.log_artifact(rundir.metrics)
    tracker.log_artifact(plot)
    return Result(task=task, metric=primary["name"], value=primary["value"], accuracy=metrics.get("accuracy"),
                  macro_f1=metrics.get("macro_f1"), unfinished_training=note)
