"""Fuzzing the protocol against a live server on loopback (Hypothesis): valid-looking and hostile JSON,
binary-extension bodies with every length field perturbed, shapes at the int64 edges, every datatype,
odd headers and paths, over HTTP and gRPC ModelInfer, and random HTTP/2 frames on the gRPC port. The
only promises checked: every answer is 2xx or 4xx (gRPC: OK or a client-error status), every 4xx has a
JSON ``error``, nothing hangs (a connection fed random frames still answers a PING, or is closed), and
afterwards the server is healthy and still answers a known request correctly.

Bounded for `make test`: a fixed seed (derandomized) and ONNX_PIPELINE_FUZZ_EXAMPLES examples (300;
gRPC a third of it). The long run: ONNX_PIPELINE_FUZZ_EXAMPLES=10000 (prints its tally; with
ONNX_PIPELINE_FUZZ_REPORT=FILE it also writes it as JSON).
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (the test extra): pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stages.serve import triton  # noqa: E402
from stages.serve.config import BatchSettings, RuntimeSettings  # noqa: E402
from stages.serve.protocol import DATATYPES, tensor_bytes  # noqa: E402
from stages.serve.runtime import load_model  # noqa: E402
from tests.test_serve import (MODEL, batch, free_port, onnx_path, reference, request_body,  # noqa: E402,F401
                              running_server, serve_config)
from tests.test_serve_extensions import types_path  # noqa: E402,F401

EXAMPLES = int(os.environ.get("ONNX_PIPELINE_FUZZ_EXAMPLES", "300"))
GRPC_EXAMPLES = max(EXAMPLES // 3, 20)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
TIMEOUT_S = 20  # no answer within this, and none again when the same request is sent once more: a hang
# stalls: answers later than TIMEOUT_S that came on the retry (a shared, overloaded machine can stall a process).
TALLY = {"http_requests": 0, "grpc_requests": 0, "http2_connections": 0, "5xx": 0, "hangs": 0, "stalls": 0, "crashes": 0,
         "slowest_s": 0.0, "statuses": {}}

# --- strategies -----------------------------------------------------------------------------------

INT64_EDGES = [0, 1, 2, 8, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -1, -(2**63), 10**30]
dims = st.one_of(st.integers(0, 4), st.sampled_from(INT64_EDGES), st.integers(-(2**70), 2**70))
# Zero-size tensors whose other dims overflow (issue 14's 500): numpy refuses them past 2**63 bytes.
OVERFLOWING = [[2**62, 4, 0], [2**61, 0], [2**60, 1, 0], [0, 2**63 - 1], [2**60 - 1, 0], [9223372036854775808, 0]]
shapes = st.one_of(st.just([1, 1, 8, 8]), st.just([2, 1, 8, 8]), st.just([1, 2]), st.just([3, 2]),
                   st.sampled_from(OVERFLOWING),
                   st.lists(dims, max_size=6), st.lists(st.integers(0, 2), min_size=30, max_size=70))
datatypes = st.one_of(st.sampled_from(list(DATATYPES)), st.text(max_size=8), st.sampled_from(["BF16", "fp32", ""]))
names = st.one_of(st.sampled_from(["input", "in_FP32", "in_INT8", "in_BYTES", "in_BOOL", "in_FP16", "in_UINT64",
                                   "logits", ""]), st.text(max_size=12))
scalars = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans(),
                    st.none(), st.text(max_size=6), st.sampled_from(["NaN", "Infinity", "-Infinity", "1.5"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=20)
data = st.one_of(st.lists(scalars, max_size=130), st.lists(st.lists(scalars, max_size=4), max_size=4),
                 st.just([0.5] * 64), st.just([[0.5, -1.0]]), json_values)
parameters = st.one_of(st.none(), st.dictionaries(st.sampled_from(["binary_data_size", "binary_data_output",
                                                                  "binary_data", "x"]),
                                                  st.one_of(st.integers(-5, 10**6), st.booleans(), st.text(max_size=3)),
                                                  max_size=2))


@st.composite
def json_requests(draw):
    """A request document: mostly the right keys with wrong or edge values, sometimes any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        entry = {"name": draw(names), "shape": draw(shapes), "datatype": draw(datatypes)}
        if draw(st.booleans()):
            entry["data"] = draw(data)
        p = draw(parameters)
        if p is not None:
            entry["parameters"] = p
        if draw(st.integers(0, 9)) == 0:
            entry[draw(st.text(max_size=5))] = draw(scalars)
        inputs.append(entry)
    doc = {"inputs": inputs}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": draw(names), **({"parameters": draw(parameters)} if draw(st.booleans()) else {})}
                          for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        doc["id"] = draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))
    if draw(st.booleans()):
        doc["parameters"] = draw(parameters)
    return doc


