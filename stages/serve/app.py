"""The HTTP transport: KServe v2 / Open Inference Protocol REST routes, as a lean ASGI app.

Routes only translate HTTP: read the body (bounded), hand it to ``protocol`` to decode, to the
model's ``ModelRuntime`` to check, to its ``Batcher`` to run, and write the answer back. Status
codes: 400 for a request that breaks the protocol or does not fit the model (the JSON ``error``
names the field), 404 for an unknown model, version or route, 405 for a wrong method, 413 for a
body above ``max_request_mb``, 503 while not ready, 500 (logged, server keeps running) for anything
else.

Why a bare ASGI callable and not FastAPI routing: on the infer hot path, FastAPI's dependency
injection, Starlette's Request object and a thread-pool hop cost more than decoding a one-sample
request. Here a request costs a dict lookup to route; small bodies are decoded on the event loop
(tens of microseconds) and only bodies above ``INLINE_DECODE_BYTES`` go to a thread so a large
request cannot stall the others; inference waits on the batcher's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence
from urllib.parse import unquote

from stages.common import PRODUCT_VERSION
from stages.serve import protocol
from stages.serve.batcher import Batcher, QueueFull
from stages.serve.config import BatchSettings, ServeConfig
from stages.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from stages.serve.metrics import ServerMetrics
from stages.serve.runtime import ModelRuntime

log = logging.getLogger(__name__)

SERVER_NAME = "onnx-pipeline"
EXTENSIONS = ["binary_tensor_data"]
INLINE_DECODE_BYTES = 256 * 1024  # larger bodies are decoded (and answers encoded) in a worker thread
_JSON = [(b"content-type", b"application/json")]
_HEADER_LENGTH = b"inference-header-content-length"


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelRepository:
    """The served models by name and version; the highest version (as Triton) is a name's default."""

    def __init__(self, models: Sequence[ModelRuntime]):
        if not models:
            raise ValueError("create_app needs at least one model to serve")
        self.by_name: dict[str, dict[str, ModelRuntime]] = {}
        for m in models:
            versions = self.by_name.setdefault(m.name, {})
            if m.version in versions:
                raise ValueError(f"model {m.name!r} version {m.version!r} is given twice")
            versions[m.version] = m
        self.default = {name: max(vs.values(), key=lambda m: (m.version.isdigit(), int(m.version) if m.version.isdigit()
                                                              else 0, m.version))
                        for name, vs in self.by_name.items()}

    def get(self, name: str, version: str | None = None) -> ModelRuntime:
        versions = self.by_name.get(name)
        if versions is None:
            raise HttpError(404, f"model {name!r} not found; served models: {sorted(self.by_name)}")
        if version is None:
            return self.default[name]
        if version not in versions:
            raise HttpError(404, f"model {name!r} version {version!r} not found; served versions: {list(versions)}")
        return versions[version]

    def all(self) -> list[ModelRuntime]:
        return [m for versions in self.by_name.values() for m in versions.values()]


class _Served:
    """What the transport holds per model version: runtime, batcher, metric series."""

    __slots__ = ("runtime", "batcher", "metrics")

    def __init__(self, runtime, batcher, metrics):
        self.runtime, self.batcher, self.metrics = runtime, batcher, metrics


