"""quantize: named variants of the exported model, each validated and evaluated on the test split.

One table (``VARIANTS``) says what each variant is and how it is made; quantize, benchmark, register
and the tests all go by these names. Every variant is written under a temporary name and renamed
only once made, its accuracy on the test split is measured with ONNX Runtime, and the accuracy drop
against fp32 is checked against the recipe's budget. A variant that misses the budget, or fails to
build, is kept as evidence in variants.json but marked so register never picks it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import numpy as np

from stages import dataset
from stages.common import StageError, atomic_path, require, sha256_file, stamp_onnx, write_json
from stages.metrics import classification_metrics
from stages.predictors import OrtPredictor, predict_batched

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    variants: tuple[str, ...] = ("int8-static", "int8-dynamic")
    calibration_samples: int = 512  # training samples fed through the model to pick activation ranges
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    accuracy_budget: float = 1.0  # points of test accuracy a variant may lose against fp32

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS or v == "fp32"]
        if unknown:
            raise ValueError(f"`variants` has unknown names {unknown}; choose from {[v for v in VARIANTS if v != 'fp32']}")
        if self.calibration_samples < 1:
            raise ValueError(f"`calibration_samples` must be >= 1, got {self.calibration_samples}")
        if self.accuracy_budget < 0:
            raise ValueError(f"`accuracy_budget` must be >= 0 (points), got {self.accuracy_budget}")


@dataclass(frozen=True)
class Context:
    """What a variant maker may use besides the fp32 file."""

    config: Config
    calibration: np.ndarray  # normalized training samples


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over an array, in mini-batches (the batch axis is dynamic)."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 64):
        self.batches = iter([{input_name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.batches, None)


@contextlib.contextmanager
def preprocessed(src: Path) -> Iterator[Path]:
    """Shape inference and graph cleanup first, as ONNX Runtime's quantization guide asks. It also
    drops the exporter's intermediate shape annotations, which the quantizer's own shape inference
    otherwise trips over (seen with the torch.export-based exporter: "Inferred shape and existing
    shape differ")."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        yield pre


def make_int8_dynamic(src: Path, dst: Path, ctx: Context) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with preprocessed(src) as pre:
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=ctx.config.per_channel)


def make_int8_static(src: Path, dst: Path, ctx: Context) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[ctx.config.calibration_method]
    with preprocessed(src) as pre:
        import onnx

        input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        quantize_static(str(pre), str(dst), CalibrationReader(input_name, ctx.calibration),
                        quant_format=QuantFormat.QDQ, per_channel=ctx.config.per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs a line per tensor on the root logger; keep the stage's log readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    make: Callable[[Path, Path, Context], None] | None  # None: the exported file itself


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("fp32", "the exported model, float32", None),
    Variant("int8-dynamic", "INT8 weights, activations quantized at run time (quantize_dynamic)", make_int8_dynamic),
    Variant("int8-static", "INT8 QDQ, per-channel weights, activation ranges calibrated on training samples",
            make_int8_static),
]}


@dataclass(frozen=True)
class Result:
    fp32_accuracy: float
    variants: dict[str, dict]

    def summary(self) -> str:
        parts = [f"{n} {v['accuracy']:.4f}" if v.get("accuracy") is not None else f"{n} failed"
                 for n, v in self.variants.items() if n != "fp32"]
        return ", ".join(parts)


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params({**config.__dict__, "variants": ",".join(config.variants)})
    require(rundir.onnx, "export")
    data = dataset.load(rundir.data, rundir.dataset)
    x_test, y_test = data.split("test")
    x_train, _ = data.split("train")
    rng = np.random.default_rng(0)
    calib = x_train[rng.permutation(len(x_train))[:config.calibration_samples]]
    ctx = Context(config=config, calibration=calib)

    rows: dict[str, dict] = {}
    fp32_acc = None
    for name in ("fp32", *config.variants):
        variant, path = VARIANTS[name], rundir.variant(name)
        row: dict = {"file": path.name, "description": variant.description}
        try:
            if variant.make is not None:
                with atomic_path(path) as tmp, quiet_root_logger():
                    variant.make(rundir.onnx, tmp, ctx)
            predictor = OrtPredictor(path)
            acc = classification_metrics(y_test, predict_batched(predictor, x_test), data.labels)["accuracy"]
            if variant.make is not None:
                # The file says what it is: quantizers keep the exporter's metadata_props, not its metrics.
                stamp_onnx(path, {"variant": name, "variant.description": variant.description,
                                  "metrics.test_accuracy": f"{acc:.6f}"})
        except Exception as e:
            if name == "fp32":
                raise StageError(f"{path} cannot be evaluated ({e}); rerun `pipeline export`") from e
            log.warning("variant %s failed: %s", name, e)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}", within_budget=False, accuracy=None)
            rows[name] = row
            continue
        if fp32_acc is None:
            fp32_acc = acc
        delta = (acc - fp32_acc) * 100.0  # accuracy points
        row.update(ok=True, accuracy=acc, delta_points=delta, within_budget=-delta <= config.accuracy_budget + 1e-9,
                   size_bytes=path.stat().st_size, size_ratio=path.stat().st_size / rundir.onnx.stat().st_size,
                   sha256=sha256_file(path), provider=predictor.provider)
        rows[name] = row
        log.info("%-13s accuracy %.4f (%+.2f points), %6.1f KiB%s", name, acc, delta, row["size_bytes"] / 1024,
                 "" if row["within_budget"] else f"  OVER BUDGET ({config.accuracy_budget} points)")
        tracker.log_metrics({f"accuracy.{name}": acc, f"delta_points.{name}": delta, f"size_bytes.{name}": row["size_bytes"]})
        if name != "fp32":
            tracker.log_artifact(path)

    write_json(rundir.variants, {"fp32_accuracy": fp32_acc, "accuracy_budget_points": config.accuracy_budget,
                                 "variants": rows})
    tracker.log_artifact(rundir.variants)
    return Result(fp32_accuracy=fp32_acc, variants=rows)
