"""The front's ASGI app: /health and /metrics of its own; every other request passed to
the engine as it came, with its request id, after a bound on how many may wait for it
(MAX_QUEUE); model answers measured on the way back (tokens from their usage, time to
the first event of a stream, duration).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import anyio
import httpx2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..server import HEALTH_PATH
from ..server.client import ClientGone, read_body
from ..server.translate import BadRequest
from . import log
from .metrics import Metrics

METRICS_PATH = "/metrics"
# Requests that wait for the model: OpenAI's routes, and llama-server's own names for them.
MODEL_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/completion",
                          "/completions", "/chat/completions", "/embedding", "/embeddings", "/infill",
                          "/rerank", "/v1/rerank", "/reranking"})
LABELLED_ROUTES = MODEL_ROUTES | {"/v1/models", HEALTH_PATH, METRICS_PATH}  # others count as "other"
# Probes and scrapes come every few seconds: counted in /metrics, but no access line.
QUIET_ROUTES = frozenset({HEALTH_PATH, METRICS_PATH})
CLIENT_LEFT = 499  # logged and counted for a request whose client left before any answer (nginx's code)
HEALTH_TIMEOUT = 2.0  # an engine that does not answer its own /health this fast is not answering
# Not passed on, either way: hop-by-hop headers, the length of a body the front may change,
# and request ids (the front's own goes to the engine under a name of its own).
DROPPED_HEADERS = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                   b"te", b"trailer", b"upgrade", b"proxy-connection", log.REQUEST_ID_HEADER.encode(),
                   log.ENGINE_REQUEST_ID_HEADER.encode()}


@dataclass
class Settings:
    engine: str
    alias: str
    backend: str  # the engine's URL on 127.0.0.1
    slots: int  # requests the engine answers at once
    max_queue: int  # requests that may wait beyond them
    add_usage: bool  # ask streams for their usage (the localllm engine's carry no other count)


class Front:
    """The ASGI app of the front: one per container, so its counts are the container's."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.engine, settings.alias, settings.slots, settings.max_queue)
        self.in_flight = 0
        self.recent: list[float] = []  # durations of the last answers, for Retry-After
        self.client = httpx2.AsyncClient(base_url=settings.backend, timeout=httpx2.Timeout(None, connect=5),
                                         limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
                                         trust_env=False)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        started, path, method = time.monotonic(), scope["path"], scope["method"]
        headers = dict(scope["headers"])
        rid = log.request_id(headers.get(log.REQUEST_ID_HEADER.encode(), b"").decode("latin-1"))
        status = [CLIENT_LEFT]  # until a response starts

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (log.REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            if path == HEALTH_PATH and method in ("GET", "HEAD"):
                await self.health(send_with_id)
            elif path == METRICS_PATH and method == "GET":
                await respond(send_with_id, 200, generate_latest(self.metrics.registry),
                              CONTENT_TYPE_LATEST.encode())
            elif path in MODEL_ROUTES and method == "POST":
                await self.admit(scope, receive, send_with_id, rid, started)
            else:
                await self.forward(scope, receive, send_with_id, rid, started, measure=False)
        except Exception:
            status[0] = 500 if status[0] == CLIENT_LEFT else status[0]
            raise
        finally:
            route = path if path in LABELLED_ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            if path not in QUIET_ROUTES:
                client = scope.get("client") or ("-", 0)
                log.access(f"{client[0]}:{client[1]}", method, path, status[0], time.monotonic() - started, rid)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def health(self, send) -> None:
        """200 once the engine says its model is loaded and answers; 503 before, at once."""
        try:
            reply = await self.client.get(HEALTH_PATH, timeout=HEALTH_TIMEOUT)
            ready = reply.status_code == 200
            state = "ok" if ready else "loading"
        except httpx2.TimeoutException:
            ready, state = False, "not answering"
        except httpx2.TransportError:
            ready, state = False, "loading"
        body = {"status": state, "engine": self.settings.engine, "model": self.settings.alias,
                "processing": min(self.in_flight, self.settings.slots),
                "waiting": max(self.in_flight - self.settings.slots, 0)}
        await respond(send, 200 if ready else 503, json.dumps(body).encode())

    async def admit(self, scope, receive, send, rid: str, started: float) -> None:
        """Beyond MAX_QUEUE waiting requests, a 503 with Retry-After at once: a client told
        to come back beats one that times out in a line (node-api gives up after 180 s)."""
        waiting = self.in_flight - self.settings.slots
        if waiting >= self.settings.max_queue:
            self.metrics.rejected.inc()
            retry = max(1, round(sum(self.recent) / len(self.recent))) if self.recent else 1
            message = (f"the server is busy: answering {self.settings.slots} (its slots) with {max(waiting, 0)} "
                       f"more waiting (MAX_QUEUE={self.settings.max_queue}); retry in {retry} s")
            body = {"error": {"message": message, "type": "server_busy", "param": None, "code": "queue_full"}}
            return await respond(send, 503, json.dumps(body).encode(), extra=[(b"retry-after", str(retry).encode())])
        self.in_flight += 1
        self.gauges()
        try:
            await self.forward(scope, receive, send, rid, started, measure=True)
        finally:
            self.in_flight -= 1
            self.gauges()

    def gauges(self) -> None:
        self.metrics.processing.set(min(self.in_flight, self.settings.slots))
        self.metrics.deferred.set(max(self.in_flight - self.settings.slots, 0))

    async def forward(self, scope, receive, send, rid: str, started: float, measure: bool) -> None:
        """Pass the request to the engine and its answer back as it comes. A client that
        leaves closes the engine's connection, which stops the generation there."""
        try:
            body = await read_body(receive)  # bounded as the localllm engine's guard bounds it
        except ClientGone:
            return
        except BadRequest as too_large:
            return await respond(send, too_large.status, too_large.body())
        answer = Answer(self.metrics, scope["path"], started) if measure else None
        if answer is not None:
            body = answer.read_request(body, self.settings.add_usage)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in DROPPED_HEADERS]
        headers.append((log.ENGINE_REQUEST_ID_HEADER.encode(), rid.encode()))
        url = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        async with anyio.create_task_group() as group:
            async def until_client_leaves() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(until_client_leaves)
            try:
                await self.relay(request, send, answer)
            finally:
                group.cancel_scope.cancel()
        if answer is not None:
            answer.finish()
            self.recent = [*self.recent[-19:], time.monotonic() - started]

    async def relay(self, request, send, answer: "Answer | None") -> None:
        try:
            reply = await self.client.send(request, stream=True)
        except httpx2.TransportError as exc:
            message = f"the model server is not answering ({type(exc).__name__}); it may still be loading the model"
            return await respond(send, 503, error_body(message, "server_unavailable"), extra=[(b"retry-after", b"5")])
        try:
            headers = [(k, v) for k, v in reply.headers.raw if k.lower() not in DROPPED_HEADERS]
            if answer is not None:
                answer.streamed = reply.headers.get("content-type", "").startswith("text/event-stream")
            await send({"type": "http.response.start", "status": reply.status_code, "headers": headers})
            async for chunk in reply.aiter_raw():
                if answer is not None:
                    chunk = answer.read(chunk)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": answer.rest() if answer else b""})
        finally:
            with anyio.CancelScope(shield=True):  # a client that left: close the engine's connection
                await reply.aclose()


