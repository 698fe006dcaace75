"""serve: the v2 protocol codec, the runtime's checks, the serve config's validation, and a real server.

The HTTP tests export a tiny CNN to ONNX, start uvicorn on a free loopback port in a background
thread and talk to it with httpx, comparing every answer with an in-process ONNX Runtime session.
Binary tensors, datatypes, batching, metrics and repositories are in test_serve_extensions.py;
the CLI (repository, --require-gpu, Triton's client, graceful shutdown) in test_serve_cli.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time

import numpy as np
import pytest

from stages.serve.config import BatchSettings, RuntimeSettings, ServeConfig, TransportSettings
from stages.serve.protocol import ProtocolError, Tensor, infer_response, parse_infer_request
from stages.serve.runtime import load_model

MODEL = "digits"
PROPS = {"labels": json.dumps([str(i) for i in range(10)]), "input.layout": "NCHW",
         "lineage.training_run_id": "run-123"}


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    import onnx
    import torch

    import models

    torch.manual_seed(0)
    model = models.build("cnn", models.cnn.Config(channels=(4, 8), hidden=16), (1, 8, 8), 10).eval()
    path = tmp_path_factory.mktemp("serve") / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    for k, v in PROPS.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def runtime(onnx_path):
    return load_model(onnx_path, MODEL, version="3", runtime=RuntimeSettings(device="cpu", intra_op_threads=1),
                      lineage={"model_uri": "models:/digits@champion"})


@pytest.fixture(scope="module")
def reference(onnx_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def client(runtime):
    import httpx

    config = serve_config(max_request_mb=0.01)  # 10 KiB: lets a test hit the 413 cheaply
    with running_server([runtime], config) as base, httpx.Client(base_url=base, timeout=10) as http:
        yield http


def serve_config(batching: BatchSettings = BatchSettings(), **transport) -> ServeConfig:
    """A serve config on a free loopback port, gRPC off unless asked (``transport`` overrides the rest of
    that part: parallel test sessions must not all bind gRPC's default port 8001)."""
    return ServeConfig(transport=TransportSettings(**{"port": free_port(), "grpc_port": 0, **transport}),
                       batching=batching)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models, config, batching=None):
    """uvicorn (as `pipeline serve` configures it) on a loopback port in a thread; yields the base URL.
    Stops it (graceful shutdown: batchers drain) on exit."""
    with running_uvicorn(models, config, batching) as (base, _):
        yield base


