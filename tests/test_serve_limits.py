"""serve under issue 14's hostile inputs and clients, each over a real socket: shapes at the int64 edges
(JSON and binary), NaN/±Infinity in and out, slow and idle clients (header, body and keep-alive
timeouts), a request cut by shutdown, a non-loopback --host, no server paths in model metadata, and the
models:/ download folder on SIGTERM."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

from stages.serve.config import InputSettings, RuntimeSettings, ServeConfig, TransportSettings
from stages.serve.runtime import load_model
from tests.test_serve import MODEL, batch, free_port, onnx_path, reference, request_body, running_server  # noqa: F401
from tests.test_serve_extensions import types_path  # noqa: F401

CPU = RuntimeSettings(device="cpu", intra_op_threads=1)
FAST = {"header_timeout_s": 0.5, "body_timeout_s": 0.6, "keep_alive_s": 0.5}


def strict_json(content: bytes):
    """json.loads that refuses NaN/Infinity tokens, as strict parsers (JavaScript's, Go's) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(content, parse_constant=refuse)


@pytest.fixture(scope="module")
def server(onnx_path, types_path):
    """digits (NaN refused, the default) and types (NaN allowed, as a config.pbtxt parameter would)."""
    import httpx

    digits = load_model(onnx_path, MODEL, runtime=CPU)
    types = load_model(types_path, "types", runtime=CPU)
    types.allow_non_finite = True
    config = ServeConfig(transport=TransportSettings(port=free_port(), grpc_port=0, **FAST))
    with running_server([digits, types], config) as base, httpx.Client(base_url=base, timeout=10) as http:
        yield http


# --- 1. dims at the int64 edges, before any arithmetic --------------------------------------------

EDGES = [([9223372036854775808, 0], "inputs[0].shape[0]: dims must be integers in 0..9223372036854775807, "
                                    "got 9223372036854775808"),
         ([4611686018427387904, 4, 0], "inputs[0].shape: [4611686018427387904,4,0] has more elements than a tensor can hold"),
         ([2**61, 0], "inputs[0].shape: [2305843009213693952,0] has more elements than a tensor can hold"),
         ([-1, 1, 8, 8], "inputs[0].shape[0]: dims must be integers in 0..9223372036854775807, got -1"),
         ([1] * 40, "inputs[0].shape: at most 32 dims, got 40"),
         ([2**64, 1, 8, 8], "inputs[0].shape[0]: dims must be integers")]


@pytest.mark.parametrize("shape,expected", EDGES)
@pytest.mark.parametrize("binary", [False, True])
def test_shapes_at_the_int64_edges_are_400_naming_the_field(server, shape, expected, binary):
    doc = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32"}]}
    if binary:
        doc["inputs"][0]["parameters"] = {"binary_data_size": 0}
        header = json.dumps(doc).encode()
        r = server.post(f"/v2/models/{MODEL}/infer", content=header,
                        headers={"Inference-Header-Content-Length": str(len(header))})
    else:
        doc["inputs"][0]["data"] = []
        r = server.post(f"/v2/models/{MODEL}/infer", json=doc)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(expected), r.json()["error"]


# --- 9. NaN and Infinity --------------------------------------------------------------------------