@st.composite
def binary_requests(draw):
    """A binary-extension body built right, then with length fields and bytes perturbed."""
    model = draw(st.sampled_from(["digits", "types"]))
    if model == "digits":
        arrays = {"input": np.random.default_rng(draw(st.integers(0, 9))).standard_normal(
            (draw(st.integers(0, 3)), 1, 8, 8)).astype(np.float32)}
    else:
        arrays = {}
        for t in draw(st.lists(st.sampled_from(list(DATATYPES)), min_size=1, max_size=4, unique=True)):
            dt = DATATYPES[t].numpy
            rows = draw(st.integers(0, 2))
            if t == "BYTES":
                a = np.array([[draw(st.text(max_size=3)) for _ in range(2)] for _ in range(rows)], dtype=object)
            elif t == "BOOL":
                a = np.zeros((rows, 2), bool)
            else:
                a = np.frombuffer(draw(st.binary(min_size=rows * 2 * dt.itemsize, max_size=rows * 2 * dt.itemsize)),
                                  dtype=dt).reshape(rows, 2)
            arrays[f"in_{t}"] = a
    blobs = [tensor_bytes(a) for a in arrays.values()]
    doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": n.removeprefix("in_") if n != "input" else "FP32",
                       "parameters": {"binary_data_size": len(b)}} for (n, a), b in zip(arrays.items(), blobs)]}
    for entry in doc["inputs"]:  # perturb lengths and shapes
        if draw(st.integers(0, 2)) == 0:
            entry["parameters"]["binary_data_size"] += draw(st.sampled_from([-1, 1, -4, 4, 2**31, 2**63, -(2**40)]))
        if draw(st.integers(0, 3)) == 0:
            entry["shape"] = draw(shapes)
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.one_of(st.booleans(), st.integers()))}
    header = json.dumps(doc).encode()
    blob = b"".join(blobs)
    cut = draw(st.integers(0, 3))
    if cut == 1 and blob:
        blob = blob[:draw(st.integers(0, len(blob) - 1))]
    elif cut == 2:
        blob += draw(st.binary(max_size=16))
    if "types" == model and draw(st.integers(0, 4)) == 0:  # a BYTES element claiming more than there is
        blob = struct.pack("<I", 2**31) + blob
    length = str(len(header))
    if draw(st.integers(0, 2)) == 0:
        length = draw(st.sampled_from(["0", "-1", "abc", "", "99999999999999999999", str(len(header) + 1),
                                       str(len(header) - 1), str(len(header) + len(blob) + 1), "+5", "1e3", "0x10"]))
    return model, header + blob, length


texts = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(str.strip)  # h11 refuses edge spaces
paths = st.sampled_from([f"/v2/models/{MODEL}/infer", "/v2/models/digits/versions/1/infer", "/v2/models/types/infer",
                         "/v2/models/types/versions/9/infer", "/v2/models/nope/infer", "/v2/models/%ff%fe/infer",
                         "/v2/models/digits/config", "/v2/models/stats", "/v2/models//infer", "/v2/models/digits/x/y"])


# --- the server and the checks --------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(onnx_path, types_path):
    import httpx

    digits = load_model(onnx_path, MODEL, runtime=RuntimeSettings(device="cpu", intra_op_threads=1),
                        warm_batch_sizes=(1, 2, 4))
    types = load_model(types_path, "types", runtime=RuntimeSettings(device="cpu", intra_op_threads=1))
    grpc_port = free_port()
    config = serve_config(grpc_port=grpc_port, max_request_mb=1)
    with running_server([digits, types], config, {(MODEL, "1"): BatchSettings(max_batch_size=4)}) as base, \
            httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
        yield http, grpc_port
    if TALLY["http_requests"] or TALLY["grpc_requests"]:
        print(f"\nfuzz tally: {json.dumps(TALLY, sort_keys=True)}")
        if os.environ.get("ONNX_PIPELINE_FUZZ_REPORT"):
            with open(os.environ["ONNX_PIPELINE_FUZZ_REPORT"], "w") as f:
                json.dump(TALLY, f, indent=1, sort_keys=True)


