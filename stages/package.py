"""package: one ONNX model -> what another app or serving engine needs to run it without this project.

Three formats, one inspection. Everything written is derived from the ONNX file itself (its graph
for names, dtypes and shapes; its ``metadata_props``, read by ``stages.onnx_model.ModelMeta``, for
labels, layout, preprocessing, task, metrics and lineage), never assumed, so a model whose
preprocessing lives inside the graph (raw uint8 in) and one that takes normalized float32 are
packaged alike, and a file whose metadata does not say how to feed it is refused.

- ``bundle``: ``model.onnx`` (one file, no external data), ``model.json`` (everything an app needs),
  ``README.md`` for app developers and ``samples.json`` (test-split inputs, their true labels and the
  outputs ONNX Runtime gave for them) so an app can check itself.
- ``triton``: a model repository NVIDIA Triton loads as is:
  ``<repo>/<name>/config.pbtxt``, ``<repo>/<name>/<version>/model.onnx`` (+ ``labels.txt``).
- ``kserve``: a KServe ``InferenceService`` manifest plus the ``model.onnx`` to upload to its storage URI.

Before anything is written the model is opened in ONNX Runtime and run on the test split (when one
is given): the bundle's expected outputs are ONNX Runtime's own. A model that needs operators from
a non-standard domain (com.microsoft contrib ops, e.g. some quantized graphs) is refused unless
``allow_contrib_ops`` is set, and then the README and model.json name the runtime build it needs.
Output is built in a temporary directory and renamed into place, so a failure leaves no half bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.common import PRODUCT_VERSION, StageError, sha256_file
from stages.onnx_model import ModelMeta, OnnxModel
from stages.predictors import OrtPredictor
from stages.serve.config import BatchSettings

log = logging.getLogger(__name__)

Format = Literal["bundle", "triton", "kserve"]
FORMATS: tuple[str, ...] = ("bundle", "triton", "kserve")
BUNDLE_FORMAT = "onnx-pipeline-bundle/1"
# Operator domains every ONNX Runtime build (and other ONNX runtimes) implements.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# ONNX tensor element type name (as ONNX Runtime reports it, "tensor(float)") -> numpy dtype name
# and Triton's model-config DataType.
DTYPES: dict[str, tuple[str, str]] = {
    "float": ("float32", "TYPE_FP32"), "float16": ("float16", "TYPE_FP16"), "double": ("float64", "TYPE_FP64"),
    "bfloat16": ("bfloat16", "TYPE_BF16"), "uint8": ("uint8", "TYPE_UINT8"), "int8": ("int8", "TYPE_INT8"),
    "uint16": ("uint16", "TYPE_UINT16"), "int16": ("int16", "TYPE_INT16"), "uint32": ("uint32", "TYPE_UINT32"),
    "int32": ("int32", "TYPE_INT32"), "uint64": ("uint64", "TYPE_UINT64"), "int64": ("int64", "TYPE_INT64"),
    "bool": ("bool", "TYPE_BOOL"), "string": ("string", "TYPE_STRING"),
}
# KServe resource names are DNS-1035 labels.
K8S_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Config:
    """What `pipeline package` was asked for (a command of its own, not a recipe section)."""

    format: Format = "bundle"
    name: str = ""  # bundle / Triton model / InferenceService name; empty: derived from the model
    version: int = 1  # Triton version directory
    samples: int = 16  # test samples carried in samples.json; -1: the whole test split
    storage_uri: str = ""  # kserve: where model.onnx will be uploaded (s3://..., gs://..., pvc://...)
    # kserve: a container image of this project's slim server (the repository's Dockerfile) to serve
    # with instead of KServe's own ONNX runtime; empty: KServe picks its runtime for modelFormat onnx.
    image: str = ""
    allow_contrib_ops: bool = False
    overwrite: bool = False  # replace a non-empty output directory
    # Triton's batching (max_batch_size, a dynamic_batching block and its delay): the serve section's
    # batching part, so Triton batches as our own server would.
    batching: BatchSettings = field(default_factory=BatchSettings)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"`format` must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"`version` must be an integer >= 1 (Triton's version directory), got {self.version!r}")
        if self.samples < -1:
            raise ValueError(f"`samples` must be >= 0, or 'all', got {self.samples}")
        if self.format == "kserve":
            if not self.storage_uri:
                raise ValueError("`--storage-uri` is required for --format kserve: where you will upload model.onnx, "
                                 "e.g. s3://my-bucket/models/digits-cnn")
            if not re.match(r"^[a-z][a-z0-9+.-]*://\S+$", self.storage_uri):
                raise ValueError(f"`--storage-uri` must be a URI such as s3://bucket/path, gs://bucket/path or "
                                 f"pvc://claim/path, got {self.storage_uri!r}")
            if self.image and (any(c.isspace() for c in self.image) or self.image.startswith("-")):
                raise ValueError(f"`--image` must be a container image reference such as "
                                 f"registry.example.com/onnx-pipeline-serve:0.1.0, got {self.image!r}")
            if self.name and not K8S_NAME.match(self.name):
                raise ValueError(f"`--name` {self.name!r} is not a valid Kubernetes name for --format kserve: use "
                                 "lowercase letters, digits and '-', starting with a letter, at most 63 characters")


@dataclass(frozen=True)
class Source:
    """The model to package, already on local disk, and where it came from."""

    path: Path
    uri: str  # models:/NAME@alias, or the file path
    name: str = ""  # registered model name, when it came from the registry
    version: str = ""  # registered version
    tags: dict[str, str] = field(default_factory=dict)  # the registry version's tags


@dataclass(frozen=True)
class TestSplit:
    """Raw test inputs (as stored, before any preprocessing) and their true labels or targets."""

    x: np.ndarray
    y: np.ndarray
    dataset_sha256: str = ""
    value_range: Any = None


@dataclass(frozen=True)
class Result:
    format: str
    output: str
    name: str
    files: list[str]
    sha256: str
    samples: int
    verified_accuracy: float | None = None

    def summary(self) -> str:
        acc = f", test accuracy {self.verified_accuracy:.4f} on ONNX Runtime" if self.verified_accuracy is not None else ""
        return f"{self.format} '{self.name}' -> {self.output} ({len(self.files)} files{acc})"


# ---------------------------------------------------------------- inspecting the model

@dataclass
class ModelInfo:
    """What the file says about itself: graph signature, operator domains, metadata_props."""

    proto: Any  # onnx.ModelProto with all weights inside
    props: dict[str, str]
    inputs: list[dict]
    outputs: list[dict]
    opsets: dict[str, int]
    contrib_ops: dict[str, list[str]]  # non-standard domain -> op types used
    had_external_data: bool


def _dims(value_info) -> list[int | str]:
    """Graph dims: an int, or the symbolic name (e.g. "batch") of a dynamic axis, or "?"."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return dims


