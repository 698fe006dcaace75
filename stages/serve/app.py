"""The HTTP transport's routes: KServe v2 / Open Inference Protocol REST, as ``App.handle``.

``App.handle(method, path, headers, read_body) -> (status, headers, body)`` is every route, whichever
wire brings the request: ``http_protocol.HttpProtocol`` (our HTTP/1.1 protocol on httptools, which
``serve`` runs inside uvicorn's server) calls it directly; ``App`` is also an ASGI app, whose HTTP
side is a thin adapter over ``handle`` (uvicorn's h11 protocol uses it when httptools is missing) and
whose lifespan starts the batchers and gRPC.

Routes only translate HTTP: read the body (bounded), hand it to ``App.infer`` (the transport-neutral
path the gRPC transport shares: ``protocol`` decodes, the model's ``ModelRuntime`` checks, its
``Batcher`` runs, ``stats`` records), and return the answer. Status codes: 400 for a request
that breaks the protocol or does not fit the model (the JSON ``error`` names the field), 404 for an
unknown model, version or route, 405 for a wrong method, 408 for a client too slow to send its
headers or body (``header_timeout_s``, ``body_timeout_s``), 413 for a body above ``max_request_mb``,
503 while not ready or when shutdown cuts a request, 500 (logged, server keeps running) for anything
else. Every error body is JSON with an ``error``; no answer holds non-standard JSON.

Routes: ``/v2``, ``/v2/health/live|ready``, ``/v2/models/NAME[/versions/V]`` (metadata), ``.../ready``,
``.../infer``, ``.../config`` (Triton's model configuration: what the server really applies),
``.../stats`` and ``/v2/models/stats`` (Triton's statistics extension), ``/metrics`` (Prometheus).
With ``transport.grpc_port`` set, the lifespan also starts the gRPC transport (``grpc_server``) on
this event loop, sharing the models, batchers, metrics and statistics.

Why a plain method and not FastAPI routing (or ASGI messages per request): on the infer hot path,
FastAPI's dependency injection, Starlette's Request object and a thread-pool hop cost more than
decoding a one-sample request, and so did uvicorn's ASGI machinery (see ``http_protocol``). Here a
request costs a dict lookup to route; small bodies are decoded on the event loop (tens of
microseconds) and only bodies above ``INLINE_DECODE_BYTES`` go to a thread so a large request cannot
stall the others; inference waits on the batcher's own thread.
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
from stages.serve.repository import check_unique
from stages.serve.runtime import ModelRuntime
from stages.serve.stats import ModelStats, Timing

log = logging.getLogger(__name__)

SERVER_NAME = "onnx-pipeline"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]  # Triton names; perf_analyzer reads "statistics"
INLINE_DECODE_BYTES = 256 * 1024  # larger bodies are decoded (and answers encoded) in a worker thread
_JSON = [(b"content-type", b"application/json")]
_METRICS = [(b"content-type", METRICS_CONTENT_TYPE.encode())]
_HEADER_LENGTH = b"inference-header-content-length"


Answer = tuple  # (status: int, headers: list[(bytes, bytes)] | None (JSON), body: bytes): what a route returns


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers  # extra response headers (HTTP only), e.g. Retry-After on a full queue


class ModelRepository:
    """The served models by name and version; the highest version (as Triton) is a name's default."""

    def __init__(self, models: Sequence[ModelRuntime]):
        if not models:
            raise ValueError("create_app needs at least one model to serve")
        check_unique(models)
        self.by_name: dict[str, dict[str, ModelRuntime]] = {}
        for m in models:
            self.by_name.setdefault(m.name, {})[m.version] = m
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


class StartupError(RuntimeError):
    """The server could not start (say, the gRPC port is taken); the message says what to change."""


class _Served:
    """What the transports hold per model version: runtime, batcher, metric series, statistics, the
    batch settings and input policy it is served with, and its applied configuration (Triton's form)."""

    __slots__ = ("runtime", "batcher", "metrics", "stats", "settings", "allow_non_finite", "_config")

    def __init__(self, runtime, batcher, metrics, stats, settings, allow_non_finite):
        self.runtime, self.batcher, self.metrics, self.stats = runtime, batcher, metrics, stats
        self.settings, self.allow_non_finite, self._config = settings, allow_non_finite, None

    def config(self):
        """Triton's ``ModelConfig`` message of what this server applies to the model (built once)."""
        if self._config is None:
            from stages.serve.repository import served_config

            self._config = served_config(self.runtime, self.settings, self.allow_non_finite)
        return self._config


