"""serve: a KServe v2 / Open Inference Protocol REST server over ONNX Runtime.

Transport, runtime and batching live apart: ``protocol`` is the v2 JSON schemas and tensor codec,
``runtime`` owns the ONNX Runtime sessions (``load_model`` -> a warm ``ModelRuntime``) and the
recipe's ``serve:`` ``Config``, ``app`` holds the HTTP routes (``create_app``) and ``serve``, which
runs uvicorn. A dynamic batcher, when it comes, wraps ``ModelRuntime.infer``.

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
    # The recipe loader imports this package for `Config`; FastAPI (about 0.5 s to import) is only
    # pulled in when the server is actually built.
    if name in ("create_app", "serve"):
        from stages.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
