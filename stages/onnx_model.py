"""An exported ONNX file and what its metadata says: opened, described, fed, run and scored in one place.

``ModelMeta`` is the typed record of a file's ``metadata_props`` read together with its graph
signature: task, labels, the input the metadata describes (name, dtype, shape, layout, value range),
how raw data becomes that input (``Preprocessing``), the outputs and their meaning, metrics, lineage,
variant, and the raw props. The graph is the truth for names, dtypes and shapes; the metadata must
agree with it. A file whose metadata does not say how to feed it is refused while it is parsed, with
one ``StageError`` naming the missing key and the fix, so quantize, benchmark, register, package and
promote all refuse it with the same sentence.

``OnnxModel`` is that record over an ONNX Runtime session (``stages.predictors.OrtPredictor``):
``feed`` turns raw samples (as data.npz stores them, ``Data.split(name, normalized=False)``) into the
arrays the file takes, ``run`` runs feeds in batches, ``predict`` does both, and ``score`` gives the
task's primary metric (``stages.metrics.score``) on a split.

The ``preprocessing`` property (JSON) is written by export (``Preprocessing.from_dataset``) and read
here, so its format has one owner. It is one of:

- in the graph, ``{"applied_in_graph": true, "mean": ..., "std": ..., ...}``: the file takes the raw
  input, cast to its input dtype, and normalizes it itself;
- outside the graph, ``{"applied_in_graph": false, "mean": m, "std": s, ...}``: the file takes
  ``(float32(raw) - mean) / std``, with scalar statistics or one value per entry of axis 1;
- none, ``{"applied_in_graph": false, "steps": []}``: the file takes its input as is (cast to its
  dtype). This says that nothing is to be done, which a missing key does not: a missing
  ``preprocessing`` is refused, never guessed.

Single-input files are fed from an array; a file with several inputs is fed from a dict of arrays by
input name (the metadata's ``input.name`` is the one the preprocessing applies to; the others are
cast to their dtype).

A file the pipeline did not make (``stages.import_onnx``) is described here too, by ``foreign_metadata``:
the same keys our exports carry, with what the file and the recipe do not say marked ``unknown`` (task,
layout, and the preprocessing as ``UNKNOWN_PREPROCESSING``: fed as is, ``"known": false``). A graph
whose batch dimension is fixed (``ModelMeta.fixed_batch``) is run in batches of exactly that size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from stages.common import BadFile, StageError, one_line
from stages.dataset import normalize
from stages.predictors import Device, OrtPredictor

UNKNOWN = "unknown"  # what a field holds when the file does not say (a foreign file's task, say)
NO_PREPROCESSING = {"applied_in_graph": False, "steps": []}  # "fed as is", stated explicitly
# A foreign file whose preprocessing nobody stated: fed as is, and saying that this is not known to be right.
UNKNOWN_PREPROCESSING = {**NO_PREPROCESSING, "known": False, "raw_input": UNKNOWN}
IMPORTED_FAMILY = "onnx"  # model.family of a file the pipeline imported rather than exported
FORMULA = "x = (float32(input) - mean) / std"
# ONNX tensor element type (TensorProto's name lower-cased, as ONNX Runtime writes it in "tensor(float)")
# -> numpy dtype name. bfloat16 has no numpy dtype: such an input cannot be fed from numpy.
NUMPY_DTYPES: dict[str, str] = {
    "float": "float32", "float16": "float16", "double": "float64", "bfloat16": "bfloat16", "uint8": "uint8",
    "int8": "int8", "uint16": "uint16", "int16": "int16", "uint32": "uint32", "int32": "int32", "uint64": "uint64",
    "int64": "int64", "bool": "bool", "string": "object",
}
REEXPORT = "re-export it with `pipeline export`"

Dim = int | str | None  # a fixed size, a symbolic name ("batch"), or unknown


class Signature(NamedTuple):
    """One graph input or output as the graph declares it."""

    name: str
    dtype: str | None  # numpy dtype name; None: not a tensor (a sequence, a map) or an unknown element type
    shape: tuple[Dim, ...] | None  # None: rank unknown


# ---------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocessing:
    """How raw samples become what the file takes (the ``preprocessing`` property, typed)."""

    applied_in_graph: bool
    mean: float | tuple[float, ...] | None = None  # a scalar, or one value per entry of axis 1
    std: float | tuple[float, ...] | None = None
    axis: int | None = None  # 1 when mean/std are per axis-1 entry (channels of NCHW/NCL, features of NF)
    input_dtype: str | None = None  # what the file takes, as the spec says (the graph's dtype wins when fed)
    raw_dtype: str | None = None  # what the raw samples are (data.npz's dtype)
    raw_value_range: tuple | None = None  # [lo, hi] of the raw samples
    raw_input: str = ""  # what the raw input is, in words
    formula: str = ""
    steps: tuple[str, ...] | None = None  # None: not stated; (): nothing to do
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the JSON object as written

    @property
    def kind(self) -> str:
        """``in-graph`` (feed raw), ``normalize`` (feed (raw - mean) / std) or ``none`` (feed as is)."""
        if self.applied_in_graph:
            return "in-graph"
        return "normalize" if self.mean is not None else "none"

    @property
    def known(self) -> bool:
        """False when nobody said how raw data becomes the input (an imported file fed as is by default)."""
        return self.spec.get("known", True) is not False

    @classmethod
    def stated(cls, mean: Sequence[float] | None, std: Sequence[float] | None, input_dtype: str | None,
               raw_value_range: Sequence[float] | None = None, raw_input: str = "") -> "Preprocessing":
        """What a recipe states for an imported file: ``(raw - mean) / std`` before feeding (one value, or
        one per entry of axis 1), or, without statistics, that the file takes its input as is."""
        spec: dict[str, Any] = {"applied_in_graph": False, "input_dtype": input_dtype,
                                "raw_value_range": list(raw_value_range) if raw_value_range else None,
                                "raw_input": raw_input or "stated by the import recipe"}
        if mean:
            per_axis = len(mean) > 1 or len(std or ()) > 1
            stats = "mean[c] and std[c] per channel/feature (axis 1)" if per_axis else "scalar mean and std"
            spec.update(mean=list(mean) if per_axis else mean[0], std=list(std) if per_axis else std[0],
                        axis=1 if per_axis else None, formula=FORMULA, steps=[f"{FORMULA} ({stats})"])
        else:
            spec["steps"] = []
        return cls.parse(spec)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | None, where: str = "the ONNX file") -> "Preprocessing":
        """The ``preprocessing`` property (its JSON text or the decoded object). Raises one StageError
        naming what is missing when it does not say how to feed the file."""
        if value is None:
            raise StageError(f"{where} has no `preprocessing` metadata, so how to feed it is unknown; {REEXPORT}")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, Mapping):
            raise StageError(f"{where}: its `preprocessing` metadata is not a JSON object, so how to feed it is "
                             f"unknown; {REEXPORT}")
        if not isinstance(value.get("applied_in_graph"), bool):
            raise StageError(f"{where}: its `preprocessing` metadata has no `applied_in_graph` (true or false), so "
                             f"whether the graph normalizes its input is unknown; {REEXPORT}")
        mean, std, steps = value.get("mean"), value.get("std"), value.get("steps")
        if (mean is None) != (std is None):
            missing = "std" if std is None else "mean"
            raise StageError(f"{where}: its `preprocessing` metadata has no `{missing}`, so how to normalize the "
                             f"input is unknown; {REEXPORT}")
        if not value["applied_in_graph"] and mean is None and steps != []:
            raise StageError(f"{where}: its `preprocessing` metadata is not applied in the graph and has no `mean` "
                             "and `std`, so how to normalize the input is unknown; re-export it with `pipeline "
                             'export` (a file that takes its input as is says so with "steps": [])')
        raw_range = value.get("raw_value_range")
        return cls(
            applied_in_graph=value["applied_in_graph"], mean=_stat(mean), std=_stat(std),
            axis=value.get("axis") if value.get("axis") is not None else (1 if isinstance(mean, list) else None),
            input_dtype=value.get("input_dtype"), raw_dtype=value.get("raw_dtype"),
            raw_value_range=tuple(raw_range) if isinstance(raw_range, list) else None,
            raw_input=str(value.get("raw_input") or ""), formula=str(value.get("formula") or ""),
            steps=tuple(str(s) for s in steps) if isinstance(steps, list) else None,
            spec=MappingProxyType(dict(value)))

    @classmethod
    def from_dataset(cls, info: Mapping[str, Any], in_graph: bool) -> "Preprocessing":
        """What export writes for a file made from this dataset (dataset.json): its normalization, in
        the graph (the file takes the raw input) or not (the file takes normalized float32)."""
        norm = info["normalization"]
        mean, std = norm["mean"], norm["std"]
        raw_dtype = str(info.get("raw_dtype") or info.get("dtype") or "float32")
        per_axis = isinstance(mean, (list, tuple)) or isinstance(std, (list, tuple))
        stats = "mean[c] and std[c] per channel/feature (axis 1)" if per_axis else "scalar mean and std"
        steps = ([] if raw_dtype == "float32" else [f"cast {raw_dtype} to float32"]) + [f"{FORMULA} ({stats})"]
        return cls.parse({
            "applied_in_graph": bool(in_graph),
            "input_dtype": raw_dtype if in_graph else "float32",
            "raw_dtype": raw_dtype,
            "raw_value_range": info.get("value_range"),
            "raw_input": info.get("description") or "raw features",
            "formula": FORMULA,
            "mean": mean,
            "std": std,
            "axis": 1 if per_axis else None,
            # in the graph: what the file does itself; outside: what the caller must do before feeding it
            "steps": steps,
        })

    def to_json(self) -> str:
        return json.dumps(dict(self.spec))

    def apply(self, x_raw: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """Raw samples -> the array the file takes (``dtype``: the graph's input dtype)."""
        dtype = dtype or self.input_dtype or "float32"
        if self.kind == "normalize":
            return np.ascontiguousarray(normalize(x_raw, self.mean, self.std).astype(dtype, copy=False))
        return np.ascontiguousarray(np.asarray(x_raw).astype(dtype, copy=False))

    def normalized(self, x_raw: np.ndarray) -> np.ndarray:
        """Raw samples in the normalized space ``(x - mean) / std`` (float32 as they are when the file
        carries no statistics): where a VAE's reconstruction lives, in or out of the graph."""
        if self.mean is None:
            return np.asarray(x_raw, dtype=np.float32)
        return normalize(x_raw, self.mean, self.std)

    def fed_range(self, raw_range: Sequence | None = None) -> list | None:
        """The value range of what the file takes, from the raw range (default: the spec's): the raw
        range itself unless normalization happens before feeding, then its image, per axis-1 entry."""
        lo_hi = raw_range if raw_range is not None else self.raw_value_range
        if lo_hi is None or self.kind != "normalize":
            return list(lo_hi) if lo_hi is not None else None
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return [np.round((np.float64(b) - mean) / std, 6).tolist() for b in lo_hi[:2]]


def _stat(value: Any) -> float | tuple[float, ...] | None:
    if value is None:
        return None
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)


