"""The HTTP transport: KServe v2 / Open Inference Protocol REST routes over ``ModelRuntime``.

Routes only translate HTTP. They read the raw body (so a bad request gets this protocol's
``{"error": ...}`` with a message naming the field, never FastAPI's own 422 document), hand it to
``protocol`` to decode, to ``ModelRuntime.infer`` to run, and write the answer back. Status codes:
400 for a request that breaks the protocol or does not fit the model, 404 for an unknown model or
version, 413 for a body above ``max_request_mb``, 500 (logged, server keeps running) for anything
else. Decoding and inference are blocking, so they run in the thread pool, off the event loop.
"""

from __future__ import annotations

import logging
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from stages.common import PRODUCT_VERSION
from stages.serve import protocol
from stages.serve.runtime import Config, ModelRuntime

log = logging.getLogger(__name__)

SERVER_NAME = "onnx-pipeline"


class _NotFound(Exception):
    pass


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ModelRepository:
    """The served models by name and version; the first version given for a name is its default."""

    def __init__(self, models: Sequence[ModelRuntime]):
        if not models:
            raise ValueError("create_app needs at least one model to serve")
        self.by_name: dict[str, dict[str, ModelRuntime]] = {}
        for m in models:
            versions = self.by_name.setdefault(m.name, {})
            if m.version in versions:
                raise ValueError(f"model {m.name!r} version {m.version!r} is given twice")
            versions[m.version] = m

    def get(self, name: str, version: str | None = None) -> ModelRuntime:
        versions = self.by_name.get(name)
        if versions is None:
            raise _NotFound(f"model {name!r} not found; served models: {sorted(self.by_name)}")
        if version is None:
            return next(iter(versions.values()))
        if version not in versions:
            raise _NotFound(f"model {name!r} version {version!r} not found; served versions: {list(versions)}")
        return versions[version]

    def all(self) -> list[ModelRuntime]:
        return [m for versions in self.by_name.values() for m in versions.values()]


def create_app(models: Sequence[ModelRuntime], config: Config) -> FastAPI:
    """A FastAPI app serving ``models`` (already loaded and warm) over the v2 REST API."""
    repo = ModelRepository(models)
    max_bytes = config.max_request_bytes
    app = FastAPI(title=SERVER_NAME, version=PRODUCT_VERSION,
                  description="KServe v2 / Open Inference Protocol over ONNX Runtime")
    app.state.models = repo

    @app.exception_handler(_NotFound)
    async def not_found(request: Request, exc: _NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods answer in the protocol's {"error": ...} shape too.
        return _error(exc.status_code, str(exc.detail))

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": PRODUCT_VERSION, "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        # Models are warmed up before the app exists, so this is 200 unless one was unloaded.
        ok = all(m.ready for m in repo.all())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        model = repo.get(name, version)
        return {**model.metadata(), "versions": list(repo.by_name[name])}

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        # The spec asks for a non-200 when not ready; 503 is what load balancers expect.
        model = repo.get(name, version)
        return JSONResponse({"name": model.name, "version": model.version, "ready": model.ready},
                            status_code=200 if model.ready else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        model = repo.get(name, version)
        try:
            body = await _read_body(request, max_bytes)
        except _TooLarge as e:
            return _error(413, str(e))
        try:
            payload = await run_in_threadpool(_infer_json, model, body)
        except protocol.ProtocolError as e:
            return _error(400, str(e))
        except Exception as e:
            log.exception("inference on model %r version %s failed", model.name, model.version)
            return _error(500, f"inference failed: {type(e).__name__}: {e}")
        return Response(payload, media_type="application/json")

    return app


def _infer_json(model: ModelRuntime, body: bytes) -> bytes:
    """Decode, run and encode in one thread-pool hop: all three block (JSON and numpy work grow
    with the tensor), so none of them runs on the event loop."""
    parsed = protocol.parse_infer_request(body)
    # A dynamic batcher will sit here, wrapping model.infer; the route stays the same.
    outputs = model.infer(parsed.inputs, parsed.outputs)
    return protocol.dumps(protocol.infer_response(model.name, model.version, outputs, parsed.id))


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``max_bytes`` (before it is all read
    when the client sends Content-Length, else while streaming it)."""
    too_large = f"request body exceeds max_request_mb ({max_bytes / 2**20:g} MiB)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _TooLarge(f"{too_large}: Content-Length is {int(declared)} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _TooLarge(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def serve(models: Sequence[ModelRuntime], config: Config) -> None:
    """Run the v2 server until interrupted (Ctrl-C / SIGTERM: uvicorn finishes in-flight requests)."""
    import uvicorn

    app = create_app(models, config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info("KServe v2 server at http://%s:%d/v2 serving %s", host, config.port,
             ", ".join(f"{m.name} v{m.version}" for m in models))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