class App:
    """The ASGI application (HTTP + lifespan). Batchers start on lifespan startup (or on the first
    request when the server runs without lifespan) and drain on shutdown."""

    def __init__(self, models: Sequence[ModelRuntime], config: ServeConfig,
                 batching: dict[tuple[str, str], BatchSettings] | None = None):
        self.repo = ModelRepository(models)
        self.config = config
        self.metrics = ServerMetrics()
        self.max_bytes = config.transport.max_request_bytes
        default = config.batching  # a model without its own settings (config.pbtxt) batches as the recipe says
        self.served: dict[int, _Served] = {}
        for m in self.repo.all():
            mm = self.metrics.for_model(m.name, m.version, m.provider)
            settings = (batching or {}).get((m.name, m.version), default)
            self.served[id(m)] = _Served(m, Batcher(m, settings, mm), mm)
        self._started = False
        # Set by a worker process (stages.serve.workers): whether every worker of the server is
        # ready, so that /v2/health/ready answers for the whole server whichever worker it reaches.
        self.peers_ready: Callable[[], bool] | None = None
        self._static = {"/v2": protocol.dumps({"name": SERVER_NAME, "version": PRODUCT_VERSION,
                                               "extensions": EXTENSIONS}),
                        "/v2/health/live": b'{"live":true}'}

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            for s in self.served.values():
                s.batcher.start()

    def stop(self) -> None:
        for s in self.served.values():
            s.batcher.stop(timeout=self.config.transport.graceful_shutdown_s)

    @property
    def ready(self) -> bool:
        return all(s.runtime.ready for s in self.served.values()) and (self.peers_ready is None or self.peers_ready())

    def batcher(self, name: str, version: str | None = None) -> Batcher:
        return self.served[id(self.repo.get(name, version))].batcher

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has already waited for in-flight requests; the queues are empty or draining.
                await asyncio.get_running_loop().run_in_executor(None, self.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        if not self._started:
            self.start()
        path = scope["path"]
        method = scope["method"]
        try:
            static = self._static.get(path)
            if static is not None:
                _allow(method, "GET")
                return await _send(send, 200, static)
            if path == "/v2/health/ready":
                _allow(method, "GET")
                ok = self.ready
                return await _send(send, 200 if ok else 503, b'{"ready":true}' if ok else b'{"ready":false}')
            if path == "/metrics":
                _allow(method, "GET")
                return await _send(send, 200, self.metrics.render(),
                                   [(b"content-type", METRICS_CONTENT_TYPE.encode())])
            parts = path.split("/")
            # ["", "v2", "models", name, ("versions", v), (action)]
            if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
                raise HttpError(404, f"no route {path}; see /v2, /v2/health/live|ready, /v2/models/NAME[/versions/V]"
                                     "[/ready|/infer], /metrics")
            name, rest, version = unquote(parts[3]), parts[4:], None
            if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                version, rest = unquote(rest[1]), rest[2:]
            if rest == ["infer"]:
                _allow(method, "POST")
                return await self._infer(scope, receive, send, name, version)
            model = self.repo.get(name, version)
            if not rest:
                _allow(method, "GET")
                doc = {**model.metadata(), "versions": list(self.repo.by_name[name])}
                return await _send(send, 200, protocol.dumps(doc))
            if rest == ["ready"]:
                _allow(method, "GET")
                ok = model.ready and self.served[id(model)].batcher.alive
                return await _send(send, 200 if ok else 503, protocol.dumps(
                    {"name": model.name, "version": model.version, "ready": ok}))
            raise HttpError(404, f"no route {path}")
        except HttpError as e:
            await _send(send, e.status, protocol.dumps({"error": str(e)}))

    async def _infer(self, scope, receive, send, name: str, version: str | None) -> None:
        start = time.perf_counter()
        served = self.served[id(self.repo.get(name, version))]  # 404 before reading the body
        model = served.runtime
        try:
            body = await _read_body(scope, receive, self.max_bytes)
            header_length = _header_length(scope)
            if len(body) > INLINE_DECODE_BYTES:
                parsed, feeds, names = await asyncio.get_running_loop().run_in_executor(
                    None, _decode, model, body, header_length)
            else:
                parsed, feeds, names = _decode(model, body, header_length)
            outputs = await served.batcher.infer(feeds)
            tensors = [protocol.Tensor(n, outputs[n]) for n in names]
            binary = [parsed.wants_binary(n) for n in names]
            if len(body) > INLINE_DECODE_BYTES:
                payload, json_length = await asyncio.get_running_loop().run_in_executor(
                    None, protocol.encode_infer_response, model.name, model.version, tensors, binary, parsed.id)
            else:
                payload, json_length = protocol.encode_infer_response(model.name, model.version, tensors, binary,
                                                                      parsed.id)
        except HttpError as e:
            served.metrics.failure.inc()
            return await _send(send, e.status, protocol.dumps({"error": str(e)}))
        except QueueFull as e:  # admission control (serve.batching.max_queue_size): come back later
            served.metrics.rejected.inc()
            return await _send(send, 503, protocol.dumps({"error": str(e)}),
                               [*_JSON, (b"retry-after", str(QueueFull.retry_after_s).encode())])
        except protocol.ProtocolError as e:
            served.metrics.failure.inc()
            return await _send(send, 400, protocol.dumps({"error": str(e)}))
        except Exception as e:
            served.metrics.failure.inc()
            log.exception("inference on model %r version %s failed", model.name, model.version)
            return await _send(send, 500, protocol.dumps({"error": f"inference failed: {type(e).__name__}: {e}"}))
        if json_length is None:
            await _send(send, 200, payload)
        else:
            await _send(send, 200, payload, [(b"content-type", b"application/octet-stream"),
                                             (_HEADER_LENGTH, str(json_length).encode())])
        served.metrics.success.inc()
        served.metrics.request_seconds.observe(time.perf_counter() - start)


def _decode(model: ModelRuntime, body: bytes, header_length: int | None):
    """Body -> (request, checked feeds, output names); every problem a ProtocolError naming the field."""
    parsed = protocol.parse_infer_request(body, header_length)
    problems = []
    feeds = names = None
    try:
        feeds = model.check_inputs(parsed.inputs)
    except protocol.ProtocolError as e:
        problems.append(str(e))
    try:
        names = model.check_outputs(parsed.outputs)
    except protocol.ProtocolError as e:
        problems.append(str(e))
    if problems:
        raise protocol.ProtocolError("; ".join(problems))
    return parsed, feeds, names


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise HttpError(405, f"method {method} not allowed here; use {allowed}")


def _header_length(scope) -> int | None:
    for key, value in scope["headers"]:
        if key == _HEADER_LENGTH:
            try:
                return int(value)
            except ValueError:
                raise protocol.ProtocolError(f"Inference-Header-Content-Length: expected an integer byte count, "
                                             f"got {value.decode('latin-1')!r}") from None
    return None


async def _read_body(scope, receive, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``max_bytes`` (before reading it when the
    client sends Content-Length, else while it streams in)."""
    too_large = f"request body exceeds max_request_mb ({max_bytes / 2**20:g} MiB)"
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit() and int(value) > max_bytes:
            raise HttpError(413, f"{too_large}: Content-Length is {int(value)} bytes")
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > max_bytes:
            raise HttpError(413, too_large)
        return body
    chunks, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise HttpError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _send(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or _JSON), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(models: Sequence[ModelRuntime], config: ServeConfig,
               batching: dict[tuple[str, str], BatchSettings] | None = None) -> App:
    """The ASGI app serving ``models`` (already loaded and warm) over the v2 REST API."""
    return App(models, config, batching)


def uvicorn_config(app: App, config: ServeConfig, log_level: str = "info"):
    """uvicorn settings for serving: uvloop + httptools where installed, no access log (a log line
    per request costs as much as a small inference), graceful shutdown bounded."""
    import importlib.util

    import uvicorn

    fast = importlib.util.find_spec("uvloop") is not None and importlib.util.find_spec("httptools") is not None
    transport = config.transport
    return uvicorn.Config(app, host=transport.host, port=transport.port, log_level=log_level, access_log=False,
                          loop="uvloop" if fast else "asyncio", http="httptools" if fast else "h11",
                          interface="asgi3", lifespan="on", backlog=2048,
                          proxy_headers=False,  # nothing here reads the client address; saves a wrapper per request
                          timeout_graceful_shutdown=transport.graceful_shutdown_s)


def serve(models: Sequence[ModelRuntime], config: ServeConfig,
          batching: dict[tuple[str, str], BatchSettings] | None = None, *, sockets: list | None = None,
          on_started: Callable[[App], None] | None = None, peers_ready: Callable[[], bool] | None = None) -> None:
    """Run the v2 server until SIGTERM / Ctrl-C; in-flight requests finish first (up to graceful_shutdown_s).

    A worker process of ``stages.serve.workers`` passes the ``sockets`` it bound (SO_REUSEPORT),
    ``on_started`` (called once the server accepts connections: it tells the supervisor) and
    ``peers_ready`` (readiness of the other workers)."""
    import gc

    import uvicorn

    app = create_app(models, config, batching)
    app.peers_ready = peers_ready
    # Workers share the gRPC port too (SO_REUSEPORT), once the gRPC transport serves beside HTTP.
    app.grpc_reuse_port = sockets is not None
    if sockets is None:
        transport = config.transport
        host = f"[{transport.host}]" if ":" in transport.host else transport.host
        log.info("KServe v2 server at http://%s:%d/v2 serving %s", host, transport.port,
                 ", ".join(f"{m.name} v{m.version} on {m.provider}" for m in models))

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_started is not None and not self.should_exit:
                on_started(app)

    # Everything loaded so far (modules, sessions, warm-up buffers) lives as long as the server: move it
    # out of the garbage collector's view. Otherwise a full collection walks those ~200k objects while
    # every request waits: 100-270 ms pauses, measured with gc.callbacks, were the whole p99 at
    # concurrency 128 (p99 10x p50; after the freeze, full collections take ~10 ms).
    gc.collect()
    gc.freeze()
    Server(uvicorn_config(app, config)).run(sockets=sockets)
