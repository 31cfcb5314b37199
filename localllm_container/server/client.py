"""The client of one request: its body (read once, bounded), its leaving (listened
for while the app runs), and the generation it is waiting for, whose tokens are
counted where llama-cpp-python makes them (patches.watch_generations).
"""
from __future__ import annotations

import contextvars

from .translate import BadRequest

# Far above any prompt that fits a context, and DataSphere's node-api takes no more (16 MB):
# a bound on what one request can make us hold (the front's, and the guard's again).
MAX_BODY_BYTES = 16 << 20


GENERATION: contextvars.ContextVar = contextvars.ContextVar("generation", default=None)


class Generation:
    """One run's tokens, counted where llama-cpp-python makes them (its streams carry no
    usage), and its client, whose leaving ends the generation at the next token."""

    def __init__(self, client: "Client"):
        self.client, self.prompt_tokens, self.completion_tokens = client, 0, 0


class ClientGone(Exception):
    """The client disconnected while sending its request."""


class Client:
    """The client of one request after its body was read: `listen` waits for it to leave;
    `receive(body)` is what the app reads, the body and then the leaving."""

    def __init__(self, receive):
        import anyio
        self._receive, self.left, self.gone = receive, anyio.Event(), False

    async def listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.left.set()

    def receive(self, body: bytes):
        sent = False

        async def receive_again():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            if not self.gone:  # starlette asks with a cancelled scope: answer at once when gone
                await self.left.wait()
            return {"type": "http.disconnect"}

        return receive_again


async def read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", status=413)
        if not message.get("more_body"):
            return b"".join(chunks)
