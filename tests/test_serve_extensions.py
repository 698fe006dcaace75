"""serve over real HTTP: the binary tensor extension, every datatype, dynamic batching, /metrics, and
a Triton-layout model repository (config.pbtxt parsing included). Answers are compared with
in-process ONNX Runtime."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

from stages.serve import triton
from stages.serve.config import BatchSettings, RuntimeSettings, ServeConfig
from stages.serve.protocol import DATATYPES, ProtocolError, parse_infer_request, tensor_bytes
from stages.serve.repository import RepositoryError, load_sources, read_model_config, scan_repository
from stages.serve.runtime import load_model
from tests.test_serve import (MODEL, batch, onnx_path, reference, request_body, running_server,  # noqa: F401
                              serve_config)

CPU = RuntimeSettings(device="cpu")

TYPES = [d for d in DATATYPES]  # every v2 datatype ONNX Runtime takes: BOOL .. FP64, BYTES
ONNX_TYPES = {"BOOL": 9, "UINT8": 2, "UINT16": 4, "UINT32": 12, "UINT64": 13, "INT8": 3, "INT16": 5, "INT32": 6,
              "INT64": 7, "FP16": 10, "FP32": 1, "FP64": 11, "BYTES": 8}


def binary_request(inputs: dict[str, np.ndarray], outputs: list[dict] | None = None, **extra) -> tuple[bytes, dict]:
    """A binary-extension request body and its headers, the way Triton's client builds them."""
    doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": _v2(a), "parameters": {
        "binary_data_size": len(tensor_bytes(a))}} for n, a in inputs.items()], **extra}
    if outputs is not None:
        doc["outputs"] = outputs
    header = json.dumps(doc).encode()
    body = header + b"".join(tensor_bytes(a) for a in inputs.values())
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def _v2(a: np.ndarray) -> str:
    from stages.serve.protocol import from_numpy

    return from_numpy(a.dtype).name


def read_response(r) -> dict[str, np.ndarray]:
    """Outputs of a v2 response, JSON or binary, as arrays."""
    length = r.headers.get("inference-header-content-length")
    header = json.loads(r.content[:int(length)] if length else r.content)
    blob, offset, out = r.content[int(length):] if length else b"", 0, {}
    for o in header["outputs"]:
        dt = DATATYPES[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.asarray(o["data"], dtype=dt.numpy).reshape(o["shape"])
            continue
        chunk = blob[offset:offset + size]
        offset += size
        if dt.name == "BYTES":
            items, pos = [], 0
            while pos < len(chunk):
                n = int.from_bytes(chunk[pos:pos + 4], "little")
                items.append(chunk[pos + 4:pos + 4 + n].decode())
                pos += 4 + n
            out[o["name"]] = np.array(items, dtype=object).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(chunk, dtype=np.uint8 if dt.name == "BOOL" else dt.numpy) \
                .astype(dt.numpy).reshape(o["shape"])
    assert offset == len(blob)
    return out


@pytest.fixture(scope="module")
def types_path(tmp_path_factory):
    """An ONNX graph of Identity ops, one input -> output per v2 datatype, batch dim free."""
    import onnx
    from onnx import helper

    inputs = [helper.make_tensor_value_info(f"in_{t}", ONNX_TYPES[t], ["batch", 2]) for t in TYPES]
    outputs = [helper.make_tensor_value_info(f"out_{t}", ONNX_TYPES[t], ["batch", 2]) for t in TYPES]
    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in TYPES]
    model = helper.make_model(helper.make_graph(nodes, "types", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("types") / "model.onnx"
    onnx.save(model, str(path))
    return path


def sample_values(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in TYPES:
        dt = DATATYPES[t].numpy
        if t == "BOOL":
            a = rng.integers(0, 2, (rows, 2)).astype(bool)
        elif t == "BYTES":
            a = np.array([[f"s{rng.integers(1000)}", "é ü"] for _ in range(rows)], dtype=object)
        elif dt.kind in "iu":
            info = np.iinfo(dt)
            a = np.array([[info.min, info.max]] * rows, dtype=dt)
            a[:, 0] += rng.integers(0, 100, rows).astype(dt)
        else:
            a = rng.standard_normal((rows, 2)).astype(dt)
        out[f"in_{t}"] = a
    return out


@pytest.fixture(scope="module")
def server(onnx_path, types_path):
    """digits (batching, 30 ms delay so concurrent requests surely merge) and types, on one server."""
    import httpx

    digits = load_model(onnx_path, MODEL, version="3", runtime=CPU, warm_batch_sizes=(1, 2, 4, 8, 16))
    types = load_model(types_path, "types", runtime=CPU)
    config = serve_config()
    batching = {(MODEL, "3"): BatchSettings(max_batch_size=16, max_queue_delay_ms=30)}
    with running_server([digits, types], config, batching) as base, httpx.Client(base_url=base, timeout=10) as http:
        yield http


# --- binary tensor data extension ---------------------------------------------------------------

def test_binary_request_and_response_match_onnxruntime(server, reference):
    x = batch(4, seed=7)
    body, headers = binary_request({"input": x}, outputs=[{"name": "logits", "parameters": {"binary_data": True}}],
                                   id="bin-1")
    r = server.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    header = json.loads(r.content[:int(r.headers["inference-header-content-length"])])
    assert header["id"] == "bin-1" and header["outputs"][0]["parameters"] == {"binary_data_size": 4 * 10 * 4}
    np.testing.assert_allclose(read_response(r)["logits"], reference(x), atol=1e-5)
    # Binary in, JSON out (no binary_data asked): a plain JSON answer.
    body, headers = binary_request({"input": x})
    r = server.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert "inference-header-content-length" not in r.headers
    np.testing.assert_allclose(read_response(r)["logits"], reference(x), atol=1e-5)
    # JSON in, every output binary via the request-level binary_data_output.
    r = server.post(f"/v2/models/{MODEL}/infer", json=request_body(x, parameters={"binary_data_output": True}))
    assert "inference-header-content-length" in r.headers
    np.testing.assert_allclose(read_response(r)["logits"], reference(x), atol=1e-5)


@pytest.mark.parametrize("as_binary", [False, True])
def test_every_datatype_round_trips(server, as_binary):
    values = sample_values(3, seed=int(as_binary))
    if as_binary:
        body, headers = binary_request(values, parameters={"binary_data_output": True})
        r = server.post("/v2/models/types/infer", content=body, headers=headers)
    else:
        doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": _v2(a),
                           "data": a.ravel().tolist()} for n, a in values.items()]}
        r = server.post("/v2/models/types/infer", json=doc)
    assert r.status_code == 200, r.text
    got = read_response(r)
    for t in TYPES:
        want = values[f"in_{t}"]
        assert got[f"out_{t}"].dtype == want.dtype, t
        np.testing.assert_array_equal(got[f"out_{t}"], want, err_msg=t)


