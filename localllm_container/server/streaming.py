"""Answers sent by the guard: a whole response (`answer`), and a stream put together
from the app's event streams, one per choice (StreamedResponse).
"""
from __future__ import annotations

import json


class StreamedResponse:
    """A streamed reply made of the app's event streams, one per choice: their events
    rewritten by replies.Reply, one [DONE] at the very end. The response start is
    held back until the first event, so that a stream that fails before it (a prompt
    longer than the context is found only then) gets the error llama-cpp-python gives the
    same request unstreamed, instead of a 200 with an empty body."""

    def __init__(self, send, reply):
        self.send, self.reply = send, reply
        self.started = False
        self.start: dict | None = None
        self.pending = b""  # the start of an event whose end has not come yet

    async def run(self, app, scope, receive, choice: int, request) -> bool:
        """Run the app for one choice; False when it answered with an error instead."""
        error: list = []

        async def send_rewritten(message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] != 200:
                    error.append(message)
                elif not self.started:
                    self.start = message
                return
            if error:
                error.append(message)
                return
            await self.events(choice, message.get("body", b""))

        try:
            await app(scope, receive, send_rewritten)
        except Exception as exc:
            if self.started:
                raise
            from llama_cpp.server.errors import RouteErrorHandler
            # It reads only its class's patterns: how the app words the same error unstreamed.
            status, body = RouteErrorHandler.error_message_wrapper(RouteErrorHandler, exc, request)
            await answer(self.send, status, json.dumps({"error": body}).encode())
            return False
        if error:
            if self.started:
                raise RuntimeError(f"the model server answered {error[0]['status']} in the middle of a stream")
            await self.send(error[0])
            for message in error[1:]:
                await self.send(message)
            return False
        return True

    async def events(self, choice: int, body: bytes) -> None:
        self.pending += body
        *whole, self.pending = self.pending.split(SSE_END)
        out = []
        for event in whole:
            if not event.startswith(b"data: "):
                out.append(event + SSE_END)  # a comment, such as sse-starlette's ping
                continue
            data = event[len(b"data: "):]
            if data.strip() == b"[DONE]":
                continue
            if self.reply.template and not self.reply.rewrites_chunks:
                out.append(event + SSE_END)  # as the app wrote it: no per-token work when nothing changes
                continue
            out.extend(sse(chunk) for chunk in self.reply.chunk(choice, json.loads(data)))
        if out:
            await self.write(b"".join(out))

    async def write(self, body: bytes, more: bool = True) -> None:
        if not self.started:
            self.started = True
            await self.send(self.start)
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def end(self, include_usage: bool) -> None:
        tail = sse(self.reply.usage_chunk()) if include_usage else b""
        await self.write(tail + b"data: [DONE]" + SSE_END, more=False)


SSE_END = b"\n\n"  # how sse-starlette ends an event, as the app sets it up (sep="\n")


def sse(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + SSE_END


async def answer(send, status: int, body: bytes, headers: list | None = None) -> None:
    kept = [(key, value) for key, value in headers or [(b"content-type", b"application/json")]
            if key.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": status,
                "headers": kept + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