def _tensor(value_info) -> dict:
    import onnx

    key = onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()  # FLOAT -> "float"
    if key not in DTYPES:
        raise StageError(f"tensor {value_info.name!r} has ONNX element type {key}, which neither Triton nor the "
                         "v2 protocol can carry")
    dims = _dims(value_info)
    return {"name": value_info.name, "dtype": DTYPES[key][0], "triton_dtype": DTYPES[key][1],
            "dims": dims, "shape": [d if isinstance(d, int) else -1 for d in dims]}


def _walk_nodes(graph):
    """Every node, including those inside If/Loop/Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _walk_nodes(attr.g)
            for g in attr.graphs:
                yield from _walk_nodes(g)


def inspect(path: Path) -> ModelInfo:
    """Load ``path`` (pulling any external weight data inside) and read its signature and domains."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise StageError(f"model file {path} not found; pass --model PATH.onnx, --model models:/NAME@ALIAS or --workdir RUN_DIR")
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise StageError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:200]}); re-export it") from None
    had_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    proto = header
    if had_external:
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except Exception as e:
            raise StageError(f"{path} keeps its weights in an external data file that cannot be read ({e}); "
                             "keep the .onnx.data file beside it or re-export with external_data=False") from None
    initializers = {t.name for t in proto.graph.initializer}
    contrib: dict[str, set[str]] = {}
    used = {"ai.onnx"}
    for node in _walk_nodes(proto.graph):
        used.add(node.domain or "ai.onnx")
        if node.domain not in STANDARD_DOMAINS:
            contrib.setdefault(node.domain, set()).add(node.op_type)
    return ModelInfo(
        proto=proto,
        props={p.key: p.value for p in proto.metadata_props},
        inputs=[_tensor(v) for v in proto.graph.input if v.name not in initializers],
        outputs=[_tensor(v) for v in proto.graph.output],
        # The opsets the nodes use: quantizers declare domains (com.microsoft, ...) they then leave unused.
        opsets={(o.domain or "ai.onnx"): o.version for o in proto.opset_import if (o.domain or "ai.onnx") in used},
        contrib_ops={d: sorted(ops) for d, ops in sorted(contrib.items())},
        had_external_data=had_external,
    )


