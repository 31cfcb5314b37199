"""uvicorn's HTTP/1.1 protocol with the bounds it lacks: at most MAX_CONNECTIONS open
connections (one more is answered 503 and closed at once), CLIENT_TIMEOUT for a
request's headers to arrive, on a new connection and between the requests of a kept one
(uvicorn waits for them for ever), and a send buffer small enough that a client that
stops reading is noticed. The body and the answer have their own time limit in the app,
so a slow client costs a connection for a while, never a place in the queue.
"""
from __future__ import annotations

import asyncio
import json
import socket

# What a client that stopped reading may leave unread before the front notices: the kernel's
# send buffer (Linux doubles the value asked for, and would grow it to 4 MiB, a whole long
# answer: found only after its generation had ended), and asyncio's own buffer above it.
# 128 KiB a round trip still carries megabytes a second to a client nearby.
SEND_BUFFER, WRITE_BUFFER = 64 << 10, 16 << 10

from uvicorn.protocols.http.h11_impl import H11Protocol


def raw_answer(status: str, message: str) -> bytes:
    """A whole HTTP answer, for a connection that has not sent a request the protocol
    could answer (h11 answers only a request it has read)."""
    body = json.dumps({"error": {"message": message, "type": "server_busy" if status.startswith("503")
                                 else "timeout_error", "param": None, "code": None}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class BoundedProtocol(H11Protocol):
    max_connections = 512
    client_timeout = 60.0

    @classmethod
    def bounded(cls, max_connections: int, client_timeout: float) -> type["BoundedProtocol"]:
        """The class uvicorn is given (it makes one instance per connection)."""
        return type("BoundedProtocol", (cls,), {"max_connections": max_connections,
                                                "client_timeout": client_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.headers_due: asyncio.TimerHandle | None = None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        if len(self.connections) > self.max_connections:
            transport.write(raw_answer("503 Service Unavailable", f"the server has {self.max_connections} "
                                       "connections open (MAX_CONNECTIONS); retry in a moment"))
            transport.close()
            return
        self.expect_headers()

    def expect_headers(self) -> None:
        """The next request's headers must be in within client_timeout."""
        self.forget_headers()
        self.headers_due = self.loop.call_later(self.client_timeout, self.headers_late)

    def forget_headers(self) -> None:
        if getattr(self, "headers_due", None) is not None:
            self.headers_due.cancel()
            self.headers_due = None

    def headers_late(self) -> None:
        self.headers_due = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: the app bounds its body and its answer
        if self.transport.is_closing():
            return
        if self.cycle is None:  # nothing answered on this connection yet: say why it ends
            self.transport.write(raw_answer("408 Request Timeout", f"no whole request within "
                                            f"{self.client_timeout:g} s (CLIENT_TIMEOUT)"))
        self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are in
            self.forget_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.forget_headers()
        super().connection_lost(exc)
