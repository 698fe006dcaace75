"""serve over gRPC and Triton's tools: Triton's own gRPC client (metadata, config, raw infer, errors as
gRPC status codes with HTTP's messages), `/config` and `/stats` through Triton's HTTP client, typed
contents for every datatype, and perf_analyzer over HTTP and gRPC. One server (HTTP and gRPC on free
loopback ports) serves the module; Triton's clients run in .venv-triton (see the Makefile)."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest

from stages.serve import triton
from stages.serve.config import BatchSettings, RuntimeSettings
from stages.serve.runtime import load_model
from tests.test_serve import (MODEL, batch, free_port, onnx_path, reference, request_body,  # noqa: F401
                              running_server, serve_config)
from tests.test_serve_extensions import TYPES, sample_values, types_path  # noqa: F401

from .conftest import ROOT

TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
PERF_ANALYZER = ROOT / ".venv-triton" / "bin" / "perf_analyzer"
needs_triton = pytest.mark.skipif(not TRITON_PYTHON.exists(),
                                  reason="needs .venv-triton with tritonclient[http,grpc]: run `make test`")
CPU = RuntimeSettings(device="cpu", intra_op_threads=1)


def M(name: str):
    return triton.message_class(f"inference.{name}")


@pytest.fixture(scope="module")
def server(onnx_path, types_path):
    """(http base URL, grpc port): digits (version 3, batching) and types, both transports."""
    digits = load_model(onnx_path, MODEL, version="3", runtime=CPU, warm_batch_sizes=(1, 2, 4, 8))
    types = load_model(types_path, "types", runtime=CPU)
    grpc_port = free_port()
    config = serve_config(grpc_port=grpc_port)
    batching = {(MODEL, "3"): BatchSettings(max_batch_size=8, max_queue_delay_ms=0.5, preferred_batch_sizes=(4,))}
    with running_server([digits, types], config, batching) as base:
        yield base, grpc_port


@pytest.fixture(scope="module")
def stub(server):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server[1]}")

    def call(method: str, request, response: str):
        rpc = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                  request_serializer=lambda m: m.SerializeToString() if hasattr(m, "SerializeToString")
                                  else m, response_deserializer=M(response).FromString)
        return rpc(request, timeout=10)

    yield call
    channel.close()


def triton_client(*args: str) -> dict:
    p = subprocess.run([str(TRITON_PYTHON), str(ROOT / "tests" / "triton_client.py"), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# --- Triton's own clients -------------------------------------------------------------------------

@needs_triton
def test_tritons_grpc_client_metadata_config_infer_and_errors(server, reference, tmp_path):
    import httpx

    base, grpc_port = server
    x = batch(3, seed=21)
    np.save(tmp_path / "x.npy", x)
    got = triton_client("--grpc", "--url", f"127.0.0.1:{grpc_port}", "--model", MODEL, "--input", str(tmp_path / "x.npy"),
                        "--bad", "nan", "--bad", "wrong-datatype", "--bad", "unknown-model", "--bad", "bad-shape")
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["server"]["name"] == "onnx-pipeline" and "statistics" in got["server"]["extensions"]
    assert got["metadata"]["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    assert got["metadata"]["versions"] == ["3"]
    config = got["config"]["config"]
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == ["1", "8", "8"]
    assert got["id"] == "grpc-1" and got["raw"]
    np.testing.assert_allclose(np.asarray(got["output"], np.float32), reference(x), atol=1e-5)
    # Each mistake: the gRPC status the HTTP status maps to, and the very message HTTP answers.
    bad = x.copy()
    bad.flat[3] = np.nan
    http_twins = {
        "nan": ("StatusCode.INVALID_ARGUMENT", f"/v2/models/{MODEL}/infer",
                {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                             "data": ["NaN" if v != v else v for v in bad.ravel().tolist()]}]}),
        "wrong-datatype": ("StatusCode.INVALID_ARGUMENT", f"/v2/models/{MODEL}/infer",
                           request_body(x.astype(np.int64), datatype="INT64")),
        "unknown-model": ("StatusCode.NOT_FOUND", "/v2/models/nope/infer", request_body(x)),
        "bad-shape": ("StatusCode.INVALID_ARGUMENT", f"/v2/models/{MODEL}/infer", request_body(x.reshape(3, -1))),
    }
    for case, (status, url, body) in http_twins.items():
        r = httpx.post(base + url, json=body)
        assert r.status_code in (400, 404), r.text
        assert got["errors"][case] == {"status": status, "message": r.json()["error"]}, case
    assert "non-finite" in got["errors"]["nan"]["message"]
    stats = got["stats"]["model_stats"][0]
    assert stats["name"] == MODEL and stats["version"] == "3"
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    assert int(stats["inference_stats"]["fail"]["count"]) >= 3



@needs_triton
def test_tritons_grpc_client_compressed_requests_get_the_same_answers(server):
    """tritonclient's compression_algorithm (gzip, deflate): the same outputs as uncompressed."""
    code = f"""
import numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient("127.0.0.1:{server[1]}")
x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
outs = []
for algo in (None, "gzip", "deflate"):
    i = g.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    outs.append(c.infer("{MODEL}", [i], compression_algorithm=algo).as_numpy("logits"))
assert all(np.array_equal(outs[0], o) for o in outs[1:]), outs
print("ok")
"""
    p = subprocess.run([str(TRITON_PYTHON), "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]

@needs_triton
def test_http_config_and_stats_with_tritonclient(server, reference, tmp_path):
    base, _ = server
    x = batch(2, seed=5)
    np.save(tmp_path / "x.npy", x)
    got = triton_client("--config", "--url", base.removeprefix("http://"), "--model", MODEL,
                        "--input", str(tmp_path / "x.npy"))
    np.testing.assert_allclose(np.asarray(got["output"], np.float32), reference(x), atol=1e-5)
    config = got["config"]
    # What the server applies: the batcher's settings, the tensors without the batch dim, the device.
    assert config["name"] == MODEL and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert config["input"] == [{**config["input"][0], "name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert config["output"][0]["dims"] == [10] and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["allow_non_finite"] == {"string_value": "false"}
    stats = got["stats"]["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [(MODEL, "3")]
    inference = stats[0]["inference_stats"]
    # The client's two infers (and whatever earlier tests sent) are counted, with their time parts.
    assert inference["success"]["count"] >= 2 and inference["success"]["ns"] > 0
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[part]["count"] == inference["success"]["count"], part
    assert stats[0]["inference_count"] >= 4 and stats[0]["execution_count"] >= 1
    assert sum(b["compute_infer"]["count"] for b in stats[0]["batch_stats"]) == stats[0]["execution_count"]
    assert {s["name"] for s in got["stats_all"]["model_stats"]} == {MODEL, "types"}


# --- our own gRPC checks (no .venv-triton needed) -------------------------------------------------

def test_grpc_every_datatype_round_trips_raw(stub):
    from stages.serve.protocol import decode_binary, tensor_bytes

    values = sample_values(2, seed=3)
    request = M("ModelInferRequest")(model_name="types", id="t")
    for name, a in values.items():
        request.inputs.add(name=name, datatype=name.removeprefix("in_"), shape=list(a.shape))
        request.raw_input_contents.append(tensor_bytes(a))
    response = stub("ModelInfer", request, "ModelInferResponse")
    assert response.id == "t" and len(response.raw_output_contents) == len(response.outputs) == len(TYPES)
    for out, blob in zip(response.outputs, response.raw_output_contents):
        got = decode_binary(memoryview(blob), out.datatype, list(out.shape), "out")
        np.testing.assert_array_equal(got, values[out.name.replace("out_", "in_")], err_msg=out.name)


def test_grpc_typed_contents_of_every_datatype_decode_as_json_data_does():
    """Typed contents (what clients without raw support send) give the arrays JSON's data gives; FP16,
    which has no typed field, is refused naming raw_input_contents, as Triton does."""
    from stages.serve.protocol import GRPC_CONTENTS, ProtocolError, parse_grpc_infer_request

    values = sample_values(2, seed=4)
    request = M("ModelInferRequest")(model_name="types")
    for name, a in values.items():
        t = name.removeprefix("in_")
        if t == "FP16":
            continue
        field = getattr(request.inputs.add(name=name, datatype=t, shape=list(a.shape)).contents, GRPC_CONTENTS[t])
        field.extend([v.encode() for v in a.ravel()] if t == "BYTES" else a.ravel().tolist())
    for tensor in parse_grpc_infer_request(request).inputs:
        np.testing.assert_array_equal(tensor.array, values[tensor.name], err_msg=tensor.name)
        assert tensor.array.dtype == values[tensor.name].dtype, tensor.name
    request.inputs.add(name="in_FP16", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    request.inputs[0].contents.int_contents.append(5)  # BOOL with an int: the wrong field
    with pytest.raises(ProtocolError) as e:
        parse_grpc_infer_request(request)
    assert "inputs[0].contents: BOOL data goes in bool_contents, got int_contents" in str(e.value)
    assert "FP16 has no typed contents field; send it in raw_input_contents" in str(e.value)
    request = M("ModelInferRequest")(model_name="types")
    request.inputs.add(name="in_INT8", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(ProtocolError, match=r"inputs\[0\].contents.int_contents: INT8 holds -128..127"):
        parse_grpc_infer_request(request)


def test_grpc_errors_name_the_field(stub):
    import grpc

    def infer(request):
        with pytest.raises(grpc.RpcError) as e:
            stub("ModelInfer", request, "ModelInferResponse")
        return e.value.code(), e.value.details()

    x = batch(1)
    request = M("ModelInferRequest")(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8]).contents.int_contents.extend([1] * 64)
    assert infer(request) == (grpc.StatusCode.INVALID_ARGUMENT,
                              "inputs[0].contents: FP32 data goes in fp32_contents, got int_contents")
    request = M("ModelInferRequest")(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.extend([x.tobytes()[:-4], b""])
    assert infer(request)[1].startswith("raw_input_contents: 2 given for 1 inputs")
    del request.raw_input_contents[1]
    assert infer(request)[1] == "raw_input_contents[0]: shape [1,1,8,8] of FP32 needs 256 bytes (64 x 4), got 252"
    request.inputs[0].shape[:] = [2**62, 4, 0]  # the int64 edge: refused before any arithmetic
    assert infer(request)[1].startswith("inputs[0].shape: [4611686018427387904,4,0] has more elements than a tensor can hold")
    # A message that is not a ModelInferRequest at all.
    code, message = infer(b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("request is not a valid inference.ModelInferRequest")
    with pytest.raises(grpc.RpcError) as e:
        stub("ModelConfig", M("ModelConfigRequest")(name=MODEL, version="9"), "ModelConfigResponse")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "version '9' not found" in e.value.details()


def test_grpc_port_taken_is_a_startup_error(onnx_path):
    import asyncio

    from stages.serve.app import StartupError, create_app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = load_model(onnx_path, MODEL, runtime=CPU)
        app = create_app([runtime], serve_config(grpc_port=port))
        with pytest.raises(StartupError, match=f"gRPC could not listen on 127.0.0.1:{port}.*--grpc-port"):
            asyncio.run(app.start_grpc())


# --- perf_analyzer --------------------------------------------------------------------------------

def _perf_analyzer_problem() -> str | None:
    if not PERF_ANALYZER.exists():
        return "perf_analyzer not found in .venv-triton (tritonclient 2.46.0's wheel carries it): run `make test`"
    env = _perf_env()
    missing = [line.split()[0] for line in subprocess.run(["ldd", str(PERF_ANALYZER)], capture_output=True,
                                                          text=True, env=env).stdout.splitlines() if "not found" in line]
    if missing:
        return (f"perf_analyzer cannot start: {', '.join(missing)} missing (apt-get install libb64-0d; "
                "pip install nvidia-cuda-runtime-cu12 into .venv-triton; see benchmarks/perf_analyzer.sh)")
    return None


def _perf_env() -> dict:
    libs = sorted((ROOT / ".venv-triton" / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"))
    path = ":".join([str(p) for p in libs] + [os.environ.get("LD_LIBRARY_PATH", "")])
    return {**os.environ, "LD_LIBRARY_PATH": path}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_against_the_server(server, protocol):
    problem = _perf_analyzer_problem()
    if problem:
        pytest.skip(problem)
    base, grpc_port = server
    url = base.removeprefix("http://") if protocol == "http" else f"127.0.0.1:{grpc_port}"
    p = subprocess.run([str(PERF_ANALYZER), "-m", MODEL, "-u", url, "-i", protocol, "--concurrency-range", "2",
                        "--measurement-interval", "300", "--stability-percentage", "100", "--max-trials", "4"],
                       capture_output=True, text=True, timeout=60, env=_perf_env())
    out = p.stdout + p.stderr
    assert "Server: " in out and "Successful request count" in out, out  # it read /stats (ModelStatistics)
    assert "Throughput:" in out and "error" not in out.lower(), out


def test_vendored_grpc_service_keeps_every_field_of_the_installed_tritons():
    """stages/serve/triton/grpc_service_desc.py (tritonclient 2.73.0) keeps every message, field, enum value
    and RPC of .venv-triton's tritonclient (2.46.0, the client the tests and perf_analyzer use) with the same
    number, type and label: what that client sends is read here field for field."""

    from stages.serve.triton import grpc_service_desc, vendor

    installed = sorted((ROOT / ".venv-triton" / "lib").glob("python3*/site-packages/tritonclient/grpc/service_pb2.py"))
    if not installed:
        pytest.skip("tritonclient's service_pb2.py not found in .venv-triton; `make test` installs tritonclient there")

    theirs = vendor.schema_shape(vendor.serialized_descriptor(installed[-1]))
    ours = vendor.schema_shape(grpc_service_desc.SERIALIZED)
    assert len(theirs) > 100 and ("rpc", "ModelInfer") in theirs
    assert {k: v for k, v in theirs.items() if ours.get(k) != v} == {}
