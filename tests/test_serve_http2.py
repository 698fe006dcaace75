"""The gRPC transport's own HTTP/2 server (stages/serve/http2.py) on real sockets: frames written by hand
(a small blocking client below, hpack's encoder for request headers), Python's grpc client, and h2load.

Covered: a message split over many padded DATA frames and a header block over CONTINUATIONs; a request
and an answer larger than every window (flow control both ways, the client's SETTINGS applied); PING;
RST_STREAM mid-request; broken connections (garbage, bad preface, oversized frame, PUSH_PROMISE, bad
HPACK, ...) closed with GOAWAY while the server goes on; gRPC's rules (415, 405, compression, missing or
cut messages, the size limit, unknown methods, grpc-timeout, percent-encoded grpc-message); the HPACK
cache following the dynamic table; 200 concurrent calls on one channel; graceful stop.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field

import numpy as np
import pytest

hpack = pytest.importorskip("hpack", reason="needs hpack (the serve extra)")

from stages.serve import http2, triton  # noqa: E402
from stages.serve.config import BatchSettings, RuntimeSettings  # noqa: E402
from stages.serve.http2 import (CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED,  # noqa: E402
                                PING, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE)
from stages.serve.protocol import tensor_bytes  # noqa: E402
from stages.serve.runtime import load_model  # noqa: E402
from tests.test_serve import (MODEL, batch, free_port, onnx_path, reference, running_server,  # noqa: E402,F401
                              serve_config)

CPU = RuntimeSettings(device="cpu", intra_op_threads=1)
SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
ECHO_WIDTH = 4096  # floats per row of the echo model: 16 KiB a row


def M(name: str):
    return triton.message_class(f"inference.{name}")


def framed(message: bytes, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(message).to_bytes(4, "big") + message


def infer_message(x: np.ndarray, model: str = MODEL, name: str = "input") -> bytes:
    request = M("ModelInferRequest")(model_name=model, id="raw")
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(tensor_bytes(x))
    return request.SerializeToString()


def output(message: bytes, shape) -> np.ndarray:
    response = M("ModelInferResponse").FromString(message)
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(shape)


@pytest.fixture(scope="module")
def echo_path(tmp_path_factory):
    """An ONNX Identity: x FP32 [batch, ECHO_WIDTH] -> y."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "echo",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ECHO_WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ECHO_WIDTH])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("echo") / "echo.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(onnx_path, echo_path):
    """(http base URL, grpc port): digits (batching) and echo, max_request_mb=64."""
    digits = load_model(onnx_path, MODEL, runtime=CPU, warm_batch_sizes=(1, 2, 4, 8))
    echo = load_model(echo_path, "echo", runtime=CPU)
    grpc_port = free_port()
    config = serve_config(grpc_port=grpc_port, max_request_mb=64)
    with running_server([digits, echo], config, {(MODEL, "1"): BatchSettings(max_batch_size=8)}) as base:
        yield base, grpc_port


@pytest.fixture(scope="module")
def channel(server):
    import grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}", options=options) as ch:
        yield ch


def grpc_infer(channel, x: np.ndarray, model: str = MODEL, name: str = "input", timeout: float = 60):
    rpc = channel.unary_unary(INFER)
    return output(rpc(infer_message(x, model, name), timeout=timeout), (x.shape[0], -1))


# --- a hand-driven HTTP/2 client ----------------------------------------------------------------------

def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def settings_payload(**values) -> bytes:
    keys = {"header_table_size": 1, "enable_push": 2, "initial_window_size": 4, "max_frame_size": 5}
    return b"".join(struct.pack(">HL", keys[k], v) for k, v in values.items())


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes
    headers: dict | None = None  # a decoded header block (HEADERS with its CONTINUATIONs)


@dataclass
class Response:
    headers: dict = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict = field(default_factory=dict)
    reset: int | None = None

    @property
    def grpc_status(self) -> int:
        return int((self.trailers or self.headers)["grpc-status"])

    @property
    def grpc_message(self) -> str:
        from urllib.parse import unquote

        return unquote((self.trailers or self.headers).get("grpc-message", ""))

    @property
    def message(self) -> bytes:
        assert self.data[:1] == b"\x00" and int.from_bytes(self.data[1:5], "big") == len(self.data) - 5
        return bytes(self.data[5:])


