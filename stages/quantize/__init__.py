"""quantize: named variants of the exported model, each validated and evaluated on the test split.

One table (``VARIANTS``, in variants.py) says what each variant is, how it is made, when it applies
and whether it needs calibration; quantize, benchmark, register and the tests all go by these names.
For each selected variant this stage

1. says "not applicable" with the reason when the predicate refuses (no MatMul for int4-weight, a
   branching model for pruned), which is not a failure;
2. makes it under a temporary name, checks it loads in ONNX Runtime and gives fp32's output names and
   shapes, measures its quality on the test split, stamps its metadata (variant, metric, delta,
   excluded nodes, calibration), and only then renames it into place;
3. judges it against the budget: ``accuracy_budget`` points of accuracy for classification, the
   ``relative_budget`` share of the primary metric for other tasks. A variant over budget is kept
   (file and numbers, as evidence) but marked ineligible, so register never picks it.

Without labels (``prepare.task: unlabeled``) or for a file whose task has no metric (an imported one
whose task is unknown), step 3 compares the variant with the fp32 file on the same inputs instead
(judge.py: top-1 agreement for a classifier, in points of ``accuracy_budget``; the largest relative
error of any output otherwise, within ``relative_budget``), so the gate still means something. A
file with a fixed batch dimension is fed and calibrated in batches of exactly that size.

int8-static is accuracy-aware: when it misses the budget on the validation split it measures
per-layer sensitivity and keeps the worst layers in float until it fits (sensitivity.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from stages import dataset
from stages.common import StageError, atomic_path, require, sha256_file, stamp_onnx, write_json
from stages.onnx_model import IMPORTED_FAMILY, OnnxModel
from stages.predictors import OrtPredictor
from stages.quantize import judge
from stages.quantize.variants import VARIANTS, CalibrationReader, Context, Variant, maker_source  # noqa: F401 (the table)
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    variants: tuple[str, ...] = ("all",)  # names from the table, or "all": every variant that applies
    accuracy_budget: float = 0.5  # classification: points of test accuracy a variant may lose against fp32
    relative_budget: float = 0.02  # regression / vae: share of fp32's primary metric a variant may lose
    calibration_samples: int = 512  # training samples fed through the model to pick activation ranges
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_percentile: float = 99.999  # for calibration_method=percentile
    per_channel: bool = True  # per-output-channel weight scales (Conv/Gemm)
    activation_type: Literal["quint8", "qint8"] = "quint8"
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI that saturate otherwise
    static_format: Literal["qdq", "qoperator"] = "qdq"
    sensitivity: bool = True  # int8-static: keep the most sensitive layers in float until within budget
    sensitivity_samples: int = 256  # calibration samples used to compare float and INT8 activations
    max_excluded_nodes: int = 0  # 0: no limit
    optimization_level: Literal["basic", "extended"] = "basic"  # the `optimized` variant; basic: standard ONNX ops only, so a registered winner stays embeddable
    int4_block_size: int = 32  # int4-weight: weights per scale along K (power of 2, >= 16)
    prune_ratio: float = 0.25  # pruned: share of each prunable layer's channels removed
    prune_finetune_epochs: int = 5  # digits-cnn: 3 epochs lost 0.56 points, 5 lost 0.28 (lr 1e-3)
    prune_lr: float = 1e-3

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v != "all" and v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"`variants` has unknown names {unknown}; choose from {['all', *VARIANTS]}")
        if self.calibration_samples < 1:
            raise ValueError(f"`calibration_samples` must be >= 1, got {self.calibration_samples}")
        if not 90.0 <= self.calibration_percentile <= 100.0:
            raise ValueError(f"`calibration_percentile` must be in [90, 100], got {self.calibration_percentile}")
        if self.accuracy_budget < 0:
            raise ValueError(f"`accuracy_budget` must be >= 0 (points), got {self.accuracy_budget}")
        if not 0 <= self.relative_budget < 1:
            raise ValueError(f"`relative_budget` must be in [0, 1) (a share of the metric), got {self.relative_budget}")
        if self.sensitivity_samples < 1 or self.max_excluded_nodes < 0:
            raise ValueError(f"`sensitivity_samples` must be >= 1 and `max_excluded_nodes` >= 0, got "
                             f"{self.sensitivity_samples}, {self.max_excluded_nodes}")
        if self.int4_block_size < 16 or self.int4_block_size & (self.int4_block_size - 1):
            raise ValueError(f"`int4_block_size` must be a power of 2 >= 16, got {self.int4_block_size}")
        if not 0 < self.prune_ratio < 1:
            raise ValueError(f"`prune_ratio` must be in (0, 1), got {self.prune_ratio}")
        if self.prune_finetune_epochs < 0 or not self.prune_lr > 0:
            raise ValueError(f"`prune_finetune_epochs` must be >= 0 and `prune_lr` > 0, got "
                             f"{self.prune_finetune_epochs}, {self.prune_lr}")

    @property
    def selected(self) -> list[str]:
        """fp32 first, then the requested variants in table order."""
        wanted = set(VARIANTS) if "all" in self.variants else set(self.variants)
        return ["fp32", *[n for n in VARIANTS if n in wanted and n != "fp32"]]


@dataclass(frozen=True)
class Result:
    metric: str
    fp32: float
    variants: dict[str, dict]

    def summary(self) -> str:
        parts = []
        for n, v in self.variants.items():
            if n == "fp32":
                continue
            if v["status"] in ("ok", "over-budget"):
                parts.append(f"{n} {v['metric']['value']:.4f}" + ("" if v["status"] == "ok" else " (over budget)"))
            else:
                parts.append(f"{n} {v['status']}")
        return f"fp32 {self.metric} {self.fp32:.4f}; " + ", ".join(parts)


def check_variant(path, reference: OnnxModel, feeds: dict[str, np.ndarray]) -> list[str]:
    """Loads in ONNX Runtime (CPU) and answers with fp32's input and output names, dtypes and shapes."""
    problems = []
    session, fp32 = OrtPredictor(path, device="cpu"), reference.predictor
    ref_in = [(i.name, i.type) for i in fp32.inputs]
    got_in = [(i.name, i.type) for i in session.inputs]
    if ref_in != got_in:
        problems.append(f"inputs {got_in} differ from fp32's {ref_in}")
        return problems
    if session.output_names != fp32.output_names:
        problems.append(f"output names {session.output_names} differ from fp32's {fp32.output_names}")
        return problems
    few = {name: x[:reference.meta.fixed_batch or 3] for name, x in feeds.items()}
    want, got = fp32.run(few), session.run(few)
    for name in fp32.output_names:
        if got[name].shape != want[name].shape or got[name].dtype != want[name].dtype:
            problems.append(f"output '{name}' is {got[name].dtype}{list(got[name].shape)}, fp32 gives "
                            f"{want[name].dtype}{list(want[name].shape)}")
    return problems


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params({**config.__dict__, "variants": ",".join(config.variants)})
    require(rundir.onnx, "export")
    data = dataset.load(rundir.data, rundir.dataset)
    # Raw splits: every file is fed and scored as fp32's metadata says (stages.onnx_model).
    splits = {name: data.split(name, normalized=False) for name in ("test", "val")}
    (x_test, y_test), (x_val, y_val) = splits["test"], splits["val"]
    fp32 = OnnxModel.open(rundir.onnx)  # refuses a file whose metadata does not say how to feed it
    task, props = fp32.meta.task, dict(fp32.meta.props)
    if len(fp32.meta.inputs) > 1:
        raise StageError(f"{rundir.onnx.name} takes {len(fp32.meta.inputs)} inputs {[i.name for i in fp32.meta.inputs]}; "
                         "a dataset gives one input array, so quantize cannot feed it. Serve the imported file as it "
                         "is (`pipeline serve --model`), or import it without a prepare section")
    agree = judge.by_agreement(task, labeled=data.labeled)
    if agree and data.labeled:
        log.warning("%s's task is %s: variants are judged by agreement with fp32, not against the dataset's labels; "
                    "set model.task (and labels) in the recipe to judge them by accuracy", rundir.onnx.name, task)
    if not agree and task == "classification":  # the dataset's class i is the file's output class_indices[i]
        to_output = fp32.meta.class_indices(data.labels)
        splits = {name: (x, to_output[y]) for name, (x, y) in splits.items()}
        (x_test, y_test), (x_val, y_val) = splits["test"], splits["val"]
    try:
        reference = {name: fp32.predict(x) for name, (x, _) in splits.items()} if agree else {}
        fp32_test, fp32_val = (score_model(fp32, name, splits, reference, task, agree) for name in ("test", "val"))
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"{rundir.onnx} cannot be evaluated ({type(e).__name__}: {str(e)[:300]}); "
                         f"rerun `pipeline {'import' if fp32.meta.family == IMPORTED_FAMILY else 'export'}`") from e
    x_train = data.split("train", normalized=False)[0]
    calibration = fp32.feed(x_train[np.random.default_rng(0).permutation(len(x_train))[:config.calibration_samples]])

    def score_variant(path, split: str) -> dict:
        """A variant takes what fp32 takes and means what it means: judged with fp32's metadata (its own
        is stamped only once it has passed)."""
        return score_model(OnnxModel.open(path, props=props), split, splits, reference, task, agree)

    judge_val = lambda path: judge.verdict(task, fp32_val, score_variant(path, "val"),  # noqa: E731
                                           config.accuracy_budget, config.relative_budget)
    scratch = tempfile.TemporaryDirectory(prefix="onnx-pipeline-quantize-")  # removed when the stage ends
    source, graph = maker_source(rundir.onnx, Path(scratch.name))  # an old opset / IR modernized (a copy)
    ctx = Context(config=config, task=task, family=fp32.meta.family, fp32=graph, calibration=calibration,
                  judge_val=judge_val, checkpoint=rundir.checkpoint, data=data,
                  artifact_names={"sensitivity_json": rundir.sensitivity_json, "sensitivity_md": rundir.sensitivity_md},
                  feed_batch=fp32.meta.fixed_batch or 64)
    test_feeds = fp32.feed(x_test)
    by_points = task == "classification"  # accuracy or top-1 agreement
    budget = config.accuracy_budget if by_points else config.relative_budget
    unit = "points" if by_points else "relative error" if agree else "relative"

    rows: dict[str, dict] = {}
    for name in config.selected:
        variant, path = VARIANTS[name], rundir.variant(name)
        row: dict = {"file": path.name, "description": variant.description,
                     "needs_calibration": variant.needs_calibration}
        reason = variant.applicable(ctx) if variant.make is not None else None
        if reason:
            row.update(status="not-applicable", reason=reason, ok=False, within_budget=False, eligible=False)
            rows[name] = row
            log.info("%-13s not applicable: %s", name, reason)
            continue
        try:
            if variant.make is None:
                metric, info = fp32_test, {}
                v = judge.verdict(task, fp32_test, metric, config.accuracy_budget, config.relative_budget)
            else:
                with atomic_path(path) as tmp, quiet_root_logger():
                    info = variant.make(source, tmp, ctx) or {}
                    problems = check_variant(tmp, fp32, test_feeds)
                    if problems:
                        raise StageError("; ".join(problems))
                    metric = score_variant(tmp, "test")
                    v = judge.verdict(task, fp32_test, metric, config.accuracy_budget, config.relative_budget)
                    # The file says what it is: fp32's metadata (labels, input, lineage), then the variant's.
                    stamp_onnx(tmp, {**props, **variant_props(name, variant, metric, v, info)})
        except Exception as e:
            log.warning("variant %s failed: %s", name, e)
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:500]}", ok=False, within_budget=False,
                       eligible=False)
            rows[name] = row
            continue
        size = path.stat().st_size
        row.update(status="ok" if v.within else "over-budget", ok=True, within_budget=v.within, eligible=v.within,
                   reason="" if v.within else f"loses {v.loss:.3f} {v.unit}, budget {v.budget} {v.unit}",
                   metric=metric, delta=v.delta, delta_unit=v.unit, size_bytes=size,
                   size_ratio=size / rundir.onnx.stat().st_size, sha256=sha256_file(path), **info)
        if task == "classification" and not agree:
            row.update(accuracy=metric["value"], delta_points=v.delta)
        elif agree:
            row[metric["name"]] = metric["value"]  # top1_agreement or relative_error, against fp32
        rows[name] = row
        log.info("%-13s %s %.4f (%+.3f %s), %7.1f KiB%s", name, metric["name"], metric["value"], v.delta, v.unit,
                 size / 1024, "" if v.within else f"  OVER BUDGET ({budget} {unit})")
        tracker.log_metrics({f"{metric['name']}.{name}": metric["value"], f"delta.{name}": v.delta,
                             f"size_bytes.{name}": size})
        if name != "fp32":
            tracker.log_artifact(path)

    scratch.cleanup()
    report = {"task": task, "metric": fp32_test["name"], "fp32": fp32_test["value"], "budget": budget,
              "budget_unit": unit, "judged_by": "agreement with fp32" if agree else "labels", "variants": rows}
    if task == "classification" and not agree:  # register reads these two keys
        report.update(fp32_accuracy=fp32_test["value"], accuracy_budget_points=config.accuracy_budget)
    write_json(rundir.variants, report)
    tracker.log_artifact(rundir.variants)
    for extra in (rundir.sensitivity_json, rundir.sensitivity_md):
        if extra.is_file() and "int8-static" in rows and rows["int8-static"].get("attempts", [None])[1:]:
            tracker.log_artifact(extra)
    return Result(metric=fp32_test["name"], fp32=fp32_test["value"], variants=rows)