AUTO = None  # the right Inference-Header-Content-Length


def _size(n):
    return lambda d: {**d, "inputs": [{**d["inputs"][0], "parameters": {"binary_data_size": n}}]}


@pytest.mark.parametrize("doc_fn,blob_fn,headers,expected", [
    (None, lambda b: b[:-4], AUTO, "inputs[0].parameters.binary_data_size: 256 bytes from offset 0 overrun"),
    (None, lambda b: b + b"xx", AUTO,
     "binary data: 258 bytes follow the JSON header but the inputs' binary_data_size add up to 256"),
    (None, lambda b: b"", {}, "inputs[0].parameters.binary_data_size: binary tensor data needs the "
                     "Inference-Header-Content-Length header"),
    (None, None, {"Inference-Header-Content-Length": "99999"}, "Inference-Header-Content-Length: expected"),
    (None, None, {"Inference-Header-Content-Length": "abc"}, "Inference-Header-Content-Length: expected an integer"),
    (_size(128), lambda b: b[:128], AUTO,
     "inputs[0].parameters.binary_data_size: shape [1,1,8,8] of FP32 needs 256 bytes (64 x 4), got 128"),
    (_size(-1), None, AUTO, "inputs[0].parameters.binary_data_size: expected a byte count >= 0, got -1"),
    (lambda d: {**d, "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}, None, AUTO,
     "outputs[0].parameters.binary_data: expected true or false"),
])
def test_bad_binary_requests_get_400_naming_the_field(server, doc_fn, blob_fn, headers, expected):
    doc = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                       "parameters": {"binary_data_size": 256}}]}
    doc = doc_fn(doc) if doc_fn else doc
    blob = batch(1).tobytes()
    blob = blob_fn(blob) if blob_fn else blob
    header = json.dumps(doc).encode()
    if headers is AUTO:
        headers = {"Inference-Header-Content-Length": str(len(header))}
    r = server.post(f"/v2/models/{MODEL}/infer", content=header + blob, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(expected), r.json()["error"]


def test_parse_binary_bool_and_bytes_errors():
    header = json.dumps({"inputs": [{"name": "b", "shape": [2], "datatype": "BOOL",
                                     "parameters": {"binary_data_size": 2}}]}).encode()
    with pytest.raises(ProtocolError, match="BOOL binary data must be bytes 0 or 1, got 7"):
        parse_infer_request(header + b"\x01\x07", len(header))
    header = json.dumps({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 9}}]}).encode()
    with pytest.raises(ProtocolError, match=r"inputs\[0\].parameters.binary_data_size: shape \[2\] needs 2 BYTES"):
        parse_infer_request(header + b"\x05\x00\x00\x00hello", len(header))


