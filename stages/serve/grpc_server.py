"""The gRPC transport: KServe v2's ``inference.GRPCInferenceService`` (Triton's), beside HTTP, in one process.

The RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed
``contents`` or ``raw_input_contents`` in; ``raw_output_contents`` out, as Triton answers), and Triton's
ModelConfig and ModelStatistics. The others (streaming, repository control, shared memory, tracing)
answer UNIMPLEMENTED. Triton's own clients (``tritonclient.grpc``, ``perf_analyzer -i grpc``) work
unchanged.

Like the HTTP routes, this only translates: messages come from Triton's vendored ``grpc_service.proto``
(``stages.serve.triton``: no protoc, no generated code, no grpcio-tools), the service is a set of
generic method handlers, and every request goes through ``App.infer``, the path HTTP uses, with the
same models, batchers, metrics and statistics. Errors are gRPC status codes carrying HTTP's message:
400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 413 -> RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE,
500 -> INTERNAL. The server runs on the event loop of the HTTP server (``grpc.aio``), started by the
app's lifespan when ``transport.grpc_port`` is not 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from stages.common import PRODUCT_VERSION
from stages.serve import protocol, triton
from stages.serve.app import EXTENSIONS, INLINE_DECODE_BYTES, SERVER_NAME, HttpError, StartupError

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE}


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
        self._server = None
        self._stopping = None
        self._handlers = {
            "ServerLive": ("ServerLiveRequest", "ServerLiveResponse", self.server_live),
            "ServerReady": ("ServerReadyRequest", "ServerReadyResponse", self.server_ready),
            "ModelReady": ("ModelReadyRequest", "ModelReadyResponse", self.model_ready),
            "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse", self.server_metadata),
            "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse", self.model_metadata),
            "ModelInfer": ("ModelInferRequest", "ModelInferResponse", self.model_infer),
            "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse", self.model_config),
            "ModelStatistics": ("ModelStatisticsRequest", "ModelStatisticsResponse", self.model_statistics),
        }

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> int:
        transport = self.app.config.transport
        options = [("grpc.so_reuseport", 1 if self.reuse_port else 0),
                   ("grpc.max_receive_message_length", transport.max_request_bytes),
                   ("grpc.max_send_message_length", -1)]
        server = grpc.aio.server(options=options)
        handlers = {}
        for method, (request, response, handler) in self._handlers.items():
            # Requests arrive as bytes and are parsed in the handler, so a malformed message is an
            # INVALID_ARGUMENT naming it rather than grpc's generic deserialization failure.
            handlers[method] = grpc.unary_unary_rpc_method_handler(
                self._wrap(handler, _message(request)), response_serializer=_message(response).SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host = transport.host
        address = f"[{host}]:{transport.grpc_port}" if ":" in host else f"{host}:{transport.grpc_port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            self.port = 0
            reason = str(e)
        else:
            reason = "port in use?"
        if not self.port:
            raise StartupError(f"gRPC could not listen on {address} ({reason}): another server may hold port "
                               f"{transport.grpc_port}; pass --grpc-port N (serve.transport.grpc_port), or 0 "
                               "to serve HTTP only")
        await server.start()
        self._server = server
        log.info("KServe v2 gRPC (inference.GRPCInferenceService) at %s", address)
        return self.port

    def begin_stop(self) -> None:
        """Refuse new calls now; in-flight ones get graceful_shutdown_s."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(self.app.config.transport.graceful_shutdown_s))

    async def stop(self) -> None:
        self.begin_stop()
        if self._stopping is not None:
            await self._stopping
        self._server = None

    # --- plumbing ----------------------------------------------------------------------------------

    @staticmethod
    def _wrap(handler, request_class):
        async def call(data: bytes, context):
            try:
                request = request_class.FromString(data)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request is not a valid {request_class.DESCRIPTOR.full_name}: {e}")
            try:
                return await handler(request, context)
            except HttpError as e:
                await context.abort(STATUS.get(e.status, grpc.StatusCode.INTERNAL), str(e))
        return call

    def _served(self, name: str, version: str):
        return self.app.served_model(name, version or None)  # "" is the default version, as in Triton

    # --- the RPCs ----------------------------------------------------------------------------------

    async def server_live(self, request, context):
        return _message("ServerLiveResponse")(live=True)

    async def server_ready(self, request, context):
        return _message("ServerReadyResponse")(ready=self.app.ready)

    async def model_ready(self, request, context):
        served = self._served(request.name, request.version)
        return _message("ModelReadyResponse")(ready=served.runtime.ready and served.batcher.alive)

    async def server_metadata(self, request, context):
        return _message("ServerMetadataResponse")(name=SERVER_NAME, version=PRODUCT_VERSION, extensions=EXTENSIONS)

    async def model_metadata(self, request, context):
        model = self._served(request.name, request.version).runtime
        response = _message("ModelMetadataResponse")(name=model.name, platform=model.platform,
                                                     versions=list(self.app.repo.by_name[model.name]))
        for kind, specs in (("inputs", model.inputs), ("outputs", model.outputs)):
            for s in specs:
                getattr(response, kind).add(name=s.name, datatype=s.datatype.name, shape=list(s.shape))
        return response

    async def model_config(self, request, context):
        response = _message("ModelConfigResponse")()
        response.config.CopyFrom(self._served(request.name, request.version).config())
        return response

    async def model_statistics(self, request, context):
        doc = self.app.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(doc, _message("ModelStatisticsResponse")())

    async def model_infer(self, request, context):
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
