"""The server's settings: the recipe's ``serve:`` section, in three nested parts.

    serve:
      transport: {host: 127.0.0.1, port: 8000, grpc_port: 8001, workers: 0, max_request_mb: 32,
                  graceful_shutdown_s: 30, header_timeout_s: 10, body_timeout_s: 60, keep_alive_s: 5}
      runtime:   {device: auto, require_gpu: false, intra_op_threads: 0, inter_op_threads: 1, allow_spinning: auto}
      batching:  {enabled: true, max_batch_size: 64, max_queue_delay_ms: 0, preferred_batch_sizes: [], max_queue_size: 0}
      inputs:    {allow_non_finite: false}

``transport`` is how clients reach the server (``app`` over HTTP, ``grpc_server`` over gRPC), ``runtime`` how its ONNX Runtime sessions are
built (``RuntimeSettings.session_settings()`` is the one conversion to the session factory's record;
register measures with it too), ``batching`` is the dynamic batcher's ``BatchSettings`` (a model
repository's config.pbtxt gives a model its own), ``inputs`` what request data a model accepts (a
config.pbtxt's ``parameters`` may say it per model). ``ServeConfig.from_dict`` validates a mapping (the
recipe loader calls it): every message names the full key, unknown keys are errors, and a key of the
old flat section (``serve.port``) is refused with its new place.

Light on purpose: no onnxruntime, torch or numpy, so a server can read its settings without the
training stack.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from stages.sessions import AUTO, Device, SessionSettings

# The flat section's keys (before the split into parts) -> where they live now.
MOVED_KEYS = {
    "host": "transport.host", "port": "transport.port", "max_request_mb": "transport.max_request_mb",
    "graceful_shutdown_s": "transport.graceful_shutdown_s",
    "device": "runtime.device", "require_gpu": "runtime.require_gpu", "intra_op_threads": "runtime.intra_op_threads",
    "dynamic_batching": "batching.enabled", "max_batch_size": "batching.max_batch_size",
    "max_queue_delay_ms": "batching.max_queue_delay_ms",
}


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{key}` must be true or false, got {value!r}")


def _check_int(key: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rule = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"`{key}` must be an integer {rule}, got {value!r}")


def _number(key: str, value: Any, positive: bool) -> float:
    """A finite number > 0 (``positive``) or >= 0, as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value) or math.isnan(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"`{key}` must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TransportSettings:
    """How clients reach the server."""

    host: str = "127.0.0.1"  # loopback unless told otherwise: the server has no authentication
    port: int = 8000
    grpc_port: int = 8001  # KServe v2 gRPC (Triton's default port); 0: no gRPC
    # Server processes sharing the port(s) (SO_REUSEPORT), each with its own sessions; 0: one per core,
    # at most 8 (stages.serve.workers.default_workers says why).
    workers: int = 0
    max_request_mb: float = 32.0  # request bodies (and gRPC messages) above this are refused with 413
    graceful_shutdown_s: float = 30.0  # on SIGTERM/Ctrl-C, in-flight requests get this long to finish
    # Slow or idle HTTP clients (seconds): a connection must finish its request headers this long after it
    # opened (or after its first byte, on a kept-alive connection), its body this long after the headers;
    # a kept-alive connection idle this long after an answer is closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0  # a whole max_request_mb body at >= ~4.5 Mbit/s
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"`host` must be a non-empty host name or IP address, got {self.host!r}")
        _check_int("port", self.port, 1, 65535)
        _check_int("grpc_port", self.grpc_port, 0, 65535)
        if self.grpc_port == self.port:
            raise ValueError(f"`grpc_port` must differ from port ({self.port}); 0 turns gRPC off")
        _check_int("workers", self.workers, 0, 256)
        object.__setattr__(self, "max_request_mb", _number("max_request_mb", self.max_request_mb, positive=True))
        for key in ("graceful_shutdown_s",):
            object.__setattr__(self, key, _number(key, getattr(self, key), positive=False))
        for key in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            object.__setattr__(self, key, _number(key, getattr(self, key), positive=True))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


@dataclass(frozen=True)
class RuntimeSettings:
    """How the server's ONNX Runtime sessions are built (and whether CPU is acceptable)."""

    device: Device = "auto"
    require_gpu: bool = False  # refuse to start unless CUDA is the provider really in use
    intra_op_threads: int = 0  # 0: cores - 1 on small machines (the event loop keeps a core), at most 8
    inter_op_threads: int = 1  # used only by ORT's parallel execution mode, which the server does not enable
    allow_spinning: bool | Literal["auto"] = AUTO  # auto: off on <= 4 cores (spinning takes the event loop's core)

    def __post_init__(self) -> None:
        _check_bool("require_gpu", self.require_gpu)
        self.session_settings()  # the factory's record checks device, threads and spinning
        if self.require_gpu and self.device == "cpu":
            raise ValueError("`require_gpu` cannot hold with device cpu; set device to auto or cuda")

    def session_settings(self) -> SessionSettings:
        """The session factory's record for these settings (``require_gpu`` asks for CUDA)."""
        device = "cuda" if self.require_gpu and self.device == "auto" else self.device
        return SessionSettings(device=device, intra_op_threads=self.intra_op_threads,
                               inter_op_threads=self.inter_op_threads, allow_spinning=self.allow_spinning)


