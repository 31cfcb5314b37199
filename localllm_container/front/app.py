"""The front's ASGI app, in front of either engine: each request is taken in the same
order. The route must be one of routes.ROUTES (else a 404 of its own); the key is checked
(keys) before the body is read; the body must arrive within CLIENT_TIMEOUT and pass the
bounds (limits); only then does a generating request count toward the slots and
MAX_QUEUE, and wait its turn here, so the engine gets at most one request per slot (all
of them with INTERRUPT_REQUESTS=true, so that a new one can cut the answer off). The
answer is passed back as it comes, measured on the way (tokens from their usage, time to
the first event of a stream, duration); a client that stops reading it for CLIENT_TIMEOUT
is dropped, which stops its generation. /health and /metrics are the front's own.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

import anyio
import httpx2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..server import HEALTH_PATH
from ..server.translate import BadRequest
from . import log
from .cors import Cors
from .keys import Keys, refusal
from ..server.client import MAX_BODY_BYTES
from .limits import check_request, parsed_body
from .metrics import Metrics
from .routes import METRICS_PATH, OTHER_CONNECTIONS, PROBE_CONNECTIONS, ROUTES, Route, error_body, not_on_engine, \
    printable, unknown

# Probes and scrapes come every few seconds: counted in /metrics, but no access line.
QUIET_ROUTES = frozenset({HEALTH_PATH, METRICS_PATH})
CLIENT_LEFT = 499  # logged and counted for a request whose client left before any answer (nginx's code)
HEALTH_TIMEOUT = 2.0  # an engine that does not answer its own /health this fast is not answering
# A whole reply's usage is read from its end (both engines write it last): parsed whole, a
# reply of 2,048 embeddings (41 MiB) held the event loop 1.2 s.
REPLY_TAIL_BYTES = 64 << 10
USAGE_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d{1,12})')
THREAD_BODY_BYTES = 32 << 10  # larger bodies are parsed and checked off the event loop, two at a time
# Bodies being received at once, all requests together: beyond, a 503 at once. Eight bodies
# of the largest size; without it MAX_CONNECTIONS uploads could hold gigabytes.
RECEIVING_BYTES = 8 * MAX_BODY_BYTES
# Not passed on, either way: hop-by-hop headers, the length of a body the front may change,
# the date (uvicorn writes its own),
# request ids (the front's own goes to the engine under a name of its own), the keys (checked
# here), llama-server's handle on a generation (X-Conversation-Id: it would keep generating
# after the client left, for anyone who knows the id), and the engines' CORS answers.
DROPPED_HEADERS = {b"host", b"date", b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                   b"te", b"trailer", b"upgrade", b"proxy-connection", log.REQUEST_ID_HEADER.encode(),
                   log.ENGINE_REQUEST_ID_HEADER.encode(), b"authorization", b"x-api-key", b"x-conversation-id"}


@dataclass
class Settings:
    engine: str
    alias: str
    backend: str  # the engine's URL on 127.0.0.1
    slots: int  # requests the engine answers at once
    max_queue: int  # requests that may wait beyond them
    add_usage: bool  # ask streams for their usage (the localllm engine's carry no other count)
    api_key: str = ""  # API_KEY: keys separated by commas, or none
    metrics_need_key: bool = False
    cors_origins: str = ""
    client_timeout: float = 60.0
    passed_at_once: int = 0  # requests the engine gets at once (0: one per slot); the rest wait here


class Refused(Exception):
    """A request the front answers itself with `status`, in the route's own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: list | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or []


class SlowClient(Exception):
    """The client did not take the next part of its answer within CLIENT_TIMEOUT: its
    connection is dropped (uvicorn closes it when the app raises; the log line is ours)."""


