"""Run by the serve tests in .venv-triton (tritonclient[http,grpc] + numpy only: tritonclient pins
protobuf and ml_dtypes versions that onnx and mlflow in .venv do not accept).

Talks to a running onnx-pipeline server with Triton's own clients and prints what it got as one JSON
document on stdout. HTTP (default): metadata, infer in the default binary mode, and with ``--config``
``get_model_config`` and ``get_inference_statistics``. gRPC (``--grpc``): the same through
``tritonclient.grpc`` (infer with raw contents, as that client sends), config and statistics as JSON,
and every ``--bad`` request's gRPC status code and message.

    .venv-triton/bin/python tests/triton_client.py --url 127.0.0.1:8000 --model digits --input x.npy
    .venv-triton/bin/python tests/triton_client.py --grpc --url 127.0.0.1:8001 --model digits --input x.npy \
        --bad nan --bad wrong-datatype --bad unknown-model
"""

import argparse
import json

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--url", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--version", default="")
ap.add_argument("--input", required=True, help=".npy file fed to the model's first input")
ap.add_argument("--grpc", action="store_true", help="use tritonclient.grpc (url is the gRPC port)")
ap.add_argument("--config", action="store_true", help="also get_model_config and get_inference_statistics")
ap.add_argument("--bad", action="append", default=[],
                help="gRPC: send a bad request and report its status (nan, wrong-datatype, unknown-model, bad-shape)")
args = ap.parse_args()
x = np.load(args.input)


def http() -> dict:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=args.url)
    meta = client.get_model_metadata(args.model, args.version)
    inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), meta["inputs"][0]["datatype"])
    inp.set_data_from_numpy(x)  # binary_data=True is the default
    out_name = meta["outputs"][0]["name"]
    named = client.infer(args.model, [inp], model_version=args.version, request_id="triton-1",
                         outputs=[httpclient.InferRequestedOutput(out_name)])  # binary_data=True by default
    unnamed = client.infer(args.model, [inp], model_version=args.version)  # binary_data_output for all outputs
    doc = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model, args.version),
        "server": client.get_server_metadata(),
        "metadata": meta,
        "id": named.get_response().get("id"),
        "binary": all("binary_data_size" in o.get("parameters", {}) for o in named.get_response()["outputs"]),
        "output": named.as_numpy(out_name).tolist(),
        "output_unnamed": unnamed.as_numpy(out_name).tolist(),
    }
    if args.config:
        doc["config"] = client.get_model_config(args.model, args.version)
        doc["stats"] = client.get_inference_statistics(args.model, args.version)
        doc["stats_all"] = client.get_inference_statistics()
    return doc


def grpc() -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url=args.url)
    meta = client.get_model_metadata(args.model, args.version, as_json=True)
    name, datatype = meta["inputs"][0]["name"], meta["inputs"][0]["datatype"]
    out_name = meta["outputs"][0]["name"]
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)  # raw_input_contents
    result = client.infer(args.model, [inp], model_version=args.version, request_id="grpc-1",
                          outputs=[grpcclient.InferRequestedOutput(out_name)])
    doc = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model, args.version),
        "server": client.get_server_metadata(as_json=True),
        "metadata": meta,
        "config": client.get_model_config(args.model, args.version, as_json=True),
        "id": result.get_response().id,
        "raw": len(result.get_response().raw_output_contents) == 1,
        "output": result.as_numpy(out_name).tolist(),
    }
    errors = {}
    for bad in args.bad:
        model, data, dt = args.model, x, datatype
        if bad == "nan":
            data = x.copy()
            data.flat[3] = np.nan
        elif bad == "wrong-datatype":
            data, dt = x.astype(np.int64), "INT64"
        elif bad == "unknown-model":
            model = "nope"
        elif bad == "bad-shape":
            data = x.reshape(x.shape[0], -1)
        bad_input = grpcclient.InferInput(name, list(data.shape), dt)
        bad_input.set_data_from_numpy(data)
        try:
            client.infer(model, [bad_input], model_version=args.version)
            errors[bad] = None
        except InferenceServerException as e:
            errors[bad] = {"status": e.status(), "message": e.message()}
    doc["errors"] = errors
    doc["stats"] = client.get_inference_statistics(args.model, args.version, as_json=True)
    return doc


print(json.dumps(grpc() if args.grpc else http()))