@dataclass(frozen=True)
class BatchSettings:
    """How one model batches: the recipe's ``serve.batching``, or a model's config.pbtxt."""

    enabled: bool = True  # merge concurrent requests into one session run
    max_batch_size: int = 64  # rows merged into one session run at most
    max_queue_delay_ms: float = 0.0  # extra wait for more rows; 0: merge what queued while the last batch ran
    preferred_batch_sizes: tuple[int, ...] = ()  # only warmed up; the merge rule is max size / delay
    # Admission control: requests waiting for the batcher (not yet started) at most; one more is
    # answered 503 with Retry-After and counted. 0: unbounded (as Triton's default queue policy).
    max_queue_size: int = 0

    def __post_init__(self) -> None:
        _check_bool("enabled", self.enabled)
        _check_int("max_batch_size", self.max_batch_size, 1)
        object.__setattr__(self, "max_queue_delay_ms",
                           _number("max_queue_delay_ms", self.max_queue_delay_ms, positive=False))
        sizes = self.preferred_batch_sizes
        if not isinstance(sizes, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int)
                                                       or not 1 <= s <= self.max_batch_size for s in sizes):
            raise ValueError(f"`preferred_batch_sizes` must be a list of integers within 1..max_batch_size "
                             f"({self.max_batch_size}), got {sizes!r}")
        object.__setattr__(self, "preferred_batch_sizes", tuple(sizes))
        _check_int("max_queue_size", self.max_queue_size, 0)


@dataclass(frozen=True)
class InputSettings:
    """What request data a model accepts, beyond its declared datatypes and shapes: the recipe's
    ``serve.inputs`` for every model, or a model's config.pbtxt ``parameters`` (``allow_non_finite``)."""

    # NaN / +-Infinity in float inputs: refused with a 400 by default. A model does not tell a NaN
    # pixel from a real one (an int8 model quantizes NaN to 0 and answers a confident class).
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        _check_bool("allow_non_finite", self.allow_non_finite)


@dataclass(frozen=True)
class ServeConfig:
    """The recipe's ``serve:`` section."""

    transport: TransportSettings = field(default_factory=TransportSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    batching: BatchSettings = field(default_factory=BatchSettings)
    inputs: InputSettings = field(default_factory=InputSettings)

    PARTS: ClassVar[dict[str, type]] = {"transport": TransportSettings, "runtime": RuntimeSettings,
                                        "batching": BatchSettings, "inputs": InputSettings}

    def __post_init__(self) -> None:
        for name, cls in self.PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"`{name}` must be a {cls.__name__}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str = "serve") -> "ServeConfig":
        """Validate a mapping shaped like the recipe's section. Raises ValueError naming the full key
        (``serve.transport.port``) and the fix; unknown keys are errors; old flat keys name their new place."""
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ValueError(f"`{path}` must be a mapping with {', '.join(cls.PARTS)}, got {data!r}")
        moved = [k for k in data if k in MOVED_KEYS]
        if moved:
            raise ValueError("; ".join(f"`{path}.{k}` moved to `{path}.{MOVED_KEYS[k]}`" for k in moved)
                             + " (the serve section has transport, runtime, batching and inputs parts)")
        _reject_unknown(data, set(cls.PARTS), path)
        parts = {name: _build(part_cls, data.get(name), f"{path}.{name}") for name, part_cls in cls.PARTS.items()}
        return cls(**parts)


def _reject_unknown(data: Mapping[str, Any], known: set[str], path: str) -> None:
    for key in data:
        if key not in known:
            raise ValueError(f"unknown key `{path}.{key}`; valid keys in `{path}`: {', '.join(sorted(known))}")


def _build(cls: type, data: Any, path: str) -> Any:
    """One part from its mapping; the part's own check messages get the full key."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ValueError(f"`{path}` must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(data, set(fields), path)
    kwargs = dict(data)
    for key, value in kwargs.items():
        # YAML 1.1 reads 1e-3 (no dot) as a string; a number-valued key takes it as the number it spells.
        if fields[key].type == "float" and isinstance(value, str):
            try:
                kwargs[key] = float(value)
            except ValueError:
                pass
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        # Parts phrase checks as "`key` must ...": the first backticked key is the one at fault.
        raise ValueError(msg.replace("`", f"`{path}.", 1) if msg.startswith("`") else f"`{path}`: {msg}") from None