class Front:
    """The ASGI app of the front: one per container, so its counts are the container's."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys, self.cors = Keys(settings.api_key), Cors(settings.cors_origins)
        self.metrics = Metrics(settings.engine, settings.alias, settings.slots, settings.max_queue)
        self.admitted = 0  # generating requests answered or waiting
        self.receiving = 0  # bytes of the bodies on their way in
        self.checking = anyio.CapacityLimiter(2)  # large bodies parsed at once
        passed = settings.passed_at_once or settings.slots
        self.turns = anyio.Semaphore(passed)  # first come, first served
        self.recent: list[float] = []  # durations of the last answers, for Retry-After

        def client(connections: int) -> httpx2.AsyncClient:
            return httpx2.AsyncClient(base_url=settings.backend, timeout=httpx2.Timeout(None, connect=5),
                                      limits=httpx2.Limits(max_connections=connections), trust_env=False)
        # Each pool is bounded, so llama-server's HTTP threads cover them all (routes.OTHER_CONNECTIONS).
        self.engine, self.other, self.probe = client(passed), client(OTHER_CONNECTIONS), client(PROBE_CONNECTIONS)
        logging.getLogger("uvicorn.error").addFilter(not_slow_client)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        started, method = time.monotonic(), scope["method"]
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")  # never percent-decoded
        route = ROUTES.get(path)
        headers = dict(scope["headers"])
        rid = log.request_id(headers.get(log.REQUEST_ID_HEADER.encode(), b"").decode("latin-1"))
        cors = self.cors.headers(headers.get(b"origin"))
        status = [CLIENT_LEFT]  # until a response starts

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *cors,
                                                  (log.REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.handle(route, scope, receive, send_with_id, rid, started)
        except Refused as refused:
            await respond(send_with_id, refused.status, error_body(route, refused.status, str(refused),
                                                                   refused.param, refused.code),
                          extra=refused.headers)
        except ClientLeft:
            pass
        except SlowClient:
            log.LOGGER.warning(f"request_id={rid}: the client took no part of its answer for "
                               f"{self.settings.client_timeout:g} s (CLIENT_TIMEOUT): dropped, its generation stopped")
            raise
        except Exception:
            status[0] = 500 if status[0] == CLIENT_LEFT else status[0]
            raise
        finally:
            self.metrics.requests.labels(route.path if route else "other", str(status[0])).inc()
            if path not in QUIET_ROUTES:
                client = scope.get("client") or ("-", 0)
                query = scope.get("query_string", b"").decode("latin-1")
                log.access(f"{client[0]}:{client[1]}", method, printable(path + ("?" + query if query else "")),
                           status[0], time.monotonic() - started, rid)

    async def handle(self, route: Route | None, scope, receive, send, rid: str, started: float) -> None:
        method, headers = scope["method"], scope["headers"]
        if route is None:
            raise Refused(404, unknown(method, scope.get("raw_path", b"").decode("latin-1") or scope["path"]))
        if method == "OPTIONS":
            return await self.preflight(dict(headers), send)
        if not route.allows(method):
            raise Refused(405, f"{route.path} takes {route.method}, not {method}",
                          headers=[(b"allow", route.method.encode())])
        if route.path == HEALTH_PATH:
            return await self.health(send)
        if (route.path != METRICS_PATH or self.settings.metrics_need_key) and not self.keys.allow(headers):
            raise Refused(401, refusal(headers), code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        if route.path == METRICS_PATH:
            return await respond(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())
        if self.settings.engine not in route.engines:
            raise Refused(404, not_on_engine(route, self.settings.engine))
        body = await self.read_body(receive) if route.method == "POST" else b""
        answer = Answer(self.metrics, route.path, started) if route.generates else None
        if route.method == "POST":
            data = await self.checked(route, body)
            if answer is not None:
                body = answer.read_request(data, body, self.settings.add_usage)
        if answer is None:
            return await self.forward(self.other, route, scope, body, receive, send, rid, None)
        await self.admit(route, scope, body, receive, send, rid, answer)

    async def read_body(self, receive) -> bytes:
        """The whole body within CLIENT_TIMEOUT, at most MAX_BODY_BYTES; a client that left
        ends the request (ClientLeft)."""
        chunks, size = [], 0
        try:
            with anyio.move_on_after(self.settings.client_timeout) as waited:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientLeft
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    self.receiving += len(chunks[-1])
                    if size > MAX_BODY_BYTES:
                        raise Refused(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB",
                                      headers=[(b"connection", b"close")])
                    if self.receiving > RECEIVING_BYTES:
                        raise Refused(503, f"the server is receiving {RECEIVING_BYTES >> 20} MiB of requests at "
                                      "once; retry in a moment", code="server_busy",
                                      headers=[(b"retry-after", b"1"), (b"connection", b"close")])
                    if not message.get("more_body"):
                        return b"".join(chunks)
        finally:
            self.receiving -= size
        assert waited.cancelled_caught
        raise Refused(408, f"the request body did not arrive within {self.settings.client_timeout:g} s "
                      "(CLIENT_TIMEOUT)", headers=[(b"connection", b"close")])

    async def checked(self, route: Route, body: bytes) -> dict:
        """The body parsed and within every bound (limits), or Refused 400 naming the field;
        a large body is checked off the event loop, so other answers keep streaming."""
        def check() -> dict:
            data = parsed_body(body)
            check_request(route.path, data)
            return data
        try:
            if len(body) <= THREAD_BODY_BYTES:
                return check()
            return await anyio.to_thread.run_sync(check, limiter=self.checking)
        except BadRequest as bad:
            raise Refused(bad.status, str(bad), bad.param) from None

    async def preflight(self, headers: dict, send) -> None:
        allowed = self.cors.preflight(headers.get(b"origin"), headers.get(b"access-control-request-headers"))
        if allowed is None:
            raise Refused(403, "this origin may not call this server from a browser: list it in CORS_ORIGINS")
        await respond(send, 204, b"", extra=allowed)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for client in (self.engine, self.other, self.probe):
                    await client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def health(self, send) -> None:
        """200 once the engine says its model is loaded and answers; 503 before, at once."""
        try:
            reply = await self.probe.get(HEALTH_PATH, timeout=HEALTH_TIMEOUT)
            ready = reply.status_code == 200
            state = "ok" if ready else "loading"
        except httpx2.TimeoutException:
            ready, state = False, "not answering"
        except httpx2.TransportError:
            ready, state = False, "loading"
        body = {"status": state, "engine": self.settings.engine, "model": self.settings.alias,
                "processing": min(self.admitted, self.settings.slots),
                "waiting": max(self.admitted - self.settings.slots, 0)}
        await respond(send, 200 if ready else 503, json.dumps(body).encode())

    async def admit(self, route: Route, scope, body: bytes, receive, send, rid: str, answer: "Answer") -> None:
        """Beyond MAX_QUEUE waiting requests, a 503 with Retry-After at once: a client told
        to come back beats one that times out in a line (node-api gives up after 180 s)."""
        waiting = self.admitted - self.settings.slots
        if waiting >= self.settings.max_queue:
            self.metrics.rejected.inc()
            retry = max(1, round(sum(self.recent) / len(self.recent))) if self.recent else 1
            raise Refused(503, f"the server is busy: answering {self.settings.slots} (its slots) with "
                          f"{max(waiting, 0)} more waiting (MAX_QUEUE={self.settings.max_queue}); retry in {retry} s",
                          code="queue_full", headers=[(b"retry-after", str(retry).encode())])
        self.admitted += 1
        self.gauges()
        try:
            await self.forward(self.engine, route, scope, body, receive, send, rid, answer)
        finally:
            self.admitted -= 1
            self.gauges()

    def gauges(self) -> None:
        self.metrics.processing.set(min(self.admitted, self.settings.slots))
        self.metrics.deferred.set(max(self.admitted - self.settings.slots, 0))

    async def forward(self, client: httpx2.AsyncClient, route: Route, scope, body: bytes, receive, send, rid: str,
                      answer: "Answer | None") -> None:
        """Pass the request to the engine under its route's own name, and its answer back as
        it comes; a generating one first waits for its turn. A client that leaves (while it
        waits or while it is answered) closes the engine's connection, which stops the generation."""
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in DROPPED_HEADERS]
        headers.append((log.ENGINE_REQUEST_ID_HEADER.encode(), rid.encode()))
        query = scope.get("query_string", b"").decode("latin-1")
        request = client.build_request(scope["method"], route.path + ("?" + query if query else ""),
                                       headers=headers, content=body)
        ended: Exception | None = None  # raised after the task group, which would wrap it in a group
        answered = False  # to the end: not cut off by the client leaving
        async with anyio.create_task_group() as group:
            async def until_client_leaves() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(until_client_leaves)
            try:
                if answer is None:
                    await self.relay(client, request, send, None)
                else:
                    async with self.turns:
                        await self.relay(client, request, send, answer)
                answered = True
            except (Refused, SlowClient) as exc:
                ended = exc
            finally:
                group.cancel_scope.cancel()
        if ended is not None:
            raise ended
        if answer is not None and answered:
            answer.finish()
            self.recent = [*self.recent[-19:], time.monotonic() - answer.started]

    async def relay(self, client: httpx2.AsyncClient, request, send, answer: "Answer | None") -> None:
        try:
            reply = await client.send(request, stream=True)
        except httpx2.TransportError as exc:
            raise Refused(503, f"the model server is not answering ({type(exc).__name__}); it may still be loading "
                          "the model", code="server_unavailable", headers=[(b"retry-after", b"5")]) from None
        try:
            headers = [(k, v) for k, v in reply.headers.raw
                       if k.lower() not in DROPPED_HEADERS and not k.lower().startswith(b"access-control-")]
            if answer is not None:
                answer.streamed = reply.headers.get("content-type", "").startswith("text/event-stream")
            await self.send_in_time(send, {"type": "http.response.start", "status": reply.status_code,
                                           "headers": headers})
            async for chunk in reply.aiter_raw():
                if answer is not None:
                    chunk = answer.read(chunk)
                if chunk:
                    await self.send_in_time(send, {"type": "http.response.body", "body": chunk, "more_body": True})
            await self.send_in_time(send, {"type": "http.response.body", "body": answer.rest() if answer else b""})
        finally:
            with anyio.CancelScope(shield=True):  # a client that left: close the engine's connection
                await reply.aclose()

    async def send_in_time(self, send, message) -> None:
        """Send, or SlowClient when the client takes nothing for CLIENT_TIMEOUT (its buffers
        are full: it stopped reading)."""
        with anyio.move_on_after(self.settings.client_timeout) as waited:
            await send(message)
        if waited.cancelled_caught:
            raise SlowClient


