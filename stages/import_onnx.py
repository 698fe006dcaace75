"""import: an ONNX file the pipeline did not make -> checked, described, copied into the run directory.

The file is read, never written: the run directory gets a copy (model.onnx, written under a temporary
name and renamed) that carries the metadata our own exports carry, so quantize, benchmark, register,
serve, package and predict treat it like one of ours. Each check fails with one ``StageError`` that
names the file, what is wrong and the fix:

1. it is a readable ONNX protobuf (a truncated download is named as such) that ``onnx.checker``
   accepts with ``full_check`` (types and shapes inferred);
2. its ``ai.onnx`` opset is 9 or newer (older graphs use operator versions ONNX Runtime's quantizer
   cannot rewrite), and its IR version is one the installed ONNX Runtime reads;
3. ONNX Runtime creates a session for it on the CPU: every operator has a kernel (the error names
   each operator in a domain ONNX Runtime does not ship, plus the one it stopped at).

Description (``stages.onnx_model.foreign_metadata``, the one writer of the keys): inputs, outputs,
dtypes and shapes from the graph; task, labels, layout and preprocessing from the recipe when it states
them, else from the file's own metadata when that already describes it (a file exported by this
pipeline, re-imported), else ``unknown`` (preprocessing: fed as is, marked not known).

Batch dimension: a graph whose inputs all have a fixed first dimension (exported at batch 1, the
common case) is made symbolic when ``dynamic_batch`` allows and the graph does: the first dimension of
every input and output becomes ``batch``, intermediate shape annotations are dropped, and the outputs
for a batch of ``VERIFY_ROWS`` seeded inputs must equal, row by row, the original file's outputs for
each row alone (``atol`` + ``rtol``). When anything refuses (a Reshape to a constant ``[1, ...]``, say)
the copy keeps the fixed batch and the report says why; quantize, benchmark, register and the server
then run it at that batch size (``ModelMeta.fixed_batch``) instead of failing later.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.common import StageError, atomic_path, sha256_file, stamp_onnx, write_json
from stages.contract import RunDir, Tracker
from stages.onnx_model import (IMPORTED_FAMILY, UNKNOWN, UNKNOWN_PREPROCESSING, ModelMeta, Preprocessing,
                               foreign_metadata, signature)

log = logging.getLogger(__name__)

MIN_OPSET = 9  # ai.onnx; the light model zoo files the onnx package ships are opset 9
VERIFY_ROWS = 3  # rows checked against the original, one at a time, after the batch dim is made symbolic
# Domains whose operators ONNX Runtime ships kernels for; a node in any other domain needs a custom-op library.
ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.training",
               "ai.onnx.preview.training", "com.microsoft.experimental", "com.ms.internal.nhwc", "org.pytorch.aten"}
CONVERT = ("python -c \"import onnx, onnx.version_converter as v; "
           "onnx.save(v.convert_version(onnx.load('IN.onnx'), 13), 'OUT.onnx')\"")


@dataclass(frozen=True)
class Config:
    """The recipe's ``model:`` section for ``family: onnx``: the file and what is known about it."""

    path: str = ""  # the .onnx file (read only; the run directory gets a copy)
    task: Literal["unknown", "classification", "regression"] = "unknown"
    labels: tuple[str, ...] = ()  # class names, in output order (a classifier)
    labels_file: str = ""  # or a text file with one class name per line
    input: str = ""  # the input the metadata describes and the preprocessing applies to; default the first
    layout: Literal["unknown", "NCHW", "NHWC", "NCL", "NLC", "NF"] = "unknown"
    mean: tuple[float, ...] = ()  # the file takes (raw - mean) / std: one value, or one per channel (axis 1)
    std: tuple[float, ...] = ()
    fed_as_is: bool = False  # state that the file takes raw data as it is (no normalization outside the graph)
    raw_value_range: tuple[float, ...] = ()  # [lo, hi] of the raw data, e.g. [0, 255]
    dynamic_batch: bool = True  # make a fixed batch dimension symbolic when the graph allows (verified)
    atol: float = 1e-5  # row-by-row check of the symbolic batch against the original
    rtol: float = 1e-4

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("`path` is required for family onnx: the .onnx file to import")
        if bool(self.mean) != bool(self.std):
            raise ValueError(f"`mean` and `std` go together (the file takes (raw - mean) / std); got mean "
                             f"{list(self.mean)} and std {list(self.std)}")
        if self.mean and len(self.mean) != len(self.std):
            raise ValueError(f"`mean` and `std` need as many values (one, or one per channel); got {len(self.mean)} "
                             f"and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"`std` values must be > 0, got {list(self.std)}")
        if self.fed_as_is and self.mean:
            raise ValueError("`fed_as_is: true` says the file takes raw data unchanged; drop it or drop mean/std")
        if self.labels and self.labels_file:
            raise ValueError("give the class names once: `labels` or `labels_file`, not both")
        if self.raw_value_range and (len(self.raw_value_range) != 2 or self.raw_value_range[0] >= self.raw_value_range[1]):
            raise ValueError(f"`raw_value_range` must be [lo, hi] with lo < hi, got {list(self.raw_value_range)}")
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"`atol` and `rtol` must be >= 0, got {self.atol}, {self.rtol}")