@contextlib.contextmanager
def running_uvicorn(models, config, batching=None, http=None):
    """``running_server``, yielding the base URL and uvicorn's Server (its ``server_state.connections``
    are our protocol's connections); ``http`` replaces the HTTP protocol (say, "h11")."""
    from stages.serve.app import create_app, uvicorn_config, uvicorn_server

    app = create_app(models, config, batching)
    uconfig = uvicorn_config(app, config, log_level="warning")
    if http is not None:
        uconfig.http = http
    server = uvicorn_server(app, uconfig)
    server.config.install_signal_handlers = False  # not the main thread
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.transport.port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def request_body(x: np.ndarray, datatype: str = "FP32", name: str = "input", nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": data}], **extra}


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


# --- protocol (no HTTP) -----------------------------------------------------------------------

def test_parse_flat_and_nested_data_give_the_same_array():
    x = batch(2)
    flat = parse_infer_request(json.dumps(request_body(x, id="a", outputs=[{"name": "logits"}])).encode())
    nested = parse_infer_request(json.dumps(request_body(x, nested=True)))
    for parsed in (flat, nested):
        (t,) = parsed.inputs
        assert t.name == "input" and t.array.dtype == np.float32 and t.array.shape == (2, 1, 8, 8)
        np.testing.assert_array_equal(t.array, x)
    assert flat.id == "a" and flat.outputs == ["logits"] and nested.id is None and nested.outputs is None


@pytest.mark.parametrize("datatype,data,dtype", [
    ("BOOL", [True, False], np.bool_), ("UINT8", [0, 255], np.uint8), ("INT8", [-128, 127], np.int8),
    ("INT32", [1, -2], np.int32), ("INT64", [2**40, -1], np.int64), ("UINT64", [2**64 - 1, 0], np.uint64),
    ("UINT64", [2**63, 1], np.uint64),
    ("FP16", [0.5, 1], np.float16), ("FP64", [0.1, 2], np.float64), ("BYTES", ["a", "bc"], object),
])
def test_parse_every_datatype(datatype, data, dtype):
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": datatype, "data": data}]}
    (t,) = parse_infer_request(json.dumps(body)).inputs
    assert t.array.dtype == dtype and t.array.tolist() == data and t.datatype == datatype


@pytest.mark.parametrize("body,expected", [
    (b"{not json", "request body is not valid JSON"),
    (b"[1, 2]", "request body: "),
    (b"{}", "inputs: Field required"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FLOAT", "data": [1, 2]}]},
     "inputs[0].datatype: unknown datatype 'FLOAT'"),
    ({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2]}]},
     "inputs[0].data: shape [2,3] needs 6 values, got 2"),
    ({"inputs": [{"name": "x", "shape": ["2"], "datatype": "FP32", "data": [1, 2]}]}, "inputs[0].shape[0]: "),
    ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, "inputs[0].shape[0]: "),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}, "inputs[0].data: Field required"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2], "dtype": "x"}]},
     "inputs[0].dtype: Extra inputs are not permitted"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]},
     "inputs[0].data: FP32 needs numbers (or the strings \"NaN\", \"Infinity\", \"-Infinity\"), got strings"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, None]}]}, "inputs[0].data: FP32 needs"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1.5, 2]}]},
     "inputs[0].data: INT64 needs integers, got non-integer numbers"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 300]}]},
     "inputs[0].data: UINT8 holds 0..255"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [2**63]}]},
     "inputs[0].data: INT64 holds"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT64", "data": [2**70]}]},
     "inputs[0].data: UINT64 holds"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}]}, "inputs[0].data: BOOL needs"),
    ({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [[1, 2], [3]]}]}, "inputs[0].data: "),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2},
     "inputs[1].name: input 'x' is given twice"),
])
def test_parse_errors_name_the_field(body, expected):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ProtocolError) as e:
        parse_infer_request(raw)
    assert str(e.value).startswith(expected), str(e.value)


def test_parse_reports_every_bad_input_at_once():
    bad = {"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [1]},
                      {"name": "b", "shape": [1], "datatype": "NOPE", "data": [1]}]}
    with pytest.raises(ProtocolError, match=r"inputs\[0\]\.data: .*; inputs\[1\]\.datatype: "):
        parse_infer_request(json.dumps(bad))


def test_infer_response_encodes_flat_data_and_echoes_id():
    out = Tensor("logits", np.arange(6, dtype=np.float32).reshape(2, 3))
    doc = infer_response("m", "1", [out], id="req-7")
    assert doc == {"model_name": "m", "model_version": "1", "id": "req-7", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}]}
    assert "id" not in infer_response("m", "1", [out])


# --- the serve config -------------------------------------------------------------------------

def test_serve_config_defaults_bind_loopback_and_batch():
    c = ServeConfig()
    assert (c.transport.host, c.transport.port, c.transport.max_request_mb) == ("127.0.0.1", 8000, 32.0)
    assert (c.runtime.device, c.runtime.intra_op_threads, c.runtime.require_gpu) == ("auto", 0, False)
    assert c.batching == BatchSettings(enabled=True, max_batch_size=64, max_queue_delay_ms=0.0)
    assert ServeConfig.from_dict({}) == c == ServeConfig.from_dict(None)
    nested = {"transport": {"port": 9000}, "runtime": {"device": "cpu", "allow_spinning": False},
              "batching": {"max_batch_size": 8, "max_queue_delay_ms": 2, "preferred_batch_sizes": [4, 8]}}
    c = ServeConfig.from_dict(nested)
    assert c.transport.port == 9000 and c.runtime.session_settings().allow_spinning is False
    assert c.batching == BatchSettings(True, 8, 2.0, (4, 8))