def runtime_requirement(info: ModelInfo) -> str:
    """One sentence: which ONNX Runtime build runs this file."""
    import onnxruntime as ort

    opset = info.opsets.get("ai.onnx", 0)
    base = f"ONNX Runtime with ONNX opset {opset} support (verified with onnxruntime {ort.__version__})"
    if not info.contrib_ops:
        return f"{base}; standard ONNX operators only, so stock ONNX Runtime runs it in any language"
    ops = "; ".join(f"{d}: {', '.join(o)}" for d, o in info.contrib_ops.items())
    return (f"{base} built WITH its contrib operators ({ops}); the standard onnxruntime, onnxruntime-gpu and "
            "onnxruntime-node packages include them, but minimal/mobile builds and non-ORT runtimes may not")


def check_contrib_ops(info: ModelInfo, allow: bool, path: Path) -> None:
    if info.contrib_ops and not allow:
        ops = "; ".join(f"{d}: {', '.join(o)}" for d, o in info.contrib_ops.items())
        raise StageError(f"{path.name} uses operators outside the standard ONNX domains ({ops}), so only an ONNX Runtime "
                         "build with its contrib operators can run it; package the fp32 model.onnx (or another "
                         "variant with standard ops), or pass --allow-contrib-ops to package it anyway with a README "
                         "that names the runtime build it needs")


# ---------------------------------------------------------------- what the model expects

