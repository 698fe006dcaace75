"""register: choose a variant by measurement, register it in MLflow, alias it `candidate`, and promote
it to `champion` when it passes the accuracy gate.

The choice: among variants that built and stayed within the accuracy budget, the one with the lowest
median latency at the recipe's target batch size on the provider the server will use. fp32 is always
eligible, so a quantized variant wins only when it is measurably faster.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from stages import dataset
from stages.common import StageError, read_json, write_json
from stages.predictors import CPU_EP, CUDA_EP, OrtPredictor, cuda_available

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    model_name: str = ""  # registered model name; empty: the recipe's name
    variant: str = "auto"  # auto: fastest within budget; or a variant name to force
    target_batch_size: int = 1
    promote: bool = True  # set `champion` when the gate passes

    def __post_init__(self) -> None:
        if self.target_batch_size < 1:
            raise ValueError(f"`target_batch_size` must be >= 1, got {self.target_batch_size}")


@dataclass(frozen=True)
class Result:
    variant: str
    reason: str
    accuracy: float
    name: str
    version: str | None
    aliases: list[str]

    def summary(self) -> str:
        where = f"{self.name} v{self.version} @{','.join(self.aliases)}" if self.version else "not registered (no tracking)"
        return f"{self.variant} -> {where}"


def choose(variants: dict, rows: list[dict], config: Config) -> tuple[str, str]:
    """-> (variant name, why). Raises StageError when nothing is eligible."""
    eligible = {n for n, v in variants.items() if v.get("ok") and v.get("within_budget")}
    if config.variant != "auto":
        if config.variant not in eligible:
            raise StageError(f"register.variant={config.variant!r} is not an eligible variant; eligible: {sorted(eligible)}")
        return config.variant, f"forced by register.variant={config.variant}"
    provider = CUDA_EP if cuda_available() and any(r["provider"] == CUDA_EP for r in rows) else CPU_EP
    timed = {r["variant"]: r for r in rows if r["engine"] == "onnxruntime" and r["provider"] == provider
             and r["batch_size"] == config.target_batch_size and r["variant"] in eligible}
    if not timed:
        raise StageError(f"no benchmark row at batch size {config.target_batch_size} on {provider} for eligible variants "
                         f"{sorted(eligible)}; add {config.target_batch_size} to benchmark.batch_sizes")
    ranked = sorted(timed.values(), key=lambda r: r["median_ms"])
    best = ranked[0]
    others = ", ".join(f"{r['variant']} {r['median_ms']:.3f} ms" for r in ranked[1:])
    excluded = sorted(set(variants) - eligible)
    why = (f"fastest within the accuracy budget at batch {config.target_batch_size} on {provider}: "
           f"{best['variant']} {best['median_ms']:.3f} ms" + (f" (vs {others})" if others else "")
           + (f"; not eligible: {', '.join(excluded)}" if excluded else ""))
    return best["variant"], why


def run(config: Config, rundir: "RunDir", tracker: "Tracker", *, recipe_name: str, pipeline_run_id: str | None = None) -> Result:
    tracker.log_params(config.__dict__)
    report = read_json(rundir.variants, "quantize")
    rows = read_json(rundir.benchmark_json, "benchmark")["rows"]
    variants = report["variants"]
    name, why = choose(variants, rows, config)
    chosen = variants[name]
    log.info("chose %s: %s", name, why)

    path = rundir.variant(name)
    data = dataset.load(rundir.data, rundir.dataset)
    x_example = data.split("test")[0][:2]
    predictor = OrtPredictor(path)
    y_example = predictor.predict(x_example)
    checkpoint_meta = read_json(rundir.checkpoint_json, "train")
    export_report = read_json(rundir.export_report, "export")
    fp32_acc, budget = report["fp32_accuracy"], report["accuracy_budget_points"]
    gate = (fp32_acc - chosen["accuracy"]) * 100.0 <= budget + 1e-9
    registered_name = config.model_name or recipe_name
    tags = {
        "variant": name,
        "test_accuracy": f"{chosen['accuracy']:.6f}",
        "fp32_test_accuracy": f"{fp32_acc:.6f}",
        "accuracy_budget_points": str(budget),
        "choice": why,
        "onnx_sha256": chosen["sha256"],
        "exporter": export_report["exporter"],
        "training_run_id": str(checkpoint_meta.get("run_id") or ""),
        "pipeline_run_id": str(pipeline_run_id or ""),
        "dataset_sha256": data.info["sha256"],
        "dataset_source": data.info["source"],
        "labels": json.dumps(data.labels),
    }
    description = (f"{name} variant of the {recipe_name} recipe's model; test accuracy {chosen['accuracy']:.4f} "
                   f"(fp32 {fp32_acc:.4f}, budget {budget} points). Chosen as {why}.")
    registered = tracker.register_onnx(onnx_path=path, registered_name=registered_name,
                                       input_example=x_example.astype(np.float32), output_example=y_example,
                                       providers=predictor.requested_providers, description=description, tags=tags)
    aliases = []
    if registered:
        tracker.set_alias(registered_name, "candidate", registered["version"])
        aliases.append("candidate")
        if config.promote and gate:
            tracker.set_alias(registered_name, "champion", registered["version"])
            aliases.append("champion")
        elif config.promote:
            log.warning("not promoted to champion: %s loses %.2f points against fp32 (budget %s)", name,
                        (fp32_acc - chosen["accuracy"]) * 100, budget)
    result = Result(variant=name, reason=why, accuracy=chosen["accuracy"], name=registered_name,
                    version=registered["version"] if registered else None, aliases=aliases)
    write_json(rundir.registration, {**result.__dict__, "gate_passed": gate, "registered": registered, "tags": tags})
    tracker.set_tags({"providers.requested": ",".join(predictor.requested_providers),
                      "providers.active": ",".join(predictor.providers),
                      "registered.name": registered_name, "registered.version": str(result.version),
                      "registered.variant": name, "registered.aliases": ",".join(aliases)})
    tracker.log_metrics({"registered_accuracy": chosen["accuracy"]})
    tracker.log_artifact(rundir.registration)
    return result