class Answer:
    """One model answer on its way back: its tokens (from usage), the time of its first
    event when streamed, and the usage event it carries only because the front asked."""

    def __init__(self, metrics: Metrics, route: str, started: float):
        self.metrics, self.route, self.started = metrics, route, started
        self.streamed, self.drop_usage_event = False, False
        self.first: float | None = None
        self.pending, self.whole = b"", []
        self.prompt_tokens = self.completion_tokens = 0

    def read_request(self, body: bytes, add_usage: bool) -> bytes:
        """With `add_usage`, a stream that did not ask for its usage is asked for it, and the
        usage event is taken out again on the way back. Anything not JSON goes as it came."""
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not (add_usage and isinstance(data, dict) and data.get("stream") is True):
            return body
        options = data.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict) or options.get("include_usage") is True:
            return body
        self.drop_usage_event = True
        data["stream_options"] = {**options, "include_usage": True}
        return json.dumps(data).encode()

    def read(self, chunk: bytes) -> bytes:
        """The part of `chunk` to pass on now: whole events of a stream (the usage event the
        client did not ask for left out); a whole reply is kept to read its usage at the end."""
        if not self.streamed:
            self.whole.append(chunk)
            return chunk
        self.pending += chunk.replace(b"\r\n", b"\n")
        *events, self.pending = self.pending.split(b"\n\n")
        return b"".join(event + b"\n\n" for event in events if self.event_kept(event))

    def event_kept(self, event: bytes) -> bool:
        data = event_json(event)
        if not isinstance(data, dict):
            return True
        if self.first is None and data.get("choices"):
            self.first = time.monotonic()
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.count(usage)
            return not (self.drop_usage_event and not data.get("choices"))
        timings = data.get("timings")  # llama-server's last event, when no usage was asked for
        if isinstance(timings, dict) and not self.completion_tokens:
            self.prompt_tokens = int(timings.get("cache_n", 0)) + int(timings.get("prompt_n", 0))
            self.completion_tokens = int(timings.get("predicted_n", 0))
        return True

    def rest(self) -> bytes:
        """What is left at the end of a stream (an event without its blank line)."""
        rest, self.pending = self.pending, b""
        return rest if not rest or self.event_kept(rest) else b""

    def count(self, usage: dict) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def finish(self) -> None:
        now = time.monotonic()
        if not self.streamed:
            data = parse_json(b"".join(self.whole))
            if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                self.count(data["usage"])
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.predicted.inc(self.completion_tokens)
        self.metrics.duration.labels(self.route).observe(now - self.started)
        if self.streamed and self.first is not None:
            self.metrics.first_token.labels(self.route).observe(self.first - self.started)
            if self.completion_tokens > 1:
                self.metrics.generated(self.completion_tokens - 1, now - self.first)


def event_json(event: bytes):
    data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
    return parse_json(data) if data and data != b"[DONE]" else None


def parse_json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


async def respond(send, status: int, body: bytes, content_type: bytes = b"application/json",
                  extra: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