def describe(info: ModelInfo, meta: ModelMeta, source: Source, split: TestSplit | None) -> dict:
    """The model.json document: everything an app needs, from the file's graph and its metadata
    (``meta``: ``stages.onnx_model.ModelMeta``, which has already refused a file that does not say how
    to feed it)."""
    if len(info.inputs) != 1:
        raise StageError(f"{source.path.name} has {len(info.inputs)} inputs {[i['name'] for i in info.inputs]}; "
                         "packaging supports single-input models")
    graph_in = next(t for t in info.inputs if t["name"] == meta.input.name)
    pre = meta.preprocessing
    # Raw: what the app has before preprocessing. Input: what the file takes (the export stage writes
    # `input.value_range` for it; older files lack it, so it is derived from the raw range).
    raw_range = pre.raw_value_range or (split.value_range if split is not None else None)
    if raw_range is None and split is not None and split.x.size:
        raw_range = [float(split.x.min()), float(split.x.max())]  # observed on the test split
    raw_range = list(raw_range) if raw_range is not None else None
    raw_dtype = pre.raw_dtype or (str(split.x.dtype) if split is not None else None)
    value_range = meta.input.value_range if meta.input.value_range is not None else pre.fed_range(raw_range)
    meaning = {o.name: o.meaning for o in meta.outputs}
    outputs = [{"name": o["name"], "dtype": o["dtype"], "shape": o["shape"], "meaning": meaning.get(o["name"], "")}
               for o in info.outputs]
    metrics, lineage = dict(meta.metrics), dict(meta.lineage)
    lineage["source"] = source.uri
    if source.name:
        lineage.update({"registered_name": source.name, "registered_version": source.version})
        for tag in ("test_accuracy", "fp32_test_accuracy"):
            if tag in source.tags:
                with contextlib.suppress(ValueError):
                    metrics.setdefault(tag, float(source.tags[tag]))
    fed_as = {"in-graph": "raw values (the graph applies the preprocessing)",
              "none": "raw values as they are (the model takes its input without preprocessing)",
              "normalize": "preprocessed values: apply `preprocessing` to the raw input first"}[pre.kind]
    return {
        "format": BUNDLE_FORMAT,
        "task": meta.task,
        "input": {
            "name": graph_in["name"], "dtype": graph_in["dtype"], "shape": graph_in["shape"],
            "dims": graph_in["dims"], "layout": meta.input.layout,
            "value_range": value_range,
            "raw": {"dtype": raw_dtype, "value_range": raw_range},
            "fed_as": fed_as,
        },
        "preprocessing": dict(pre.spec),
        "labels": list(meta.labels) or None,
        "outputs": outputs,
        "metrics": metrics,
        "lineage": lineage,
        "model": {
            "file": "model.onnx", "variant": meta.variant, "ir_version": info.proto.ir_version,
            "opsets": info.opsets, "producer": f"{info.proto.producer_name} {info.proto.producer_version}".strip(),
            "exporter": meta.props.get("export.exporter", ""),
            "non_standard_ops": info.contrib_ops,
        },
        "runtime": {"requires": runtime_requirement(info)},
        "metadata_props": dict(meta.props),
    }


# ---------------------------------------------------------------- verification

def verify(model_path: Path, meta: ModelMeta, split: TestSplit | None) -> dict[str, np.ndarray] | None:
    """Open the file in ONNX Runtime (CPU) and run the test split through it, fed as its metadata
    says (``OnnxModel``); returns every output."""
    import onnxruntime as ort

    try:
        predictor = OrtPredictor(model_path, device="cpu")
    except Exception as e:
        raise StageError(f"ONNX Runtime {ort.__version__} cannot load the model: {str(e).splitlines()[0][:300]}") from None
    if split is None:
        return None
    want = [d if isinstance(d, int) else -1 for d in (meta.input.shape or ())[1:]]
    got = list(split.x.shape[1:])
    if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
        raise StageError(f"the test split's samples have shape {got} but the model takes {want} per sample; "
                         "pass the --workdir the model was trained in, or --samples 0")
    return OnnxModel(predictor, meta).predict(split.x)


def _scores_output(doc: dict) -> str:
    """The output whose argmax is the class: logits if there, else the first."""
    names = [o["name"] for o in doc["outputs"]]
    return next((n for n in ("logits", "probabilities") if n in names), names[0])


def sample_records(split: TestSplit, outputs: dict[str, np.ndarray], doc: dict, count: int) -> list[dict]:
    n = len(split.x) if count < 0 else min(count, len(split.x))
    labels, scores = doc.get("labels"), _scores_output(doc)
    records = []
    for i in range(n):
        rec: dict[str, Any] = {"index": i, "input": split.x[i].tolist()}
        expected: dict[str, Any] = {"outputs": {k: v[i].tolist() for k, v in outputs.items()}}
        if labels:
            truth = int(split.y[i])
            rec["label"], rec["label_index"] = labels[truth], truth
            pred = int(np.argmax(outputs[scores][i]))
            expected.update({"label": labels[pred], "label_index": pred})
        else:
            rec["target"] = np.asarray(split.y[i]).tolist()
        rec["expected"] = expected
        records.append(rec)
    return records


# ---------------------------------------------------------------- writers

