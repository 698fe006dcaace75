"""A minimal HTTP/2 server for gRPC unary calls, on the asyncio event loop: the gRPC transport's wire.

``Http2Server`` listens (cleartext HTTP/2 with prior knowledge, as gRPC speaks it without TLS) and
gives every connection an asyncio ``Protocol``: ``data_received`` parses frames out of a byte buffer
(9-byte headers with ``struct``), a request's header block is HPACK-decoded (the ``hpack`` package),
its DATA frames are gathered into the one gRPC message (5-byte prefix: compressed flag, big-endian
length), and a complete call runs ``handler(path, message) -> response message`` as a task. The answer
goes out as one ``transport.write``: HEADERS (``:status 200``, ``content-type: application/grpc``),
the message in DATA frames, trailers HEADERS (``grpc-status``, ``grpc-message``). A handler raises
``GrpcError(code, message)`` for any other status; nothing here knows what the methods mean
(``grpc_server`` does).

Why not ``grpc.aio``: its server costs ~500 us of CPU per single-sample call on the development
machine (a poller thread, cross-thread wake-ups, per-call bookkeeping), against ~130 us for the whole
HTTP request through uvicorn's protocol then (``benchmarks/serve_cpu.py``). The pure-Python ``h2`` library alone
costs ~216 us per request. This module does only what a gRPC unary server needs, and its hot path is
a few dozen lines: decoded header blocks are cached by their raw bytes (HPACK decoding costs ~20 us
a block; see ``_Connection._head``), response header blocks are encoded once.

What it handles (RFC 9113): the client preface; SETTINGS (ours sent first; the client's acknowledged,
its INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE applied); PING (acknowledged); flow control both ways
(response bytes beyond the client's windows wait for its WINDOW_UPDATE; our receive windows are
credited back as DATA arrives, in batches); HEADERS with padding, priority and CONTINUATION; DATA
with padding; RST_STREAM (the call is forgotten, its task cancelled); GOAWAY from the client (the
connection closes when its calls are done); PRIORITY and unknown frame types ignored. A connection
that breaks the protocol (a bad preface, a frame over our MAX_FRAME_SIZE, PUSH_PROMISE from a client,
a malformed frame, an HPACK error) gets GOAWAY with the error code and is closed; the server goes on.

gRPC rules (the gRPC over HTTP/2 spec): a ``content-type`` other than ``application/grpc*`` is
answered HTTP 415; a method other than POST HTTP 405; a message above ``max_message_bytes``
RESOURCE_EXHAUSTED as soon as its prefix says so; no message, a truncated one or more than one
INVALID_ARGUMENT; a compressed message is inflated (gzip, deflate; bounded by ``max_message_bytes``),
any other ``grpc-encoding`` UNIMPLEMENTED, answers go uncompressed; ``grpc-timeout``
is honoured (DEADLINE_EXCEEDED, the call cancelled); ``grpc-message`` is percent-encoded.
Stopping is graceful: ``begin_stop`` closes the listener and sends GOAWAY, calls already received
finish (``stop``'s grace period), then the rest are answered UNAVAILABLE and the connections closed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib

import hpack

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types, flags, error codes and settings (RFC 9113, sections 6, 7 and 6.5.2).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x9
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, \
    S_MAX_HEADER_LIST_SIZE = range(1, 7)
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535  # every window's size until SETTINGS or WINDOW_UPDATE change it
# grpc-encoding -> zlib's wbits: gzip's header, or deflate as gRPC means it (zlib's format, RFC 1950).
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
INLINE_INFLATE_BYTES = 65536  # compressed messages above this are inflated on a thread, not the event loop
DEFAULT_FRAME = 16384  # the largest frame a peer takes until its SETTINGS say more

# What we advertise. Streams: more than any client here opens at once (grpc.aio set no limit; a
# stream over it is refused, which gRPC clients retry). Windows: a stream may send 1 MiB before we
# credit it back, the connection 16 MiB (credited as DATA arrives), so a large tensor streams in
# without waiting on round trips; the message size limit, not the window, bounds what a call holds.
MAX_CONCURRENT_STREAMS = 1024
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME_SIZE = 1 << 20  # fewer frames to parse for a large tensor than the default 16 KiB
MAX_HEADER_LIST_SIZE = 64 << 10  # decoded headers; a header block (with CONTINUATIONs) is held to the same
HEADER_CACHE_ENTRIES = 64  # distinct header blocks remembered per connection (see _Connection._head)

# gRPC status codes (grpc/include/grpcpp/impl/codegen/status_code_enum.h).
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}

_HEAD = struct.Struct(">BHBBL")  # length (24 bits: high byte, low 16), type, flags, stream id (31 bits + R)
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")


class GrpcError(Exception):
    """A call's answer other than OK: a gRPC status code and its message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _ConnectionError(Exception):
    """The client broke HTTP/2: GOAWAY with this error code, then the connection closes."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _inflate(data: bytes, wbits: int, encoding: bytes, limit: int) -> tuple[bytes | None, tuple | None]:
    """(message, None) or (None, (code, message)): at most ``limit`` bytes inflated, so a small message
    that inflates past the limit is RESOURCE_EXHAUSTED as a large one is, without inflating it whole."""
    inflate = zlib.decompressobj(wbits)
    name = encoding.decode("latin-1")
    try:
        message = inflate.decompress(data, limit + 1)
    except zlib.error as e:
        return None, (INTERNAL, f"the message is not valid {name} ({e})")
    if len(message) > limit:
        return None, (RESOURCE_EXHAUSTED, f"SERVER: Received message larger than max ({len(message)}+ vs. {limit}) "
                                          "once inflated")
    if not inflate.eof:
        return None, (INTERNAL, f"the message is not valid {name} (truncated)")
    return message, None


# --- encoding ------------------------------------------------------------------------------------

def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first``'s high bits in its first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes | int, value: bytes) -> bytes:
    """A 'literal header field without indexing' (RFC 7541 6.2.2), not Huffman-coded: the name by its
    static-table index where it has one, else as a string. Responses never touch the dynamic table,
    so the client's SETTINGS_HEADER_TABLE_SIZE needs nothing from us."""
    head = _hpack_int(name, 4) if isinstance(name, int) else b"\x00" + _hpack_int(len(name), 7) + name
    return head + _hpack_int(len(value), 7) + value


