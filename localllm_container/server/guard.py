"""The request guard: ASGI middleware in front of llama-cpp-python's app that runs the
checks and translations on each POST and puts the reply together. It owns the order
of the steps; what each step does lives in checks, translate, replies, client and
streaming.
"""
from __future__ import annotations

import json

from . import HEALTH_PATH
from .checks import ServedModel, check_semantics, nulls_meaning_default, parse_json, request_models, \
    validated, with_defaults_explicit
from .client import GENERATION, Client, ClientGone, Generation, read_body
from .log import REQUEST_ID
from .replies import Reply
from .streaming import StreamedResponse, answer
from .translate import BadRequest, translate

# llama-server's body on HEALTH_PATH, so a probe means the same on both engines.
HEALTHY = b'{"status":"ok"}'


class RequestGuard:
    """ASGI middleware in front of llama-cpp-python's app: reads each POST body once,
    answers what cannot run with a 400 naming the field, translates what today's OpenAI
    clients send into what the app runs (translate), and puts the reply together from
    the app's: one run per choice, the served alias as `model`. While the app runs it
    listens for the client, so a client that leaves stops its generation (Generation).
    The front has checked the key and the bounds (front/limits.py) before a request gets here."""

    def __init__(self, app, model: ServedModel):
        self.app, self.model = app, model
        self.models = request_models()
        self.nulls_to_drop = {path: nulls_meaning_default(model) for path, model in self.models.items()}
        self.naming_a_model = {path for path, model in self.models.items() if "model" in model.model_fields}

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http":  # the front's id, on every line written for this request
            REQUEST_ID.set(dict(scope["headers"]).get(b"x-localllm-request-id", b"").decode("latin-1"))
        if scope["type"] == "http" and path == HEALTH_PATH and scope["method"] in ("GET", "HEAD"):
            return await answer(send, 200, HEALTHY)  # the server listens only once the model is loaded
        if scope["type"] != "http" or scope["method"] != "POST" or path not in self.models:
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        try:
            body = await read_body(receive)
            data = parse_json(body, headers.get("content-type", ""))
            data = with_defaults_explicit(data, self.nulls_to_drop[path])
            data, plan = translate(path, data, self.model)
            if path in self.naming_a_model:
                data["model"] = self.model.alias  # the reply names the model /v1/models lists, never a path
            request = validated(self.models[path], data)
            check_semantics(path, request, self.model)
        except BadRequest as problem:
            return await answer(send, problem.status, problem.body())
        except ClientGone:
            return
        import anyio
        client = Client(receive)
        async with anyio.create_task_group() as listening:
            listening.start_soon(client.listen)
            await self.run(scope, client, send, data, request, plan)
            listening.cancel_scope.cancel()

    async def run(self, scope, client: "Client", send, data: dict, request, plan) -> None:
        """One run of the app per choice; a stream is passed on as it comes, an unstreamed
        reply once all choices are in."""
        reply = Reply(plan)
        response = StreamedResponse(send, reply) if plan.stream else None
        for choice in range(plan.choices):
            generation = Generation(client)
            token = GENERATION.set(generation)
            try:
                body = json.dumps(plan.body_for(choice, data)).encode()
                if response is None:
                    status, headers, content = await self.run_collecting(scope, client.receive(body), request)
                    if status != 200:
                        return await answer(send, status, content, headers)
                    reply.add(choice, json.loads(content))
                elif not await response.run(self.app, scope, client.receive(body), choice, request):
                    return
                reply.count(choice, generation.prompt_tokens, generation.completion_tokens)
            finally:
                GENERATION.reset(token)
            if client.gone:
                return
        if response is None:
            return await answer(send, 200, json.dumps(reply.merged).encode())
        await response.end(plan.include_usage)

    async def run_collecting(self, scope, receive, request) -> tuple[int, list, bytes]:
        """The app's whole answer: status, headers and body."""
        start, parts = {}, []

        async def keep(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                parts.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        return start.get("status", 500), start.get("headers", []), b"".join(parts)
