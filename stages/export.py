"""export: the trained PyTorch model -> one self-contained ONNX file (plus its parts), verified against PyTorch.

The ``torch.export``-based exporter is tried first and the legacy TorchScript exporter second; a
candidate file is accepted only when ONNX Runtime reproduces PyTorch's outputs on real test inputs
at every checked batch size (names, then shapes, then values within tolerance), one of them a size
the exporter never saw, so a batch axis baked in as a constant fails. All mismatches are reported at
once, each with its max absolute difference; if any file of the model fails, the stage fails and
nothing is written.

For images and signals (layout NCHW or NCL with a known raw value range) the preprocessing goes
into the graph by default: the file takes the raw input the user has (digits: float32 intensities
0..16; IDX data: uint8) and does the cast and the normalization itself; the check then runs on raw
inputs against the same wrapper in PyTorch. A VAE's encoder and decoder (``ExportSpec.parts``) are exported
and checked the same way beside model.onnx. Each file carries its task, labels, exact input
description, preprocessing, outputs, metrics and lineage in ``metadata_props`` so an app can use it
without this project.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import models
from stages import checkpoint, conversion, dataset
from stages.common import PRODUCT_VERSION, StageError, atomic_path, git_state, sha256_file, stamp_onnx, write_json
from stages.conversion import EXAMPLE_BATCH, EXPORTERS, ValidationError  # noqa: F401  (ValidationError: re-exported)
from stages.onnx_model import Preprocessing
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)
IMAGE_LAYOUTS = ("NCHW", "NCL")

OUTPUT_MEANING = {
    "logits": "unnormalized class scores (N, C); argmax indexes `labels`; softmax gives probabilities",
    "probabilities": "softmax of the logits (N, C): class probabilities, each row sums to 1, columns follow `labels`",
    "prediction": "regression predictions (N, T), one column per `target_names`",
    "reconstruction": "the reconstructed input, in the normalized space (x - mean) / std of `preprocessing`; "
                      "raw = reconstruction * std + mean",
    "mu": "mean of the latent posterior (N, latent_dim); the deterministic latent code",
    "logvar": "log-variance of the latent posterior (N, latent_dim)",
}


@dataclass(frozen=True)
class Config:
    opset: int = 18
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"  # auto: dynamo, then legacy if it fails
    check_batch_sizes: tuple[int, ...] = (1, 2, 37)
    atol: float = 1e-4
    rtol: float = 1e-3
    # auto: on for images (layout NCHW/NCL with a value range in dataset.json), off for tabular data
    preprocessing_in_graph: bool | Literal["auto"] = "auto"
    # Off by default: the file's outputs stay what the model computes (logits); on adds `probabilities`.
    softmax_output: bool = False

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 23:
            raise ValueError(f"`opset` must be between 13 and 23, got {self.opset}")
        if not self.check_batch_sizes or min(self.check_batch_sizes) < 1:
            raise ValueError(f"`check_batch_sizes` must be positive ints, got {list(self.check_batch_sizes)}")
        if all(bs == EXAMPLE_BATCH for bs in self.check_batch_sizes):
            raise ValueError(f"`check_batch_sizes` must hold a size other than {EXAMPLE_BATCH} (the size the exporter "
                             f"traces with), so a fixed batch axis shows; e.g. [1, 2, 37], got {list(self.check_batch_sizes)}")
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"`atol` and `rtol` must be >= 0, got {self.atol}, {self.rtol}")
        if self.preprocessing_in_graph not in (True, False, "auto"):
            raise ValueError(f"`preprocessing_in_graph` must be true, false or auto, got {self.preprocessing_in_graph!r}")


@dataclass(frozen=True)
class Result:
    exporter: str
    max_abs_diff: float
    size_bytes: int
    sha256: str
    attempts: list[dict] = field(default_factory=list)
    preprocessing_in_graph: bool = False
    parts: dict = field(default_factory=dict)

    def summary(self) -> str:
        extra = (", raw input" if self.preprocessing_in_graph else "") + (f", parts {'+'.join(self.parts)}" if self.parts else "")
        return f"{self.exporter}, max |diff| {self.max_abs_diff:.1e}, {self.size_bytes / 1024:.0f} KiB{extra}"


def wants_preprocessing(config: Config, info: dict) -> bool:
    if config.preprocessing_in_graph != "auto":
        return bool(config.preprocessing_in_graph)
    return info.get("input_layout") in IMAGE_LAYOUTS and info.get("value_range") is not None


def metadata(meta: dict, info: dict, task: str, input_name: str, input_shape: list, output_names: list[str],
             pre: Preprocessing, outcome: dict, opset: int, test_metrics: dict | None, part: str | None = None,
             takes_model_input: bool = True) -> dict[str, str]:
    """What an app needs to use the file alone, as ONNX metadata_props (string values, JSON where structured)."""
    props = {
        "onnx_pipeline.version": PRODUCT_VERSION,
        "model.family": meta["model"]["family"],
        "task": task,
        "input.name": input_name,
        "input.dtype": pre.input_dtype if takes_model_input else "float32",
        "input.shape": json.dumps(input_shape),
        "input.layout": meta.get("input_layout") or info.get("input_layout", ""),
        "input.value_range": json.dumps(pre.fed_range() if takes_model_input else None),
        "preprocessing": pre.to_json(),
        "output.names": json.dumps(output_names),
        "output.meaning": json.dumps({n: OUTPUT_MEANING.get(n, "") for n in output_names}),
        "lineage.training_run_id": str(meta.get("run_id") or ""),
        "lineage.dataset_sha256": meta["dataset_sha256"],
        "lineage.dataset_source": meta["dataset_source"],
        "lineage.recipe": str(meta.get("recipe", {}).get("name", "")),
        "lineage.checkpoint_epoch": str(meta["epoch"]),
        "lineage.git_commit": git_state()["git.commit"],
        "export.exporter": outcome["exporter"],
        "export.rejected": json.dumps(outcome["rejected"]),
        "export.opset": str(opset),
        "export.max_abs_diff": f"{outcome['max_abs_diff']:.3e}",
        "export.dynamic_axes": json.dumps({n: {"0": "batch"} for n in [input_name, *output_names]}),
        "variant": "fp32",
    }
    if part is not None:
        props["export.part"] = part
        if not takes_model_input:  # a decoder takes latents, not the dataset's input
            props["input.layout"] = "NF"
            props["preprocessing"] = json.dumps({"applied_in_graph": True, "input_dtype": "float32", "steps": [],
                                                 "raw_input": "latent codes, e.g. draws from N(0, 1) or an encoder's mu"})
    if task == "classification":
        labels = meta.get("label_names") or info.get("label_names") or []
        props["labels"] = json.dumps(labels)
        props["num_classes"] = str(len(labels))
    elif task == "regression":
        props["target_names"] = json.dumps(meta.get("target_names") or info.get("target_names") or [])
    if test_metrics:
        if "primary" in test_metrics:
            props["metrics.primary"] = json.dumps(test_metrics["primary"])
        if "accuracy" in test_metrics:
            props["metrics.test_accuracy"] = f"{test_metrics['accuracy']:.6f}"
    return props


def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    tracker.log_params(config.__dict__)
    model, meta = checkpoint.load(rundir.checkpoint)
    data = dataset.load(rundir.data, rundir.dataset)
    task = meta.get("task") or data.info.get("task") or "classification"
    family = meta["model"]["family"]
    spec = models.export_spec(family, task)
    if config.softmax_output and task != "classification":
        raise StageError(f"export.softmax_output needs a classification model; this one's task is {task!r}. "
                         "Set export.softmax_output=false")
    in_graph = wants_preprocessing(config, data.info)
    pre = Preprocessing.from_dataset(data.info, in_graph)
    x_raw, _ = data.split("test", normalized=False)
    x = pre.apply(x_raw)  # exactly what the file will take
    test_metrics = json.loads(rundir.metrics.read_text()) if rundir.metrics.is_file() else None
    input_shape = list(meta["model"]["input_shape"])
    batch = -1 if spec.dynamic_batch else 1
    check = dict(opset=config.opset, exporter=config.exporter, batch_sizes=config.check_batch_sizes,
                 atol=config.atol, rtol=config.rtol)

    # What gets exported: the whole model as model.onnx, then each part beside it.
    main_outputs = list(spec.output_names) + (["probabilities"] if config.softmax_output else [])
    jobs = [("model", rundir.onnx, conversion.InGraph(model, pre, config.softmax_output,
                                                      len(input_shape) + 1),
             x, dataclasses.replace(spec, output_names=tuple(main_outputs)), spec.input_name, [batch, *input_shape])]
    for part in spec.parts:
        sub = getattr(model, part.attribute)
        if part.input_name == spec.input_name:  # takes the model's input: same preprocessing, same inputs
            jobs.append((part.name, rundir.onnx_part(part.name),
                         conversion.InGraph(sub, pre, False, len(input_shape) + 1),
                         x, part, part.input_name, [batch, *input_shape]))
        else:
            shape = list(part.input_shape_fn(model, tuple(input_shape)))
            jobs.append((part.name, rundir.onnx_part(part.name), conversion.InGraph(sub), conversion.part_inputs(shape, 64),
                         part, part.input_name, [batch, *shape]))

    outcomes: dict[str, dict] = {}
    failures: list[str] = []
    with contextlib.ExitStack() as stack:  # every file under a temporary name; all renamed, or none
        for what, final, module, inputs, job_spec, input_name, shape in jobs:
            tmp = stack.enter_context(atomic_path(final))
            try:
                outcome = conversion.export_checked(module, inputs, tmp, job_spec, what=final.name, **check)
            except ValidationError as e:
                failures.append(str(e))
                continue
            outcomes[what] = {**outcome, "file": final.name, "input_name": input_name, "input_shape": shape,
                              "output_names": list(job_spec.output_names)}
            stamp_onnx(tmp, metadata(meta, data.info, task, input_name, shape, list(job_spec.output_names), pre,
                                     outcome, config.opset, test_metrics, part=None if what == "model" else what,
                                     takes_model_input=input_name == spec.input_name),
                       f"{family} {task} model{'' if what == 'model' else ' (' + what + ')'} exported by onnx-pipeline; "
                       "see metadata_props")
        if failures:
            raise ValidationError("\n".join(failures) + "\nno ONNX file was written (previous ones, if any, are kept)")

    for what, o in outcomes.items():
        path = rundir.root / o["file"]
        o.update(size_bytes=path.stat().st_size, sha256=sha256_file(path))
    main = outcomes["model"]
    parts = {k: v for k, v in outcomes.items() if k != "model"}
    result = Result(exporter=main["exporter"], max_abs_diff=max(o["max_abs_diff"] for o in outcomes.values()),
                    size_bytes=main["size_bytes"], sha256=main["sha256"], attempts=main["attempts"],
                    preprocessing_in_graph=in_graph, parts={k: v["file"] for k, v in parts.items()})
    write_json(rundir.export_report, {
        "exporter": result.exporter, "rejected": main["rejected"], "opset": config.opset, "atol": config.atol,
        "rtol": config.rtol, "check_batch_sizes": list(config.check_batch_sizes), "example_batch": EXAMPLE_BATCH,
        "max_abs_diff": result.max_abs_diff, "size_bytes": result.size_bytes, "sha256": result.sha256, "task": task,
        "preprocessing": dict(pre.spec), "softmax_output": config.softmax_output, "input": {
            "name": spec.input_name, "dtype": pre.input_dtype, "shape": [batch, *input_shape],
            "layout": data.info.get("input_layout")},
        "outputs": main_outputs, "attempts": main["attempts"], "files": outcomes})
    log.info("exported %s with the %s exporter (max |diff| %.2e)%s%s", rundir.onnx, result.exporter, result.max_abs_diff,
             "; input is raw, preprocessing in the graph" if in_graph else "",
             "".join(f"; {v['file']} by {v['exporter']}" for v in parts.values()))
    tracker.set_tags({"export.exporter": result.exporter, "onnx.sha256": result.sha256,
                      "export.preprocessing_in_graph": str(in_graph), "export.rejected": json.dumps(main["rejected"])[:5000]})
    tracker.log_metrics({"max_abs_diff": result.max_abs_diff, "onnx_size_bytes": result.size_bytes})
    for o in outcomes.values():
        tracker.log_artifact(rundir.root / o["file"])
    tracker.log_artifact(rundir.export_report)
    return result