def _bundle_readme(doc: dict, name: str, n_samples: int, sha: str) -> str:
    inp, pre, outs = doc["input"], doc["preprocessing"], doc["outputs"]
    labels = doc.get("labels") or []
    shape = "[" + ", ".join("N" if i == 0 and d == -1 else str(d) for i, d in enumerate(inp["shape"])) + "]"
    if pre.get("applied_in_graph"):
        feed = (f"Feed the raw input as `{inp['dtype']}`: the graph applies the preprocessing itself"
                + (f" ({pre.get('formula') or '; '.join(pre.get('steps', []))})" if pre.get("formula") or pre.get("steps") else "") + ".")
    elif "mean" in pre:
        feed = (f"Normalize first, in float32: `x = (raw - mean) / std` with `mean = {json.dumps(pre['mean'])}` and "
                f"`std = {json.dumps(pre['std'])}`" + (" (one value per entry of axis 1)" if isinstance(pre["mean"], list) else "")
                + f", then feed `{inp['dtype']}`.")
    else:
        feed = f"Feed `{inp['dtype']}` values as they are (the model takes its input without preprocessing)."
    if pre.get("applied_in_graph") or "mean" not in pre:
        snippet = 'x = raw.astype(meta["input"]["dtype"])          # the graph does any preprocessing'
    else:
        snippet = ('pre = meta["preprocessing"]                     # not in the graph: normalize here\n'
                   'x = ((raw - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)).astype(np.float32)'
                   + ("\n# mean/std hold one value per entry of axis 1: reshape them to (1, -1, 1, ...) first"
                      if isinstance(pre["mean"], list) else ""))
    out_lines = "\n".join(f"- `{o['name']}` ({o['dtype']}, shape {o['shape']}): {o['meaning'] or 'see model.json'}" for o in outs)
    metrics = ", ".join(f"{k} {v['name']} {v['value']}" if isinstance(v, dict) and {"name", "value"} <= set(v)
                        else f"{k} {v}" for k, v in doc["metrics"].items()) or "none recorded"
    samples = (f"`samples.json` holds {n_samples} test inputs (raw, before preprocessing), their true labels and the "
               "outputs ONNX Runtime gave for them: run them through your integration and compare." if n_samples
               else "This bundle carries no samples.")
    return f"""# {name}: an ONNX model to embed in your app

Made by onnx-pipeline {PRODUCT_VERSION}. Everything below is also in `model.json` (machine-readable).

| file | what |
|---|---|
| `model.onnx` | the model, one self-contained file (sha256 `{sha}`) |
| `model.json` | input, preprocessing, labels, outputs, metrics, lineage, runtime |
| `samples.json` | test inputs with their expected outputs, to check your integration |

## Runtime
{doc['runtime']['requires']}.

## Input
`{inp['name']}`: `{inp['dtype']}`, shape `{shape}` (N: any batch size), layout `{inp.get('layout') or 'see model.json'}`,
values in `{json.dumps(inp.get('value_range'))}`; raw input (before preprocessing): `{inp['raw']['dtype']}` in
`{json.dumps(inp['raw']['value_range'])}`.

{feed}

## Outputs
{out_lines}
{f"Labels ({len(labels)}): `{json.dumps(labels)}` — the argmax of `{_scores_output(doc)}` indexes into them." if labels else ""}

Metrics: {metrics}. Task: {doc['task']}.

## Use it
Python (`pip install onnxruntime numpy`):
```python
import json, numpy as np, onnxruntime as ort
meta = json.load(open("model.json"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
sample = json.load(open("samples.json"))["samples"][0]
raw = np.asarray([sample["input"]])            # a batch of one, raw values
{snippet}
scores = session.run(None, {{meta["input"]["name"]: x}})[0]
```
Node.js (`npm install onnxruntime-node`): see `examples/node/classify.js` in onnx-pipeline; same steps with
`ort.InferenceSession.create("model.onnx")` and `new ort.Tensor(dtype, data, shape)`.

## Check your integration
{samples}
"""


