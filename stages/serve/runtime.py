"""The serving runtime: one ONNX Runtime session per served model, its v2 metadata and its checks.

``ModelRuntime.infer`` is the data-plane call the HTTP routes make (and that a dynamic batcher
will wrap): it checks the request's tensors against the session's declared inputs, reporting every
mismatch at once in the field-naming style of ``protocol.ProtocolError``, runs the session and
returns named output arrays. ``load_model`` builds one from an .onnx file and warms it up, so a
server that says it is ready answers its first request at full speed. The session itself comes
from ``stages.predictors.OrtPredictor``, which picks the execution providers and records the ones
actually in use (ONNX Runtime falls back to CPU silently).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_args

import numpy as np

from stages.predictors import OrtPredictor
from stages.serve.protocol import DataType, ProtocolError, Tensor, format_shape, from_onnx

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Config:
    """The recipe's ``serve:`` section."""

    host: str = "127.0.0.1"  # loopback unless told otherwise: the server has no authentication
    port: int = 8000
    device: Device = "auto"
    intra_op_threads: int = 0  # 0: predictors.default_intra_op_threads()
    max_request_mb: float = 32.0  # request bodies above this are refused with 413

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"`host` must be a non-empty host name or IP address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"`port` must be between 1 and 65535, got {self.port!r}")
        if self.device not in get_args(Device):
            raise ValueError(f"`device` must be one of {', '.join(get_args(Device))}, got {self.device!r}")
        if isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int) \
                or self.intra_op_threads < 0:
            raise ValueError(f"`intra_op_threads` must be an int >= 0 (0: automatic), got {self.intra_op_threads!r}")
        if isinstance(self.max_request_mb, bool) or not isinstance(self.max_request_mb, (int, float)) \
                or not self.max_request_mb > 0 or math.isinf(self.max_request_mb):
            raise ValueError(f"`max_request_mb` must be a finite number > 0, got {self.max_request_mb!r}")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


