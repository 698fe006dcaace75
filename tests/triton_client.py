"""Run by test_serve_cli.py in .venv-triton (tritonclient[http] + numpy only: tritonclient pins
protobuf and ml_dtypes versions that onnx and mlflow in .venv do not accept).

Talks to a running onnx-pipeline server with Triton's own HTTP client in its default binary mode
and prints what it got as one JSON document on stdout.

    .venv-triton/bin/python tests/triton_client.py --url 127.0.0.1:8000 --model digits --input x.npy
"""

import argparse
import json

import numpy as np
import tritonclient.http as httpclient

ap = argparse.ArgumentParser()
ap.add_argument("--url", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--version", default="")
ap.add_argument("--input", required=True, help=".npy file fed to the model's first input")
args = ap.parse_args()

client = httpclient.InferenceServerClient(url=args.url)
meta = client.get_model_metadata(args.model, args.version)
x = np.load(args.input)
inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), meta["inputs"][0]["datatype"])
inp.set_data_from_numpy(x)  # binary_data=True is the default
out_name = meta["outputs"][0]["name"]
named = client.infer(args.model, [inp], model_version=args.version, request_id="triton-1",
                     outputs=[httpclient.InferRequestedOutput(out_name)])  # binary_data=True by default
unnamed = client.infer(args.model, [inp], model_version=args.version)  # binary_data_output for all outputs
print(json.dumps({
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(args.model, args.version),
    "server": client.get_server_metadata(),
    "metadata": meta,
    "id": named.get_response().get("id"),
    "binary": all("binary_data_size" in o.get("parameters", {}) for o in named.get_response()["outputs"]),
    "output": named.as_numpy(out_name).tolist(),
    "output_unnamed": unnamed.as_numpy(out_name).tolist(),
}))