@dataclass(frozen=True)
class Result:
    source: str
    sha256: str
    opset: int
    inputs: list[dict]
    outputs: list[dict]
    batch: dict = field(default_factory=dict)
    task: str = UNKNOWN

    def summary(self) -> str:
        b = self.batch
        batch = ("dynamic batch" if b.get("dynamic") and not b.get("made_dynamic") else
                 f"batch made dynamic (was {b.get('fixed')}, verified)" if b.get("made_dynamic") else
                 f"fixed batch {b.get('fixed')}")
        return (f"{Path(self.source).name} opset {self.opset}, {len(self.inputs)} in / {len(self.outputs)} out, "
                f"{batch}, task {self.task} ({self.sha256[:8]})")


# ---------------------------------------------------------------- the checks

def load_checked(path: Path):
    """The file as an ``onnx.ModelProto``, checked by ``onnx.checker`` (full check); StageError otherwise."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise StageError(f"model.path {path}: no such file; set model.path to the .onnx file to import")
    if path.stat().st_size == 0:
        raise StageError(f"model.path {path}: the file is empty; copy or download it again")
    try:
        proto = onnx.load(str(path))
    except DecodeError as e:
        raise StageError(f"model.path {path}: not a readable ONNX model, the protobuf does not parse ({e}); the file "
                         "is truncated or not ONNX: copy or download it again") from None
    except Exception as e:  # external data missing, a directory, ...
        raise StageError(f"model.path {path}: cannot be loaded as ONNX ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}); check the file and any external data beside it") from None
    if not proto.graph.node:
        raise StageError(f"model.path {path}: the graph has no nodes (a truncated or empty file); copy or download "
                         "it again")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        raise StageError(f"model.path {path}: onnx.checker refuses it ({first}); fix or re-export the model in the "
                         "framework that made it") from None
    return proto


def check_opset(proto, where: str) -> int:
    """The ai.onnx opset, refused below MIN_OPSET with the fix."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise StageError(f"{where}: it imports no ai.onnx opset; a model needs standard operators")
    if opset < MIN_OPSET:
        raise StageError(f"{where} uses opset {opset} (ai.onnx); the pipeline takes opset {MIN_OPSET} and newer. "
                         f"Convert it with onnx's version converter: {CONVERT}")
    return int(opset)


