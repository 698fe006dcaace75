"""The HTTP/1.1 transport's wire: an asyncio ``Protocol`` on httptools' parser that calls ``App.handle`` directly.

``HttpProtocol`` gives every connection the ``httptools.HttpRequestParser`` (llhttp, the parser uvicorn
and Node use); its callbacks gather a request's method, percent-decoded path, lower-cased headers and
body, a complete head starts a task that awaits ``App.handle(method, path, headers, read_body)`` (the
routes, shared with nothing else: ``app.py`` owns them), and the answer goes out as one
``transport.write``: status line, uvicorn's default headers (``date``, ``server``: bytes rebuilt once a
second), content-type, Content-Length, ``connection: close`` where the connection ends, the body.

Why not uvicorn's own protocol: per request it builds an ASGI scope and message dicts, a
``RequestResponseCycle`` with an ``asyncio.Event``, validates every response header with regular
expressions and writes twice; on the development machine that machinery was ~40 us of the ~125 us of
server CPU a single-sample infer cost over HTTP (gRPC, through our own ``http2.py`` and the same
``App.infer``, cost ~85 us; ``benchmarks/serve_cpu.py``). uvicorn still runs the server around it: the
sockets (SO_REUSEPORT for worker processes), lifespan (which starts gRPC), signals and the graceful
shutdown, which constructs this class as ``http=`` (``app.uvicorn_config``) and talks to it through
``server_state`` (connections, tasks, default headers) and ``shutdown()``.

What it handles: keep-alive (HTTP/1.1's default; ``Connection: close`` and HTTP/1.0 close after the
answer), pipelined requests (answered in order: the next starts when the one before is answered, and
reading pauses while any wait), chunked request bodies (llhttp decodes them), ``Expect: 100-continue``
(``100 Continue`` is sent when a route reads the body, so a request refused before that, 404 or 413 by
its Content-Length, never uploads it; the connection then closes, as the client may never send it),
HEAD (a GET's headers without its body), an Upgrade request (answered as plain HTTP/1.1, then closed).
Limits, each a JSON ``error``:

- a request line and headers over ``MAX_HEADER_BYTES``, or more than ``MAX_HEADERS`` headers, and
  anything llhttp refuses (a malformed request line, header or chunk): 400, then the connection closes,
- a body over ``max_request_mb``: 413 from the route (by Content-Length before any of it is read; a
  chunked body as soon as it passes the limit); what still comes of it is parsed and dropped, never
  buffered,
- a **header timeout** (``header_timeout_s``): from the connection's opening (or the first byte of a
  later request on it) until the request's headers are complete; then 408 (or, when the client sent
  nothing, just the close),
- a **body timeout** (``body_timeout_s``): from the headers until the whole body is in; then 408,
- the **keep-alive timeout** (``keep_alive_s``): a connection idle that long after its last answer closes,
- at **shutdown**, a request still receiving its body is answered 503 (``Connection: close``) at once
  instead of holding the shutdown; requests whose body is in are answered (graceful_shutdown_s), then
  their connections close,
- **backpressure**: a client whose answers fill the transport's write buffer (it sends and does not
  read) is not read from, and no further pipelined request of it starts, until the buffer drains; so
  what the server holds for it stays bounded.

Timers cost nothing on the common path: header and body timers are armed only while a request is
between its first byte and its complete body after a read (a request that arrives in one read never
arms one), and the keep-alive timer is armed once and re-armed lazily when it fires early, rather than
cancelled and re-created per request.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from urllib.parse import unquote

import httptools
import orjson

from stages.serve.app import HttpError, body_too_large

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # request line + header names and values (h11's default limit)
MAX_HEADERS = 128

_IDLE, _HEADERS, _BODY, _KEEP_ALIVE = 0, 1, 2, 3  # where the request being parsed is; the last a timer's kind


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}
_JSON = b"content-type: application/json\r\n"
_CLOSE = b"connection: close\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DISCONNECTED = "client disconnected before the body was complete"
_defaults: tuple[object, bytes] = (None, b"")  # (uvicorn's default header list, its bytes)


def _default_headers(headers: list) -> bytes:
    """uvicorn's default headers (date, server) as bytes; uvicorn replaces the list once a second."""
    global _defaults
    if _defaults[0] is not headers:
        _defaults = (headers, b"".join(name + b": " + value + b"\r\n" for name, value in headers))
    return _defaults[1]