def triton_config(doc: dict, info: ModelInfo, name: str, batching: BatchSettings, label_file: str | None) -> str:
    """config.pbtxt: Triton's ``ModelConfig`` message (its own schema, vendored in stages.serve.triton)
    in protobuf text format, so names are escaped and every field is one Triton knows.

    With a dynamic batch axis (dim 0 symbolic on every input and output) Triton batches: dims
    leave that axis out and ``max_batch_size`` > 0, with a ``dynamic_batching`` block when
    ``batching.enabled``; otherwise ``max_batch_size: 0`` and full dims.
    """
    from stages.serve import triton

    batched = all(t["dims"] and not isinstance(t["dims"][0], int) for t in info.inputs + info.outputs)
    config = triton.model_config_class()(name=name, platform="onnxruntime_onnx", default_model_filename="model.onnx",
                                         max_batch_size=batching.max_batch_size if batched else 0)
    for kind, tensors in (("input", info.inputs), ("output", info.outputs)):
        for t in tensors:
            entry = getattr(config, kind).add(name=t["name"], dims=(t["shape"][1:] if batched else t["shape"]) or [1])
            entry.data_type = triton.enum_value("inference.DataType", t["triton_dtype"])
            if kind == "output" and label_file and t["name"] == _scores_output(doc):
                entry.label_filename = label_file
    if batched and batching.enabled:
        config.dynamic_batching.SetInParent()  # the block's presence turns merging on, even with every field at 0
        config.dynamic_batching.max_queue_delay_microseconds = round(batching.max_queue_delay_ms * 1000)
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.instance_group.add(count=1)  # kind KIND_AUTO (the default): GPU where Triton has one, else CPU
    return triton.to_text(config, header=f"Written by onnx-pipeline {PRODUCT_VERSION} from the ONNX file's graph "
                                         f"and metadata ({doc['task']} model).")


SERVE_PORT_IN_KSERVE = 8080  # the port KServe routes to in a custom predictor container


def kserve_manifest(name: str, storage_uri: str, doc: dict, image: str = "") -> dict:
    """The InferenceService: KServe's own ONNX runtime, or with ``image`` this project's slim server
    (Dockerfile) as a custom predictor container; KServe's storage initializer puts the files of
    ``storage_uri`` in /mnt/models either way (STORAGE_URI for a custom container)."""
    annotations = {"onnx-pipeline/source": doc["lineage"].get("source", ""),
                   "onnx-pipeline/onnx-sha256": doc["model"]["sha256"]}
    if image:
        container = {
            "name": "kserve-container",
            "image": image,
            "args": ["--model", "/mnt/models/model.onnx", "--name", name, "--port", str(SERVE_PORT_IN_KSERVE)],
            "env": [{"name": "STORAGE_URI", "value": storage_uri}],
            "ports": [{"containerPort": SERVE_PORT_IN_KSERVE, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": SERVE_PORT_IN_KSERVE}},
            "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        }
        return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"predictor": {"containers": [container]}}}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "onnx"},
            "protocolVersion": "v2",  # KServe needs v2 to find a runtime for ONNX
            "storageUri": storage_uri,
            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        }}},
    }


def _k8s_name(name: str) -> str:
    fixed = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not fixed or not fixed[0].isalpha():
        fixed = f"model-{fixed}".strip("-")
    return fixed


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise StageError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise StageError(f"output directory {output} exists and is not empty; choose another --output, or pass "
                         "--overwrite to replace it")