@pytest.mark.parametrize("data,message", [
    ({"transport": {"port": 0}}, "`serve.transport.port` must be an integer between 1 and 65535, got 0"),
    ({"transport": {"port": 70000}}, "`serve.transport.port` must be an integer between 1 and 65535, got 70000"),
    ({"transport": {"port": True}}, "`serve.transport.port` must be an integer"),
    ({"transport": {"max_request_mb": 0}}, "`serve.transport.max_request_mb` must be a finite number > 0, got 0"),
    ({"transport": {"host": ""}}, "`serve.transport.host` must be a non-empty"),
    ({"transport": {"prot": 1}}, "unknown key `serve.transport.prot`; valid keys in `serve.transport`: "
                                 "body_timeout_s, graceful_shutdown_s, grpc_port, header_timeout_s, host, keep_alive_s, "
                                 "max_request_mb, port"),
    ({"runtime": {"intra_op_threads": -1}}, "`serve.runtime.intra_op_threads` must be an integer >= 0"),
    ({"runtime": {"device": "gpu"}}, "`serve.runtime.device` must be one of auto, cpu, cuda, got 'gpu'"),
    ({"runtime": {"allow_spinning": "yes"}}, "`serve.runtime.allow_spinning` must be true, false or auto"),
    ({"runtime": {"require_gpu": True, "device": "cpu"}}, "`serve.runtime.require_gpu` cannot hold with device cpu"),
    ({"batching": {"max_batch_size": 0}}, "`serve.batching.max_batch_size` must be an integer >= 1, got 0"),
    ({"batching": {"max_queue_delay_ms": -1}}, "`serve.batching.max_queue_delay_ms` must be a finite number >= 0"),
    ({"batching": {"enabled": "yes"}}, "`serve.batching.enabled` must be true or false"),
    ({"batching": {"preferred_batch_sizes": [128]}}, "`serve.batching.preferred_batch_sizes` must be a list of "
                                                     "integers within 1..max_batch_size (64)"),
    ({"batching": 3}, "`serve.batching` must be a mapping"),
    ({"runtim": {}}, "unknown key `serve.runtim`; valid keys in `serve`: batching, inputs, runtime, transport"),
    # The flat section of before: one error naming each key's new place.
    ({"port": 8001, "max_batch_size": 8}, "`serve.port` moved to `serve.transport.port`; "
                                          "`serve.max_batch_size` moved to `serve.batching.max_batch_size`"),
    ({"dynamic_batching": False}, "`serve.dynamic_batching` moved to `serve.batching.enabled`"),
])
def test_serve_config_validation_names_the_full_key(data, message):
    with pytest.raises(ValueError) as e:
        ServeConfig.from_dict(data)
    assert str(e.value).startswith(message), str(e.value)


def test_serve_config_reads_without_the_heavy_libraries():
    """The settings module is what a torch-free server reads first: it imports no onnxruntime, torch or numpy."""
    import subprocess
    import sys

    code = ("import sys; from stages.serve.config import ServeConfig; ServeConfig.from_dict({'transport': {'port': 1}}); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'numpy') if m in sys.modules))")
    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- runtime (no HTTP) ------------------------------------------------------------------------

def test_load_model_refuses_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "nope.onnx", "m")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        load_model(junk, "m")


def test_runtime_checks_report_every_problem(runtime):
    bad = [Tensor("input", np.zeros((1, 2, 8), np.int64)), Tensor("extra", np.zeros(1, np.float32))]
    with pytest.raises(ProtocolError) as e:
        runtime.infer(bad, ["logits", "probs"])
    msg = str(e.value)
    assert "inputs[0].datatype: expected FP32 for input 'input', got INT64" in msg
    assert "inputs[0].shape: input 'input' needs 4 dims [-1,1,8,8]" in msg
    assert "inputs[1].name: unknown input 'extra'" in msg
    assert "outputs[1].name: unknown output 'probs'" in msg
    with pytest.raises(ProtocolError, match="inputs: missing input 'input' \\(FP32, shape \\[-1,1,8,8\\]\\)"):
        runtime.infer([])


# --- HTTP -------------------------------------------------------------------------------------

def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    assert client.get(f"/v2/models/{MODEL}/versions/3/ready").status_code == 200
    meta = client.get("/v2").json()
    assert meta["name"] == "onnx-pipeline" and meta["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"] and meta["version"]


