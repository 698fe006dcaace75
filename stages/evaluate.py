"""evaluate: the trained PyTorch model on the test split -> metrics.json + confusion_matrix.png."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stages import checkpoint, dataset
from stages.common import write_json
from stages.metrics import classification_metrics, plot_confusion
from stages.predictors import TorchPredictor, predict_batched

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker


@dataclass(frozen=True)
class Config:
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Result:
    accuracy: float
    macro_f1: float

    def summary(self) -> str:
        return f"test_acc {self.accuracy:.4f}, macro F1 {self.macro_f1:.4f}"


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params(config.__dict__)
    data = dataset.load(rundir.data, rundir.dataset)
    model, meta = checkpoint.load(rundir.checkpoint)
    x, y = data.split("test")
    logits = predict_batched(TorchPredictor(model, config.device), x, config.batch_size)
    metrics = classification_metrics(y, logits, data.labels)
    metrics["checkpoint_epoch"] = meta["epoch"]
    write_json(rundir.metrics, metrics)
    plot_confusion(metrics["confusion_matrix"], data.labels, rundir.confusion_matrix,
                   f"test split, accuracy {metrics['accuracy']:.4f}")
    tracker.log_metrics({"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
                         **{f"test_f1.{label}": m["f1"] for label, m in metrics["per_class"].items()}})
    tracker.log_artifact(rundir.metrics)
    tracker.log_artifact(rundir.confusion_matrix)
    return Result(accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"])