# --- dynamic batching and metrics -----------------------------------------------------------------

def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_concurrent_requests_are_merged_and_each_gets_its_rows(server, reference):
    import httpx

    before = server.get("/metrics").text
    xs = [batch(n, seed=100 + i) for i, n in enumerate([1, 2, 1, 3, 1, 2, 1, 1])]

    async def fire():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=10) as http:
            return await asyncio.gather(*(http.post(f"/v2/models/{MODEL}/infer", json=request_body(x, id=str(i)))
                                          for i, x in enumerate(xs)))

    responses = asyncio.run(fire())
    for i, (x, r) in enumerate(zip(xs, responses)):
        assert r.status_code == 200, r.text
        assert r.json()["id"] == str(i)
        np.testing.assert_allclose(read_response(r)["logits"], reference(x), atol=1e-5)
    after = server.get("/metrics").text
    labels = {"model": MODEL, "version": "3", "provider": "CPUExecutionProvider"}
    runs = metric(after, "onnx_pipeline_batch_size_count", **labels) - metric(before, "onnx_pipeline_batch_size_count", **labels)
    rows = metric(after, "onnx_pipeline_batch_size_sum", **labels) - metric(before, "onnx_pipeline_batch_size_sum", **labels)
    assert rows == sum(len(x) for x in xs) == 12
    assert runs < len(xs), f"{len(xs)} concurrent requests ran in {runs} session runs: nothing was merged"
    # The largest request has 3 rows; a batch above 4 rows exists only if requests were merged.
    assert metric(after, "onnx_pipeline_batch_size_bucket", le="4.0", **labels) < \
        metric(after, "onnx_pipeline_batch_size_count", **labels)


def test_metrics_count_success_and_failure_by_model_version_provider(server):
    labels = {"model": MODEL, "version": "3", "provider": "CPUExecutionProvider"}
    before = server.get("/metrics").text
    assert server.post(f"/v2/models/{MODEL}/infer", json=request_body(batch(1))).status_code == 200
    assert server.post(f"/v2/models/{MODEL}/infer", content=b"{").status_code == 400
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    for outcome in ("success", "failure"):
        name = "onnx_pipeline_inference_requests_total"
        assert metric(after, name, outcome=outcome, **labels) - metric(before, name, outcome=outcome, **labels) == 1
    for hist in ("request", "queue", "compute"):
        assert metric(after, f"onnx_pipeline_{hist}_duration_seconds_count", **labels) > 0, hist


def test_batcher_never_mixes_shapes_and_survives_a_failing_batch(onnx_path, types_path):
    """Direct (no HTTP): different per-row shapes run apart; an exception fails only its batch."""
    from stages.serve.batcher import Batcher

    runtime = load_model(types_path, "types", runtime=CPU)
    b = Batcher(runtime, BatchSettings(max_batch_size=8, max_queue_delay_ms=20)).start()
    try:
        v1, v2 = sample_values(2, 1), sample_values(3, 2)

        async def go():
            return await asyncio.gather(b.infer(v1), b.infer(v2))

        o1, o2 = asyncio.run(go())
        np.testing.assert_array_equal(o1["out_FP32"], v1["in_FP32"])
        np.testing.assert_array_equal(o2["out_INT64"], v2["in_INT64"])
        original = runtime.run
        runtime.run = lambda feeds: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(go())
        runtime.run = original
        o1, _ = asyncio.run(go())
        np.testing.assert_array_equal(o1["out_BYTES"], v1["in_BYTES"])
    finally:
        b.stop()


# --- model repository -----------------------------------------------------------------------------