def _error(status: int, message: str) -> tuple[int, None, bytes]:
    return status, None, orjson.dumps({"error": message})


class _BadRequest(Exception):
    """Raised in a parser callback: the request is answered 400 with this message and the connection closes."""


class _Request:
    """One request: its head, its body as it arrives, and whether it is answered."""

    __slots__ = ("protocol", "method", "path", "headers", "url", "head_bytes", "keep_alive", "expect_continue",
                 "chunks", "size", "complete", "too_large", "error", "waiter", "answer", "answered")

    def __init__(self, protocol: "HttpProtocol"):
        self.protocol = protocol
        self.method = self.path = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.head_bytes = 0
        self.keep_alive = True
        self.expect_continue = False  # Expect: 100-continue, and 100 Continue not yet sent
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False  # the whole body is in
        self.too_large = False  # the body passed max_request_mb: dropped as it comes
        self.error: str | None = None  # the body will never complete (malformed, client gone, cut)
        self.waiter: asyncio.Future | None = None  # a route waiting for the body
        self.answer = None  # an answer decided without the routes (a 400 for a malformed request, a 503)
        self.answered = False

    async def read(self) -> bytes:
        """The body (``App.handle``'s ``read_body``): 413 above max_request_mb, 400 if it cannot complete."""
        if not (self.complete or self.too_large or self.error):
            protocol = self.protocol
            if self.expect_continue and not protocol.transport.is_closing():
                self.expect_continue = False
                protocol.transport.write(_CONTINUE)
            self.waiter = protocol.loop.create_future()
            protocol.update_reading()  # a body being waited for is read even while answers are backed up
            try:
                await self.waiter
            finally:
                self.waiter = None
                protocol.update_reading()
        if self.too_large:
            raise body_too_large(self.protocol.max_body)
        if self.error is not None:
            raise HttpError(400, self.error)
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection (see the module docstring). Constructed by uvicorn's server as its ``http``
    protocol class: ``config`` is uvicorn's Config with ``serve_app`` (the ``App``), ``header_timeout_s``
    and ``body_timeout_s`` set by ``app.uvicorn_config``."""

    def __init__(self, config, server_state, app_state=None, _loop=None):
        if not config.loaded:
            config.load()
        self.app = config.serve_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.limit_concurrency = config.limit_concurrency
        self.keep_alive_s = config.timeout_keep_alive
        self.header_timeout = getattr(config, "header_timeout_s", 10.0)
        self.body_timeout = getattr(config, "body_timeout_s", 60.0)
        self.max_body = self.app.max_bytes
        self.parser = httptools.HttpRequestParser(self)
        try:  # after `Connection: close`, further bytes are ignored rather than a parse error (httptools >= 0.6.3)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover
            pass
        self.transport = None
        self.request: _Request | None = None  # the request the parser is in
        self.active: _Request | None = None  # the request being answered
        self.queue: deque[_Request] = deque()  # pipelined requests waiting for it, in order
        self.phase = _IDLE
        self.timer = None
        self.timer_kind = _IDLE
        self.idle_since: float | None = None  # loop time of the last answer, while the connection is idle
        self.received = False  # any byte yet on this connection
        self.broken = False  # the parser gave up: nothing more is read
        self.closing = False  # shutdown: close after the answer in progress
        self.write_paused = False
        self.reading = True

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.connections.add(self)
        self._arm(_HEADERS, self.header_timeout)  # a connection that sends nothing is closed too

    def connection_lost(self, exc) -> None:
        self.connections.discard(self)
        self._disarm()
        for request in (self.request, self.active, *self.queue):
            if request is not None and not request.complete and request.error is None:
                request.error = _DISCONNECTED
                request.wake()
        self.queue.clear()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        return None  # the client closed its side: the transport closes (as uvicorn's protocol did)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        self.received = True
        self.idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # WebSocket or h2c: not served. The request is answered as plain HTTP/1.1, then the connection closes.
            self._stop_parsing(None)
        except httptools.HttpParserError as e:
            cause, status = e.__context__, 400
            if isinstance(cause, _BadRequest):
                message = str(cause)
            elif cause is not None:  # a bug in a callback here: it costs this connection, never the server
                log.error("HTTP connection from %s: unexpected error in the parser's callback", self._peer(),
                          exc_info=cause)
                message, status = f"internal error: {type(cause).__name__}", 500
            else:
                message = f"invalid HTTP request: {e}"
            self._stop_parsing(message, status)
            return
        phase = self.phase
        if phase == _IDLE:
            if self.timer is not None and self.timer_kind != _KEEP_ALIVE:
                self._disarm()  # the request came whole
        elif self.timer is None or self.timer_kind != phase:
            self._arm(phase, self.header_timeout if phase == _HEADERS else self.body_timeout)

    # A client that sends requests but does not read their answers fills the transport's write buffer:
    # stop reading from it (and starting its pipelined requests) until the buffer drains.
    def pause_writing(self) -> None:
        self.write_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_reading()
        if self.active is None and self.queue and not self.transport.is_closing():
            self._start(self.queue.popleft())
            self.update_reading()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close idle connections now, the others after their answer; cut a
        request still receiving its body with 503."""
        request = self.request
        if self.phase == _BODY and request is not None and not request.answered:
            self._cut(503, "the server is shutting down and this request's body was not complete; retry it")
        elif self.active is None and not self.queue:
            self.transport.close()
        else:
            self.closing = True

    # --- the parser's callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = _Request(self)
        self.phase = _HEADERS

    def on_url(self, url: bytes) -> None:
        request = self.request
        request.url += url
        request.head_bytes += len(url)
        if request.head_bytes > MAX_HEADER_BYTES:
            raise _BadRequest(f"request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.request
        request.head_bytes += len(name) + len(value)
        if request.head_bytes > MAX_HEADER_BYTES:
            raise _BadRequest(f"request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB")
        headers = request.headers
        if len(headers) >= MAX_HEADERS:
            raise _BadRequest(f"more than {MAX_HEADERS} request headers")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            request.expect_continue = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        parser = self.parser
        request.method = parser.get_method().decode("ascii")
        request.keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        url = request.url
        if url[:1] == b"/" and b"?" not in url and b"#" not in url:
            raw = url  # the usual origin-form target: nothing for parse_url to split off
        else:
            try:
                raw = httptools.parse_url(url).path or b""
            except httptools.HttpParserInvalidURLError:
                raise _BadRequest(f"invalid request target {url[:200].decode('latin-1')!r}") from None
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _BadRequest("the request target holds bytes outside ASCII (percent-encode them)") from None
        request.path = unquote(path) if "%" in path else path
        self.phase = _BODY
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            request.answer = _error(503, "Exceeded concurrency limit.")
        if self.active is None:
            self._start(request)
        else:
            self.queue.append(request)
            self.update_reading()

    def on_body(self, body: bytes) -> None:
        request = self.request
        if request.answered or request.too_large:
            return  # answered early (404, 413) or over the limit: dropped as it comes
        size = request.size + len(body)
        if size > self.max_body:
            request.too_large = True
            request.chunks = []
            request.wake()
            return
        request.size = size
        request.chunks.append(body)

    def on_message_complete(self) -> None:
        request = self.request
        self.request = None
        self.phase = _IDLE
        request.complete = True
        request.wake()

    # --- requests and answers ----------------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        self.active = request
        task = self.loop.create_task(self._run(request))
        self.tasks.add(task)  # uvicorn's shutdown waits for these, then cancels them after its grace period
        task.add_done_callback(self.tasks.discard)

    async def _run(self, request: _Request) -> None:
        answer = request.answer
        if answer is None:
            try:
                answer = await self.app.handle(request.method, request.path, request.headers, request.read)
            except Exception as e:  # the routes answer their own errors; this is a bug: 500, logged, server goes on
                log.exception("HTTP %s %s failed", request.method, request.path)
                answer = _error(500, f"internal error: {type(e).__name__}: {e}")
        self._respond(request, *answer)

    def _respond(self, request: _Request, status: int, headers: list | None, body: bytes) -> None:
        """Write the answer in one ``transport.write``, then start the next pipelined request or wait for one."""
        request.answered = True
        self.active = None
        self.server_state.total_requests += 1
        transport = self.transport
        if transport.is_closing():
            return  # the client left, or a timeout or shutdown cut the connection and answered it
        # The connection ends after this answer when the client asked, at shutdown, when its body is
        # unusable, after the last answer once the parser gave up, and when it expected 100 Continue and
        # never got it (it may never send the body, and the parser would take the next request for it).
        keep = request.keep_alive and not self.closing and request.error is None and \
            not (self.broken and not self.queue) and not (request.expect_continue and not request.complete)
        parts = [STATUS_LINES[status], _default_headers(self.server_state.default_headers)]
        if headers is None:
            parts.append(_JSON)
        else:
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"content-length: %d\r\n" % len(body))
        if not keep:
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        if request.method != "HEAD":
            parts.append(body)
        transport.write(b"".join(parts))
        if not keep:
            transport.close()
            return
        if self.queue:
            if not self.write_paused:
                self._start(self.queue.popleft())
                self.update_reading()
        elif self.phase == _IDLE:
            self.idle_since = self.loop.time()
            if self.timer is None:
                self._arm(_KEEP_ALIVE, self.keep_alive_s)

    def _stop_parsing(self, message: str | None, status: int = 400) -> None:
        """The parser can go no further: a malformed request (``message``: answered ``status`` in its turn) or an
        Upgrade (``None``: the request is answered as it is). The connection closes after the answers."""
        self.broken = True
        self.update_reading()
        request, self.request = self.request, None
        dispatched = self.phase == _BODY  # its head was complete: it is being answered or waits its turn
        self.phase = _IDLE
        self._disarm()
        if message is not None and not dispatched:
            # A malformed head: the 400 takes the request's place in the order of answers.
            request = request or _Request(self)
            request.answer = _error(status, message)
            request.complete = True
            if self.active is None:
                self._start(request)
            else:
                self.queue.append(request)
        elif request is not None and not request.complete:  # dispatched, its body broken mid-way
            request.error = f"the request body is malformed: {message}" if message else "the request body never came"
            request.wake()
        elif self.active is None and not self.queue:
            self.transport.close()  # nothing left to answer

    def update_reading(self) -> None:
        """Read from the client unless its answers are backed up or pipelined requests wait (a body that a
        route waits for is read regardless), or the parser gave up."""
        active = self.active
        pause = self.broken or (self.write_paused or bool(self.queue)) and (active is None or active.waiter is None)
        if pause == self.reading and not self.transport.is_closing():
            self.reading = not pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # --- timers ------------------------------------------------------------------------------------

    def _arm(self, kind: int, seconds: float) -> None:
        self._disarm()
        self.timer_kind = kind
        self.timer = self.loop.call_later(seconds, self._expired, kind)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_kind = _IDLE

    def _expired(self, kind: int) -> None:
        self.timer = None
        self.timer_kind = _IDLE
        if self.transport.is_closing():
            return
        busy = self.active is not None or bool(self.queue)
        if kind == _KEEP_ALIVE:
            if busy or self.phase != _IDLE:
                return  # answering, or a request is arriving (its own timer runs); re-armed after the answer
            if self.idle_since is None:  # bytes came that began no request (blank lines)
                self.idle_since = self.loop.time()
                left = self.keep_alive_s
            else:
                left = self.idle_since + self.keep_alive_s - self.loop.time()
            if left > 0.001:
                self._arm(_KEEP_ALIVE, left)  # answers came since it was armed
            else:
                self.transport.close()
        elif kind == _HEADERS:
            if self.phase == _HEADERS:
                self._cut(408, f"request headers not complete within header_timeout_s ({self.header_timeout:g} s)")
            elif not busy and not self.received:
                self.transport.close()  # never sent a byte
            elif not busy:
                self.idle_since = self.loop.time()
                self._arm(_KEEP_ALIVE, self.keep_alive_s)
        elif self.phase == _BODY:
            self._cut(408, f"request body not complete within body_timeout_s ({self.body_timeout:g} s)")

    def _cut(self, status: int, message: str) -> None:
        """Answer the request being received ``status`` now and close; a route waiting for its body gets an
        error, and its own answer goes nowhere."""
        self._disarm()
        request = self.request
        if request is None or not request.answered and (self.active is None or self.active is request):
            _, _, body = _error(status, message)
            self.transport.write(b"".join((STATUS_LINES[status], _JSON, b"content-length: %d\r\n" % len(body),
                                           _CLOSE, b"\r\n", body)))
        if request is not None:
            request.answered = True
            if not request.complete and request.error is None:
                request.error = message
                request.wake()
        self.broken = True
        self.transport.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"
