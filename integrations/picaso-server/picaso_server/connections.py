"""Connections the server holds, bounded: header size, time to send the headers, idle keep-alive.

uvicorn times out an idle keep-alive connection only after a response: a client that opens a
connection and sends nothing (or a header a byte at a time) holds its slot of ``limit_concurrency``
for ever, and a few hundred of them turn every other request into a 503. :class:`BoundedH11Protocol`
closes a connection whose request headers are not complete within ``HEADER_TIMEOUT_S`` (from the
connection, or from the end of the previous response), and h11 refuses headers over
``MAX_HEADER_BYTES`` (431). Usage::

    uvicorn.Server(uvicorn_config(app, "127.0.0.1", 8000)).run()
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 32 * 1024
KEEP_ALIVE_S = 5


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # of the request whose headers are being received
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()  # nothing was answered on it: no response to send

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # receiving a request's headers
            end = data.find(b"\r\n\r\n")
            self._header_bytes += end + 4 if end >= 0 else len(data)
            if self._header_bytes > MAX_HEADER_BYTES:  # h11 bounds only headers that arrive in pieces
                self._disarm()
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()
                return
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the request runs (the app bounds its own time)
            self._header_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, host: str, port: int, limit_concurrency: int | None = 512, log_level: str = "warning",
                   access_log: bool = False) -> uvicorn.Config:
    """The server's uvicorn settings: the bounded h11 protocol, header size, keep-alive and concurrency."""
    return uvicorn.Config(app, host=host, port=port, http=BoundedH11Protocol, limit_concurrency=limit_concurrency,
                          timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          log_level=log_level, access_log=access_log)