def percent_encode(message: str) -> bytes:
    """``grpc-message``'s encoding (gRPC over HTTP/2): UTF-8, bytes outside space..tilde and '%' as %XX."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


_STATUS_200 = b"\x88"  # ':status: 200' is static entry 8
_CONTENT_TYPE = _literal(31, b"application/grpc")  # static entry 31 is content-type
_RESPONSE_HEADERS = _STATUS_200 + _CONTENT_TYPE
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _status_block(code: int, message: str, http_status: int = 200) -> bytes:
    """A trailers-only answer's header block: the HTTP status, content-type, grpc-status and grpc-message."""
    status = _STATUS_200 if http_status == 200 else _literal(8, str(http_status).encode())
    block = status + _CONTENT_TYPE + _literal(b"grpc-status", str(code).encode())
    return block + _literal(b"grpc-message", percent_encode(message)) if message else block


def _header_frames(stream_id: int, flags: int, block: bytes, max_frame: int) -> bytes:
    """HEADERS (and CONTINUATION where ``block`` is longer than the client's frames) with ``flags``."""
    if len(block) <= max_frame:
        return _frame(HEADERS, flags | END_HEADERS, stream_id, block)
    parts = [_frame(HEADERS, flags, stream_id, block[:max_frame])]
    for i in range(max_frame, len(block), max_frame):
        last = i + max_frame >= len(block)
        parts.append(_frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[i:i + max_frame]))
    return b"".join(parts)


_PREAMBLE = (  # our SETTINGS, and the connection window raised from its fixed 65,535 to ours
    _frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in (
        (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS), (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
        (S_MAX_FRAME_SIZE, MAX_FRAME_SIZE), (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE))))
    + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))
_SETTINGS_ACK = _frame(SETTINGS, ACK, 0)


# --- decoding ------------------------------------------------------------------------------------