class Raw:
    """A blocking HTTP/2 client whose every frame the test chooses. ``next()`` returns each frame the
    server sends (its SETTINGS are acknowledged and its windows tracked on the way)."""

    def __init__(self, port: int, preface: bool = True, timeout: float = 30, **settings):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.buf = bytearray()
        self.inbox: list[Frame] = []
        self.window = 65535  # what we may send: the connection's, and each stream's
        self.initial = 65535
        self.stream_windows: dict[int, int] = {}
        self.max_frame = 16384
        self.block = None
        self.head_flags = 0
        if preface:
            self.sock.sendall(http2.PREFACE + frame(SETTINGS, 0, 0, settings_payload(**settings)))

    def close(self):
        self.sock.close()

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.sock.sendall(frame(kind, flags, stream_id, payload))

    def header_block(self, path: str = INFER, content_type: str = "application/grpc", method: str = "POST",
                     extra=()) -> bytes:
        return self.encoder.encode([(":method", method), (":scheme", "http"), (":path", path), (":authority", "t"),
                                    ("content-type", content_type), ("te", "trailers"), *extra])

    def headers(self, stream_id: int, end_stream: bool = False, **kwargs) -> None:
        self.stream_windows.setdefault(stream_id, self.initial)
        self.send(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, self.header_block(**kwargs))

    def _read(self) -> Frame | None:
        while True:
            if len(self.buf) >= 9:
                high, low, kind, flags, sid = struct.unpack_from(">BHBBL", self.buf)
                length = high << 16 | low
                if len(self.buf) >= 9 + length:
                    payload = bytes(self.buf[9:9 + length])
                    del self.buf[:9 + length]
                    return Frame(kind, flags, sid & 0x7FFFFFFF, payload)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk

    def next(self) -> Frame | None:
        if self.inbox:
            return self.inbox.pop(0)
        while True:
            f = self._read()
            if f is None:
                return None
            if f.kind == SETTINGS and not f.flags & 1:
                for i in range(0, len(f.payload), 6):
                    key, value = struct.unpack_from(">HL", f.payload, i)
                    if key == 4:
                        for sid in self.stream_windows:
                            self.stream_windows[sid] += value - self.initial
                        self.initial = value
                    elif key == 5:
                        self.max_frame = value
                self.send(SETTINGS, 1, 0)
            elif f.kind == WINDOW_UPDATE:
                increment = struct.unpack(">L", f.payload)[0]
                if f.stream:
                    self.stream_windows[f.stream] = self.stream_windows.get(f.stream, self.initial) + increment
                else:
                    self.window += increment
            elif f.kind in (HEADERS, CONTINUATION):  # decoded as they come: HPACK's state is in order
                if f.kind == HEADERS:
                    self.head_flags = f.flags
                self.block = (self.block or b"") + f.payload
                if not f.flags & END_HEADERS:
                    continue
                f = Frame(HEADERS, self.head_flags | END_HEADERS, f.stream, self.block,
                          dict(self.decoder.decode(self.block)))
                self.block = None
            return f

    def send_message(self, stream_id: int, data: bytes, end_stream: bool = True) -> None:
        """``data`` in DATA frames as the server's windows allow (waiting for its WINDOW_UPDATEs)."""
        self.stream_windows.setdefault(stream_id, self.initial)
        view, sent = memoryview(data), 0
        while sent < len(data):
            n = min(len(data) - sent, self.max_frame, self.window, self.stream_windows[stream_id])
            if n <= 0:
                f = self.next()
                assert f is not None, "the server closed the connection while we waited for window"
                if f.kind not in (SETTINGS, WINDOW_UPDATE, PING):
                    self.inbox.append(f)
                continue
            last = end_stream and sent + n == len(data)
            self.send(DATA, END_STREAM if last else 0, stream_id, bytes(view[sent:sent + n]))
            self.window -= n
            self.stream_windows[stream_id] -= n
            sent += n
        if not data and end_stream:
            self.send(DATA, END_STREAM, stream_id)

    def response(self, stream_id: int, credit: bool = True) -> Response:
        """The answer on ``stream_id`` (frames of other streams are kept for later); ``credit``: give
        back every DATA frame's bytes at once (connection and stream WINDOW_UPDATE)."""
        r = Response()
        kept = []
        try:
            while True:
                f = self.next()
                assert f is not None, f"the connection closed before stream {stream_id} was answered"
                if f.stream != stream_id or f.kind in (SETTINGS, WINDOW_UPDATE, PING):
                    if f.stream:
                        kept.append(f)
                    continue
                if f.kind == RST_STREAM:
                    r.reset = struct.unpack(">L", f.payload)[0]
                    return r
                if f.kind == HEADERS:
                    if r.headers:
                        r.trailers = f.headers
                    else:
                        r.headers = f.headers
                elif f.kind == DATA:
                    r.data += f.payload
                    if credit and f.payload:
                        self.send(WINDOW_UPDATE, 0, 0, struct.pack(">L", len(f.payload)))
                        if not f.flags & END_STREAM:
                            self.send(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", len(f.payload)))
                if f.flags & END_STREAM:
                    if f.kind == HEADERS and not r.trailers:  # trailers-only
                        r.trailers = r.headers
                    return r
        finally:
            self.inbox[:0] = kept

    def call(self, stream_id: int, message: bytes, **headers) -> Response:
        self.headers(stream_id, **headers)
        self.send_message(stream_id, framed(message))
        return self.response(stream_id)

    def until_closed(self) -> list[Frame]:
        """Every frame until the server closes the connection (a test fails on a timeout if it never does)."""
        frames = []
        while True:
            try:
                f = self.next()
            except ConnectionResetError:
                return frames
            if f is None:
                return frames
            frames.append(f)


def goaway_code(frames: list[Frame]) -> int:
    goaways = [f for f in frames if f.kind == GOAWAY]
    assert goaways, f"no GOAWAY among {[f.kind for f in frames]}"
    return struct.unpack(">LL", goaways[-1].payload[:8])[1]


# --- calls ----------------------------------------------------------------------------------------

def test_a_message_in_many_small_padded_frames_after_a_header_block_in_continuations(server, reference):
    x = batch(2, seed=1)
    raw = Raw(server[1])
    block = raw.header_block()
    # HEADERS padded and with priority, then two CONTINUATIONs.
    raw.send(HEADERS, PADDED | PRIORITY_FLAG, 1, bytes([4]) + b"\x00\x00\x00\x00\x10" + block[:3] + b"\x00" * 4)
    raw.send(CONTINUATION, 0, 1, block[3:7])
    raw.send(CONTINUATION, END_HEADERS, 1, block[7:])
    data = framed(infer_message(x))
    for i in range(0, len(data), 7):  # 7-byte DATA frames, every other one padded
        chunk = data[i:i + 7]
        raw.send(DATA, PADDED if i % 14 else 0, 1, bytes([3]) + chunk + b"\x00" * 3 if i % 14 else chunk)
    raw.send(DATA, END_STREAM, 1)  # the end of the request in an empty frame
    r = raw.response(1)
    assert r.headers[":status"] == "200" and r.headers["content-type"] == "application/grpc"
    assert r.grpc_status == 0
    np.testing.assert_allclose(output(r.message, (2, 10)), reference(x), atol=1e-5)
    raw.close()


def test_a_request_and_an_answer_larger_than_every_window(server):
    """20 MiB in (over the 1 MiB stream and 16 MiB connection windows, so the server must credit them
    back) and 20 MiB out (over the client's 64 KiB windows, so the server must wait for its updates)."""
    x = np.random.default_rng(2).standard_normal((1280, ECHO_WIDTH)).astype(np.float32)
    raw = Raw(server[1])
    r = raw.call(1, infer_message(x, "echo", "x"))
    assert r.grpc_status == 0, r.grpc_message
    np.testing.assert_array_equal(output(r.message, x.shape), x)
    raw.close()


def test_the_grpc_client_sends_and_receives_a_20_mib_tensor(channel):
    x = np.random.default_rng(3).standard_normal((1280, ECHO_WIDTH)).astype(np.float32)
    np.testing.assert_array_equal(grpc_infer(channel, x, "echo", "x"), x)


def test_an_answer_waits_for_the_clients_window(server):
    """A client with a 1,000-byte stream window (SETTINGS) and the default 65,535 connection window:
    the server never sends more DATA than granted, resumes on each WINDOW_UPDATE (stream or connection)
    and on a larger SETTINGS_INITIAL_WINDOW_SIZE, and the 120 KB answer arrives whole."""
    x = np.random.default_rng(4).standard_normal((8, ECHO_WIDTH)).astype(np.float32)
    stream_granted, conn_granted, initial = 1000, 65535, 1000
    raw = Raw(server[1], initial_window_size=initial)
    raw.headers(1)
    raw.send_message(1, framed(infer_message(x, "echo", "x")))
    data, received, updates = bytearray(), 0, 0
    while True:
        f = raw.next()
        assert f is not None
        if f.stream != 1:
            continue
        if f.kind == DATA:
            data += f.payload
            received += len(f.payload)
            assert received <= stream_granted and received <= conn_granted, (received, stream_granted, conn_granted)
            if received == stream_granted:
                updates += 1
                if updates == 3:  # a larger initial window grows the open stream's window too
                    initial += 20000
                    raw.send(SETTINGS, 0, 0, settings_payload(initial_window_size=initial))
                    stream_granted += 20000
                else:
                    raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">L", 7000))
                    stream_granted += 7000
            if received == conn_granted:
                raw.send(WINDOW_UPDATE, 0, 0, struct.pack(">L", 50000))
                conn_granted += 50000
        elif f.kind == HEADERS and f.flags & END_STREAM:
            assert f.headers["grpc-status"] == "0"
            break
    assert updates > 3
    np.testing.assert_array_equal(output(bytes(data[5:]), x.shape), x)
    raw.close()