def test_non_finite_inputs_are_refused_by_default_json_and_binary(server):
    x = batch(2)
    x.flat[5], x.flat[70] = np.nan, -np.inf
    expected = ("inputs[0].data: input 'input' holds 2 non-finite value(s) (-Infinity, NaN; the first, NaN, at flat "
                "index 5); this model refuses NaN and Infinity (serve.inputs.allow_non_finite is false for it)")
    # JSON: the strings of protobuf's JSON mapping, and the bare tokens Python's json module writes.
    data = ["NaN" if v != v else "-Infinity" if v == -np.inf else v for v in x.ravel().tolist()]
    r = server.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{"name": "input", "shape": [2, 1, 8, 8],
                                                                   "datatype": "FP32", "data": data}]})
    assert (r.status_code, r.json()["error"]) == (400, expected)
    r = server.post(f"/v2/models/{MODEL}/infer", content=json.dumps(request_body(x)).encode())  # bare NaN tokens
    assert (r.status_code, r.json()["error"]) == (400, expected)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    r = server.post(f"/v2/models/{MODEL}/infer", content=header + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert (r.status_code, r.json()["error"]) == (400, expected)
    # A finite number beyond the datatype's range would become Infinity in the cast: refused too.
    r = server.post("/v2/models/types/infer", json={"inputs": [{"name": "in_FP16", "shape": [1, 2], "datatype": "FP16",
                                                                "data": [1e6, 1]}]})
    assert r.status_code == 400 and r.json()["error"].startswith("inputs[0].data: FP16 holds finite values up to")


def test_a_model_that_allows_non_finite_answers_them_as_standard_json(server):
    """types allows them: NaN/±Infinity go through, and come back as "NaN"/"Infinity"/"-Infinity"
    strings (protobuf's JSON mapping), never bare tokens; binary answers carry the IEEE bits."""
    from tests.test_serve_extensions import read_response, sample_values

    values = sample_values(1)
    values["in_FP32"] = np.array([[np.nan, np.inf]], np.float32)
    values["in_FP64"] = np.array([[-np.inf, 1.5]], np.float64)
    doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": n.removeprefix("in_"),
                       "data": [v if isinstance(v, (str, bool)) or v == v and abs(v) != float("inf") else
                                ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
                                for v in a.ravel().tolist()]} for n, a in values.items()]}
    r = server.post("/v2/models/types/infer", json=doc)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in strict_json(r.content)["outputs"]}  # standard JSON throughout
    assert outputs["out_FP32"] == ["NaN", "Infinity"] and outputs["out_FP64"] == ["-Infinity", 1.5]
    doc["parameters"] = {"binary_data_output": True}
    r = server.post("/v2/models/types/infer", json=doc)
    got = read_response(r)["out_FP32"]
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf


def test_allow_non_finite_per_model_from_config_pbtxt(tmp_path, onnx_path):
    from stages.serve.repository import RepositoryError, load_sources, scan_repository

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(onnx_path.read_bytes())
    pbtxt = tmp_path / "m" / "config.pbtxt"
    pbtxt.write_text('parameters { key: "allow_non_finite" value { string_value: "true" } }')
    assert scan_repository(tmp_path)[0].allow_non_finite is True
    runtimes, _ = load_sources(scan_repository(tmp_path), ServeConfig(inputs=InputSettings(allow_non_finite=False)))
    assert runtimes[0].allow_non_finite is True
    pbtxt.write_text('parameters { key: "allow_non_finite" value { string_value: "maybe" } }')
    with pytest.raises(RepositoryError, match='parameters "allow_non_finite" must have string_value "true" or "false"'):
        scan_repository(tmp_path)
    with pytest.raises(ValueError, match="`serve.inputs.allow_non_finite` must be true or false"):
        ServeConfig.from_dict({"inputs": {"allow_non_finite": "yes"}})


# --- 8. slow and idle clients ---------------------------------------------------------------------

def _connect(server) -> socket.socket:
    s = socket.create_connection((server.base_url.host, server.base_url.port), timeout=5)
    return s


def _read_all(s: socket.socket, limit: float = 5.0) -> bytes:
    s.settimeout(limit)
    chunks = []
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for over {limit} s") from None
    return b"".join(chunks)


def test_idle_and_half_sent_header_connections_are_closed(server):
    started = time.monotonic()
    idle = _connect(server)  # sends nothing at all
    half = _connect(server)
    half.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert _read_all(idle) == b""  # closed without an answer: there was no request
    answer = _read_all(half)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"header_timeout_s (0.5 s)" in answer, answer
    assert time.monotonic() - started < 3
    # Kept alive after an answer, then idle: closed after keep_alive_s.
    kept = _connect(server)
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_all(kept).startswith(b"HTTP/1.1 200 ")
    for s in (idle, half, kept):
        s.close()


def test_a_trickled_body_gets_408_after_the_body_timeout(server, reference):
    body = json.dumps(request_body(batch(1))).encode()
    s = _connect(server)
    s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    started = time.monotonic()
    answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body_timeout_s (0.6 s)" in answer, answer
    assert time.monotonic() - started < 3
    s.close()
    # The server still answers, correctly.
    x = batch(2, seed=8)
    r = server.post(f"/v2/models/{MODEL}/infer", json=request_body(x))
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 10), reference(x),
                               atol=1e-5)