def _skip_int(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[i] & limit
    i += 1
    if value == limit:
        shift = 0
        while True:
            b = block[i]
            i += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
    return value, i


def leaves_table_alone(block: bytes) -> bool:
    """Whether an HPACK header block (already decoded once, so well formed) leaves the dynamic table as
    it was: only indexed fields and literals without indexing (or never indexed), no literal with
    incremental indexing, no table size update."""
    i, n = 0, len(block)
    try:
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field
                _, i = _skip_int(block, i, 7)
            elif b & 0xC0 == 0x40 or b & 0xE0 == 0x20:  # incremental indexing, table size update
                return False
            else:  # 0000xxxx / 0001xxxx: literal without indexing / never indexed
                index, i = _skip_int(block, i, 4)
                if index == 0:
                    length, i = _skip_int(block, i, 7)
                    i += length
                length, i = _skip_int(block, i, 7)
                i += length
    except IndexError:
        return False
    return True


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` (1-8 digits and a unit: H M S m u n) in seconds; ValueError when malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit() or value[-1] not in _TIMEOUT_UNITS:
        raise ValueError(f"grpc-timeout {value.decode('latin-1')!r} is not 1-8 digits and a unit (H, M, S, m, u, n)")
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


class _Head:
    """What a request's headers say that the server acts on."""

    __slots__ = ("method", "path", "content_type", "encoding", "timeout")

    def __init__(self, headers):
        self.method = self.path = self.content_type = self.encoding = self.timeout = None
        for name, value in headers:
            if name == b":path":
                self.path = value
            elif name == b":method":
                self.method = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"grpc-encoding":
                self.encoding = value
            elif name == b"grpc-timeout":
                self.timeout = value


class _Stream:
    __slots__ = ("id", "head", "body", "declared", "ended", "window", "unacked", "send_window", "task", "timer",
                 "answered", "pending", "trailers")

    def __init__(self, stream_id: int, head: _Head, send_window: int):
        self.id = stream_id
        self.head = head
        self.body = bytearray()  # the gRPC message as it arrives (prefix included)
        self.declared = -1  # the message length its prefix gives, once 5 bytes are in
        self.ended = False  # the client sent END_STREAM
        self.window = STREAM_WINDOW  # what the client may still send on this stream
        self.unacked = 0  # DATA bytes received and not yet credited back
        self.send_window = send_window
        self.task = self.timer = None
        self.answered = False
        self.pending = b""  # response DATA waiting for window
        self.trailers = b""  # and the trailers frame that follows it


class _Connection(asyncio.Protocol):
    """One client connection: frames in, calls run as tasks, answers out."""

    def __init__(self, server: "Http2Server"):
        self.server = server
        self.handler = server.handler
        self.max_message = server.max_message_bytes
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.buf = bytearray()
        self.out = bytearray()  # control frames gathered while parsing, written once per data_received
        self.parsing = False
        self.preface = False
        self.settings_seen = False
        self.closed = False
        self.goaway_sent = False  # we stop taking streams (the server is stopping)
        self.peer_goaway = False  # the client opens no more
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}  # answered streams whose DATA waits for window
        self.max_seen = 0  # highest stream id the client opened
        self.continuing = None  # (stream id, end_stream, header block so far) until END_HEADERS
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        self.heads: dict[bytes, _Head] = {}
        self.window = CONNECTION_WINDOW  # what the client may still send on the connection
        self.unacked = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME

    # --- asyncio -----------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        transport.write(_PREAMBLE)
        if self.server.stopping:
            self.goaway()

    def connection_lost(self, exc) -> None:
        self._close()

    # A client that sends calls but does not read their answers fills the transport's write buffer:
    # stop reading its calls until the buffer drains, so memory stays bounded by the buffer's limits.
    def pause_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buf += data
        self.parsing = True
        try:
            self._parse()
        except _ConnectionError as e:
            self._fail(e.code, str(e))
        except Exception as e:  # a bug here must cost one connection, never the server
            log.exception("HTTP/2 connection from %s: unexpected error", self._peer())
            self._fail(INTERNAL_ERROR, f"internal error: {type(e).__name__}")
        finally:
            self.parsing = False
        if self.closed:
            return
        if self.out:
            self.transport.write(bytes(self.out))
            self.out.clear()
        if (self.peer_goaway or self.goaway_sent) and not self.streams:
            self._close()

    # --- frames in ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        n = len(buf)
        pos = 0
        if not self.preface:
            if buf[:24] != PREFACE[:n]:
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface (gRPC needs HTTP/2 with prior knowledge)")
            if n < 24:
                return
            self.preface = True
            pos = 24
        with memoryview(buf) as view:
            while n - pos >= 9 and not self.closed:
                high, low, kind, flags, stream_id = _HEAD.unpack_from(buf, pos)
                length = high << 16 | low
                if length > MAX_FRAME_SIZE:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes over our SETTINGS_MAX_FRAME_SIZE "
                                                             f"({MAX_FRAME_SIZE})")
                end = pos + 9 + length
                if end > n:
                    break
                stream_id &= 0x7FFFFFFF
                if self.continuing is not None and kind != CONTINUATION:
                    raise _ConnectionError(PROTOCOL_ERROR, "a header block must end (CONTINUATION) before another frame")
                if not self.settings_seen and kind != SETTINGS:
                    raise _ConnectionError(PROTOCOL_ERROR, "the connection preface must be followed by SETTINGS")
                if kind == DATA:
                    with view[pos + 9:end] as payload:
                        self._on_data(flags, stream_id, payload)
                elif kind == HEADERS:
                    self._on_headers(flags, stream_id, bytes(buf[pos + 9:end]))
                elif kind == CONTINUATION:
                    self._on_continuation(flags, stream_id, bytes(buf[pos + 9:end]))
                elif kind == SETTINGS:
                    self._on_settings(flags, stream_id, bytes(buf[pos + 9:end]))
                elif kind == WINDOW_UPDATE:
                    self._on_window_update(stream_id, bytes(buf[pos + 9:end]))
                elif kind == PING:
                    if length != 8:
                        raise _ConnectionError(FRAME_SIZE_ERROR, f"PING of {length} bytes (must be 8)")
                    if stream_id:
                        raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
                    if not flags & ACK:
                        self._write(_frame(PING, ACK, 0, bytes(buf[pos + 9:end])))
                elif kind == RST_STREAM:
                    self._on_rst_stream(stream_id, length, bytes(buf[pos + 9:end]))
                elif kind == GOAWAY:
                    if stream_id or length < 8:
                        raise _ConnectionError(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "malformed GOAWAY")
                    self.peer_goaway = True
                elif kind == PRIORITY:  # advice we do not need: one call per stream, answered at once
                    if not stream_id:
                        raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                    if length != 5:
                        raise _ConnectionError(FRAME_SIZE_ERROR, f"PRIORITY of {length} bytes (must be 5)")
                elif kind == PUSH_PROMISE:
                    raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # other frame types are extensions: ignored (RFC 9113 5.5)
                pos = end
        if not self.closed:
            del buf[:pos]

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes (a multiple of 6)")
        self.settings_seen = True
        grown = False
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} over 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():  # applies to every open stream's window (RFC 9113 6.9.2)
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE overflows a window")
                grown = grown or delta > 0
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} outside 16384..16777215")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value} (0 or 1)")
            # HEADER_TABLE_SIZE limits the table our encoder may use: it uses none. The others are advice.
        self._write(_SETTINGS_ACK)
        if grown:
            self._flush_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes (must be 4)")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection's window over 2^31-1")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.max_seen:
                raise _ConnectionError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # a stream already closed: ignored
        if not increment or stream.send_window + increment > MAX_WINDOW:
            self._reset(stream, PROTOCOL_ERROR if not increment else FLOW_CONTROL_ERROR)
            return
        stream.send_window += increment
        if stream.pending:
            self._flush(stream)

    def _on_rst_stream(self, stream_id: int, length: int, payload: bytes) -> None:
        if length != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"RST_STREAM of {length} bytes (must be 4)")
        if not stream_id or stream_id > self.max_seen:
            raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM on {'stream 0' if not stream_id else 'an idle stream'}")
        stream = self.streams.get(stream_id)
        if stream is not None:  # the client gave up on the call: nothing more is sent on it
            stream.answered = True
            self._forget(stream)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "padded HEADERS without its pad length")
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if end < start:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        block = payload[start:end]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, bool(flags & END_STREAM), block)
        else:
            self.continuing = (stream_id, bool(flags & END_STREAM), bytearray(block))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS before it on its stream")
        block = self.continuing[2]
        block += payload
        if len(block) > MAX_HEADER_LIST_SIZE:
            raise _ConnectionError(PROTOCOL_ERROR, f"header block over {MAX_HEADER_LIST_SIZE} bytes")
        if flags & END_HEADERS:
            _, end_stream, _ = self.continuing
            self.continuing = None
            self._on_header_block(stream_id, end_stream, bytes(block))

    def _head(self, block: bytes) -> _Head:
        """The request head of an HPACK header block. Decoding costs ~20 us even for a block of indexed
        fields, and a client sends the same bytes call after call; so a block that leaves the dynamic
        table alone is remembered by its bytes (its meaning can change only when the table does, and
        then every remembered block is forgotten). A block that changes the table is decoded every time."""
        head = self.heads.get(block)
        if head is not None:
            return head
        try:
            head = _Head(self.decoder.decode(block, raw=True))
        except Exception as e:  # hpack's errors, and whatever a hostile block makes of it
            raise _ConnectionError(COMPRESSION_ERROR, f"header block does not decode: {e}") from None
        if leaves_table_alone(block):
            if len(self.heads) >= HEADER_CACHE_ENTRIES:
                self.heads.clear()
            self.heads[block] = head
        else:
            self.heads.clear()
        return head

    def _on_header_block(self, stream_id: int, end_stream: bool, block: bytes) -> None:
        head = self._head(block)  # always decoded: HPACK state is the connection's, whatever the stream
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: they may only end the request
            if stream.ended or not end_stream:
                self._reset(stream, PROTOCOL_ERROR)
            else:
                self._end_of_request(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.max_seen:
            raise _ConnectionError(PROTOCOL_ERROR if stream_id % 2 == 0 else STREAM_CLOSED,
                                   f"HEADERS opening stream {stream_id}: not a new odd stream id")
        self.max_seen = stream_id
        if self.goaway_sent or self.peer_goaway:
            return  # after GOAWAY: not processed (the client retries above GOAWAY's last stream id)
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._write(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        stream = _Stream(stream_id, head, self.peer_initial_window)
        self.streams[stream_id] = stream
        if head.path is None or head.method is None:
            self._reset(stream, PROTOCOL_ERROR)
            return
        if head.method != b"POST":
            self._answer(stream, INTERNAL, f"gRPC calls are POST, got {head.method.decode('latin-1')}", http_status=405)
            return
        if head.content_type is None or not head.content_type.startswith(b"application/grpc"):
            got = "none" if head.content_type is None else repr(head.content_type.decode("latin-1"))
            self._answer(stream, INTERNAL, f"content-type must be application/grpc, got {got}", http_status=415)
            return
        if head.timeout is not None:
            try:
                seconds = parse_timeout(head.timeout)
            except ValueError as e:
                self._answer(stream, INTERNAL, str(e))
                return
            stream.timer = self.loop.call_later(seconds, self._deadline, stream)
        if end_stream:
            self._end_of_request(stream)

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding included: all of it counts against the windows
        self.window -= size
        if self.window < 0:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self.unacked += size
        if self.unacked >= CONNECTION_WINDOW // 2:  # credit back in batches, not per frame
            self._write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.window += self.unacked
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended:
            if stream_id > self.max_seen:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            if stream is not None:  # after the client's END_STREAM
                self._reset(stream, STREAM_CLOSED)
            return  # a stream we closed (answered early, refused, reset): its late DATA is dropped
        start, end = 0, size
        if flags & PADDED:
            if not size or payload[0] >= size:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA padding longer than the frame")
            start, end = 1, size - payload[0]
        stream.window -= size
        if stream.window < 0:
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        if not stream.answered:
            body = stream.body
            body += payload[start:end]
            if stream.declared < 0 and len(body) >= 5:
                stream.declared = int.from_bytes(body[1:5], "big")
                if stream.declared > self.max_message:
                    self._answer(stream, RESOURCE_EXHAUSTED, f"SERVER: Received message larger than max "
                                                             f"({stream.declared} vs. {self.max_message})")
                    return
            if stream.declared >= 0 and len(body) > 5 + stream.declared:
                self._answer(stream, INVALID_ARGUMENT, "a unary call takes one message; more than one came")
                return
        if flags & END_STREAM:
            self._end_of_request(stream)
        elif not stream.answered:
            stream.unacked += size
            if stream.unacked >= STREAM_WINDOW // 2:
                self._write(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked)))
                stream.window += stream.unacked
                stream.unacked = 0

    # --- calls ---------------------------------------------------------------------------------------

    def _end_of_request(self, stream: _Stream) -> None:
        stream.ended = True
        if stream.answered:
            if not stream.pending:
                self._forget(stream)
            return
        body, stream.body = stream.body, None
        if len(body) < 5:
            self._answer(stream, INVALID_ARGUMENT, "the request has no message: a unary call sends one "
                                                   "(a 5-byte gRPC prefix, then the message)")
            return
        if len(body) != 5 + stream.declared:
            self._answer(stream, INVALID_ARGUMENT, f"the request's message is cut short: its prefix says "
                                                   f"{stream.declared} bytes, {len(body) - 5} came")
            return
        with memoryview(body) as view:
            message = view[5:].tobytes()
        if body[0]:
            encoding = stream.head.encoding
            wbits = _WBITS.get(encoding)
            if wbits is None:
                if encoding is None or encoding == b"identity":
                    self._answer(stream, INTERNAL, "the message is flagged compressed but grpc-encoding names no "
                                                   "compression")
                else:
                    self._answer(stream, UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')} is not served: "
                                                        "send messages uncompressed (identity), gzip or deflate")
                return
            stream.task = self.loop.create_task(self._inflate_and_call(stream, message, wbits, encoding))
            return
        stream.task = self.loop.create_task(self._call(stream, message))

    async def _inflate_and_call(self, stream: _Stream, data: bytes, wbits: int, encoding: bytes) -> None:
        """A gzip or deflate message inflated (off the event loop when large), then called."""
        if len(data) > INLINE_INFLATE_BYTES:
            message, error = await self.loop.run_in_executor(None, _inflate, data, wbits, encoding, self.max_message)
        else:
            message, error = _inflate(data, wbits, encoding, self.max_message)
        if error is not None:
            self._answer(stream, *error)
        else:
            await self._call(stream, message)

    async def _call(self, stream: _Stream, message: bytes) -> None:
        try:
            response = await self.handler(stream.head.path, message)
        except GrpcError as e:
            self._answer(stream, e.code, e.message)
        except asyncio.CancelledError:
            pass  # whoever cancelled has answered (deadline, shutdown) or the client is gone
        except Exception as e:
            log.exception("gRPC call %s failed", stream.head.path.decode("latin-1"))
            self._answer(stream, UNKNOWN, f"Unexpected {type(e)}: {e}")
        else:
            self._answer(stream, OK, response=response)

    def _deadline(self, stream: _Stream) -> None:
        stream.timer = None
        self._answer(stream, DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _answer(self, stream: _Stream, code: int, message: str = "", response: bytes | None = None,
                http_status: int = 200) -> None:
        """Send the call's answer: the response message and OK trailers, or a trailers-only status."""
        if stream.answered or self.closed:
            return
        stream.answered = True
        self._settle(stream)
        sid = stream.id
        if response is None:
            out = _header_frames(sid, END_STREAM, _status_block(code, message, http_status), self.peer_max_frame)
        else:
            data = b"\x00" + len(response).to_bytes(4, "big") + response
            trailers = _frame(HEADERS, END_STREAM | END_HEADERS, sid, _OK_TRAILERS)
            headers = _frame(HEADERS, END_HEADERS, sid, _RESPONSE_HEADERS)
            n = len(data)
            if n <= self.peer_max_frame and n <= self.send_window and n <= stream.send_window:  # the usual case
                self.send_window -= n
                stream.send_window -= n
                out = b"".join((headers, _HEAD.pack(n >> 16, n & 0xFFFF, DATA, 0, sid), data, trailers))
            else:
                stream.pending, stream.trailers = data, trailers
                self._write(headers)
                self._flush(stream)
                return
        self._write(out)
        if not stream.ended:  # answered before the request was complete: the client may stop sending
            self._write(_frame(RST_STREAM, 0, sid, _U32.pack(NO_ERROR)))
        self._forget(stream)

    def _flush(self, stream: _Stream) -> None:
        """Send what the windows allow of an answered stream's DATA; its trailers once all of it went."""
        data = stream.pending
        n = min(len(data), self.send_window, stream.send_window)
        frames = []
        if n > 0:
            step = self.peer_max_frame
            with memoryview(data) as view:
                for i in range(0, n, step):
                    chunk = view[i:min(i + step, n)]
                    frames.append(_HEAD.pack(len(chunk) >> 16, len(chunk) & 0xFFFF, DATA, 0, stream.id))
                    frames.append(chunk.tobytes())
            self.send_window -= n
            stream.send_window -= n
            stream.pending = data = data[n:]
        if data:
            self.blocked[stream.id] = stream
        else:
            frames.append(stream.trailers)
            self.blocked.pop(stream.id, None)
        if frames:
            self._write(b"".join(frames))
        if not data:
            self._forget(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                break
            if stream.send_window > 0:
                self._flush(stream)

    def _reset(self, stream: _Stream, code: int) -> None:
        """A stream error: RST_STREAM with ``code``, the call forgotten."""
        self._write(_frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        stream.answered = True
        self._forget(stream)

    @staticmethod
    def _settle(stream: _Stream) -> None:
        """The call's deadline timer stopped and its task cancelled (unless it is the caller)."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        task = stream.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        stream.pending = b""
        self._settle(stream)
        if (self.goaway_sent or self.peer_goaway) and not self.streams and not self.parsing:
            self._close()

    # --- the connection ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.parsing:
            self.out += data
        elif not self.closed:
            self.transport.write(data)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def _fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with ``code`` and why, then close (the server goes on)."""
        if self.closed:
            return
        log.info("closing HTTP/2 connection from %s: %s", self._peer(), message)
        self.out += _frame(GOAWAY, 0, 0, _U32.pack(self.max_seen) + _U32.pack(code) + message.encode()[:256])
        self.transport.write(bytes(self.out))
        self.out.clear()
        self._close()

    def goaway(self) -> None:
        """Take no new streams (graceful stop); close once the open ones are answered."""
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self.transport.write(_frame(GOAWAY, 0, 0, _U32.pack(self.max_seen) + _U32.pack(NO_ERROR)))
        if not self.streams:
            self._close()

    def abort_calls(self, message: str) -> None:
        """Answer every call still open UNAVAILABLE (the grace period ran out), then close."""
        for stream in list(self.streams.values()):
            if not stream.answered:
                self._answer(stream, UNAVAILABLE, message)
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.connections.discard(self)
        for stream in self.streams.values():
            if stream.timer is not None:
                stream.timer.cancel()
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
        self.streams.clear()
        self.blocked.clear()
        self.buf = bytearray()
        if self.transport is not None and not self.transport.is_closing():
            if self.out:
                self.transport.write(bytes(self.out))
            self.transport.close()  # after what was written has gone
        self.out = bytearray()


class Http2Server:
    """gRPC unary calls over cleartext HTTP/2 on the running event loop: ``handler(path: bytes, message:
    bytes) -> bytes`` answers each (raising ``GrpcError`` for a status other than OK); a message over
    ``max_message_bytes`` is refused before it is read."""

    def __init__(self, handler, max_message_bytes: int):
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host``:``port`` (``reuse_port``: SO_REUSEPORT, for worker processes sharing it);
        the bound port. OSError when it cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_port=reuse_port,
                                                backlog=2048)
        return self._server.sockets[0].getsockname()[1]

    def begin_stop(self) -> None:
        """Close the listener and send GOAWAY on every connection: calls already received go on."""
        if self.stopping:
            return
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.goaway()

    async def stop(self, grace_s: float) -> None:
        """``begin_stop``, then wait up to ``grace_s`` for the open calls; the rest are answered UNAVAILABLE."""
        self.begin_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.abort_calls("the server shut down before this call finished (graceful_shutdown_s ran out); "
                                   "retry it")
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
