"""serve: a KServe v2 / Open Inference Protocol server (REST and gRPC) over ONNX Runtime, with dynamic batching.

Transport, runtime and batching live apart, as in MLServer: the routes only translate HTTP, the
runtime owns the sessions, the batcher wraps the runtime's ``run``. The modules:

- ``config``: the recipe's ``serve:`` section, ``ServeConfig`` with its transport, runtime,
  batching and inputs parts (light: no onnxruntime, torch or numpy),
- ``protocol``: the v2 JSON schemas and tensor codec, JSON, binary and the gRPC message's tensors, and
  every request check that needs no model (no HTTP, no sessions),
- ``runtime``: a served model's ONNX Runtime session (built by ``stages.sessions``), I/O binding,
  warm-up and the request checks (``load_model`` -> a warm ``ModelRuntime``),
- ``batcher``: the dynamic batcher wrapping ``ModelRuntime.run`` on its own thread,
- ``repository``: Triton-layout model repositories and their config.pbtxt,
- ``triton``: Triton's own protobuf schemas (vendored), for config.pbtxt,
- ``metrics``: the Prometheus series; ``stats``: Triton's statistics extension (both transports and the batcher),
- ``app``: the HTTP routes (``create_app``, ``App.handle``; also an ASGI app), the transport-neutral
  ``App.infer``, and ``serve``, which runs uvicorn's server with our HTTP/1.1 protocol,
- ``http_protocol``: that protocol, on httptools' parser: one write per answer, pipelining,
  header/body/keep-alive timeouts, the shutdown cut, backpressure,
- ``grpc_server``: the gRPC transport (``inference.GRPCInferenceService``) on the same event loop,
  over ``http2``: our own minimal HTTP/2 server for gRPC unary calls (frames, HPACK, flow control).

    runtime = load_model("runs/x/model.onnx", "digits")
    serve([runtime], ServeConfig(transport=TransportSettings(port=8000)))   # http://127.0.0.1:8000/v2
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.serve.app import create_app, serve
    from stages.serve.config import BatchSettings, RuntimeSettings, ServeConfig, TransportSettings
    from stages.serve.runtime import ModelRuntime, load_model

# Name -> submodule. Nothing is imported with the package: reading the settings (stages.serve.config)
# must not pull in numpy, onnxruntime, uvicorn or prometheus-client; each name loads its module on first use.
_EXPORTS = {"ServeConfig": "config", "TransportSettings": "config", "RuntimeSettings": "config",
            "BatchSettings": "config", "ModelRuntime": "runtime", "load_model": "runtime",
            "create_app": "app", "serve": "app"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"stages.serve.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
