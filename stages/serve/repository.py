"""Model repositories laid out as Triton expects: ``<repo>/<model>/<version>/model.onnx`` (+ config.pbtxt).

``scan_repository`` turns a directory into ``ModelSource``s (what to load, under which name and
version, batching how) without opening any session. The optional ``<repo>/<model>/config.pbtxt`` is
read with protobuf's text format into Triton's own ``ModelConfig`` message (``stages.serve.triton``),
so a field Triton does not know, or a value of the wrong type, is refused naming its line and field,
as Triton refuses it. These fields are honoured:

- ``name``: must equal the directory name (as Triton requires),
- ``platform`` / ``backend``: must be ``onnxruntime_onnx`` / ``onnxruntime`` when given,
- ``max_batch_size``: the most rows the batcher merges; 0 turns merging off,
- ``dynamic_batching { max_queue_delay_microseconds preferred_batch_size }``: as in Triton, merging
  is on only when this block is present; preferred sizes are warmed up,
- ``version_policy { latest { num_versions } | all {} | specific { versions } }``: default latest 1,
- ``default_model_filename``: default ``model.onnx``,
- ``input`` / ``output`` ``name``, ``data_type`` and ``dims``: checked against the ONNX file at load
  (``dims`` without the batch dim when ``max_batch_size`` > 0; -1 matches any size),
- ``instance_group { kind: KIND_CPU }``: runs that model on the CPU provider,
- ``parameters { key: "allow_non_finite" value { string_value: "true" } }``: this model accepts NaN and
  ±Infinity in its float inputs (the recipe's ``serve.inputs.allow_non_finite`` otherwise; default: refused).

Every other field that is set (``instance_group.count``, ``optimization``, ``parameters``,
``output.label_filename``...) is reported in the log as not honoured, so nothing is ignored silently.
Without a config.pbtxt a model gets the recipe's ``serve.batching`` settings.

``served_config`` goes the other way: what the server really applies to a loaded model (batching,
tensors, device, input policy) as a ``ModelConfig``, for ``/v2/models/NAME/config`` and gRPC's ModelConfig.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.serve import triton
from stages.serve.config import BatchSettings, ServeConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"
# Fields of ModelConfig this server acts on (dotted: a sub-message's fields); see the module docstring.
HONOURED = {"name", "platform", "backend", "max_batch_size", "default_model_filename",
            "dynamic_batching", "dynamic_batching.max_queue_delay_microseconds", "dynamic_batching.preferred_batch_size",
            "version_policy", "version_policy.latest", "version_policy.latest.num_versions", "version_policy.all",
            "version_policy.specific", "version_policy.specific.versions",
            "input", "input.name", "input.data_type", "input.dims",
            "output", "output.name", "output.data_type", "output.dims",
            "instance_group", "instance_group.kind", "parameters"}
PARAMETERS = {"allow_non_finite"}  # config.pbtxt parameters keys this server acts on
# Triton's TYPE_* names for the v2 datatypes (TYPE_STRING is BYTES).
TRITON_TYPES = {"TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
                "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
                "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
                "TYPE_BF16": "BF16", "TYPE_STRING": "BYTES"}


class RepositoryError(ValueError):
    """The repository or one of its config.pbtxt files is wrong; the message names the file and fix."""


@dataclass(frozen=True)
class TensorConfig:
    """An input or output as config.pbtxt declares it; empty ``datatype`` / None ``shape``: not declared."""

    name: str
    datatype: str = ""  # v2 name (FP32, BYTES, ...)
    shape: tuple[int, ...] | None = None  # full shape, batch dim (-1) included when the model batches


@dataclass(frozen=True)
class ModelSource:
    """One model version to load: where, as what, and how it batches (None: the server's default)."""

    path: Path
    name: str
    version: str
    batching: BatchSettings | None = None
    device: str | None = None  # None: the server's device
    lineage: dict[str, Any] = field(default_factory=dict)
    io_spec: dict[str, list[TensorConfig]] = field(default_factory=dict)  # "input"/"output" -> declared tensors
    allow_non_finite: bool | None = None  # None: the server's serve.inputs.allow_non_finite


# --- config.pbtxt ----------------------------------------------------------------------------

def read_model_config(path: Path) -> Any:
    """``path`` (a config.pbtxt) as Triton's ``ModelConfig`` message; RepositoryError naming the file,
    line and field when protobuf's text format refuses it. Set fields this server does not act on are
    logged as not honoured."""
    try:
        config = triton.parse_text(Path(path).read_text(), triton.model_config_class())
    except ValueError as e:
        raise RepositoryError(f"{path}: not a valid Triton model configuration: {e}") from None
    ignored = _not_honoured(triton.set_fields(config))
    ignored += sorted(f"parameters.{k}" for k in config.parameters if k not in PARAMETERS)
    if ignored:
        log.info("%s: fields not honoured by this server: %s", path, ", ".join(ignored))
    return config


def _not_honoured(names: list[str]) -> list[str]:
    """The set fields outside HONOURED, each reported once at its outermost level."""
    out: list[str] = []
    for name in names:
        if name not in HONOURED and not any(name.startswith(f"{o}.") for o in out):
            out.append(name)
    return sorted(out)


# --- scanning --------------------------------------------------------------------------------

def check_unique(models) -> None:
    """Two models (sources or runtimes) with the same name and version cannot both be served: a
    ValueError naming them. One check for the server (``app.ModelRepository``) and for `pipeline serve`,
    which asks before any worker starts."""
    seen = set()
    for m in models:
        if (m.name, m.version) in seen:
            raise ValueError(f"model {m.name!r} version {m.version!r} is given twice")
        seen.add((m.name, m.version))


def scan_repository(root: Path | str) -> list[ModelSource]:
    """Every model version the repository asks to serve, in name then version order."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory; expected <repo>/<model>/<version>/model.onnx")
    sources: list[ModelSource] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sources += _scan_model(model_dir)
    if not sources:
        raise RepositoryError(f"model repository {root} holds no model; expected <repo>/<model>/<version>/model.onnx")
    return sources


def _scan_model(model_dir: Path) -> list[ModelSource]:
    name = model_dir.name
    cfg_path = model_dir / CONFIG_FILE
    where = str(cfg_path)
    cfg = read_model_config(cfg_path) if cfg_path.is_file() else triton.model_config_class()()
    if cfg.name and cfg.name != name:
        raise RepositoryError(f"{where}: name {cfg.name!r} must equal the model's directory name {name!r}")
    if cfg.platform not in ("", "onnxruntime_onnx") or cfg.backend not in ("", "onnxruntime"):
        raise RepositoryError(f"{where}: this server runs ONNX models only; platform must be onnxruntime_onnx "
                              f"(or backend onnxruntime), got platform={cfg.platform!r} backend={cfg.backend!r}")
    filename = cfg.default_model_filename or DEFAULT_MODEL_FILE

    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise RepositoryError(f"model directory {model_dir} has no numeric version directory; "
                              f"expected {model_dir}/1/{filename}")
    versions = _apply_version_policy(cfg, versions, where)

    # A config.pbtxt that says nothing about batching turns merging off, as in Triton (max_batch_size 0);
    # no config.pbtxt (or an empty one) means the recipe's serve.batching.
    batching = _batching(cfg, where) if cfg.ListFields() else None
    device = "cpu" if any(triton.enum_name(g, "kind") == "KIND_CPU" for g in cfg.instance_group) else None
    io_spec = {kind: [_tensor_config(t, cfg.max_batch_size > 0) for t in getattr(cfg, kind)]
               for kind in ("input", "output")}
    out = []
    allow_non_finite = _allow_non_finite(cfg, where)
    for vdir in versions:
        path = vdir / filename
        if not path.is_file():
            raise RepositoryError(f"model {name!r} version {vdir.name}: {path} not found "
                                  f"(each version directory holds {filename})")
        # The repository's directory name, not its absolute path: metadata must not map the server's disk.
        out.append(ModelSource(path=path, name=name, version=vdir.name, batching=batching, device=device,
                               lineage={"model_repository": model_dir.parent.resolve().name}, io_spec=io_spec,
                               allow_non_finite=allow_non_finite))
    return out


def _allow_non_finite(cfg: Any, where: str) -> bool | None:
    params = cfg.parameters
    if "allow_non_finite" not in params:
        return None
    value = params["allow_non_finite"].string_value.strip().lower()
    if value not in ("true", "false"):
        raise RepositoryError(f'{where}: parameters "allow_non_finite" must have string_value "true" or "false", '
                              f"got {params['allow_non_finite'].string_value!r}")
    return value == "true"


def _tensor_config(t: Any, batched: bool) -> TensorConfig:
    type_name = triton.enum_name(t, "data_type")
    dims = tuple(t.dims)
    return TensorConfig(name=t.name, datatype=TRITON_TYPES.get(type_name, ""),
                        shape=((-1, *dims) if batched else dims) if dims else None)


def _apply_version_policy(cfg: Any, versions: list[Path], where: str) -> list[Path]:
    if not cfg.HasField("version_policy"):
        return versions[-1:]  # Triton's default: the latest version only
    policy = cfg.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "latest":
        n = policy.latest.num_versions
        if n < 1:
            raise RepositoryError(f"{where}: version_policy.latest.num_versions must be >= 1, got {n}")
        return versions[-n:]
    if choice == "specific":
        wanted = [str(v) for v in policy.specific.versions]
        present = {p.name for p in versions}
        missing = [v for v in wanted if v not in present]
        if missing or not wanted:
            raise RepositoryError(f"{where}: version_policy.specific.versions {wanted} must name existing "
                                  f"version directories; found {sorted(present, key=int)}")
        return [p for p in versions if p.name in wanted]
    raise RepositoryError(f"{where}: version_policy must hold latest, all or specific")


def _batching(cfg: Any, where: str) -> BatchSettings:
    max_bs = cfg.max_batch_size
    if max_bs < 0:
        raise RepositoryError(f"{where}: max_batch_size must be >= 0, got {max_bs}")
    if not cfg.HasField("dynamic_batching") or max_bs == 0:
        # Triton batches dynamically only when asked to (a dynamic_batching block and max_batch_size > 0).
        return BatchSettings(enabled=False, max_batch_size=max(max_bs, 1), max_queue_delay_ms=0.0)
    dyn = cfg.dynamic_batching
    delay_us = dyn.max_queue_delay_microseconds  # uint64: never negative
    preferred = tuple(dyn.preferred_batch_size)
    if any(p < 1 or p > max_bs for p in preferred):
        raise RepositoryError(f"{where}: dynamic_batching needs preferred_batch_size within 1..max_batch_size "
                              f"({max_bs}); got {list(preferred)}")
    return BatchSettings(enabled=True, max_batch_size=max_bs, max_queue_delay_ms=delay_us / 1000.0,
                         preferred_batch_sizes=preferred)


def check_io_spec(source: ModelSource, runtime) -> None:
    """The config.pbtxt's input/output names, data types and dims must match the ONNX file."""
    problems = []
    for kind, specs in (("input", runtime.inputs), ("output", runtime.outputs)):
        actual = {s.name: s for s in specs}
        for declared in source.io_spec.get(kind, []):
            spec = actual.get(declared.name)
            if spec is None:
                problems.append(f"{kind} {declared.name!r} is not in the model (it has {sorted(actual)})")
                continue
            if declared.datatype and declared.datatype != spec.datatype.name:
                problems.append(f"{kind} {declared.name!r} is {spec.datatype.name} in the model, not {declared.datatype}")
            if declared.shape is not None and not _shapes_agree(declared.shape, spec.shape):
                problems.append(f"{kind} {declared.name!r} has shape {list(spec.shape)} in the model (-1: any size), "
                                f"but config.pbtxt says {list(declared.shape)} (with the batch dim when "
                                "max_batch_size > 0)")
    if problems:
        raise RepositoryError(f"{source.path.parent.parent / CONFIG_FILE}: " + "; ".join(problems))


def _shapes_agree(declared: tuple[int, ...], actual: tuple[int, ...]) -> bool:
    return len(declared) == len(actual) and all(d == a or d == -1 or a == -1 for d, a in zip(declared, actual))


def load_sources(sources: list[ModelSource], config: ServeConfig) -> tuple[list, dict[tuple[str, str], BatchSettings]]:
    """Open, check and warm every source (at the batch sizes its batcher will form); returns the
    runtimes and each one's batch settings (its config.pbtxt's, else the serve config's batching)."""
    from stages.serve.runtime import load_model, warm_up_sizes

    runtimes, batching = [], {}
    for src in sources:
        settings = src.batching or config.batching
        sizes = warm_up_sizes(settings.max_batch_size, settings.preferred_batch_sizes) if settings.enabled else [1]
        # instance_group KIND_CPU: that model runs on the CPU provider, whatever the server's device.
        runtime_settings = config.runtime if src.device is None else \
            dataclasses.replace(config.runtime, device=src.device, require_gpu=False)
        runtime = load_model(src.path, src.name, src.version, runtime_settings, lineage=src.lineage,
                             warm_batch_sizes=sizes)
        check_io_spec(src, runtime)
        runtime.allow_non_finite = src.allow_non_finite
        runtimes.append(runtime)
        batching[(runtime.name, runtime.version)] = settings
    return runtimes, batching


def served_config(runtime, batching: BatchSettings, allow_non_finite: bool) -> Any:
    """What the server applies to a loaded model, as Triton's ``ModelConfig``: its tensors (dims without
    the batch dim when it merges batches, as Triton writes them), ``max_batch_size`` and ``dynamic_batching``
    when the batcher merges (else ``max_batch_size: 0`` and full dims, -1 for dynamic), the device the
    session runs on, and the input policy as a parameter (the same key config.pbtxt takes)."""
    config = triton.model_config_class()(name=runtime.name, platform="onnxruntime_onnx", backend="onnxruntime",
                                         default_model_filename=runtime.path.name)
    merging = batching.enabled and runtime.batchable
    config.max_batch_size = batching.max_batch_size if merging else 0
    v2_to_triton = {v: k for k, v in TRITON_TYPES.items()}
    for kind, specs in (("input", runtime.inputs), ("output", runtime.outputs)):
        for spec in specs:
            entry = getattr(config, kind).add(name=spec.name, dims=list(spec.shape[1:] if merging else spec.shape))
            entry.data_type = triton.enum_value("inference.DataType", v2_to_triton[spec.datatype.name])
    if merging:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = round(batching.max_queue_delay_ms * 1000)
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    gpu = runtime.provider == "CUDAExecutionProvider"
    group = config.instance_group.add(name=runtime.name, count=1)
    group.kind = triton.enum_value("inference.ModelInstanceGroup.Kind", "KIND_GPU" if gpu else "KIND_CPU")
    if gpu:
        group.gpus.append(0)
    config.parameters["allow_non_finite"].string_value = "true" if allow_non_finite else "false"
    config.parameters["execution_provider"].string_value = runtime.provider
    return config