def check(r) -> None:
    TALLY["http_requests"] += 1
    TALLY["statuses"][str(r.status_code)] = TALLY["statuses"].get(str(r.status_code), 0) + 1
    if r.status_code >= 500:
        TALLY["5xx"] += 1
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        error = r.json()["error"]  # strict: a JSON document with an error string
        assert isinstance(error, str) and error
    elif r.headers.get("content-type") == "application/json":
        json.loads(r.content, parse_constant=lambda t: pytest.fail(f"non-standard JSON token {t}"))


def post(http, path: str, **kwargs):
    import httpx

    started = time.monotonic()
    try:
        r = http.post(path, **kwargs)
    except httpx.TimeoutException:
        TALLY["stalls"] += 1
        try:  # the same request once more, on a new connection
            with httpx.Client(base_url=http.base_url, timeout=TIMEOUT_S) as fresh:
                r = fresh.post(path, **kwargs)
        except httpx.TimeoutException:
            TALLY["hangs"] += 1
            raise AssertionError(f"no answer within {TIMEOUT_S} s, twice") from None
    TALLY["slowest_s"] = max(TALLY["slowest_s"], round(time.monotonic() - started, 3))
    return r


def assert_healthy_and_correct(http, reference) -> None:
    x = batch(3, seed=99)
    r = http.post(f"/v2/models/{MODEL}/infer", json=request_body(x))
    if r.status_code != 200 or http.get("/v2/health/ready").status_code != 200:
        TALLY["crashes"] += 1
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, reference(x), atol=1e-5)


def test_fuzz_http_json(server, reference):
    http, _ = server

    @FUZZ
    @given(doc=json_requests(), path=paths, content_type=st.one_of(st.none(), texts))
    def one(doc, path, content_type):
        headers = {"content-type": content_type} if content_type is not None else {}
        check(post(http, path, content=json.dumps(doc, allow_nan=True).encode(), headers=headers))

    one()
    assert_healthy_and_correct(http, reference)


def test_fuzz_http_binary_and_raw_bytes(server, reference):
    http, _ = server

    @FUZZ
    @given(request=binary_requests(), junk=st.one_of(st.none(), st.binary(max_size=64)),
           header=st.one_of(st.none(), texts))
    def one(request, junk, header):
        model, body, length = request
        if junk is not None:  # not JSON at all, with or without the binary header
            headers = {} if header is None else {"Inference-Header-Content-Length": header}
            check(post(http, f"/v2/models/{model}/infer", content=junk, headers=headers))
            return
        check(post(http, f"/v2/models/{model}/infer", content=body,
                   headers={"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"}))

    one()
    assert_healthy_and_correct(http, reference)


def test_fuzz_grpc_model_infer(server, reference):
    import grpc

    http, grpc_port = server
    request_class = triton.message_class("inference.ModelInferRequest")
    response_class = triton.message_class("inference.ModelInferResponse")
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.RESOURCE_EXHAUSTED}
    contents_fields = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                       "fp32_contents", "fp64_contents", "bytes_contents"]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        rpc = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                  response_deserializer=response_class.FromString)

        @settings(FUZZ, max_examples=GRPC_EXAMPLES)
        @given(model=st.sampled_from(["digits", "types", "nope", ""]), version=st.sampled_from(["", "1", "9"]),
               tensors=st.lists(st.tuples(names, datatypes, st.one_of(st.lists(dims, max_size=5),
                                                                      st.sampled_from(OVERFLOWING)),
                                          st.sampled_from(contents_fields),
                                          st.integers(0, 70), st.one_of(st.none(), st.binary(max_size=300))),
                                max_size=3),
               raw_mode=st.integers(0, 2), junk=st.one_of(st.none(), st.binary(max_size=40)))
        def one(model, version, tensors, raw_mode, junk):
            if junk is not None and not tensors:
                body = junk  # not a ModelInferRequest at all
            else:
                request = request_class(model_name=model, model_version=version, id="f")
                for name, datatype, shape, field, count, raw in tensors:
                    entry = request.inputs.add(name=name, datatype=datatype)
                    entry.shape.extend([max(-(2**63), min(d, 2**63 - 1)) for d in shape])  # int64 on the wire
                    if raw_mode == 1 or raw is None:
                        values = getattr(entry.contents, field)
                        values.extend([b"x"] * count if field == "bytes_contents" else
                                      [True] * count if field == "bool_contents" else [1] * count)
                    if raw_mode != 1 and raw is not None:
                        request.raw_input_contents.append(raw)
                if raw_mode == 2 and tensors and tensors[0][2:3] != ([],):  # a right-sized raw digits input
                    request.ClearField("inputs")
                    request.ClearField("raw_input_contents")
                    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
                    request.raw_input_contents.append(batch(1).tobytes())
                body = request.SerializeToString()
            TALLY["grpc_requests"] += 1
            try:
                rpc(body, timeout=TIMEOUT_S)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    TALLY["hangs"] += 1
                elif code not in allowed:
                    TALLY["5xx"] += 1
                assert code in allowed, f"{code}: {e.details()}"
                assert e.details(), "a gRPC error without a message"
            TALLY["statuses"][f"grpc:{code.name}"] = TALLY["statuses"].get(f"grpc:{code.name}", 0) + 1

        started = time.monotonic()
        one()
        assert time.monotonic() - started < max(60, GRPC_EXAMPLES)  # bounded
    assert_healthy_and_correct(http, reference)