def test_model_metadata(client, onnx_path):
    for url in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/3"):
        r = client.get(url)
        assert r.status_code == 200
        meta = r.json()
        assert meta["name"] == MODEL and meta["versions"] == ["3"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        params = meta["parameters"]
        assert {k: params[k] for k in PROPS} == PROPS
        assert params["model_uri"] == "models:/digits@champion"
        assert json.loads(params["execution_providers"]) == ["CPUExecutionProvider"]
        assert params["execution_provider"] == "CPUExecutionProvider" and params["io_binding"] is False
        # Lineage: what the file says, and the file's own hash.
        assert params["lineage.mlflow_run_id"] == "run-123"
        assert params["lineage.onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        for key in ("lineage.registered_version", "lineage.dataset_sha256", "lineage.variant"):
            assert key in params


@pytest.mark.parametrize("n", [1, 5])
def test_infer_matches_onnxruntime(client, reference, n):
    x = batch(n, seed=n)
    r = client.post(f"/v2/models/{MODEL}/infer", json=request_body(x, nested=n == 5, id=f"req-{n}"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == MODEL and doc["model_version"] == "3" and doc["id"] == f"req-{n}"
    (out,) = doc["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [n, 10]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    assert np.allclose(got, reference(x), atol=1e-5)


def test_infer_versioned_route_and_requested_outputs(client, reference):
    x = batch(2)
    r = client.post(f"/v2/models/{MODEL}/versions/3/infer", json=request_body(x, outputs=[{"name": "logits"}]))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert "id" not in doc and [o["name"] for o in doc["outputs"]] == ["logits"]
    r = client.post(f"/v2/models/{MODEL}/infer", json=request_body(x, outputs=[{"name": "probs"}]))
    assert r.status_code == 400 and "outputs[0].name: unknown output 'probs'" in r.json()["error"]


@pytest.mark.parametrize("body,expected", [
    (b"{not json", "request body is not valid JSON"),
    ({"id": "x"}, "inputs: "),
    (request_body(batch(1), name="image"), "inputs[0].name: unknown input 'image'"),
    (request_body(batch(1).astype(np.int64), datatype="INT64"),
     "inputs[0].datatype: expected FP32 for input 'input', got INT64"),
    ({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]},
     "inputs[0].data: shape [2,1,8,8] needs 128 values, got 64"),
    (request_body(np.zeros((1, 64), np.float32)), "inputs[0].shape: input 'input' needs 4 dims"),
    (request_body(np.zeros((1, 3, 8, 8), np.float32)), "inputs[0].shape: dim 1 of input 'input' must be 1"),
])
def test_bad_requests_get_400_naming_the_problem(client, body, expected):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(f"/v2/models/{MODEL}/infer", **kwargs)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(expected), r.json()["error"]


def test_unknown_model_version_route_and_large_body(client):
    r = client.post("/v2/models/nope/infer", json=request_body(batch(1)))
    assert r.status_code == 404 and r.json()["error"] == f"model 'nope' not found; served models: ['{MODEL}']"
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404
    r = client.get(f"/v2/models/{MODEL}/versions/9")
    assert r.status_code == 404 and "version '9' not found" in r.json()["error"]
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"].startswith("no route /v2/nothing")
    r = client.get(f"/v2/models/{MODEL}/infer")
    assert r.status_code == 405 and "use POST" in r.json()["error"]
    r = client.post(f"/v2/models/{MODEL}/infer", json=request_body(batch(16)))  # ~20 KiB > 10 KiB
    assert r.status_code == 413 and "max_request_mb" in r.json()["error"]


def test_chunked_body_over_the_limit_gets_413(client):
    # No Content-Length: the limit is enforced while the body streams in.
    r = client.post(f"/v2/models/{MODEL}/infer", content=(b"x" * 4096 for _ in range(4)))
    assert r.status_code == 413 and "max_request_mb" in r.json()["error"]


def test_unexpected_failure_is_500_and_logged(client, runtime, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("session exploded")

    monkeypatch.setattr(runtime, "run", broken)
    with caplog.at_level("ERROR", logger="stages.serve.app"):
        r = client.post(f"/v2/models/{MODEL}/infer", json=request_body(batch(1)))
    assert r.status_code == 500 and "session exploded" in r.json()["error"]
    assert "inference on model 'digits' version 3 failed" in caplog.text


def test_server_still_answers_after_bad_requests(client, reference):
    # Runs last in the file: every bad and failing request above has already hit this server.
    x = batch(3, seed=42)
    r = client.post(f"/v2/models/{MODEL}/infer", json=request_body(x))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert np.allclose(np.asarray(out["data"], np.float32).reshape(3, 10), reference(x), atol=1e-5)
