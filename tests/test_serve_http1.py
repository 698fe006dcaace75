"""serve's HTTP/1.1 protocol (``stages.serve.http_protocol``) on the wire: raw sockets against a real server
on loopback, for what httpx never does: pipelining, a request split byte by byte, chunked bodies,
``Expect: 100-continue``, ``Connection: close`` and HTTP/1.0, HEAD, malformed and oversized heads, a body
over max_request_mb that is never buffered, backpressure from a client that does not read, and one
transport write per answer. Also the ASGI adapter (``App.__call__``) under uvicorn's h11 protocol."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from stages.serve.config import RuntimeSettings
from stages.serve.runtime import load_model
from tests.test_serve import MODEL, batch, onnx_path, reference, request_body, running_uvicorn, serve_config  # noqa: F401

MAX_MB = 0.01  # 10 KiB: a 413 is cheap to reach
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def served(onnx_path):
    runtime = load_model(onnx_path, MODEL, runtime=RuntimeSettings(device="cpu", intra_op_threads=1))
    with running_uvicorn([runtime], serve_config(max_request_mb=MAX_MB)) as (base, server):
        yield base, server


class Conn:
    """A raw client connection that reads HTTP/1.1 responses (Content-Length framed) off the socket."""

    def __init__(self, base: str, buffers: int = 0):
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.socket()
        if buffers:  # small kernel buffers (set before connecting, so the window stays small)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        self.sock.settimeout(10)
        self.sock.connect((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self, head: bool = False) -> tuple[int, dict, bytes]:
        """The next response: status, headers (lower-case names), body (none for a HEAD's answer)."""
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response; got {self.buf!r}"
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            return status, headers, b""
        n = 0 if head else int(headers["content-length"])
        while len(self.buf) < n:
            assert self._fill(), "connection closed mid-body"
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed(self) -> bool:
        """Whether the server closes the connection (EOF) with nothing more sent."""
        self.sock.settimeout(5)
        try:
            return not self._fill() and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {len(body)}",
            *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/{version}", "Host: x", *extra]) + "\r\n\r\n").encode()


def logits(body: bytes) -> np.ndarray:
    out = json.loads(body)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def server_side(server, before: set):
    """The protocol object of the connection opened since ``before`` (a copy of server_state.connections)."""
    deadline = time.monotonic() + 5
    while True:
        new = [c for c in list(server.server_state.connections) if c not in before]
        if new:
            return new[0]
        assert time.monotonic() < deadline, "the server never saw the connection"
        time.sleep(0.01)


def test_pipelined_requests_are_answered_in_order(served, reference):
    base, _ = served
    xs = [batch(1, seed=1), batch(2, seed=2)]
    c = Conn(base)
    c.send(get("/v2/health/live") + post(INFER, json.dumps(request_body(xs[0])).encode()) + get("/v2/nothing")
           + post(INFER, json.dumps(request_body(xs[1], id="b")).encode()) + get(f"/v2/models/{MODEL}"))
    status, _, body = c.response()
    assert (status, body) == (200, b'{"live":true}')
    status, _, body = c.response()
    assert status == 200
    np.testing.assert_allclose(logits(body), reference(xs[0]), atol=1e-5)
    status, _, body = c.response()
    assert status == 404 and json.loads(body)["error"].startswith("no route /v2/nothing")
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["id"] == "b"
    np.testing.assert_allclose(logits(body), reference(xs[1]), atol=1e-5)
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["name"] == MODEL
    c.send(get("/v2/health/live"))  # still kept alive
    assert c.response()[0] == 200
    c.close()


def answers_with_logits(c, x, reference) -> None:
    """The connection's next answer is a 200 with ``x``'s logits."""
    status, _, body = c.response()
    assert status == 200
    np.testing.assert_allclose(logits(body), reference(x), atol=1e-5)


def test_a_request_split_byte_by_byte(served, reference):
    base, _ = served
    x = batch(1, seed=3)
    c = Conn(base)
    for b in post(INFER, json.dumps(request_body(x)).encode()):
        c.send(bytes([b]))
        time.sleep(0.0005)  # separate segments, so separate reads on the server
    answers_with_logits(c, x, reference)
    c.close()


def test_chunked_request_body(served, reference):
    base, _ = served
    x = batch(2, seed=4)
    body = json.dumps(request_body(x)).encode()
    c = Conn(base)
    c.send(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    for i in range(0, len(body), 700):
        chunk = body[i:i + 700]
        c.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    c.send(b"0\r\n\r\n")
    answers_with_logits(c, x, reference)
    c.close()


def test_expect_100_continue(served, reference):
    base, _ = served
    x = batch(1, seed=5)
    body = json.dumps(request_body(x)).encode()
    c = Conn(base)
    c.send(post(INFER, b"", "Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)))
    assert c.response()[0] == 100  # before any of the body is sent
    c.send(body)
    answers_with_logits(c, x, reference)
    # Refused by its Content-Length: 413 at once, no 100 Continue, and the connection closes (the client
    # may never send the body it announced).
    c.send(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n".encode())
    status, headers, answer = c.response()
    assert status == 413 and "max_request_mb" in json.loads(answer)["error"]
    assert headers["connection"] == "close" and c.closed()


def test_connection_close_and_http_1_0_end_the_connection(served):
    base, _ = served
    for request in (get("/v2/health/live", "Connection: close"), get("/v2/health/live", version="1.0")):
        c = Conn(base)
        c.send(request)
        status, headers, body = c.response()
        assert (status, body) == (200, b'{"live":true}') and headers["connection"] == "close"
        assert c.closed()
        c.close()
    c = Conn(base)  # HTTP/1.1 without it: kept alive
    c.send(get("/v2/health/live"))
    assert "connection" not in c.response()[1]
    c.send(get("/v2/health/live"))
    assert c.response()[0] == 200
    c.close()


def test_head_answers_headers_only(served):
    base, _ = served
    c = Conn(base)
    c.send(get("/v2/health/live", method="HEAD") + get("/v2/health/live"))
    status, headers, _ = c.response(head=True)
    assert status == 200 and headers["content-length"] == str(len(b'{"live":true}'))
    assert c.response()[::2] == (200, b'{"live":true}')  # the HEAD's answer had no body
    c.close()


@pytest.mark.parametrize("request_bytes,expected", [
    (b"GARBAGE\r\n\r\n", "invalid HTTP request"),
    (b"GET /v2 HTTP/9.9\r\n\r\n", "invalid HTTP request"),
    (b"GET /v2/health/live HTTP/1.1\r\nBad Header\r\n\r\n", "invalid HTTP request"),
    (b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "exceed 64 KiB"),
    (b"GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
     "more than 128 request headers"),
    (b"POST " + INFER.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
])
def test_malformed_or_oversized_heads_get_400_and_the_server_serves_on(served, request_bytes, expected):
    base, _ = served
    c = Conn(base)
    c.send(request_bytes)
    status, headers, body = c.response()
    assert status == 400 and expected in json.loads(body)["error"], body
    assert headers["connection"] == "close" and c.closed()
    c.close()
    c = Conn(base)
    c.send(get("/v2/health/live"))
    assert c.response()[0] == 200
    c.close()


def test_a_bad_request_after_good_pipelined_ones_is_answered_after_them(served):
    base, _ = served
    c = Conn(base)
    c.send(get("/v2/health/live") + get("/v2/health/ready") + b"NOT HTTP AT ALL\r\n\r\n")
    assert c.response()[0] == 200 and c.response()[0] == 200
    status, headers, _ = c.response()
    assert status == 400 and headers["connection"] == "close" and c.closed()
    c.close()


def test_a_body_over_the_limit_is_refused_without_being_buffered(served):
    base, server = served
    # Content-Length over the limit: 413 before a byte of the body is sent.
    c = Conn(base)
    c.send(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n".encode())
    status, _, body = c.response()
    assert status == 413 and "Content-Length is 1000000000 bytes" in json.loads(body)["error"]
    c.close()
    # Chunked, no length: refused once it passes 10 KiB; what follows is dropped, not held.
    before = set(server.server_state.connections)
    c = Conn(base)
    c.send(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    connection = server_side(server, before)
    chunk = b"x" * 4096
    for _ in range(4):
        c.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    status, _, body = c.response()
    assert status == 413 and "max_request_mb" in json.loads(body)["error"]
    for _ in range(200):  # 800 KiB more of the same body
        c.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    c.send(get("/v2/health/live").replace(b"GET", b"0\r\n\r\nGET", 1))  # the body ends; the next request
    assert c.response()[0] == 200
    assert connection.request is None or connection.request.size <= MAX_MB * 2**20
    c.close()


def test_a_client_that_does_not_read_is_not_read_from(served):
    """Backpressure: requests sent without reading their answers fill the server's write buffer; it stops
    reading (and starting requests) instead of growing, then answers every request once the client reads."""
    base, server = served
    before = set(server.server_state.connections)
    c = Conn(base, buffers=4096)
    connection = server_side(server, before)
    request = get(f"/v2/models/{MODEL}/config")  # a few KiB of answer for ~50 bytes of request
    c.sock.setblocking(False)
    sent, stalled_since = 0, None
    deadline = time.monotonic() + 30
    stream = request * 64
    while time.monotonic() < deadline:
        try:
            sent += c.sock.send(stream[sent % len(stream):])  # on from where a partial send stopped
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break  # the server stopped reading
            time.sleep(0.01)
    assert stalled_since is not None, "the server read everything the client sent for 30 s"
    assert connection.write_paused and not connection.reading
    # What it holds for this client is bounded: the transport's buffer and the requests of one read.
    assert connection.transport.get_write_buffer_size() < 4 << 20
    assert len(connection.queue) * len(request) < 1 << 20
    # The client reads now (within header_timeout_s: a client that never reads is cut by it): every
    # complete request it sent is answered, in order.
    c.sock.setblocking(True)
    c.sock.settimeout(30)
    for _ in range(sent // len(request)):  # (a last request cut short is left unanswered)
        status, _, body = c.response()
        assert status == 200 and json.loads(body)["name"] == MODEL
    c.close()


class CountingTransport:
    """The server's real transport, counting ``write`` calls."""

    def __init__(self, transport):
        self.transport = transport
        self.writes = 0

    def write(self, data):
        self.writes += 1
        self.transport.write(data)

    def __getattr__(self, name):
        return getattr(self.transport, name)


def test_each_answer_is_one_transport_write(served, reference):
    base, server = served
    before = set(server.server_state.connections)
    c = Conn(base)
    connection = server_side(server, before)
    counting = connection.transport = CountingTransport(connection.transport)
    x = batch(1, seed=6)
    doc = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                       "parameters": {"binary_data_size": x.nbytes}}],
           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    header = json.dumps(doc).encode()
    requests = [post(INFER, json.dumps(request_body(x)).encode()),
                post(INFER, header + x.tobytes(), f"Inference-Header-Content-Length: {len(header)}").replace(
                    b"application/json", b"application/octet-stream"),
                get("/v2/nothing"), get("/metrics"), post(INFER, b"{")]
    statuses = []
    for r in requests:
        c.send(r)
        statuses.append(c.response()[0])
    assert statuses == [200, 200, 404, 200, 400]
    assert counting.writes == len(requests)
    c.close()


def test_the_asgi_adapter_serves_the_same_routes(onnx_path, reference):
    """``App`` stays an ASGI app (for uvicorn's h11 fallback): same routes, same 413, through ``handle``."""
    import httpx

    runtime = load_model(onnx_path, MODEL, runtime=RuntimeSettings(device="cpu", intra_op_threads=1))
    with running_uvicorn([runtime], serve_config(max_request_mb=MAX_MB), http="h11") as (base, server), \
            httpx.Client(base_url=base, timeout=10) as http:
        assert server.config.http_protocol_class.__module__.startswith("uvicorn.")
        assert http.get("/v2/health/live").json() == {"live": True}
        x = batch(2, seed=7)
        r = http.post(INFER, json=request_body(x))
        np.testing.assert_allclose(logits(r.content), reference(x), atol=1e-5)
        r = http.post(INFER, content=(b"x" * 4096 for _ in range(4)))
        assert r.status_code == 413 and "max_request_mb" in r.json()["error"]
        r = http.get(INFER)
        assert r.status_code == 405 and "use POST" in r.json()["error"]
