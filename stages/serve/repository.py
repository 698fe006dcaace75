"""Model repositories laid out as Triton expects: ``<repo>/<model>/<version>/model.onnx`` (+ config.pbtxt).

``scan_repository`` turns a directory into ``ModelSource``s (what to load, under which name and
version, batching how) without opening any session. The optional ``<repo>/<model>/config.pbtxt`` is
protobuf text format; ``parse_pbtxt`` reads it generically and these fields are honored:

- ``name``: must equal the directory name (as Triton requires),
- ``platform`` / ``backend``: must be ``onnxruntime_onnx`` / ``onnxruntime`` when given,
- ``max_batch_size``: the most rows the batcher merges; 0 turns merging off,
- ``dynamic_batching { max_queue_delay_microseconds preferred_batch_size }``: as in Triton, merging
  is on only when this block is present; preferred sizes are warmed up,
- ``version_policy { latest { num_versions } | all {} | specific { versions } }``: default latest 1,
- ``default_model_filename``: default ``model.onnx``,
- ``input`` / ``output`` ``name`` and ``data_type``: checked against the ONNX file at load,
- ``instance_group { kind: KIND_CPU }``: runs that model on the CPU provider.

Anything else (``count``, ``optimization``, ``parameters``, ``dims``...) is parsed and reported as
not honored in the log, so nothing is ignored silently. Without a config.pbtxt a model gets the
recipe's ``serve`` settings.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.serve.batcher import BatchSettings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"
HONORED = {"name", "platform", "backend", "max_batch_size", "dynamic_batching", "version_policy",
           "default_model_filename", "input", "output", "instance_group"}
# Triton's TYPE_* names for the v2 datatypes (TYPE_STRING is BYTES).
TRITON_TYPES = {"TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
                "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
                "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
                "TYPE_STRING": "BYTES"}


class RepositoryError(ValueError):
    """The repository or one of its config.pbtxt files is wrong; the message names the file and fix."""


@dataclass(frozen=True)
class ModelSource:
    """One model version to load: where, as what, and how it batches (None: the server's default)."""

    path: Path
    name: str
    version: str
    batching: BatchSettings | None = None
    device: str | None = None  # None: the server's device
    lineage: dict[str, Any] = field(default_factory=dict)
    io_spec: dict[str, dict[str, str]] = field(default_factory=dict)  # "input"/"output" -> name -> v2 datatype


# --- config.pbtxt ----------------------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<tok>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}\[\]<>:,;]|[^\s{}\[\]<>:,;#"\']+)')


def _tokens(text: str, where: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise RepositoryError(f"{where}: cannot read text at offset {pos}: {text[pos:pos + 20]!r}")
        if m.group("tok"):
            out.append(m.group("tok"))
        pos = m.end()
    return out


def parse_pbtxt(text: str, where: str = CONFIG_FILE) -> dict[str, list]:
    """Protobuf text format -> {field: [values]} (every field a list: fields may repeat); messages
    are nested dicts, scalars are int, float, str (quoted or enum names) or bool."""
    toks = _tokens(text, where)
    pos = 0

    def scalar(tok: str) -> Any:
        if tok[0] in "\"'":
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if tok in ("true", "True"):
            return True
        if tok in ("false", "False"):
            return False
        for conv in (int, float):
            try:
                return conv(tok)
            except ValueError:
                pass
        return tok  # an enum name such as KIND_GPU or TYPE_FP32

    def value() -> Any:
        nonlocal pos
        tok = toks[pos]
        if tok in ("{", "<"):
            pos += 1
            return message("}" if tok == "{" else ">")
        pos += 1
        return scalar(tok)

    def message(end: str | None) -> dict[str, list]:
        nonlocal pos
        msg: dict[str, list] = {}
        while pos < len(toks):
            tok = toks[pos]
            if tok == end:
                pos += 1
                return msg
            if tok in (",", ";"):
                pos += 1
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
                raise RepositoryError(f"{where}: expected a field name, got {tok!r}")
            pos += 1
            if pos < len(toks) and toks[pos] == ":":
                pos += 1
            if pos >= len(toks):
                raise RepositoryError(f"{where}: field {tok!r} has no value")
            values = msg.setdefault(tok, [])
            if toks[pos] == "[":  # a list: [1, 2] or [ { ... }, { ... } ]
                pos += 1
                while toks[pos] != "]":
                    if toks[pos] == ",":
                        pos += 1
                        continue
                    values.append(value())
                    if pos >= len(toks):
                        raise RepositoryError(f"{where}: list of {tok!r} is not closed with ]")
                pos += 1
            else:
                values.append(value())
        if end is not None:
            raise RepositoryError(f"{where}: a message is not closed with {end}")
        return msg

    try:
        return message(None)
    except IndexError:
        raise RepositoryError(f"{where}: the text ends in the middle of a field") from None


def _one(msg: dict, key: str, kind: type | tuple, where: str, default: Any = None) -> Any:
    values = msg.get(key)
    if not values:
        return default
    if len(values) > 1:
        raise RepositoryError(f"{where}: `{key}` is given {len(values)} times; give it once")
    v = values[0]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise RepositoryError(f"{where}: `{key}` must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


# --- scanning --------------------------------------------------------------------------------

def scan_repository(root: Path | str, default_batching: BatchSettings) -> list[ModelSource]:
    """Every model version the repository asks to serve, in name then version order."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory; expected <repo>/<model>/<version>/model.onnx")
    sources: list[ModelSource] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sources += _scan_model(model_dir, default_batching)
    if not sources:
        raise RepositoryError(f"model repository {root} holds no model; expected <repo>/<model>/<version>/model.onnx")
    return sources


def _scan_model(model_dir: Path, default_batching: BatchSettings) -> list[ModelSource]:
    name = model_dir.name
    cfg_path = model_dir / CONFIG_FILE
    cfg: dict[str, list] = {}
    where = str(cfg_path)
    if cfg_path.is_file():
        cfg = parse_pbtxt(cfg_path.read_text(), where)
        ignored = sorted(set(cfg) - HONORED)
        if ignored:
            log.info("%s: fields not honored by this server: %s", where, ", ".join(ignored))
    cfg_name = _one(cfg, "name", str, where)
    if cfg_name is not None and cfg_name != name:
        raise RepositoryError(f"{where}: name {cfg_name!r} must equal the model's directory name {name!r}")
    platform = _one(cfg, "platform", str, where)
    backend = _one(cfg, "backend", str, where)
    if platform not in (None, "onnxruntime_onnx") or backend not in (None, "onnxruntime"):
        raise RepositoryError(f"{where}: this server runs ONNX models only; platform must be onnxruntime_onnx "
                              f"(or backend onnxruntime), got platform={platform!r} backend={backend!r}")
    filename = _one(cfg, "default_model_filename", str, where, DEFAULT_MODEL_FILE)

    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise RepositoryError(f"model directory {model_dir} has no numeric version directory; "
                              f"expected {model_dir}/1/{filename}")
    versions = _apply_version_policy(cfg, versions, where)

    batching = None
    if cfg:
        batching = _batching(cfg, default_batching, where)
    device = None
    for group in cfg.get("instance_group", []):
        kinds = group.get("kind", []) if isinstance(group, dict) else []
        if "KIND_CPU" in kinds:
            device = "cpu"
    io_spec = {kind: {_one(t, "name", str, where): TRITON_TYPES.get(_one(t, "data_type", str, where, ""), "")
                      for t in cfg.get(kind, []) if isinstance(t, dict)} for kind in ("input", "output")}
    out = []
    for vdir in versions:
        path = vdir / filename
        if not path.is_file():
            raise RepositoryError(f"model {name!r} version {vdir.name}: {path} not found "
                                  f"(each version directory holds {filename})")
        out.append(ModelSource(path=path, name=name, version=vdir.name, batching=batching, device=device,
                               lineage={"model_repository": str(model_dir.parent.resolve())}, io_spec=io_spec))
    return out


def _apply_version_policy(cfg: dict, versions: list[Path], where: str) -> list[Path]:
    policy = _one(cfg, "version_policy", dict, where)
    if policy is None:
        return versions[-1:]  # Triton's default: the latest version only
    if "all" in policy:
        return versions
    if "latest" in policy:
        n = _one(policy["latest"][0], "num_versions", int, where, 1)
        if n < 1:
            raise RepositoryError(f"{where}: version_policy.latest.num_versions must be >= 1, got {n}")
        return versions[-n:]
    if "specific" in policy:
        wanted = [str(v) for v in policy["specific"][0].get("versions", [])]
        present = {p.name for p in versions}
        missing = [v for v in wanted if v not in present]
        if missing or not wanted:
            raise RepositoryError(f"{where}: version_policy.specific.versions {wanted} must name existing "
                                  f"version directories; found {sorted(present, key=int)}")
        return [p for p in versions if p.name in wanted]
    raise RepositoryError(f"{where}: version_policy must hold latest, all or specific, got {sorted(policy)}")


def _batching(cfg: dict, default: BatchSettings, where: str) -> BatchSettings:
    max_bs = _one(cfg, "max_batch_size", int, where, 0)
    if max_bs < 0:
        raise RepositoryError(f"{where}: max_batch_size must be >= 0, got {max_bs}")
    dyn = _one(cfg, "dynamic_batching", dict, where)
    if dyn is None or max_bs == 0:
        # Triton batches dynamically only when asked to (a dynamic_batching block and max_batch_size > 0).
        return BatchSettings(enabled=False, max_batch_size=max(max_bs, 1), max_queue_delay_ms=0.0)
    delay_us = _one(dyn, "max_queue_delay_microseconds", int, where, 0)
    preferred = tuple(int(v) for v in dyn.get("preferred_batch_size", []))
    if delay_us < 0 or any(p < 1 or p > max_bs for p in preferred):
        raise RepositoryError(f"{where}: dynamic_batching needs max_queue_delay_microseconds >= 0 and "
                              f"preferred_batch_size within 1..max_batch_size ({max_bs}); got {delay_us}, {list(preferred)}")
    ignored = sorted(set(dyn) - {"max_queue_delay_microseconds", "preferred_batch_size"})
    if ignored:
        log.info("%s: dynamic_batching fields not honored: %s", where, ", ".join(ignored))
    return BatchSettings(enabled=True, max_batch_size=max_bs, max_queue_delay_ms=delay_us / 1000.0,
                         preferred_batch_sizes=preferred)


def check_io_spec(source: ModelSource, runtime) -> None:
    """The config.pbtxt's input/output names and data types must match the ONNX file."""
    problems = []
    for kind, specs in (("input", runtime.inputs), ("output", runtime.outputs)):
        actual = {s.name: s.datatype.name for s in specs}
        for name, dtype in source.io_spec.get(kind, {}).items():
            if name not in actual:
                problems.append(f"{kind} {name!r} is not in the model (it has {sorted(actual)})")
            elif dtype and dtype != actual[name]:
                problems.append(f"{kind} {name!r} is {actual[name]} in the model, not {dtype}")
    if problems:
        raise RepositoryError(f"{source.path.parent.parent / CONFIG_FILE}: " + "; ".join(problems))


def load_sources(sources: list[ModelSource], config) -> tuple[list, dict[tuple[str, str], BatchSettings]]:
    """Open, check and warm every source (at the batch sizes its batcher will form); returns the
    runtimes and each one's batch settings. ``config`` is the recipe's serve ``Config``."""
    from stages.serve.runtime import load_model, warm_up_sizes

    default = BatchSettings(enabled=config.dynamic_batching, max_batch_size=config.max_batch_size,
                            max_queue_delay_ms=config.max_queue_delay_ms)
    runtimes, batching = [], {}
    for src in sources:
        settings = src.batching or default
        sizes = warm_up_sizes(settings.max_batch_size, settings.preferred_batch_sizes) if settings.enabled else [1]
        runtime = load_model(src.path, src.name, src.version, device=src.device or config.device,
                             intra_op_threads=config.intra_op_threads, lineage=src.lineage,
                             warm_batch_sizes=sizes, require_gpu=config.require_gpu and src.device != "cpu")
        check_io_spec(src, runtime)
        runtimes.append(runtime)
        batching[(runtime.name, runtime.version)] = settings
    return runtimes, batching