class App:
    """The served models and their routes (``handle``), and the ASGI application (lifespan, and HTTP through
    ``handle``). Batchers start on lifespan startup (or on the first request when the server runs without
    lifespan) and drain on shutdown."""

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
            stats = ModelStats(m.name, m.version)
            allow = config.inputs.allow_non_finite if m.allow_non_finite is None else m.allow_non_finite
            self.served[id(m)] = _Served(m, Batcher(m, settings, mm, stats), mm, stats, settings, allow)
        self._started = False
        self.grpc = None  # the gRPC transport (grpc_server.GrpcServer) while it runs
        self.grpc_reuse_port = False  # worker processes sharing one gRPC port set this (SO_REUSEPORT)
        self.startup_error: str | None = None
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
                try:
                    await self.start_grpc()
                except StartupError as e:
                    self.startup_error = str(e)
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has already waited for in-flight requests; the queues are empty or draining.
                await self.stop_grpc()
                await asyncio.get_running_loop().run_in_executor(None, self.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start_grpc(self) -> None:
        """Start the gRPC transport on this event loop when ``transport.grpc_port`` is set (StartupError
        when its port cannot be bound)."""
        port = self.config.transport.grpc_port
        if port and self.grpc is None:
            from stages.serve.grpc_server import GrpcServer  # protobuf messages and hpack load only when gRPC is on

            self.grpc = GrpcServer(self, reuse_port=self.grpc_reuse_port)
            await self.grpc.start()

    def begin_shutdown(self) -> None:
        """Stop taking new gRPC calls now (in-flight ones finish within graceful_shutdown_s); HTTP's own
        shutdown runs in uvicorn."""
        if self.grpc is not None:
            self.grpc.begin_stop()

    async def stop_grpc(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
            self.grpc = None

    async def _http(self, scope, receive, send) -> None:
        """The ASGI adapter over ``handle`` (for an ASGI server other than ours: uvicorn's h11 fallback)."""
        status, headers, body = await self.handle(scope["method"], scope["path"], scope["headers"],
                                                  lambda: _receive_body(receive, self.max_bytes))
        await send({"type": "http.response.start", "status": status,
                    "headers": [*(headers or _JSON), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    # --- the routes (transport-neutral: http_protocol and the ASGI adapter call this) ----------------

    async def handle(self, method: str, path: str, headers: list[tuple[bytes, bytes]], read_body) -> Answer:
        """One HTTP request -> ``(status, headers, body)``; ``headers`` None means ``content-type:
        application/json`` (the transport adds Content-Length). ``path`` is percent-decoded, ``headers``
        have lower-case names, ``read_body()`` returns the body (HttpError 413 above ``max_bytes``, 400
        if the client left); it is called only by the routes that take a body, after their 404 and 413
        checks."""
        if not self._started:
            self.start()
        try:
            static = self._static.get(path)
            if static is not None:
                _allow(method, "GET")
                return 200, None, static
            if path == "/v2/health/ready":
                _allow(method, "GET")
                ok = self.ready
                return (200, None, b'{"ready":true}') if ok else (503, None, b'{"ready":false}')
            if path == "/metrics":
                _allow(method, "GET")
                return 200, _METRICS, self.metrics.render()
            parts = path.split("/")
            # ["", "v2", "models", name, ("versions", v), (action)]
            if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
                raise HttpError(404, f"no route {path}; see /v2, /v2/health/live|ready, /v2/models/NAME[/versions/V]"
                                     "[/ready|/infer|/config|/stats], /v2/models/stats, /metrics")
            if len(parts) == 4 and parts[3] == "stats":  # every model's statistics (Triton's route)
                _allow(method, "GET")
                return 200, None, protocol.dumps(self.statistics())
            name, rest, version = unquote(parts[3]), parts[4:], None
            if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                version, rest = unquote(rest[1]), rest[2:]
            if rest == ["infer"]:
                _allow(method, "POST")
                return await self._infer(headers, read_body, name, version)
            model = self.repo.get(name, version)
            if not rest:
                _allow(method, "GET")
                doc = {**model.metadata(), "versions": list(self.repo.by_name[name])}
                return 200, None, protocol.dumps(doc)
            if rest == ["ready"]:
                _allow(method, "GET")
                ok = model.ready and self.served[id(model)].batcher.alive
                return 200 if ok else 503, None, protocol.dumps({"name": model.name, "version": model.version,
                                                                 "ready": ok})
            if rest == ["config"]:
                _allow(method, "GET")
                from stages.serve import triton

                return 200, None, protocol.dumps(triton.to_json(self.served[id(model)].config()))
            if rest == ["stats"]:
                _allow(method, "GET")
                return 200, None, protocol.dumps(self.statistics(name, version))
            raise HttpError(404, f"no route {path}")
        except HttpError as e:
            return e.status, None, protocol.dumps({"error": str(e)})

    async def _infer(self, headers, read_body, name: str, version: str | None) -> Answer:
        start = time.perf_counter_ns()
        served = self.served[id(self.repo.get(name, version))]  # 404 before reading the body
        model = served.runtime
        try:
            header_length = _check_headers(headers, self.max_bytes)
            body = await read_body()
        except (HttpError, protocol.ProtocolError) as e:
            self.failed(served, start)
            return getattr(e, "status", 400), None, protocol.dumps({"error": str(e)})

        def encode(parsed, tensors):
            binary = [parsed.wants_binary(t.name) for t in tensors]
            return protocol.encode_infer_response(model.name, model.version, tensors, binary, parsed.id)

        try:
            payload, json_length = await self.infer(
                served, lambda: protocol.parse_infer_request(body, header_length), encode,
                offload=len(body) > INLINE_DECODE_BYTES, start_ns=start)
        except HttpError as e:
            return e.status, [*_JSON, *e.headers] if e.headers else None, protocol.dumps({"error": str(e)})
        except asyncio.CancelledError:
            # Shutdown's grace period ran out with this request still running: answer 503 (retry
            # elsewhere), not a 500 with a CancelledError traceback.
            return 503, None, protocol.dumps({"error": "the server shut down before this request finished "
                                                       "(graceful_shutdown_s ran out); retry it"})
        if json_length is None:
            return 200, None, payload
        return 200, [(b"content-type", b"application/octet-stream"),
                     (_HEADER_LENGTH, str(json_length).encode())], payload

    # --- the transport-neutral infer path (HTTP and gRPC) ------------------------------------------

    def served_model(self, name: str, version: str | None = None) -> _Served:
        """The served model version (HttpError 404 naming what is served)."""
        return self.served[id(self.repo.get(name, version))]

    async def infer(self, served: _Served, decode, encode, offload: bool = False, start_ns: int | None = None):
        """One infer request, whichever transport it came by: ``decode()`` -> ``protocol.InferRequest``,
        the model's checks (and its non-finite policy), the batcher, ``encode(request, tensors)`` -> the
        transport's answer, which is returned. Raises HttpError: 400 (the ProtocolError's message), 503
        (shutting down) or 500 (logged); records metrics and statistics either way. ``offload``: decode
        and encode in a worker thread (large requests must not stall the event loop)."""
        start = time.perf_counter_ns() if start_ns is None else start_ns
        model = served.runtime
        loop = asyncio.get_running_loop()
        timing = Timing()
        try:
            if not served.batcher.alive and self._started:
                raise HttpError(503, f"model {model.name!r} version {model.version} is not accepting requests: "
                                     "the server is shutting down")
            if offload:
                parsed, feeds, names = await loop.run_in_executor(None, _decode, served, decode)
            else:
                parsed, feeds, names = _decode(served, decode)
            decoded = time.perf_counter_ns()
            outputs = await served.batcher.infer(feeds, timing)
            tensors = [protocol.Tensor(n, outputs[n]) for n in names]
            inferred = time.perf_counter_ns()
            if offload:
                answer = await loop.run_in_executor(None, encode, parsed, tensors)
            else:
                answer = encode(parsed, tensors)
        except HttpError:
            self.failed(served, start)
            raise
        except protocol.ProtocolError as e:
            self.failed(served, start)
            raise HttpError(400, str(e)) from None
        except QueueFull as e:  # admission control (serve.batching.max_queue_size): come back later
            served.metrics.rejected.inc()
            served.stats.failed(time.perf_counter_ns() - start)
            raise HttpError(503, str(e), [(b"retry-after", str(QueueFull.retry_after_s).encode())]) from None
        except asyncio.CancelledError:
            self.failed(served, start)
            raise
        except Exception as e:
            self.failed(served, start)
            log.exception("inference on model %r version %s failed", model.name, model.version)
            raise HttpError(500, f"inference failed: {type(e).__name__}: {e}") from None
        end = time.perf_counter_ns()
        rows = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else 1
        served.stats.succeeded(end - start, rows, decoded - start, timing, end - inferred)
        served.metrics.success.inc()
        served.metrics.request_seconds.observe((end - start) / 1e9)
        return answer

    def failed(self, served: _Served, start_ns: int) -> None:
        served.metrics.failure.inc()
        served.stats.failed(time.perf_counter_ns() - start_ns)

    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics document: every model, one name (all its versions) or one version (404 if unknown)."""
        if name is None:
            models = self.repo.all()
        elif version is None:
            self.repo.get(name)
            models = list(self.repo.by_name[name].values())
        else:
            models = [self.repo.get(name, version)]
        return {"model_stats": [self.served[id(m)].stats.to_dict() for m in models]}


def _decode(served: _Served, decode):
    """``decode()`` (a transport's parser) -> (request, checked feeds, output names); every problem a
    ProtocolError naming the field."""
    model = served.runtime
    parsed = decode()
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
    if not served.allow_non_finite and not parsed.finite:
        protocol.refuse_non_finite(parsed.inputs, " (serve.inputs.allow_non_finite is false for it)")
    return parsed, feeds, names


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise HttpError(405, f"method {method} not allowed here; use {allowed}")


def _check_headers(headers, max_bytes: int) -> int | None:
    """An infer request's headers: 413 when Content-Length is above ``max_bytes`` (before the body is
    read); the binary extension's Inference-Header-Content-Length (ProtocolError when not an integer)."""
    length = header_length = None
    for key, value in headers:
        if key == b"content-length":
            length = value
        elif key == _HEADER_LENGTH:
            header_length = value
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise body_too_large(max_bytes, f"Content-Length is {int(length)} bytes")
    if header_length is None:
        return None
    try:
        return int(header_length)
    except ValueError:
        raise protocol.ProtocolError(f"Inference-Header-Content-Length: expected an integer byte count, "
                                     f"got {header_length.decode('latin-1')!r}") from None


def body_too_large(max_bytes: int, detail: str = "") -> HttpError:
    """The 413 of a request body above ``max_request_mb`` (the transports raise it while reading)."""
    return HttpError(413, f"request body exceeds max_request_mb ({max_bytes / 2**20:g} MiB)" +
                     (f": {detail}" if detail else ""))


async def _receive_body(receive, max_bytes: int) -> bytes:
    """An ASGI request's body, refused (413) as soon as it is known to exceed ``max_bytes``."""
    message = await receive()
    chunks, size = [message.get("body", b"")], len(message.get("body", b""))
    while True:
        if message["type"] == "http.disconnect":
            raise HttpError(400, "client disconnected before the body was complete")
        if size > max_bytes:
            raise body_too_large(max_bytes)
        if not message.get("more_body"):
            return b"".join(chunks)
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)


def create_app(models: Sequence[ModelRuntime], config: ServeConfig,
               batching: dict[tuple[str, str], BatchSettings] | None = None) -> App:
    """The app serving ``models`` (already loaded and warm) over the v2 REST API (``handle``, and as ASGI)."""
    return App(models, config, batching)


def uvicorn_config(app: App, config: ServeConfig, log_level: str = "info"):
    """uvicorn settings for serving: uvloop where installed, our HTTP/1.1 protocol (``http_protocol``:
    httptools' parser calling ``App.handle``, with the header/body timeouts and the shutdown cut), no
    access log (a log line per request costs as much as a small inference), keep-alive and graceful
    shutdown bounded. uvicorn runs the server around the protocol: sockets, lifespan, signals, shutdown."""
    import importlib.util

    import uvicorn

    transport = config.transport
    if importlib.util.find_spec("httptools") is not None:  # a declared dependency; h11 only as a last resort
        from stages.serve.http_protocol import HttpProtocol

        http = HttpProtocol
    else:
        log.warning("httptools is not installed: serving with uvicorn's h11 protocol (the ASGI adapter), slower "
                    "and without header and body timeouts")
        http = "h11"
    uconfig = uvicorn.Config(app, host=transport.host, port=transport.port, log_level=log_level, access_log=False,
                             loop="uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio",
                             http=http, interface="asgi3", lifespan="on", backlog=2048,
                             proxy_headers=False,  # nothing here reads the client address; saves a wrapper per request
                             timeout_keep_alive=transport.keep_alive_s,
                             timeout_graceful_shutdown=transport.graceful_shutdown_s)
    uconfig.serve_app = app  # read by HttpProtocol (uvicorn's loaded_app may be a wrapper)
    uconfig.header_timeout_s = transport.header_timeout_s
    uconfig.body_timeout_s = transport.body_timeout_s
    return uconfig


def uvicorn_server(app: App, uconfig, on_started: Callable[[App], None] | None = None):
    """uvicorn's Server, telling ``app`` when shutdown begins (so gRPC stops taking calls with HTTP) and
    ``on_started`` once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_started is not None and not self.should_exit:
                on_started(app)

        async def shutdown(self, sockets=None):
            app.begin_shutdown()
            await super().shutdown(sockets)

    return Server(uconfig)


LOOPBACK = ("127.0.0.1", "localhost", "::1", "ip6-localhost")


def warn_if_exposed(host: str) -> None:
    """A warning when the server listens beyond this machine: it has no authentication or TLS."""
    import ipaddress

    try:
        local = host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        local = False
    if not local:
        where = "every network interface" if host in ("0.0.0.0", "::", "") else f"{host}"
        log.warning("serving on %s: anyone who can reach this machine can call the models (the server has no "
                    "authentication or TLS); bind 127.0.0.1 and put an authenticating proxy in front to expose "
                    "it", where)


def serve(models: Sequence[ModelRuntime], config: ServeConfig,
          batching: dict[tuple[str, str], BatchSettings] | None = None, *, sockets: list | None = None,
          on_started: Callable[[App], None] | None = None, peers_ready: Callable[[], bool] | None = None) -> None:
    """Run the v2 server (HTTP, and gRPC unless ``grpc_port`` is 0) until SIGTERM / Ctrl-C; in-flight
    requests finish first (up to graceful_shutdown_s). StartupError when a port cannot be bound.

    A worker process of ``stages.serve.workers`` passes the ``sockets`` it bound (SO_REUSEPORT; its
    gRPC port is shared the same way), ``on_started`` (called once the server accepts connections: it
    tells the supervisor) and ``peers_ready`` (readiness of the other workers)."""
    import gc

    app = create_app(models, config, batching)
    app.peers_ready = peers_ready
    app.grpc_reuse_port = sockets is not None
    if sockets is None:
        transport = config.transport
        host = f"[{transport.host}]" if ":" in transport.host else transport.host
        warn_if_exposed(transport.host)
        grpc = f" and grpc://{host}:{transport.grpc_port}" if transport.grpc_port else ""
        log.info("KServe v2 server at http://%s:%d/v2%s serving %s", host, transport.port, grpc,
                 ", ".join(f"{m.name} v{m.version} on {m.provider}" for m in models))
    server = uvicorn_server(app, uvicorn_config(app, config), on_started)
    # Everything loaded so far (modules, sessions, warm-up buffers) lives as long as the server: move it
    # out of the garbage collector's view. Otherwise a full collection walks those ~200k objects while
    # every request waits: 100-270 ms pauses, measured with gc.callbacks, were the whole p99 at
    # concurrency 128 (p99 10x p50; after the freeze, full collections take ~10 ms).
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=sockets)
    except SystemExit as e:
        if e.code in (None, 0) or server.started:  # a signal's exit (the CLI's handlers), not a failed start
            raise
        raise StartupError(app.startup_error or f"the server could not start (uvicorn exited with {e.code}); "
                           f"see the log above") from None