PBTXT = """
name: "digits"   # Triton's own format
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [ 4, 8 ] }
version_policy: { all { } }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def test_config_pbtxt_is_read_into_tritons_model_config(tmp_path, caplog):
    path = tmp_path / "config.pbtxt"
    path.write_text(PBTXT + 'parameters { key: "k" value { string_value: "v" } }\n')
    with caplog.at_level("INFO", logger="stages.serve.repository"):
        cfg = read_model_config(path)
    assert cfg.name == "digits" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [1, 8, 8] and triton.enum_name(cfg.output[0], "data_type") == "TYPE_FP32"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.version_policy.WhichOneof("policy_choice") == "all"
    assert triton.enum_name(cfg.instance_group[0], "kind") == "KIND_CPU"
    # Parsed but not acted on: said in the log, each at its outermost level.
    assert "fields not honoured by this server: instance_group.count, parameters.k" in caplog.text, caplog.text


@pytest.mark.parametrize("text,fragment", [
    ('name: "digits"\nmax_batch_sise: 8\n', '2:1 : Message type "inference.ModelConfig" has no field named "max_batch_sise"'),
    ("dynamic_batching { max_queue_delay_microsecond: 5 }",
     'Message type "inference.ModelDynamicBatching" has no field named "max_queue_delay_microsecond"'),
    ('name: "a" name: "b"', 'should not have multiple "name" fields'),
    ("max_batch_size: 8.5", "Couldn't parse integer"),
    ("input [ { data_type: TYPE_FP33 } ]", 'Enum type "inference.DataType" has no value named TYPE_FP33'),
])
def test_config_pbtxt_refuses_what_triton_refuses_naming_the_field(tmp_path, text, fragment):
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    with pytest.raises(RepositoryError) as e:
        read_model_config(path)
    assert str(e.value).startswith(f"{path}: not a valid Triton model configuration: ") and fragment in str(e.value), \
        str(e.value)


def make_repository(root, onnx_path, types_path, pbtxt: str = PBTXT):
    for v in ("1", "2"):
        (root / "digits" / v).mkdir(parents=True)
        (root / "digits" / v / "model.onnx").write_bytes(onnx_path.read_bytes())
    (root / "digits" / "config.pbtxt").write_text(pbtxt)
    (root / "types" / "7").mkdir(parents=True)
    (root / "types" / "7" / "model.onnx").write_bytes(types_path.read_bytes())
    return root


def test_repository_serves_two_models_and_honors_config(tmp_path, onnx_path, types_path, reference):
    import httpx

    repo = make_repository(tmp_path / "repo", onnx_path, types_path)
    sources = scan_repository(repo)
    assert [(s.name, s.version) for s in sources] == [("digits", "1"), ("digits", "2"), ("types", "7")]
    digits = sources[0]
    assert digits.batching == BatchSettings(True, 8, 0.5, (4, 8)) and digits.device == "cpu"
    assert sources[2].batching is None  # no config.pbtxt: the server's defaults
    config = serve_config()
    runtimes, batching = load_sources(sources, config)
    assert runtimes[0].warm_batch_sizes == [1, 2, 4, 8]
    with running_server(runtimes, config, batching) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/v2/models/digits").json()["versions"] == ["1", "2"]
        assert http.get("/v2/models/digits/versions/1/ready").status_code == 200
        assert http.get("/v2/models/types/versions/7").json()["name"] == "types"
        x = batch(2)
        for url in ("/v2/models/digits/infer", "/v2/models/digits/versions/1/infer"):
            r = http.post(url, json=request_body(x))
            assert r.status_code == 200 and r.json()["model_version"] == "2" if "versions" not in url else "1"
            np.testing.assert_allclose(read_response(r)["logits"], reference(x), atol=1e-5)
        values = sample_values(1)
        body, headers = binary_request(values)
        r = http.post("/v2/models/types/infer", content=body, headers=headers)
        np.testing.assert_array_equal(read_response(r)["out_INT16"], values["in_INT16"])


@pytest.mark.parametrize("pbtxt,message", [
    ('name: "other"', "name 'other' must equal the model's directory name 'digits'"),
    ('platform: "tensorflow_savedmodel"', "this server runs ONNX models only"),
    ("version_policy: { specific { versions: [ 5 ] } }", "version_policy.specific.versions ['5'] must name existing"),
    ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 16 ] }", "dynamic_batching needs"),
    ("max_batch_size: -1", "max_batch_size must be >= 0"),
    ("name: ", "Expected string but found"), ("dynamic_batching { ", 'Expected "}"'),
    ("max_batch_size: 8 input [ { name: \"input\" dims: [ 8, 8 ] } ]", "input 'input' has shape [-1, 1, 8, 8] in the "
                                                                      "model (-1: any size), but config.pbtxt says [-1, 8, 8]"),
    ("input [ { name: \"pixels\" data_type: TYPE_FP32 } ]", "input 'pixels' is not in the model"),
    ("output [ { name: \"logits\" data_type: TYPE_INT64 } ]", "output 'logits' is FP32 in the model, not INT64"),
])
def test_bad_repository_config_is_refused_naming_the_file(tmp_path, onnx_path, types_path, pbtxt, message):
    repo = make_repository(tmp_path / "repo", onnx_path, types_path, pbtxt)
    with pytest.raises(RepositoryError) as e:
        load_sources(scan_repository(repo), ServeConfig())
    assert "config.pbtxt" in str(e.value) and message in str(e.value), str(e.value)


def test_repository_without_models_is_refused(tmp_path):
    (tmp_path / "empty" / "m" / "1").mkdir(parents=True)
    with pytest.raises(RepositoryError, match="m/1/model.onnx not found"):
        scan_repository(tmp_path / "empty")
    with pytest.raises(RepositoryError, match="is not a directory"):
        scan_repository(tmp_path / "nope")
