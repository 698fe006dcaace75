"""The serving runtime: one ONNX Runtime session per served model, its v2 metadata and its checks.

``ModelRuntime`` owns a session and nothing about HTTP or batching: ``check_inputs`` matches a
request's tensors to the session's declared inputs (every mismatch reported at once, in the
field-naming style of ``protocol.ProtocolError``), ``run`` executes one (possibly merged) batch and
``warm_up`` runs the batch sizes the batcher will use, so a server that says it is ready answers its
first request at full speed. ``load_model`` builds a warm one from an .onnx file.

Providers: CUDA (with I/O binding: inputs copied to the device once per merged batch, outputs
allocated there and copied back once) when a GPU is usable, CPU otherwise. ONNX Runtime falls back
to CPU silently when CUDA libraries are missing, so the providers really in use are read back from
the session, reported in the metadata and the metrics, and ``require_gpu`` refuses to serve on CPU.

Sessions are built by the one factory (``stages.sessions.create_session``) from the serve config's
``runtime`` part: the batcher calls ``run`` from one thread and the HTTP event loop needs a core of
its own, so on small machines intra-op threads are cores - 1 and do not spin-wait (see there).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from stages.common import sha256_file
from stages.serve.config import RuntimeSettings
from stages.serve.protocol import DataType, ProtocolError, Tensor, format_shape, from_onnx
from stages.sessions import CUDA_EP, create_session, cuda_problem

log = logging.getLogger(__name__)


class GpuRequired(ValueError):
    """require_gpu was asked for but CUDA is not (or would not be) the provider in use."""


def check_gpu_required(runtime: RuntimeSettings) -> None:
    """Refuse early (before loading anything) when require_gpu cannot be met on this machine."""
    if runtime.require_gpu:
        problem = cuda_problem()
        if problem:
            raise GpuRequired(f"--require-gpu: CUDAExecutionProvider is not available, the server would run on "
                              f"CPUExecutionProvider: {problem}")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the v2 metadata describes it: ``shape`` has -1 for dynamic dims, ``dims`` keeps
    ONNX's own dims (int, a symbolic name such as "batch", or None) for cross-input checks."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    dims: tuple[int | str | None, ...]

    @classmethod
    def from_node_arg(cls, arg) -> "TensorSpec":
        dims = tuple(arg.shape or ())
        return cls(arg.name, from_onnx(arg.type), tuple(d if isinstance(d, int) else -1 for d in dims), dims)

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.dims) and not isinstance(self.dims[0], int)

    def describe(self) -> dict:
        return {"name": self.name, "datatype": self.datatype.name, "shape": list(self.shape)}


class ModelRuntime:
    """One served model: a warm ONNX Runtime session plus what the v2 endpoints say about it."""

    platform = "onnxruntime_onnx"  # the v2 / Triton name for an ONNX Runtime backend

    def __init__(self, name: str, version: str, session, path: Path, lineage: Mapping[str, Any] | None = None,
                 io_binding: bool = True):
        self.name = name
        self.version = str(version)
        self.session = session
        self.path = Path(path)
        self.providers: list[str] = session.get_providers()
        self.provider = self.providers[0]
        try:
            self.inputs = [TensorSpec.from_node_arg(a) for a in session.get_inputs()]
            self.outputs = [TensorSpec.from_node_arg(a) for a in session.get_outputs()]
        except ProtocolError as e:
            raise ValueError(f"{path} cannot be served over the v2 protocol: {e}") from None
        self._inputs = {s.name: s for s in self.inputs}
        self.output_names = [s.name for s in self.outputs]
        # Rows of several requests can be stacked only if every input and output has a free first dim.
        self.batchable = all(s.dynamic_batch for s in (*self.inputs, *self.outputs))
        # I/O binding pays on CUDA (one host->device copy per merged batch, outputs allocated on the
        # device); string tensors cannot live there.
        self.io_binding = io_binding and self.provider == CUDA_EP and \
            all(s.datatype.name != "BYTES" for s in (*self.inputs, *self.outputs))
        # What the exporter wrote (labels, layout, normalization, lineage): strings only.
        self.metadata_props = dict(session.get_modelmeta().custom_metadata_map)
        self.lineage = lineage_of(self.metadata_props, dict(lineage or {}), sha256_file(self.path))
        self.allow_non_finite: bool | None = None  # NaN/Inf inputs; None: the server's serve.inputs setting
        self.warm_batch_sizes: list[int] = []
        self.batch1_seconds = float("inf")  # measured by warm_up
        self.batch_seconds: dict[int, float] = {}  # warm run time by batch size, measured by warm_up
        self.ready = False

    def metadata(self) -> dict:
        """The v2 model metadata document (plus parameters: the file's metadata, lineage, provider)."""
        # v2 parameter values are scalars, so structured values travel as JSON strings, the same
        # convention the exporter uses for metadata_props ("labels": "[\"0\", ...]").
        parameters: dict[str, Any] = dict(self.metadata_props)
        parameters.update({k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
                           for k, v in self.lineage.items()})
        parameters["execution_provider"] = self.provider
        parameters["execution_providers"] = json.dumps(self.providers)
        parameters["io_binding"] = self.io_binding
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

    def check_outputs(self, requested: Sequence[str] | None) -> list[str]:
        """The output names to answer (all of them when None); unknown names are a ProtocolError."""
        if not requested:
            return self.output_names
        unknown = [f"outputs[{j}].name: unknown output {n!r}; model {self.name!r} has {self.output_names}"
                   for j, n in enumerate(requested) if n not in self.output_names]
        if unknown:
            raise ProtocolError("; ".join(unknown))
        return list(requested)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for one batch. Blocking; the batcher calls it from its own thread."""
        if self.io_binding:
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))

    def infer(self, tensors: Sequence[Tensor], requested_outputs: Sequence[str] | None = None) -> list[Tensor]:
        """Check, run (unbatched) and return the requested outputs, in request order."""
        problems = []
        try:
            feeds = self.check_inputs(tensors)
        except ProtocolError as e:
            problems.append(str(e))
        try:
            names = self.check_outputs(requested_outputs)
        except ProtocolError as e:
            problems.append(str(e))
        if problems:
            raise ProtocolError("; ".join(problems))
        results = self.run(feeds)
        return [Tensor(n, results[n]) for n in names]

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run zeros at every batch size the batcher will form: first runs allocate memory and pick
        kernels (on CUDA, a new shape can take seconds), which no client should pay for."""
        sizes = sorted(set(batch_sizes)) if self.batchable else [1]
        for n in sizes:
            feeds = {}
            for s in self.inputs:
                shape = [n if axis == 0 and self.batchable else (d if d >= 0 else 1) for axis, d in enumerate(s.shape)]
                feeds[s.name] = np.full(shape, "" if s.datatype.name == "BYTES" else 0, dtype=s.datatype.numpy)
            self.run(feeds)
            # A second, timed run: what a batch of n costs once warm (the batcher decides by it whether
            # a batch may run right on the event loop); the faster of two, against a busy machine's noise.
            took = []
            for _ in range(2):
                start = time.perf_counter()
                self.run(feeds)
                took.append(time.perf_counter() - start)
            self.batch_seconds[n] = min(took)
            if n == 1:
                self.batch1_seconds = self.batch_seconds[1]
        self.warm_batch_sizes = sizes
        self.ready = True


def warm_up_sizes(max_batch_size: int, preferred: Sequence[int] = ()) -> list[int]:
    """1, powers of two up to ``max_batch_size``, the maximum itself and any preferred sizes."""
    sizes = {1, max_batch_size, *preferred}
    n = 2
    while n < max_batch_size:
        sizes.add(n)
        n *= 2
    return sorted(s for s in sizes if 1 <= s <= max_batch_size)


# Lineage keys the metadata always carries (empty when unknown), and where each may come from:
# the registry (MLflow tags / version), else the ONNX file's own metadata_props.
_LINEAGE_SOURCES = {
    "lineage.mlflow_run_id": ("run_id", "lineage.training_run_id", "lineage.mlflow_run_id"),
    "lineage.registered_name": ("registered_name",),
    "lineage.registered_version": ("registered_version",),
    "lineage.dataset_sha256": ("lineage.dataset_sha256", "dataset_sha256", "dataset.sha256"),
    "lineage.variant": ("variant", "lineage.variant"),
}


def lineage_of(props: Mapping[str, str], given: Mapping[str, Any], onnx_sha256: str) -> dict[str, Any]:
    """Lineage for the metadata: what the caller resolved (registry URI, tags) wins over the file's props."""
    out: dict[str, Any] = dict(given)
    for key, sources in _LINEAGE_SOURCES.items():
        value = next((given[s] for s in sources if given.get(s)), None) or \
            next((props[s] for s in sources if props.get(s)), "")
        out[key] = str(value)
    out["lineage.onnx_sha256"] = onnx_sha256
    return out


def load_model(path: Path | str, name: str, version: str = "1", runtime: RuntimeSettings = RuntimeSettings(),
               lineage: Mapping[str, Any] | None = None, warm_batch_sizes: Sequence[int] = (1,)) -> ModelRuntime:
    """Open ``path`` in ONNX Runtime with the serve config's ``runtime`` settings, warm it up and return
    the runtime that serves it as ``name``.

    ``lineage`` (say, the registry URI and version it was resolved from) is added to the model's
    metadata parameters next to the file's own ``metadata_props``. With ``runtime.require_gpu``, a
    session that did not get the CUDA provider is refused (GpuRequired) instead of served on CPU.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} not found")
    try:
        session = create_session(path, runtime.session_settings())  # warns when CUDA fell back to CPU
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NotImplemented) as e:
        raise ValueError(f"{path} is not a valid ONNX model that ONNX Runtime can load: {e}") from None
    model = ModelRuntime(name, version, session, path, lineage)
    if runtime.require_gpu and model.provider != CUDA_EP:
        raise GpuRequired(f"--require-gpu: model {name!r} got {model.provider}, not {CUDA_EP} "
                          f"(ONNX Runtime could not start CUDA: {cuda_problem() or 'CUDA/cuDNN libraries not found?'})")
    try:
        model.warm_up(warm_batch_sizes)
    except Exception as e:
        raise ValueError(f"{path} loaded but a warm-up inference on zeros failed: {e}") from e
    log.info("model %r version %s ready from %s on %s (warm at batch sizes %s)", name, model.version, path,
             ", ".join(model.providers), model.warm_batch_sizes)
    return model