def test_shutdown_cuts_a_trickled_body_with_503_not_a_500(onnx_path, caplog):
    """Graceful shutdown does not wait for a slow uploader, and the uploader hears 503 (retry elsewhere)."""
    import httpx

    runtime = load_model(onnx_path, MODEL, runtime=CPU)
    config = ServeConfig(transport=TransportSettings(port=free_port(), grpc_port=0, body_timeout_s=30,
                                                     graceful_shutdown_s=20))
    body = json.dumps(request_body(batch(1))).encode()
    with caplog.at_level(logging.INFO):
        with running_server([runtime], config) as base:
            s = socket.create_connection(("127.0.0.1", config.transport.port), timeout=5)
            s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                      .encode() + body[:10])
            assert httpx.get(f"{base}/v2/health/live").status_code == 200
            started = time.monotonic()
        # running_server's exit is uvicorn's graceful shutdown; it returned long before graceful_shutdown_s.
        assert time.monotonic() - started < 5
        answer = _read_all(s)
        s.close()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"shutting down" in answer, answer
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text, caplog.text
    assert "CancelledError" not in caplog.text


def test_a_request_cancelled_at_the_end_of_the_grace_period_gets_503(onnx_path, caplog):
    import httpx

    from stages.serve.config import BatchSettings

    runtime = load_model(onnx_path, MODEL, runtime=CPU)
    config = ServeConfig(transport=TransportSettings(port=free_port(), grpc_port=0, graceful_shutdown_s=0.5))
    answer = {}
    # A 3 s batching delay keeps the request in the server past the 0.5 s grace period.
    with caplog.at_level(logging.INFO):
        with running_server([runtime], config, {(MODEL, "1"): BatchSettings(max_queue_delay_ms=3000)}) as base:
            def call():
                answer["r"] = httpx.post(f"{base}/v2/models/{MODEL}/infer", json=request_body(batch(1)), timeout=10)

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)
        caller.join(10)
    r = answer["r"]
    assert r.status_code == 503 and "graceful_shutdown_s ran out" in r.json()["error"], r.text
    assert "Exception in ASGI application" not in caplog.text and "CancelledError" not in caplog.text


def test_transport_timeouts_are_validated():
    for key in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
        with pytest.raises(ValueError, match=f"`serve.transport.{key}` must be a finite number > 0"):
            ServeConfig.from_dict({"transport": {key: 0}})
    with pytest.raises(ValueError, match="`serve.transport.grpc_port` must differ from port"):
        ServeConfig.from_dict({"transport": {"port": 9000, "grpc_port": 9000}})


# --- also noticed: --host, paths in metadata, the models:/ download -----------------------------------

@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("::", True), ("192.0.2.7", True), ("example.org", True),
                                         ("127.0.0.1", False), ("localhost", False), ("::1", False)])
def test_a_non_loopback_host_is_warned_about(host, warned, caplog):
    from stages.serve.app import warn_if_exposed

    with caplog.at_level(logging.WARNING, logger="stages.serve.app"):
        warn_if_exposed(host)
    assert ("no authentication" in caplog.text) == warned, caplog.text


def test_metadata_holds_no_absolute_server_path(tmp_path, onnx_path):
    """--model PATH and --model-repository DIR: the metadata names files, never where they are."""
    from pipeline.cli import _model_source
    from stages.serve.repository import scan_repository

    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "1" / "model.onnx").write_bytes(onnx_path.read_bytes())
    for source in (_model_source(str(onnx_path), None), scan_repository(tmp_path / "repo")[0]):
        runtime = load_model(source.path, source.name, runtime=CPU, lineage=source.lineage)
        params = runtime.metadata()["parameters"]
        leaks = {k: v for k, v in params.items() if isinstance(v, str) and (v.startswith("/") or str(tmp_path) in v
                                                                             or str(onnx_path.parent) in v)}
        assert not leaks, leaks