# ---------------------------------------------------------------- the record

@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str | None  # numpy dtype name, from the graph
    shape: tuple[Dim, ...] | None  # from the graph
    layout: str | None = None  # e.g. NCHW, NCL, NF (metadata `input.layout`); None: unknown
    value_range: list | None = None  # [lo, hi] of what the file takes (per axis-1 entry when normalized per channel)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dtype: str | None
    shape: tuple[Dim, ...] | None
    meaning: str = ""  # metadata `output.meaning`


@dataclass(frozen=True)
class ModelMeta:
    """What an ONNX file says about itself, typed. Build it with ``parse``, ``from_proto`` or ``read``."""

    where: str  # the file's name, for messages
    task: str  # classification | regression | vae | unknown
    labels: tuple[str, ...]  # class names (classification)
    target_names: tuple[str, ...]  # regression targets
    input: InputSpec  # the input the metadata describes and the preprocessing applies to
    inputs: tuple[InputSpec, ...]  # every graph input, in graph order
    preprocessing: Preprocessing
    outputs: tuple[OutputSpec, ...]  # graph order
    metrics: Mapping[str, Any]  # `metrics.*` props (numbers, or JSON such as metrics.primary)
    lineage: Mapping[str, str]  # `lineage.*` props
    variant: str  # fp32, int8-static, ...; "" when unsaid
    family: str  # model.family; "" when unsaid
    props: Mapping[str, str]  # every metadata_props entry as written

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def primary_output(self) -> str:
        """The output a task's metric reads: a classifier's class scores (logits, else probabilities),
        else the first output."""
        names = self.output_names
        if self.task == "classification":
            return next((n for n in ("logits", "probabilities") if n in names), names[0])
        return names[0]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph insists on (every input's first dimension is this number; a foreign
        file exported at batch 1, say), or None when the batch dimension is free."""
        firsts = {i.shape[0] if i.shape else None for i in self.inputs}
        first = firsts.pop() if len(firsts) == 1 else None
        return first if isinstance(first, int) and first > 0 else None

    def class_indices(self, names: Sequence[str]) -> np.ndarray:
        """Dataset class names (``label_names``: class i of data.npz is ``names[i]``) -> the index of the
        file's output each one is: by name when the file has labels that include them (our own exports,
        where the two lists are the same), else the name read as an index when every name is an integer
        (a foreign classifier's ImageNet ids: prepare numbers only the classes present), else the position."""
        if self.labels and set(names) <= set(self.labels):
            return np.array([self.labels.index(n) for n in names], dtype=np.int64)
        if names and all(str(n).isdigit() for n in names):
            return np.array([int(n) for n in names], dtype=np.int64)
        return np.arange(len(names), dtype=np.int64)

    @classmethod
    def parse(cls, props: Mapping[str, str], inputs: Sequence[Signature], outputs: Sequence[Signature],
              where: str = "the ONNX file") -> "ModelMeta":
        """Metadata props plus the graph's signature -> the record; StageError when the file cannot be fed."""
        props = {str(k): str(v) for k, v in props.items()}
        preprocessing = Preprocessing.parse(props.get("preprocessing"), where)
        if not inputs or not outputs:
            raise StageError(f"{where} declares {len(inputs)} inputs and {len(outputs)} outputs; an ONNX model "
                             f"needs at least one of each; {REEXPORT}")
        names = [s.name for s in inputs]
        named = props.get("input.name")
        if named and named not in names:
            raise StageError(f"{where}: metadata input.name is {named!r} but the graph's "
                             f"{'input is ' + repr(names[0]) if len(names) == 1 else 'inputs are ' + repr(names)}; "
                             f"{REEXPORT}")
        if not named and len(names) > 1:
            raise StageError(f"{where} has {len(names)} inputs {names} and no `input.name` metadata saying which "
                             f"one `preprocessing` applies to; {REEXPORT}")
        described = next(s for s in inputs if s.name == (named or names[0]))
        meta_dtype = props.get("input.dtype")
        if meta_dtype and described.dtype and meta_dtype != described.dtype:
            raise StageError(f"{where}: metadata input.dtype is {meta_dtype!r} but the graph takes {described.dtype}; "
                             f"{REEXPORT}")
        value_range = _json(props, "input.value_range")
        described_spec = InputSpec(described.name, described.dtype, described.shape,
                                   layout=_known(props.get("input.layout")),
                                   value_range=value_range if value_range is not None else preprocessing.fed_range())
        meaning = _json(props, "output.meaning", "")
        metrics = {k[len("metrics."):]: _number(v) for k, v in props.items() if k.startswith("metrics.")}
        if isinstance(_json(props, "metrics"), dict):
            metrics.update(_json(props, "metrics"))
        lineage = {k[len("lineage."):]: v for k, v in props.items() if k.startswith("lineage.")}
        if isinstance(_json(props, "lineage"), dict):
            lineage.update(_json(props, "lineage"))
        return cls(
            where=where, task=_task(props),
            labels=_names(_json(props, "labels")), target_names=_names(_json(props, "target_names")),
            input=described_spec,
            inputs=tuple(described_spec if s.name == described.name else InputSpec(s.name, s.dtype, s.shape)
                         for s in inputs),
            preprocessing=preprocessing,
            outputs=tuple(OutputSpec(s.name, s.dtype, s.shape,
                                     meaning=str(meaning.get(s.name, "") if isinstance(meaning, dict) else meaning))
                          for s in outputs),
            metrics=MappingProxyType(metrics), lineage=MappingProxyType(lineage),
            variant=props.get("variant", ""), family=props.get("model.family", ""), props=MappingProxyType(props))

    @classmethod
    def from_proto(cls, proto, where: str = "the ONNX file", props: Mapping[str, str] | None = None) -> "ModelMeta":
        """From a loaded ``onnx.ModelProto`` (weights need not be loaded). ``props``: describe the
        graph with these metadata props instead of its own."""
        own = {p.key: p.value for p in proto.metadata_props}
        return cls.parse(own if props is None else props, *signature(proto), where)

    @classmethod
    def read(cls, path: Path | str) -> "ModelMeta":
        """Of the file at ``path``, without a session (weights are not loaded)."""
        import onnx

        path = Path(path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except FileNotFoundError:
            raise StageError(f"{path} not found") from None
        except Exception as e:
            raise BadFile(path, f"is not a readable ONNX model ({one_line(e, 200)}): it is truncated, corrupt or not "
                          "ONNX", REEXPORT) from None
        return cls.from_proto(proto, path.name)

    # -------------------------------------------------------------- feeding and judging

    def feed(self, x_raw: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw samples -> {input name: what the file takes}: cast to the input dtype when the
        preprocessing is in the graph (or there is none), else ``(x - mean) / std``. A file with several
        inputs takes a dict by input name; inputs other than the described one are cast as they are."""
        if isinstance(x_raw, Mapping):
            given, wanted = set(x_raw), {i.name for i in self.inputs}
            if given != wanted:
                raise StageError(f"{self.where} takes inputs {sorted(wanted)}; got {sorted(given)}")
            return {i.name: self._feed_one(i, np.asarray(x_raw[i.name])) for i in self.inputs}
        if len(self.inputs) != 1:
            raise StageError(f"{self.where} takes {len(self.inputs)} inputs {[i.name for i in self.inputs]}; "
                             "pass a dict of arrays by input name")
        return {self.input.name: self._feed_one(self.input, np.asarray(x_raw))}

    def _feed_one(self, spec: InputSpec, x: np.ndarray) -> np.ndarray:
        if spec.dtype is None or spec.dtype == "bfloat16":
            raise StageError(f"{self.where}: input {spec.name!r} is not a tensor numpy can fill "
                             f"({spec.dtype or 'not a tensor'})")
        if spec.shape is not None and (x.ndim != len(spec.shape) or any(
                isinstance(w, int) and w != g for w, g in zip(spec.shape[1:], x.shape[1:]))):
            raise StageError(f"{self.where}: input {spec.name!r} takes samples shaped {_shape_text(spec.shape[1:])}, "
                             f"got {list(x.shape[1:])} (arrays of shape {list(x.shape)})")
        if spec.name == self.input.name:
            return self.preprocessing.apply(x, spec.dtype)
        return np.ascontiguousarray(x.astype(spec.dtype, copy=False))

    def evaluate(self, outputs: Mapping[str, np.ndarray], x_raw: np.ndarray, y: np.ndarray) -> dict:
        """``stages.metrics.score`` of the file's outputs for raw samples ``x_raw`` with truth ``y``:
        classification accuracy and the rest, regression r2, vae reconstruction MSE against the
        normalized inputs (whatever the file is fed). Has a ``primary`` entry."""
        from stages.metrics import PRIMARY, score

        if self.task not in PRIMARY:
            raise StageError(f"{self.where}: its task is {self.task!r} (metadata `task`), which has no metric; "
                             f"a file that is scored must say one of {sorted(PRIMARY)}")
        if self.task == "vae":
            return score("vae", self.preprocessing.normalized(x_raw), dict(outputs), [])
        if np.ndim(y) == 2 and np.shape(y)[1] == 0:  # prepare.task unlabeled: inputs without targets
            raise StageError(f"{self.where} cannot be scored on data without labels (prepare.task unlabeled); "
                             "compare it with its fp32 file instead, as quantize does, or prepare labeled data")
        scores = np.asarray(outputs[self.primary_output])
        if self.task == "classification":
            labels = list(self.labels) or [str(i) for i in range(scores.shape[-1] if scores.ndim > 1 else 1)]
        else:
            labels = list(self.target_names)
        return score(self.task, y, scores, labels)


def _task(props: Mapping[str, str]) -> str:
    """The one task default: the file's ``task``; without one, a file that names ``labels`` is a
    classifier (files from before tasks were); else unknown."""
    return props.get("task") or ("classification" if "labels" in props else UNKNOWN)


def _known(value: str | None) -> str | None:
    """A metadata value, or None when it is missing or says ``unknown``."""
    return value if value and value != UNKNOWN else None


def _json(props: Mapping[str, str], key: str, default: Any = None) -> Any:
    raw = props.get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a plain string value


def _number(v: str) -> Any:
    """A metric as written in metadata_props: a number, a JSON document (e.g. metrics.primary) or text."""
    try:
        return float(v)
    except (TypeError, ValueError):
        pass
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return v


def _names(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _shape_text(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def _proto_signature(value_info) -> Signature:
    import onnx

    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        return Signature(value_info.name, None, None)
    t = value_info.type.tensor_type
    dtype = NUMPY_DTYPES.get(onnx.TensorProto.DataType.Name(t.elem_type).lower()) if t.elem_type else None
    if not t.HasField("shape"):
        return Signature(value_info.name, dtype, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return Signature(value_info.name, dtype, dims)


def _ort_signature(node_arg) -> Signature:
    """ONNX Runtime's NodeArg: type "tensor(float)", shape with ints, names or None."""
    kind = node_arg.type or ""
    dtype = NUMPY_DTYPES.get(kind[len("tensor("):-1]) if kind.startswith("tensor(") else None
    shape = node_arg.shape
    return Signature(node_arg.name, dtype, tuple(shape) if shape is not None and kind.startswith("tensor(") else None)


def signature(proto) -> tuple[list[Signature], list[Signature]]:
    """(inputs, outputs) a loaded ``onnx.ModelProto`` declares; initializers an IR < 4 file lists among its
    inputs are weights, not inputs."""
    initializers = {t.name for t in proto.graph.initializer}
    return ([_proto_signature(v) for v in proto.graph.input if v.name not in initializers],
            [_proto_signature(v) for v in proto.graph.output])


def foreign_metadata(inputs: Sequence[Signature], outputs: Sequence[Signature], *, described: str, task: str,
                     labels: Sequence[str], layout: str | None, preprocessing: Preprocessing,
                     value_range: Sequence | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The metadata_props an imported file gets: the keys export writes (``stages.export.metadata``), from
    the graph's signature and what the recipe states; what nobody states says ``unknown`` (task, layout),
    or is left out (labels, value range) rather than guessed. ``extra``: import's own keys (source,
    checks, batch), added as they are."""
    from stages.common import PRODUCT_VERSION

    spec = next(s for s in inputs if s.name == described)
    shape = list(spec.shape) if spec.shape is not None else None
    props = {
        "onnx_pipeline.version": PRODUCT_VERSION,
        "model.family": IMPORTED_FAMILY,
        "task": task or UNKNOWN,
        "input.name": described,
        "input.dtype": spec.dtype or "",
        "input.shape": json.dumps(shape),
        "input.layout": layout or UNKNOWN,
        "input.value_range": json.dumps(list(value_range) if value_range is not None else preprocessing.fed_range()),
        "preprocessing": preprocessing.to_json(),
        "output.names": json.dumps([o.name for o in outputs]),
        "output.meaning": json.dumps({o.name: UNKNOWN for o in outputs}),
        "variant": "fp32",
    }
    if labels:
        props["labels"] = json.dumps(list(labels))
        props["num_classes"] = str(len(labels))
    props.update(extra)
    # The record must describe the file: parsing it here refuses a contradiction before anything is written.
    ModelMeta.parse(props, inputs, outputs, "the imported file")
    return props


# ---------------------------------------------------------------- the file, opened

class OnnxModel:
    """An ONNX file opened in ONNX Runtime, with its metadata: feed raw data, run batched, score."""

    def __init__(self, predictor: OrtPredictor, meta: ModelMeta | None = None, props: Mapping[str, str] | None = None):
        """Over an open session. ``meta``: the record, when already parsed; ``props``: describe the file
        with these metadata props instead of its own (a variant being made, stamped only afterwards)."""
        self.predictor = predictor
        self.path = predictor.path
        self.meta = meta if meta is not None else ModelMeta.parse(
            predictor.metadata if props is None else props,
            [_ort_signature(i) for i in predictor.inputs], [_ort_signature(o) for o in predictor.outputs],
            predictor.path.name)

    @classmethod
    def open(cls, path: Path | str, *, device: Device = "cpu", props: Mapping[str, str] | None = None) -> "OnnxModel":
        """Open ``path`` (an ONNX Runtime session on ``device``) and parse its metadata; StageError when
        the file is missing or its metadata does not say how to feed it. For other session settings
        (threads, providers), open the ``OrtPredictor`` yourself and wrap it: ``OnnxModel(predictor)``."""
        if not Path(path).is_file():
            raise StageError(f"{path} not found")
        return cls(OrtPredictor(path, device=device), props=props)

    def feed(self, x_raw: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.meta.feed(x_raw)

    def run(self, feeds: Mapping[str, np.ndarray] | np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Every output for ``feeds`` (what the file takes: ``feed``'s result, or one array for a
        single-input file), ``batch_size`` samples per session call, concatenated along axis 0."""
        if not isinstance(feeds, Mapping):
            feeds = {self.meta.input.name: feeds}
        n = len(next(iter(feeds.values())))
        fixed = self.meta.fixed_batch  # a graph that takes exactly this many rows: run in such batches
        batch_size = fixed or batch_size
        parts = []
        for i in range(0, max(n, 1), batch_size):
            chunk = {k: v[i:i + batch_size] for k, v in feeds.items()}
            rows = len(next(iter(chunk.values())))
            if fixed and 0 < rows < fixed:  # the last partial batch: pad with its last row, keep the real rows
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], fixed - rows, axis=0)]) for k, v in chunk.items()}
            parts.append({k: v[:rows] if fixed else v for k, v in self.predictor.run(chunk).items()})
        return {name: np.concatenate([p[name] for p in parts]) for name in self.predictor.output_names}

    def predict(self, x_raw: np.ndarray | Mapping[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Raw samples in, every output out: ``run(feed(x_raw))``."""
        return self.run(self.feed(x_raw), batch_size)

    def evaluate(self, x_raw: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
        """Every metric of the task (``stages.metrics.score``) on raw samples and their truth."""
        return self.meta.evaluate(self.predict(x_raw, batch_size), x_raw, y)

    def score(self, x_raw: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
        """The task's primary metric ``{"name", "value", "higher_is_better"}`` on raw samples and their
        truth: classification accuracy, regression r2, vae reconstruction MSE (normalized units)."""
        return self.evaluate(x_raw, y, batch_size)["primary"]
