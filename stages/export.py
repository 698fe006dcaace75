"""export: the trained PyTorch model -> one self-contained ONNX file, verified against PyTorch.

The ``torch.export``-based exporter is tried first and the legacy TorchScript exporter second; a
candidate file is accepted only when ONNX Runtime reproduces PyTorch's outputs on real test inputs
at every checked batch size (names, then shapes, then values within tolerance). All mismatches are
reported at once, each with its max absolute difference; if no exporter passes, the stage fails and
no model.onnx is written. The file carries its labels, input layout, preprocessing and lineage in
``metadata_props`` so an app can use it without this project.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal


import models
from stages import checkpoint, dataset
from stages.conversion import export_onnx, torch_example, validate
from stages.common import PRODUCT_VERSION, StageError, atomic_path, git_state, sha256_file, stamp_onnx, write_json

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)
EXPORTERS = ("dynamo", "legacy")


@dataclass(frozen=True)
class Config:
    opset: int = 18
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"  # auto: dynamo, then legacy if it fails
    check_batch_sizes: tuple[int, ...] = (1, 2, 37)
    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 23:
            raise ValueError(f"`opset` must be between 13 and 23, got {self.opset}")
        if not self.check_batch_sizes or min(self.check_batch_sizes) < 1:
            raise ValueError(f"`check_batch_sizes` must be positive ints, got {list(self.check_batch_sizes)}")
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"`atol` and `rtol` must be >= 0, got {self.atol}, {self.rtol}")


@dataclass(frozen=True)
class Result:
    exporter: str
    max_abs_diff: float
    size_bytes: int
    sha256: str
    attempts: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.exporter}, max |diff| {self.max_abs_diff:.1e}, {self.size_bytes / 1024:.0f} KiB"


class ValidationError(StageError):
    pass


def metadata(meta: dict, spec: "models.ExportSpec", exporter: str, opset: int, test_metrics: dict | None) -> dict[str, str]:
    """What an app needs to use the file alone, as ONNX metadata_props (string values, JSON where structured)."""
    norm = meta["normalization"]
    shape = [-1 if spec.dynamic_batch else 1, *meta["model"]["input_shape"]]
    props = {
        "onnx_pipeline.version": PRODUCT_VERSION,
        "model.family": meta["model"]["family"],
        "labels": json.dumps(meta["label_names"]),
        "num_classes": str(len(meta["label_names"])),
        "input.name": spec.input_name,
        "input.dtype": "float32",
        "input.shape": json.dumps(shape),
        "input.layout": meta["input_layout"],
        "preprocessing": json.dumps({
            "steps": ["cast to float32", f"x = (x - {norm['mean']:.6f}) / {norm['std']:.6f}"],
            "mean": norm["mean"], "std": norm["std"], "applied_in_graph": False,
            "raw_input": "pixel intensities 0..16 (8x8 digits)" if meta["dataset_source"].endswith("load_digits") else "raw features",
        }),
        "output.names": json.dumps(list(spec.output_names)),
        "output.meaning": "logits over labels (unnormalized); argmax is the class index into `labels`, softmax gives probabilities",
        "lineage.training_run_id": str(meta.get("run_id") or ""),
        "lineage.dataset_sha256": meta["dataset_sha256"],
        "lineage.dataset_source": meta["dataset_source"],
        "lineage.recipe": str(meta.get("recipe", {}).get("name", "")),
        "lineage.checkpoint_epoch": str(meta["epoch"]),
        "lineage.git_commit": git_state()["git.commit"],
        "export.exporter": exporter,
        "export.opset": str(opset),
        "variant": "fp32",
    }
    if test_metrics:
        props["metrics.test_accuracy"] = f"{test_metrics['accuracy']:.6f}"
    return props


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params(config.__dict__)
    model, meta = checkpoint.load(rundir.checkpoint)
    spec = models.family(meta["model"]["family"]).export
    x_test, _ = dataset.load(rundir.data, rundir.dataset).split("test")
    test_metrics = json.loads(rundir.metrics.read_text()) if rundir.metrics.is_file() else None

    order = EXPORTERS if config.exporter == "auto" else (config.exporter,)
    attempts: list[dict] = []
    with atomic_path(rundir.onnx) as tmp:
        for exporter in order:
            try:
                export_onnx(model, torch_example(x_test), tmp, spec, config.opset, exporter)
                problems, report = validate(tmp, model, x_test, spec, config.check_batch_sizes, config.atol, config.rtol)
            except Exception as e:
                problems, report = [f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"], {}
            attempts.append({"exporter": exporter, "ok": not problems, "problems": problems, "batches": report})
            if not problems:
                break
            log.warning("%s exporter rejected: %s", exporter, "; ".join(problems))
        else:
            raise ValidationError("ONNX export does not reproduce PyTorch; no model.onnx was written:\n  "
                                  + "\n  ".join(f"[{a['exporter']}] {p}" for a in attempts for p in a["problems"]))
        if any(p.name.endswith(".data") for p in tmp.parent.glob(tmp.name + "*")):
            raise StageError("the exporter wrote external weight data; expected a single self-contained file")
        stamp_onnx(tmp, metadata(meta, spec, exporter, config.opset, test_metrics),
              f"{meta['model']['family']} classifier exported by onnx-pipeline; see metadata_props")
    accepted = attempts[-1]
    result = Result(exporter=accepted["exporter"], max_abs_diff=max(b["max_abs_diff"] for b in accepted["batches"].values()),
                    size_bytes=rundir.onnx.stat().st_size, sha256=sha256_file(rundir.onnx), attempts=attempts)
    write_json(rundir.export_report, {"exporter": result.exporter, "opset": config.opset, "atol": config.atol,
                                      "rtol": config.rtol, "max_abs_diff": result.max_abs_diff,
                                      "size_bytes": result.size_bytes, "sha256": result.sha256, "attempts": attempts})
    log.info("exported %s with the %s exporter (max |diff| %.2e)", rundir.onnx, result.exporter, result.max_abs_diff)
    tracker.set_tags({"export.exporter": result.exporter, "onnx.sha256": result.sha256})
    tracker.log_metrics({"max_abs_diff": result.max_abs_diff, "onnx_size_bytes": result.size_bytes})
    tracker.log_artifact(rundir.onnx)
    tracker.log_artifact(rundir.export_report)
    return result