def test_fuzz_raw_http2_frames(server, reference):
    """Random frames (any type, flags, stream and payload, honest lengths) after a valid preface and
    SETTINGS, sometimes after a valid call's HEADERS, then a PING: the server answers the PING or closes
    the connection (GOAWAY, never INTERNAL_ERROR: that is an exception of its own), within TIMEOUT_S;
    and serves on."""
    import socket

    import grpc
    import hpack

    from stages.serve import http2

    http, grpc_port = server
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":authority", "f"),
                                    (":path", "/inference.GRPCInferenceService/ModelInfer"),
                                    ("content-type", "application/grpc"), ("grpc-timeout", "5S")])
    request = triton.message_class("inference.ModelInferRequest")(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(batch(1).tobytes())
    message = b"\x00" + struct.pack(">I", request.ByteSize()) + request.SerializeToString()

    def frame(kind, flags, stream, payload=b""):
        return struct.pack(">BHBBL", len(payload) >> 16, len(payload) & 0xFFFF, kind, flags, stream) + payload

    payloads = st.one_of(st.binary(max_size=40), st.binary(min_size=4, max_size=4), st.binary(min_size=8, max_size=8),
                         st.just(block), st.just(message), st.just(message[:7]), st.just(b"\x00\x04\x00\x00\x00\x00"))
    frames = st.lists(st.tuples(st.one_of(st.integers(0, 9), st.sampled_from([10, 0xFF])), st.integers(0, 255),
                                st.sampled_from([0, 1, 1, 2, 3, 5, 2**31 - 1]), payloads), max_size=8)

    @settings(FUZZ, max_examples=GRPC_EXAMPLES)
    @given(opening=st.booleans(), frames=frames)
    def one(opening, frames):
        TALLY["http2_connections"] += 1
        out = http2.PREFACE + frame(http2.SETTINGS, 0, 0)
        if opening:
            out += frame(http2.HEADERS, http2.END_HEADERS, 1, block)
        out += b"".join(frame(*f) for f in frames) + frame(http2.PING, 0, 0, b"fuzzping")
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=TIMEOUT_S) as s:
            s.sendall(out)
            buf = bytearray()
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return  # closed (after GOAWAY): answered
                    buf += chunk
                    while len(buf) >= 9:
                        high, low, kind, flags, _ = struct.unpack_from(">BHBBL", buf)
                        end = 9 + (high << 16 | low)
                        if len(buf) < end:
                            break
                        if kind == http2.PING and flags & 1 and buf[9:end] == b"fuzzping":
                            return  # the PING's answer: the connection is alive
                        if kind == http2.GOAWAY:  # INTERNAL_ERROR: an exception in the server, not the client's fault
                            code = struct.unpack_from(">L", buf, 13)[0]
                            assert code != http2.INTERNAL_ERROR, f"GOAWAY INTERNAL_ERROR: {bytes(buf[17:end])!r}"
                        del buf[:end]
            except ConnectionResetError:
                return
            except socket.timeout:
                TALLY["hangs"] += 1
                raise AssertionError(f"no PING answer and no close within {TIMEOUT_S} s") from None

    one()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # gRPC still served
        answer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message[5:], timeout=TIMEOUT_S)
    got = np.frombuffer(triton.message_class("inference.ModelInferResponse").FromString(answer).raw_output_contents[0],
                        np.float32)
    np.testing.assert_allclose(got.reshape(1, 10), reference(batch(1)), atol=1e-5)
    assert_healthy_and_correct(http, reference)
