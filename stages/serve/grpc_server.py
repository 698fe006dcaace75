"""The gRPC transport: KServe v2's ``inference.GRPCInferenceService`` (Triton's), beside HTTP, in one process.

The RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed
``contents`` or ``raw_input_contents`` in; ``raw_output_contents`` out, as Triton answers), and Triton's
ModelConfig and ModelStatistics. The others (streaming, repository control, shared memory, tracing)
answer UNIMPLEMENTED. Triton's own clients (``tritonclient.grpc``, ``perf_analyzer -i grpc``) work
unchanged.

Like the HTTP routes, this only translates: messages come from Triton's vendored ``grpc_service.proto``
(``stages.serve.triton``: no protoc, no generated code, no grpcio-tools), a call's path picks its
handler, and every request goes through ``App.infer``, the path HTTP uses, with the same models,
batchers, metrics and statistics. Errors are gRPC status codes carrying HTTP's message:
400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 408 -> DEADLINE_EXCEEDED, 413 -> RESOURCE_EXHAUSTED,
503 -> UNAVAILABLE, 500 -> INTERNAL. The wire (HTTP/2 frames, HPACK, flow control, gRPC's message
framing, deadlines, graceful stop) is ``http2.Http2Server``, on the event loop of the HTTP server,
started by the app's lifespan when ``transport.grpc_port`` is not 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from stages.common import PRODUCT_VERSION
from stages.serve import protocol, triton
from stages.serve.app import EXTENSIONS, INLINE_DECODE_BYTES, SERVER_NAME, HttpError, StartupError
from stages.serve.http2 import (DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
                                UNAVAILABLE, UNIMPLEMENTED, GrpcError, Http2Server)

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
STATUS = {400: INVALID_ARGUMENT, 404: NOT_FOUND, 408: DEADLINE_EXCEEDED, 413: RESOURCE_EXHAUSTED, 503: UNAVAILABLE}


def _message(name: str) -> type:
    return triton.message_class(f"inference.{name}")


class GrpcServer:
    """``inference.GRPCInferenceService`` for an ``App``'s models, on ``app.config.transport``'s host and
    ``grpc_port``. ``reuse_port``: several worker processes share the port (SO_REUSEPORT); off, a port
    already taken is a StartupError, not a silent second listener."""

    def __init__(self, app, reuse_port: bool = False):
        self.app = app
        self.reuse_port = reuse_port
        self.port = 0  # bound port, once started
        self._server: Http2Server | None = None
        self._stopping = None
        rpcs = {
            "ServerLive": ("ServerLiveRequest", self.server_live),
            "ServerReady": ("ServerReadyRequest", self.server_ready),
            "ModelReady": ("ModelReadyRequest", self.model_ready),
            "ServerMetadata": ("ServerMetadataRequest", self.server_metadata),
            "ModelMetadata": ("ModelMetadataRequest", self.model_metadata),
            "ModelInfer": ("ModelInferRequest", self.model_infer),
            "ModelConfig": ("ModelConfigRequest", self.model_config),
            "ModelStatistics": ("ModelStatisticsRequest", self.model_statistics),
        }
        self._handlers = {f"/{SERVICE}/{method}".encode(): (_message(request), handler)
                          for method, (request, handler) in rpcs.items()}

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> int:
        transport = self.app.config.transport
        host = transport.host
        address = f"[{host}]:{transport.grpc_port}" if ":" in host else f"{host}:{transport.grpc_port}"
        server = Http2Server(self.call, max_message_bytes=transport.max_request_bytes)
        try:
            self.port = await server.start(host, transport.grpc_port, reuse_port=self.reuse_port)
        except OSError as e:
            raise StartupError(f"gRPC could not listen on {address} ({e.strerror or e}): another server may hold "
                               f"port {transport.grpc_port}; pass --grpc-port N (serve.transport.grpc_port), or 0 "
                               "to serve HTTP only") from None
        self._server = server
        log.info("KServe v2 gRPC (inference.GRPCInferenceService) at %s", address)
        return self.port

    def begin_stop(self) -> None:
        """Refuse new calls now; in-flight ones get graceful_shutdown_s."""
        if self._server is not None and self._stopping is None:
            self._server.begin_stop()
            self._stopping = asyncio.ensure_future(self._server.stop(self.app.config.transport.graceful_shutdown_s))

    async def stop(self) -> None:
        self.begin_stop()
        if self._stopping is not None:
            await self._stopping
        self._server = None

    # --- plumbing ----------------------------------------------------------------------------------

    async def call(self, path: bytes, data: bytes) -> bytes:
        """One unary call (``http2.Http2Server``'s handler): the serialized response, or GrpcError."""
        entry = self._handlers.get(path)
        if entry is None:
            raise GrpcError(UNIMPLEMENTED, f"Method not found: {path.decode('latin-1')}")
        request_class, handler = entry
        # Requests arrive as bytes and are parsed here, so a malformed message is an INVALID_ARGUMENT
        # naming it.
        try:
            request = request_class.FromString(data)
        except DecodeError as e:
            raise GrpcError(INVALID_ARGUMENT, f"request is not a valid {request_class.DESCRIPTOR.full_name}: {e}") from None
        try:
            response = await handler(request)
        except HttpError as e:
            raise GrpcError(STATUS.get(e.status, INTERNAL), str(e)) from None
        return response.SerializeToString()

    def _served(self, name: str, version: str):
        return self.app.served_model(name, version or None)  # "" is the default version, as in Triton

    # --- the RPCs ----------------------------------------------------------------------------------

    async def server_live(self, request):
        return _message("ServerLiveResponse")(live=True)

    async def server_ready(self, request):
        return _message("ServerReadyResponse")(ready=self.app.ready)

    async def model_ready(self, request):
        served = self._served(request.name, request.version)
        return _message("ModelReadyResponse")(ready=served.runtime.ready and served.batcher.alive)

    async def server_metadata(self, request):
        return _message("ServerMetadataResponse")(name=SERVER_NAME, version=PRODUCT_VERSION, extensions=EXTENSIONS)

    async def model_metadata(self, request):
        model = self._served(request.name, request.version).runtime
        response = _message("ModelMetadataResponse")(name=model.name, platform=model.platform,
                                                     versions=list(self.app.repo.by_name[model.name]))
        for kind, specs in (("inputs", model.inputs), ("outputs", model.outputs)):
            for s in specs:
                getattr(response, kind).add(name=s.name, datatype=s.datatype.name, shape=list(s.shape))
        return response

    async def model_config(self, request):
        response = _message("ModelConfigResponse")()
        response.config.CopyFrom(self._served(request.name, request.version).config())
        return response

    async def model_statistics(self, request):
        doc = self.app.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(doc, _message("ModelStatisticsResponse")())

    async def model_infer(self, request):
        start = time.perf_counter_ns()
        served = self._served(request.model_name, request.model_version)
        model = served.runtime
        response_class = _message("ModelInferResponse")

        def encode(parsed, tensors):
            response = response_class(model_name=model.name, model_version=model.version, id=parsed.id or "")
            for t in tensors:
                response.outputs.add(name=t.name, datatype=t.datatype, shape=t.array.shape)
                response.raw_output_contents.append(protocol.tensor_bytes(t.array))
            return response

        large = sum(len(raw) for raw in request.raw_input_contents) > INLINE_DECODE_BYTES
        return await self.app.infer(served, lambda: protocol.parse_grpc_infer_request(request), encode,
                                    offload=large, start_ns=start)
