"""The contract between the conductor and the stages: the run directory's file names and the Tracker.

The layer that uses an interface owns it. Stages hand work to each other through the named files of
``RunDir`` (never by importing each other) and report to a ``Tracker``; both are defined here, in
``stages/``, and the conductor (``pipeline/``) implements and passes them. No stage imports anything
from ``pipeline``: tests of a single stage pass a ``NullTracker`` and a temporary ``RunDir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # prepare
    @property
    def data(self) -> Path:
        return self.root / "data.npz"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.json"

    # train
    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def checkpoint_json(self) -> Path:
        return self.root / "checkpoint.json"

    @property
    def train_state(self) -> Path:
        """The resumable training state (optimizer, RNG, epoch, ...), every train.checkpoint_every epochs."""
        return self.root / "train_state.pt"

    @property
    def weights_report(self) -> Path:
        """Fine-tuning: which tensors of the starting weights were loaded, skipped, missing (train)."""
        return self.root / "weights_report.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def training_curves(self) -> Path:
        return self.root / "training_curves.png"

    # evaluate
    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def confusion_matrix(self) -> Path:
        return self.root / "confusion_matrix.png"

    @property
    def predictions_plot(self) -> Path:  # regression: predicted against true
        return self.root / "predictions.png"

    @property
    def reconstructions(self) -> Path:  # vae: originals above their reconstructions
        return self.root / "reconstructions.png"

    # export
    @property
    def onnx(self) -> Path:
        return self.variant("fp32")

    @property
    def export_report(self) -> Path:
        return self.root / "export.json"

    def onnx_part(self, name: str) -> Path:
        """An extra file exported from a submodule (ExportSpec.parts), e.g. encoder.onnx of a VAE."""
        return self.root / f"{name}.onnx"

    # import (a file the pipeline did not make; its checked copy is model.onnx, as export's would be)
    @property
    def import_report(self) -> Path:
        return self.root / "import.json"

    # quantize
    def variant(self, name: str) -> Path:
        """ONNX file of a named variant: fp32 is model.onnx, others model.<name>.onnx."""
        return self.root / ("model.onnx" if name == "fp32" else f"model.{name}.onnx")

    def model_tag(self, path: Path) -> str:
        """The short name a model file goes by (MLflow LoggedModel name, metric suffix): fp32 for
        model.onnx, the variant for model.<variant>.onnx, the stem for anything else (checkpoint)."""
        name = Path(path).name
        if name == "model.onnx":
            return "fp32"
        if name.startswith("model.") and name.endswith(".onnx"):
            return name[len("model."):-len(".onnx")]
        return name.split(".")[0]

    @property
    def variants(self) -> Path:
        return self.root / "variants.json"

    @property
    def sensitivity_json(self) -> Path:
        """int8-static's per-layer sensitivity table (written when the budget was missed)."""
        return self.root / "sensitivity.json"

    @property
    def sensitivity_md(self) -> Path:
        return self.root / "sensitivity.md"

    @property
    def quantized_variants(self) -> list[Path]:
        """Every model.<name>.onnx present (the quantized variants; fp32 is model.onnx)."""
        return sorted(self.root.glob("model.*.onnx"))

    # benchmark
    @property
    def benchmark_json(self) -> Path:
        return self.root / "benchmark.json"

    @property
    def benchmark_md(self) -> Path:
        return self.root / "benchmark.md"

    @property
    def benchmark_png(self) -> Path:
        return self.root / "benchmark.png"

    # register
    @property
    def registration(self) -> Path:
        return self.root / "registration.json"

    def result(self, stage: str) -> Path:
        """Each stage's Result as JSON, so a later stage run (or command) can read it back."""
        return self.root / "results" / f"{stage}.json"

    # pipeline bookkeeping (pipeline/orchestrate.py): not stage artifacts
    @property
    def state(self) -> Path:
        """The last pipeline run in this directory: recipe, stages, status, MLflow run ids (for --resume)."""
        return self.root / "pipeline.json"

    @property
    def lock(self) -> Path:
        """Held (flock) while a pipeline uses the directory; the kernel frees it when the holder dies."""
        return self.root / ".pipeline.lock"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    BOOKKEEPING = ("results", "pipeline.json", ".pipeline.lock", "recipe.yaml")

    def ensure(self) -> "RunDir":
        (self.root / "results").mkdir(parents=True, exist_ok=True)
        return self


# ---------------------------------------------------------------- what a stage may record

class Tracker(Protocol):
    """What a stage may record. Every method is safe to call on a NullTracker."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_dataset(self, *, name: str, digest: str, source: str, features: Any, targets: Any, context: str) -> None: ...
    def register_onnx(self, *, onnx_path: Path, registered_name: str, input_example: Any, output_example: Any,
                      providers: list[str], description: str, tags: Mapping[str, str],
                      aliases: Sequence[str] = ()) -> dict | None:
        """Register the file as a new version, created with ``tags`` and pointed to by ``aliases`` (all or
        nothing); None when nothing is recorded."""
    def set_alias(self, registered_name: str, alias: str, version: str) -> None: ...

    def should_stop(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Asked by train once per epoch, after validation (``metrics``: that epoch's row, e.g. val_accuracy):
        True ends training there, as early stopping does. A tuner answers True to prune a hopeless trial
        (under torchrun every rank must answer alike: only the tuner's in-process trials say True)."""
        ...


class NullTracker:
    """Records nothing: for tests of a single stage and for `--no-track`."""

    run_id: str | None = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def log_dataset(self, **kwargs):
        pass

    def register_onnx(self, **kwargs):
        return None

    def set_alias(self, registered_name, alias, version):
        pass

    def should_stop(self, epoch, metrics):
        return False