class ClientLeft(Exception):
    """The client disconnected while sending its request."""


def not_slow_client(record: logging.LogRecord) -> bool:
    """uvicorn's traceback for the exception that drops a slow client: the front's own
    warning line says it instead."""
    return not (record.exc_info and isinstance(record.exc_info[1], SlowClient))


class Answer:
    """One model answer on its way back: its tokens (from usage), the time of its first
    event when streamed, and the usage event it carries only because the front asked."""

    def __init__(self, metrics: Metrics, route: str, started: float):
        self.metrics, self.route, self.started = metrics, route, started
        self.streamed, self.drop_usage_event = False, False
        self.first: float | None = None
        self.pending, self.tail = b"", b""
        self.prompt_tokens = self.completion_tokens = 0

    def read_request(self, data: dict, body: bytes, add_usage: bool) -> bytes:
        """With `add_usage`, a stream that did not ask for its usage is asked for it, and the
        usage event is taken out again on the way back."""
        if not (add_usage and data.get("stream") is True):
            return body
        options = data.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict) or options.get("include_usage") is True:
            return body
        self.drop_usage_event = True
        return json.dumps({**data, "stream_options": {**options, "include_usage": True}}).encode()

    def read(self, chunk: bytes) -> bytes:
        """The part of `chunk` to pass on now: whole events of a stream (the usage event the
        client did not ask for left out); of a whole reply, its end is kept to read the usage."""
        if not self.streamed:
            self.tail = (self.tail + chunk)[-REPLY_TAIL_BYTES:]
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
            self.count({name.decode(): int(number) for name, number in USAGE_FIELD.findall(self.tail)})
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


async def respond(send, status: int, body: bytes, content_type: bytes = b"application/json",
                  extra: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
