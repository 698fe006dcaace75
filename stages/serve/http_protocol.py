"""uvicorn's httptools HTTP/1.1 protocol with the timeouts it lacks, and a clean cut at shutdown.

uvicorn closes a kept-alive connection that stays idle after an answer (``keep_alive_s``), but nothing
else: a connection that never sends a byte, one that stops in the middle of its headers and one that
trickles its body stay open for ever (until the process runs out of file descriptors), and on SIGTERM a
trickling body holds the graceful shutdown for its whole length, then ends in a 500 with a logged
``CancelledError``. ``TimedHttpToolsProtocol`` adds, per connection:

- a **header timeout** (``header_timeout_s``): from the connection's opening (or the first byte of a
  later request on it) until its request headers are complete; then the connection is closed, with a
  408 answer if the client had sent anything,
- a **body timeout** (``body_timeout_s``): from the headers until the whole body is in; then the
  client gets a 408 and the connection is closed,
- at **shutdown**, a request still receiving its body is answered 503 (``Connection: close``) at once
  instead of holding the shutdown; requests whose body is in are left to finish (graceful_shutdown_s).

Timers cost nothing on the common path: they are armed only while a connection is between requests'
first byte and its complete body after a read (a request that arrives in one read never arms one), or
at the connection's opening.
"""

from __future__ import annotations

import logging

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_IDLE, _HEADERS, _BODY = 0, 1, 2  # where the current request is, as the parser saw it


def _response(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("latin-1") + body


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus header and body timeouts and the shutdown cut (see the module docstring).
    The timeouts come from ``config.header_timeout_s`` / ``config.body_timeout_s``, set on uvicorn's
    Config by ``app.uvicorn_config``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._header_timeout = getattr(config, "header_timeout_s", 10.0)
        self._body_timeout = getattr(config, "body_timeout_s", 60.0)
        self._phase = _IDLE
        self._timer = None
        self._timer_phase = _IDLE
        self._received = False  # any byte yet on this connection

    # --- the parser's callbacks tell where the request is -------------------------------------------

    def on_message_begin(self) -> None:
        self._phase = _HEADERS
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        super().on_message_complete()

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(_HEADERS, self._header_timeout)  # a connection that sends nothing is closed too

    def data_received(self, data: bytes) -> None:
        self._received = True
        super().data_received(data)
        phase = self._phase
        if phase == _IDLE:
            if self._timer is not None and self._timer_phase == _HEADERS and self.cycle is not None:
                self._disarm()  # the first request came in whole
            elif self._timer is not None and self._timer_phase == _BODY:
                self._disarm()
        elif phase != self._timer_phase or self._timer is None:
            self._arm(phase, self._header_timeout if phase == _HEADERS else self._body_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._phase == _BODY and self.cycle is not None and not self.cycle.response_started:
            self._cut(503, "Service Unavailable", "the server is shutting down and this request's body was "
                                                  "not complete; retry it")
            return
        super().shutdown()

    # --- timers ------------------------------------------------------------------------------------

    def _arm(self, phase: int, seconds: float) -> None:
        self._disarm()
        self._timer_phase = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_phase = _IDLE

    def _expired(self, phase: int) -> None:
        self._timer = None
        self._timer_phase = _IDLE
        if self.transport.is_closing() or phase != self._phase and not (phase == _HEADERS and self._phase == _IDLE):
            return
        if phase == _HEADERS:
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered: not idle (a kept-alive one is the keep-alive timer's)
            if self._received:
                self._cut(408, "Request Timeout", f"request headers not complete within header_timeout_s "
                                                  f"({self._header_timeout:g} s)")
            else:
                self.transport.close()
        else:
            self._cut(408, "Request Timeout", f"request body not complete within body_timeout_s "
                                              f"({self._body_timeout:g} s)")

    def _cut(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` now and close; the app, still waiting for the body, sees a disconnect and its
        own answer goes nowhere."""
        self._disarm()
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(_response(status, reason, message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