def score_model(model: OnnxModel, split: str, splits: dict, reference: dict, task: str, agree: bool) -> dict:
    """The model's metric on a split: against the labels, or (``agree``) its agreement with fp32's outputs
    on the same inputs (``reference``: fp32's outputs per split)."""
    x, y = splits[split]
    if agree:
        return judge.agreement(task, reference[split], model.predict(x), model.meta.primary_output)
    return model.score(x, y)


def variant_props(name: str, variant: Variant, metric: dict, v: judge.Verdict, info: dict) -> dict[str, str]:
    props = {"variant": name, "variant.description": variant.description,
             f"metrics.test_{metric['name']}": f"{metric['value']:.6f}",
             "variant.delta_vs_fp32": f"{v.delta:.6f} {v.unit}", "variant.within_budget": str(v.within).lower()}
    if "excluded_nodes" in info:
        props["quantize.excluded_nodes"] = json.dumps(info["excluded_nodes"])
    if "calibration_method" in info:
        props["quantize.calibration"] = json.dumps({"method": info["calibration_method"],
                                                    "samples": info["calibration_samples"]})
    for key in ("format", "per_channel", "activation_type", "optimization_level", "block_size", "prune_ratio",
                "parameters_after"):
        if key in info:
            props[f"quantize.{key}"] = json.dumps(info[key])
    return props


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