def open_session(path: Path, proto, where: str):
    """An ONNX Runtime CPU session over ``path``; StageError naming every operator it cannot run."""
    from stages.sessions import SessionSettings, create_session

    try:
        return create_session(path, SessionSettings(device="cpu"))
    except Exception as e:
        message = str(e)
        ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message)
        if ir:
            raise StageError(f"{where} has IR version {ir[1]}; ONNX Runtime {_ort_version()} reads IR {ir[2]} and "
                             f"older. Save it with an older IR version: python -c \"import onnx; m = onnx.load('IN.onnx'); "
                             f"m.ir_version = {ir[2]}; onnx.save(m, 'OUT.onnx')\"") from None
        named = {f"{d}:{op}" for d, op in re.findall(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op", message)}
        named |= {f"{op} (opset {v})" for op, v in re.findall(r"Could not find an implementation for (\w+)\((\d+)\)", message)}
        foreign = {f"{n.domain}:{n.op_type}" for n in proto.graph.node if n.domain not in ORT_DOMAINS}
        ops = sorted(named | foreign)
        detail = message.split(" : ", 2)[-1].strip().splitlines()[0][:300]
        if ops:
            raise StageError(f"{where}: ONNX Runtime {_ort_version()} has no kernel for {', '.join(ops)} ({detail}); "
                             "replace those operators with standard ONNX ones before importing (custom-op libraries "
                             "are not supported)") from None
        raise StageError(f"{where}: ONNX Runtime {_ort_version()} cannot create a session for it ({detail}); fix or "
                         "re-export the model") from None


def _quiet():
    """Session options that log nothing below errors (a failed attempt is reported by us, once)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


# ---------------------------------------------------------------- the batch dimension

def fixed_batch(proto) -> int | None:
    """The fixed first dimension every graph input shares (1 for most foreign files), or None."""
    inputs, _ = signature(proto)
    firsts = {s.shape[0] if s.shape else None for s in inputs}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, int) else None


def with_symbolic_batch(proto):
    """A copy whose inputs' and outputs' first dimension is the symbol ``batch``, without intermediate
    shape annotations (they may repeat the fixed size); shape inference must still accept it."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    initializers = {t.name for t in out.graph.initializer}
    for value in [*[v for v in out.graph.input if v.name not in initializers], *out.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.HasField("tensor_type") and len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del out.graph.value_info[:]
    onnx.checker.check_model(out, full_check=True)
    return out


def verification_feeds(proto, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs shaped as the graph says (free dims 1): floats uniform in [0, 1), integers 0 or 1
    (valid as indices too), booleans at random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in signature(proto)[0]:
        shape = [rows, *[d if isinstance(d, int) and d > 0 else 1 for d in (s.shape or (1,))[1:]]]
        if s.dtype is None or s.dtype in ("object", "bfloat16"):
            raise StageError(f"input {s.name!r} is {s.dtype or 'not a tensor'}, which cannot be fed from numpy; "
                             "the pipeline imports models whose inputs are numeric tensors")
        kind = np.dtype(s.dtype).kind
        feeds[s.name] = (rng.uniform(0, 1, shape).astype(s.dtype) if kind == "f" else
                         rng.integers(0, 2, shape).astype(s.dtype) if kind in "iu" else rng.integers(0, 2, shape).astype(bool))
    return feeds


def try_symbolic_batch(proto, original_session, config: Config) -> tuple[Any, str]:
    """(the copy with a symbolic batch dim, "") when the graph allows and every row checks out, else
    (None, why not)."""
    import onnxruntime as ort

    try:
        candidate = with_symbolic_batch(proto)
        session = ort.InferenceSession(candidate.SerializeToString(), _quiet(), providers=["CPUExecutionProvider"])
        feeds = verification_feeds(proto, VERIFY_ROWS)
        together = session.run(None, feeds)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return None, f"the graph does not run at batch {VERIFY_ROWS} ({reason})"
    names = [o.name for o in original_session.get_outputs()]
    for row in range(VERIFY_ROWS):
        alone = original_session.run(None, {k: v[row:row + 1] for k, v in feeds.items()})
        for name, want, got in zip(names, alone, together):
            if got.shape[:1] != (VERIFY_ROWS,) or got.shape[1:] != want.shape[1:]:
                return None, (f"output {name!r} is {list(got.shape)} at batch {VERIFY_ROWS}, not "
                              f"[{VERIFY_ROWS}, {', '.join(map(str, want.shape[1:]))}]")
            if not np.allclose(got[row:row + 1], want, atol=config.atol, rtol=config.rtol, equal_nan=True):
                diff = float(np.max(np.abs(got[row:row + 1].astype(np.float64) - want.astype(np.float64))))
                return None, (f"row {row} of output {name!r} at batch {VERIFY_ROWS} differs from the original at "
                              f"batch 1 by up to {diff:.3g} (atol {config.atol}, rtol {config.rtol})")
    return candidate, ""


# ---------------------------------------------------------------- description

def stated_labels(config: Config) -> list[str]:
    if config.labels_file:
        path = Path(config.labels_file)
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise StageError(f"model.labels_file {path}: cannot be read ({e.strerror}); give a text file with one "
                             "class name per line") from None
        if not names:
            raise StageError(f"model.labels_file {path} holds no class names; one name per line")
        return names
    return list(config.labels)


def describe(config: Config, proto, where: str, extra: dict[str, str]) -> dict[str, str]:
    """metadata_props for the copy: the recipe's statements, else the file's own metadata when it
    already says how to feed the file, else unknown."""
    inputs, outputs = signature(proto)
    names = [s.name for s in inputs]
    if config.input and config.input not in names:
        raise StageError(f"model.input {config.input!r} is not an input of {where}; its inputs are {names}")
    own = {p.key: p.value for p in proto.metadata_props}
    try:
        theirs = ModelMeta.parse(own, inputs, outputs, where) if "preprocessing" in own else None
    except StageError:
        theirs = None  # metadata that does not describe this graph is not trusted
    described = config.input or (theirs.input.name if theirs else names[0])
    spec = next(s for s in inputs if s.name == described)
    labels = stated_labels(config) or (list(theirs.labels) if theirs else [])
    task = config.task if config.task != UNKNOWN else (theirs.task if theirs else UNKNOWN)
    if labels and task == UNKNOWN:
        task = "classification"  # class names are a statement that the file classifies
    if config.mean or config.fed_as_is:
        pre = Preprocessing.stated(config.mean, config.std, spec.dtype, config.raw_value_range or None)
    elif theirs is not None and described == theirs.input.name:
        pre = theirs.preprocessing
    else:
        pre = Preprocessing.parse({**UNKNOWN_PREPROCESSING, "input_dtype": spec.dtype})
    layout = config.layout if config.layout != UNKNOWN else ((theirs.input.layout if theirs else None) or UNKNOWN)
    if task == "classification" and labels:
        _check_labels(labels, outputs, theirs.primary_output if theirs else None, where)
    value_range = (pre.fed_range(list(config.raw_value_range)) if config.raw_value_range else
                   theirs.input.value_range if theirs is not None and not config.mean else None)
    kept = {k: v for k, v in own.items() if k not in ("preprocessing",)}  # the file's own keys, ours win below
    return {**kept, **foreign_metadata(inputs, outputs, described=described, task=task, labels=labels,
                                       layout=None if layout == UNKNOWN else layout, preprocessing=pre,
                                       value_range=value_range, extra=extra)}


def _check_labels(labels: list[str], outputs, primary: str | None, where: str) -> None:
    """Class names must match the class-score output's width when the graph fixes it."""
    scores = next((o for o in outputs if o.name == primary), None) or outputs[0]
    dims = [d for d in (scores.shape or ())[1:] if d != 1]
    if len(dims) == 1 and isinstance(dims[0], int) and dims[0] != len(labels):
        raise StageError(f"{where}: {len(labels)} class names given (model.labels / labels_file) but output "
                         f"{scores.name!r} scores {dims[0]} classes; give one name per class, in output order")


def _signature_rows(sigs) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape) if s.shape is not None else None} for s in sigs]


# ---------------------------------------------------------------- the stage

def run(config: Config, rundir: "RunDir", tracker: "Tracker") -> Result:
    import onnx

    tracker.log_params({k: (json.dumps(list(v)) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()})
    source = Path(config.path)
    where = f"model.path {source}"
    proto = load_checked(source)
    opset = check_opset(proto, where)
    original = open_session(source, proto, where)
    digest = sha256_file(source)

    fixed = fixed_batch(proto)
    batch: dict[str, Any] = {"fixed": fixed, "dynamic": fixed is None, "made_dynamic": False, "reason": ""}
    graph = proto
    if fixed is not None and config.dynamic_batch:
        symbolic, why_not = try_symbolic_batch(proto, original, config)
        if symbolic is not None:
            graph = symbolic
            batch.update(dynamic=True, made_dynamic=True, verified_rows=VERIFY_ROWS,
                         reason=f"made symbolic: outputs at batch {VERIFY_ROWS} match the original row by row")
            log.info("%s: its fixed batch dimension %d is now symbolic (verified on %d rows against the original)",
                     source.name, fixed, VERIFY_ROWS)
        else:
            batch["reason"] = f"kept fixed: {why_not}"
            log.warning("%s takes batches of exactly %d (%s): quantize, benchmark, register and the server run it "
                        "at batch %d", source.name, fixed, why_not, fixed)
    elif fixed is not None:
        batch["reason"] = "kept fixed: model.dynamic_batch is false"

    inputs, outputs = signature(graph)
    if len(inputs) > 1:
        log.info("%s has %d inputs %s: it imports and serves; quantize takes one input array from a dataset, so it "
                 "refuses this file", source.name, len(inputs), [s.name for s in inputs])
    extra = {
        "lineage.source_file": str(source.resolve()),
        "lineage.source_sha256": digest,
        "lineage.dataset_sha256": "",
        "import.producer": f"{proto.producer_name} {proto.producer_version}".strip() or UNKNOWN,
        "import.opset": str(opset),
        "import.ir_version": str(proto.ir_version),
        "import.batch": json.dumps(batch),
        "import.checks": json.dumps(["onnx.checker (full)", f"opset >= {MIN_OPSET}",
                                     f"onnxruntime {_ort_version()} session (CPU)"]),
    }
    props = describe(config, graph, where, extra)
    meta = ModelMeta.parse(props, inputs, outputs, rundir.onnx.name)

    with atomic_path(rundir.onnx) as tmp:
        onnx.save(graph, str(tmp))
        stamp_onnx(tmp, props, doc=f"{source.name} imported by onnx-pipeline (original sha256 {digest}); "
                                   "see metadata_props")
        _check_copy(tmp, original, verification_feeds(proto, fixed or 1, seed=1), graph is not proto)

    result = Result(source=str(source.resolve()), sha256=digest, opset=opset, inputs=_signature_rows(inputs),
                    outputs=_signature_rows(outputs), batch=batch, task=meta.task)
    write_json(rundir.import_report, {
        **result.__dict__, "size_bytes": source.stat().st_size, "ir_version": proto.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "producer": extra["import.producer"], "described_input": meta.input.name, "task": meta.task,
        "labels": list(meta.labels), "layout": meta.input.layout or UNKNOWN,
        "preprocessing": dict(meta.preprocessing.spec), "preprocessing_known": meta.preprocessing.known,
        "copy": {"file": rundir.onnx.name, "sha256": sha256_file(rundir.onnx)}, "checks": json.loads(extra["import.checks"]),
        "unknown": [k for k, v in (("task", meta.task), ("layout", meta.input.layout), ("labels", meta.labels),
                                   ("preprocessing", meta.preprocessing.known)) if v in (UNKNOWN, None, (), False)]})
    log.info("imported %s -> %s: %s", source, rundir.onnx, result.summary())
    tracker.set_tags({"import.sha256": digest, "import.source": str(source.resolve()), "import.opset": str(opset),
                      "import.batch": json.dumps(batch)[:5000], "import.task": meta.task,
                      "import.family": IMPORTED_FAMILY})
    tracker.log_artifact(rundir.import_report)
    return result


def _check_copy(path: Path, original, feeds: dict[str, np.ndarray], batch_changed: bool) -> None:
    """The copy opens and gives the original's outputs (at the original's batch size)."""
    from stages.sessions import SessionSettings, create_session

    copy = create_session(path, SessionSettings(device="cpu"))
    for name, want, got in zip([o.name for o in original.get_outputs()], original.run(None, feeds), copy.run(None, feeds)):
        if want.shape != got.shape or not np.allclose(want, got, atol=1e-6, rtol=1e-5, equal_nan=True):
            raise StageError(f"the imported copy's output {name!r} differs from the original's"
                             f"{' after the batch dimension was made symbolic' if batch_changed else ''}; "
                             "set model.dynamic_batch: false and import again")