@dataclass(frozen=True)
class TensorSpec:
    """One declared session input or output; ``shape`` uses -1 for dynamic dims, ``dims`` keeps
    ONNX's own dims (int, a symbolic name such as "batch", or None) for cross-input checks."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    dims: tuple[int | str | None, ...]

    @classmethod
    def from_node_arg(cls, arg) -> "TensorSpec":
        dims = tuple(arg.shape or ())
        return cls(arg.name, from_onnx(arg.type), tuple(d if isinstance(d, int) else -1 for d in dims), dims)

    def describe(self) -> dict:
        return {"name": self.name, "datatype": self.datatype.name, "shape": list(self.shape)}


class ModelRuntime:
    """One served model: a warm ONNX Runtime session plus what the v2 endpoints say about it."""

    platform = "onnxruntime_onnx"  # the v2 / Triton name for an ONNX Runtime backend

    def __init__(self, name: str, version: str, predictor: OrtPredictor, lineage: Mapping[str, Any] | None = None):
        self.name = name
        self.version = str(version)
        self.predictor = predictor
        self.lineage = dict(lineage or {})
        try:
            self.inputs = [TensorSpec.from_node_arg(a) for a in predictor.inputs]
            self.outputs = [TensorSpec.from_node_arg(a) for a in predictor.outputs]
        except ProtocolError as e:
            raise ValueError(f"{predictor.path} cannot be served over the v2 JSON protocol: {e}") from None
        self._inputs = {s.name: s for s in self.inputs}
        self._output_names = [s.name for s in self.outputs]
        # What the exporter wrote (labels, layout, normalization, training run id): strings only.
        self.metadata_props = dict(predictor.session.get_modelmeta().custom_metadata_map)
        self.ready = False

    def metadata(self) -> dict:
        """The v2 model metadata document."""
        # v2 parameter values are scalars, so structured values travel as JSON strings, the same
        # convention the exporter uses for metadata_props ("labels": "[\"0\", ...]").
        parameters: dict[str, Any] = dict(self.metadata_props)
        parameters.update({k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
                           for k, v in self.lineage.items()})
        parameters["execution_providers"] = json.dumps(self.predictor.providers)
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [s.describe() for s in self.inputs],
            "outputs": [s.describe() for s in self.outputs],
            "parameters": parameters,
        }

    def check_inputs(self, tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
        """Match request tensors to the session's inputs; every mismatch reported at once."""
        problems: list[str] = []
        feeds: dict[str, np.ndarray] = {}
        symbolic: dict[str, tuple[int, str]] = {}  # "batch" -> (size, where it was first seen)
        for i, t in enumerate(tensors):
            spec = self._inputs.get(t.name)
            if spec is None:
                problems.append(f"inputs[{i}].name: unknown input {t.name!r}; model {self.name!r} "
                                f"expects {list(self._inputs)}")
                continue
            feeds[t.name] = t.array
            if t.datatype != spec.datatype.name:
                problems.append(f"inputs[{i}].datatype: expected {spec.datatype.name} for input {t.name!r}, "
                                f"got {t.datatype}")
            shape = t.array.shape
            if len(shape) != len(spec.dims):
                problems.append(f"inputs[{i}].shape: input {t.name!r} needs {len(spec.dims)} dims "
                                f"{format_shape(spec.shape)} (-1: any size), got {format_shape(shape)}")
                continue
            for axis, (want, got) in enumerate(zip(spec.dims, shape)):
                if isinstance(want, int) and want != got:
                    problems.append(f"inputs[{i}].shape: dim {axis} of input {t.name!r} must be {want} "
                                    f"(expected {format_shape(spec.shape)}, -1: any size), got {format_shape(shape)}")
                elif isinstance(want, str):
                    # A symbolic dim shared by several inputs (say "batch") must agree across them.
                    seen = symbolic.setdefault(want, (got, f"inputs[{i}]"))
                    if seen[0] != got:
                        problems.append(f"inputs[{i}].shape: dim {axis} ({want!r}) is {got} but {seen[1]} "
                                        f"has {want!r} = {seen[0]}")
        for spec in self.inputs:
            if spec.name not in feeds:
                problems.append(f"inputs: missing input {spec.name!r} ({spec.datatype.name}, "
                                f"shape {format_shape(spec.shape)})")
        if problems:
            raise ProtocolError("; ".join(problems))
        return feeds

    def infer(self, tensors: Sequence[Tensor], requested_outputs: Sequence[str] | None = None) -> list[Tensor]:
        """Check, run, and return the requested outputs (all of them when None), in request order.

        Blocking: the HTTP layer calls this off its event loop. ONNX Runtime sessions are safe to
        run from several threads at once.
        """
        names = list(requested_outputs) if requested_outputs else self._output_names
        unknown = [f"outputs[{j}].name: unknown output {n!r}; model {self.name!r} has {self._output_names}"
                   for j, n in enumerate(names) if n not in self._output_names]
        try:
            feeds = self.check_inputs(tensors)
        except ProtocolError as e:
            raise ProtocolError("; ".join([str(e), *unknown])) from None
        if unknown:
            raise ProtocolError("; ".join(unknown))
        results = self.predictor.run(feeds, names)
        return [Tensor(n, results[n]) for n in names]

    def warm_up(self) -> None:
        """One batch-1 inference on zeros: first runs allocate memory and pick kernels (on CUDA, the
        first call can take seconds), which the first client should not pay for."""
        self.infer([Tensor(s.name, np.full([d if d >= 0 else 1 for d in s.shape],
                                           "" if s.datatype.name == "BYTES" else 0, dtype=s.datatype.numpy))
                    for s in self.inputs])
        self.ready = True


def load_model(path: Path | str, name: str, version: str = "1", device: Device = "auto",
               intra_op_threads: int = 0, lineage: Mapping[str, Any] | None = None) -> ModelRuntime:
    """Open ``path`` in ONNX Runtime, warm it up and return the runtime that serves it as ``name``.

    ``lineage`` (say, the registry URI and version it was resolved from) is added to the model's
    metadata parameters next to the file's own ``metadata_props``.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} not found")
    try:
        predictor = OrtPredictor(path, device=device, intra_op_threads=intra_op_threads)
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NotImplemented) as e:
        raise ValueError(f"{path} is not a valid ONNX model that ONNX Runtime can load: {e}") from None
    runtime = ModelRuntime(name, version, predictor, lineage)
    try:
        runtime.warm_up()
    except Exception as e:
        raise ValueError(f"{path} loaded but a warm-up inference on zeros failed: {e}") from e
    log.info("model %r version %s ready from %s on %s", name, runtime.version, path, ", ".join(predictor.providers))
    return runtime
