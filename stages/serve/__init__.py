"""serve: a KServe v2 / Open Inference Protocol REST server over ONNX Runtime, with dynamic batching.

Transport, runtime and batching live apart, as in MLServer: the routes only translate HTTP, the
runtime owns the sessions, the batcher wraps the runtime's ``run``. The modules:

- ``protocol``: the v2 JSON schemas and tensor codec, JSON and binary (no HTTP, no sessions),
- ``runtime``: ONNX Runtime sessions (providers, threads, I/O binding, warm-up), the recipe's
  ``serve:`` ``Config`` and the request checks (``load_model`` -> a warm ``ModelRuntime``),
- ``batcher``: the dynamic batcher wrapping ``ModelRuntime.run`` on its own thread,
- ``repository``: Triton-layout model repositories and their config.pbtxt,
- ``metrics``: the Prometheus series,
- ``app``: the HTTP routes (``create_app``, a lean ASGI app) and ``serve``, which runs uvicorn.

    runtime = load_model("runs/x/model.onnx", "digits")
    serve([runtime], Config(port=8000))   # http://127.0.0.1:8000/v2
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stages.serve.runtime import Config, ModelRuntime, load_model

if TYPE_CHECKING:
    from stages.serve.app import create_app, serve

__all__ = ["Config", "ModelRuntime", "load_model", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # The recipe loader imports this package for `Config`; the server's imports (uvicorn,
    # prometheus-client, orjson) are only pulled in when the server is actually built.
    if name in ("create_app", "serve"):
        from stages.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