def _install(tmp: Path, output: Path) -> None:
    """Move the finished directory into place; an old one (allowed by --overwrite) is removed only after."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def default_name(source: Source, info: ModelInfo) -> str:
    return source.name or info.props.get("lineage.recipe") or source.path.stem.split(".")[0]


def run(config: Config, source: Source, output: Path, split: TestSplit | None = None) -> Result:
    """Inspect and verify the model, then write ``config.format`` to ``output`` (built aside, renamed in)."""
    import onnx
    import onnxruntime as ort
    import yaml

    output = Path(output)
    _prepare_output(output, config.overwrite)
    info = inspect(source.path)
    check_contrib_ops(info, config.allow_contrib_ops, source.path)
    if split is not None and info.props.get("lineage.dataset_sha256") and split.dataset_sha256 \
            and split.dataset_sha256 != info.props["lineage.dataset_sha256"]:
        raise StageError(f"the test split (dataset {split.dataset_sha256[:12]}) is not the data this model was trained "
                         f"on (dataset {info.props['lineage.dataset_sha256'][:12]}); pass the --workdir it was trained "
                         "in, or --samples 0")
    name = config.name or default_name(source, info)
    if config.format == "kserve":
        if not config.name and _k8s_name(name) != name:
            log.info("InferenceService name %r (from %r, made a valid Kubernetes name)", _k8s_name(name), name)
        name = _k8s_name(name) if not config.name else name
    meta = ModelMeta.from_proto(info.proto, source.path.name)  # refuses a file that does not say how to feed it
    doc = describe(info, meta, source, split if config.format == "bundle" else None)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model_dir = {"bundle": tmp, "kserve": tmp, "triton": tmp / name / str(config.version)}[config.format]
        model_dir.mkdir(parents=True, exist_ok=True)
        model_path = model_dir / "model.onnx"
        # Re-saved with every weight inside: one file to ship, whatever the source's layout.
        onnx.save(info.proto, str(model_path), save_as_external_data=False)
        sha = sha256_file(model_path)
        doc["model"].update({"sha256": sha, "size_bytes": model_path.stat().st_size})
        outputs = verify(model_path, meta, split if config.format == "bundle" else None)
        doc["runtime"]["verified_with"] = {"onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
                                           "onnx_pipeline": PRODUCT_VERSION}
        accuracy, n_samples = None, 0
        if config.format == "bundle":
            if outputs is not None and meta.task == "classification" and meta.labels:
                accuracy = float(meta.evaluate(outputs, split.x, split.y)["accuracy"])
                doc["runtime"]["verified_with"].update({"test_samples": int(len(split.y)), "test_accuracy": accuracy})
            if outputs is not None and config.samples != 0:
                records = sample_records(split, outputs, doc, config.samples)
                n_samples = len(records)
                (tmp / "samples.json").write_text(json.dumps({
                    "about": "raw test inputs (before preprocessing), true labels, and ONNX Runtime's outputs for them",
                    "split": "test", "input": {"dtype": str(split.x.dtype), "shape": [n_samples, *split.x.shape[1:]],
                                               "layout": doc["input"]["layout"]},
                    "tolerance": {"atol": 1e-4, "rtol": 1e-3},
                    "samples": records}) + "\n")
            doc["samples"] = {"file": "samples.json" if n_samples else None, "count": n_samples, "split": "test"}
            (tmp / "model.json").write_text(json.dumps(doc, indent=2) + "\n")
            (tmp / "README.md").write_text(_bundle_readme(doc, name, n_samples, sha))
        elif config.format == "triton":
            labels = doc.get("labels")
            label_file = "labels.txt" if labels else None
            if label_file:
                (tmp / name / label_file).write_text("\n".join(labels) + "\n")
            (tmp / name / "config.pbtxt").write_text(
                triton_config(doc, info, name, config.batching, label_file))
        else:
            (tmp / "inference-service.yaml").write_text(
                f"# KServe InferenceService for {name}, written by onnx-pipeline {PRODUCT_VERSION}.\n"
                f"# Upload model.onnx to {config.storage_uri}/model.onnx, then: kubectl apply -f inference-service.yaml\n"
                + yaml.safe_dump(kserve_manifest(name, config.storage_uri, doc, config.image), sort_keys=False))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _install(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("packaged %s as %s in %s (%s)", source.uri, config.format, output, ", ".join(files))
    return Result(format=config.format, output=str(output), name=name, files=files, sha256=sha,
                  samples=n_samples, verified_accuracy=accuracy)