def test_ping_is_answered_with_its_payload(server):
    raw = Raw(server[1])
    raw.send(PING, 0, 0, b"8 bytes!")
    while (f := raw.next()).kind != PING:
        pass
    assert f.flags == 1 and f.payload == b"8 bytes!"
    raw.close()


def test_a_stream_reset_mid_request_leaves_the_connection_serving(server, channel, reference):
    x = batch(1, seed=5)
    raw = Raw(server[1])
    raw.headers(1)
    data = framed(infer_message(x))
    raw.send(DATA, 0, 1, data[:20])
    raw.send(RST_STREAM, 0, 1, struct.pack(">L", 8))  # CANCEL
    raw.send(DATA, 0, 1, data[20:40])  # late frames of the reset stream are dropped, not an error
    r = raw.call(3, infer_message(x))
    assert r.grpc_status == 0
    np.testing.assert_allclose(output(r.message, (1, 10)), reference(x), atol=1e-5)
    raw.close()
    np.testing.assert_allclose(grpc_infer(channel, x), reference(x), atol=1e-5)


BROKEN = {
    # name: (preface?, bytes sent after our preface and SETTINGS, or in place of them, GOAWAY error code)
    "garbage": (False, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n", http2.PROTOCOL_ERROR),
    "bad preface": (False, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", http2.PROTOCOL_ERROR),
    "no SETTINGS first": (False, http2.PREFACE + frame(PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR),
    "oversized frame": (True, struct.pack(">BHBBL", 0xFF, 0xFFFF, DATA, 0, 1), http2.FRAME_SIZE_ERROR),
    "PUSH_PROMISE": (True, frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x88"), http2.PROTOCOL_ERROR),
    "bad HPACK": (True, frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"), http2.COMPRESSION_ERROR),
    "HEADERS on stream 0": (True, frame(HEADERS, END_HEADERS, 0, b"\x83"), http2.PROTOCOL_ERROR),
    "even stream": (True, frame(HEADERS, END_HEADERS, 2, b"\x83"), http2.PROTOCOL_ERROR),
    "DATA on an idle stream": (True, frame(DATA, 0, 5, b"abc"), http2.PROTOCOL_ERROR),
    "CONTINUATION alone": (True, frame(CONTINUATION, END_HEADERS, 1, b"\x83"), http2.PROTOCOL_ERROR),
    "padding past the frame": (True, frame(HEADERS, END_HEADERS | PADDED, 1, b"\xc8\x83"), http2.PROTOCOL_ERROR),
    "short WINDOW_UPDATE": (True, frame(WINDOW_UPDATE, 0, 0, b"\x00\x01\x00"), http2.FRAME_SIZE_ERROR),
    "window overflow": (True, frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)), http2.FLOW_CONTROL_ERROR),
    "SETTINGS not a multiple of 6": (True, frame(SETTINGS, 0, 0, b"\x00\x04\x00"), http2.FRAME_SIZE_ERROR),
    "other frame amid a header block": (True, frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, b"12345678"),
                                        http2.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_connection_is_closed_alone_with_goaway(server, channel, reference, case):
    preface, data, code = BROKEN[case]
    raw = Raw(server[1], preface=preface)
    raw.sock.sendall(data)
    frames = raw.until_closed()
    assert goaway_code(frames) == code
    raw.close()
    x = batch(1, seed=6)  # and the server goes on
    np.testing.assert_allclose(grpc_infer(channel, x), reference(x), atol=1e-5)


def test_grpc_rules_for_what_is_not_a_proper_call(server):
    raw = Raw(server[1])
    x = framed(infer_message(batch(1)))
    raw.headers(1, content_type="application/json")
    raw.send_message(1, x)
    r = raw.response(1)
    assert r.headers[":status"] == "415" and "content-type must be application/grpc" in r.grpc_message
    raw.headers(3, method="GET", end_stream=True)
    assert raw.response(3).headers[":status"] == "405"
    # A compressed message: UNIMPLEMENTED with an encoding not served, INTERNAL without an encoding.
    raw.headers(5, extra=[("grpc-encoding", "snappy")])
    raw.send_message(5, b"\x01" + x[1:])
    r = raw.response(5)
    assert r.grpc_status == 12 and "grpc-encoding snappy is not served" in r.grpc_message
    raw.headers(7)
    raw.send_message(7, b"\x01" + x[1:])
    assert raw.response(7).grpc_status == 13
    raw.headers(9, end_stream=True)  # no message at all
    r = raw.response(9)
    assert r.grpc_status == 3 and "has no message" in r.grpc_message
    raw.headers(11)
    raw.send_message(11, x[:-3])  # cut short
    r = raw.response(11)
    assert r.grpc_status == 3 and f"says {len(x) - 5} bytes, {len(x) - 8} came" in r.grpc_message
    raw.headers(13)
    raw.send_message(13, x + x)  # two messages
    assert raw.response(13).grpc_status == 3
    # Over max_request_mb: refused from the prefix, before the rest is sent (the stream is reset after).
    raw.headers(15)
    raw.send(DATA, 0, 15, b"\x00" + (2**31).to_bytes(4, "big") + b"abc")
    r = raw.response(15)
    assert r.grpc_status == 8 and r.grpc_message == f"SERVER: Received message larger than max ({2**31} vs. {64 << 20})"
    assert raw.response(15).reset == http2.NO_ERROR
    raw.send(DATA, END_STREAM, 15, b"late")  # dropped
    raw.headers(17, path=SERVICE + "ModelStreamInfer")  # streaming (and anything unknown): UNIMPLEMENTED
    raw.send_message(17, framed(b""))
    r = raw.response(17)
    assert r.grpc_status == 12 and r.grpc_message == "Method not found: /inference.GRPCInferenceService/ModelStreamInfer"
    r = raw.call(19, M("ServerLiveRequest")().SerializeToString(), path=SERVICE + "ServerLive")  # still serving
    assert r.grpc_status == 0 and M("ServerLiveResponse").FromString(r.message).live
    raw.close()


def test_grpc_timeout_is_honoured_by_the_server(server, channel, reference):
    raw = Raw(server[1])
    raw.headers(1, extra=[("grpc-timeout", "50m")])  # and the message never comes
    r = raw.response(1)
    assert r.grpc_status == 4 and r.grpc_message == "Deadline Exceeded"
    assert raw.response(1).reset == http2.NO_ERROR  # the client need not send the rest
    raw.headers(3, extra=[("grpc-timeout", "soon")])
    r = raw.response(3)
    assert r.grpc_status == 13 and "grpc-timeout 'soon'" in r.grpc_message
    r = raw.call(5, infer_message(batch(1)), extra=[("grpc-timeout", "20S")])  # in time: answered
    assert r.grpc_status == 0
    raw.close()
    import grpc

    with pytest.raises(grpc.RpcError) as e:  # what Python's client sees (its own deadline, or ours)
        channel.unary_unary(INFER)(infer_message(np.zeros((64, ECHO_WIDTH), np.float32), "echo", "x"),
                                   timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_header_cache_follows_the_dynamic_table(server):
    """The same header-block bytes mean another method once the dynamic table changed: blocks that index
    into the table are decoded again after a block that inserts into it."""
    raw = Raw(server[1])
    message = framed(M("ModelMetadataRequest")(name=MODEL).SerializeToString())
    common = b"\x83\x86" + http2._literal(31, b"application/grpc")  # POST, http, content-type (no indexing)

    def call(stream_id, block):
        raw.send(HEADERS, END_HEADERS, stream_id, block)
        raw.send_message(stream_id, message)
        r = raw.response(stream_id)
        assert r.grpc_status == 0, r.grpc_message
        return r.message

    def insert(path: str) -> bytes:  # :path (static name 4) with incremental indexing: dynamic entry 62
        return b"\x44" + bytes([len(path)]) + path.encode()

    indexed = common + b"\xbe"  # :path from dynamic entry 62
    assert M("ServerMetadataResponse").FromString(call(1, common + insert(SERVICE + "ServerMetadata"))).name \
        == "onnx-pipeline"
    assert M("ServerMetadataResponse").FromString(call(3, indexed)).name == "onnx-pipeline"  # now cached
    assert M("ModelMetadataResponse").FromString(call(5, common + insert(SERVICE + "ModelMetadata"))).name == MODEL
    got = M("ModelMetadataResponse").FromString(call(7, indexed))  # the same bytes as stream 3's
    assert got.name == MODEL and got.inputs[0].name == "input"
    raw.close()


def test_leaves_table_alone_reads_each_representation():
    assert http2.leaves_table_alone(b"\x83\x86\xbe" + http2._literal(31, b"application/grpc")
                                    + http2._literal(b"grpc-timeout", b"1S") + b"\x10\x01a\x01b")
    assert not http2.leaves_table_alone(b"\x83\x44\x01/")  # incremental indexing
    assert not http2.leaves_table_alone(b"\x20\x83")  # table size update
    assert http2.percent_encode("ok: plain") == b"ok: plain"
    assert http2.percent_encode("50% ü\n") == b"50%25 %C3%BC%0A"


def test_grpc_message_is_percent_encoded(channel):
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(SERVICE + "ModelMetadata")(M("ModelMetadataRequest")(name="nö%pe\t").SerializeToString(),
                                                        timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details().startswith("model 'nö%pe\\t' not found")


def test_200_concurrent_calls_on_one_channel(channel, reference):
    rpc = channel.unary_unary(INFER)
    inputs = [batch(1 + i % 3, seed=100 + i) for i in range(200)]
    futures = [rpc.future(infer_message(x), timeout=60) for x in inputs]
    for x, f in zip(inputs, futures):
        np.testing.assert_allclose(output(f.result(), (len(x), 10)), reference(x), atol=1e-5)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (apt-get install nghttp2-client)")
def test_h2load_gets_only_answers_with_grpc_status_0(server, channel, tmp_path):
    """nghttp2's load generator, 4 connections x 16 streams: every answer HTTP 200 and a whole
    ModelInferResponse (an error would be a trailers-only answer: no DATA), and the model's statistics
    count every call as a success."""
    import httpx

    base, port = server
    message = infer_message(batch(1, seed=7))
    answer = channel.unary_unary(INFER)(message, timeout=10)
    (tmp_path / "grpc.bin").write_bytes(framed(message))

    def successes():
        stats = httpx.get(f"{base}/v2/models/{MODEL}/stats").json()["model_stats"][0]
        return stats["inference_stats"]["success"]["count"]

    before = successes()
    p = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "16", "-d", str(tmp_path / "grpc.bin"),
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        f"http://127.0.0.1:{port}{INFER}"], capture_output=True, text=True, timeout=120)
    assert "400 succeeded, 0 failed, 0 errored" in p.stdout, p.stdout
    assert "400 2xx, 0 3xx, 0 4xx, 0 5xx" in p.stdout, p.stdout
    data = int(re.search(r"\((\d+)\) data", p.stdout).group(1))
    assert data == 400 * (5 + len(answer))  # every answer carried its message
    assert successes() - before == 400


# --- graceful stop -------------------------------------------------------------------------------

@pytest.mark.parametrize("grace_s, status", [(10.0, 0), (0.2, 14)])
def test_stop_sends_goaway_and_lets_calls_in_flight_finish(onnx_path, reference, grace_s, status):
    """A call held in the batcher (a 1.5 s queue delay) when shutdown begins: GOAWAY (NO_ERROR) comes
    at once, no new connection is taken, and the call is answered, OK within the grace period or
    UNAVAILABLE when it runs out; then the connection closes."""
    from stages.serve.app import create_app

    port = free_port()
    runtime = load_model(onnx_path, MODEL, runtime=CPU)
    config = serve_config(grpc_port=port, graceful_shutdown_s=grace_s)
    app = create_app([runtime], config, {(MODEL, "1"): BatchSettings(max_batch_size=8, max_queue_delay_ms=1500)})
    x = batch(1, seed=8)

    async def scenario():
        app.start()
        await app.start_grpc()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        encoder = hpack.Encoder()
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", INFER), (":authority", "t"),
                                ("content-type", "application/grpc")])
        writer.write(http2.PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, block)
                     + frame(DATA, END_STREAM, 1, framed(infer_message(x))))
        await writer.drain()
        while not any(s.task for c in app.grpc._server.connections for s in c.streams.values()):
            await asyncio.sleep(0.01)  # until the call is in flight
        app.begin_shutdown()
        stopping = asyncio.ensure_future(app.stop_grpc())
        received = await asyncio.wait_for(reader.read(), 30)  # to EOF: the server closes when done
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await stopping
        writer.close()
        await asyncio.get_running_loop().run_in_executor(None, app.stop)
        return received

    received = asyncio.run(scenario())
    frames, decoder = [], hpack.Decoder()
    while received:
        high, low, kind, flags, sid = struct.unpack_from(">BHBBL", received)
        n = 9 + (high << 16 | low)
        frames.append(Frame(kind, flags, sid, received[9:n]))
        received = received[n:]
    kinds = [f.kind for f in frames if f.kind not in (SETTINGS, WINDOW_UPDATE)]
    assert kinds[0] == GOAWAY and struct.unpack(">LL", frames[[f.kind for f in frames].index(GOAWAY)].payload) == (1, 0)
    headers = [dict(decoder.decode(f.payload)) for f in frames if f.kind == HEADERS]
    assert int(headers[-1]["grpc-status"]) == status
    if status == 0:
        data = b"".join(f.payload for f in frames if f.kind == DATA)
        np.testing.assert_allclose(output(data[5:], (1, 10)), reference(x), atol=1e-5)
    else:
        assert "graceful_shutdown_s ran out" in headers[-1]["grpc-message"]



def test_gzip_and_deflate_messages_are_inflated_within_the_size_limit(server):
    import zlib

    raw = Raw(server[1])
    message = infer_message(batch(2))
    raw.headers(1)
    raw.send_message(1, framed(message))
    plain = raw.response(1).message
    gzip_ = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    for sid, encoding, packed in ((3, "gzip", gzip_.compress(message) + gzip_.flush()),
                                  (5, "deflate", zlib.compress(message))):
        raw.headers(sid, extra=[("grpc-encoding", encoding)])
        raw.send_message(sid, framed(packed, compressed=True))
        r = raw.response(sid)
        assert r.grpc_status == 0, r.grpc_message
        assert r.message == plain  # the same answer as the uncompressed call's
    raw.headers(7, extra=[("grpc-encoding", "gzip")])
    raw.send_message(7, framed(b"not gzip", compressed=True))
    r = raw.response(7)
    assert r.grpc_status == 13 and "not valid gzip" in r.grpc_message
    # A small message that inflates past max_request_mb: refused, not inflated whole.
    bomb = zlib.compress(b"\0" * (65 * 2**20), 9)
    assert len(bomb) < 2**20
    raw.headers(9, extra=[("grpc-encoding", "deflate")])
    raw.send_message(9, framed(bomb, compressed=True))
    r = raw.response(9)
    assert r.grpc_status == 8 and "once inflated" in r.grpc_message
    raw.headers(11)  # the connection still serves
    raw.send_message(11, framed(message))
    assert raw.response(11).grpc_status == 0
