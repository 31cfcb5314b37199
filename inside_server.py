"""Code that runs inside the model server process, not in the entrypoint.

`llm run` starts the server as `uvicorn --factory llama_cpp.server.app:create_app
--log-config FILE` and takes no other options, so the log config is the one way
in: uvicorn applies it before it imports the app. It brings in:
- HandoffStreamHandler: the server's log reaches the container's log after `llm run`
  has returned (see ../shared/localllm-contract.md, "Consequences for a container").
- RequestGuard: checks each request before llama-cpp-python 0.3.36 sees it, so bad
  input gets a 400 that names the field instead of a 500, or a crash of the whole
  shared server (a grammar that does not parse, a token id outside the vocabulary);
  translates what today's OpenAI clients send (openai_compat.py) and puts the reply
  together; stops a generation whose client has left.
- Draining on stop: streams in flight may finish within the grace period instead of
  being cut the moment SIGTERM arrives (sse-starlette's default).
- The reason a start failed: llama.cpp's own words when it cannot load the model
  (llama-cpp-python hides them when not verbose, and localllm forces VERBOSE=False),
  written where the entrypoint prints them as one line.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
from dataclasses import dataclass

import openai_compat
from openai_compat import BadRequest

READY_LINE = "Uvicorn running on"
# The file the server writes why it could not start to; set by the entrypoint.
START_ERROR_VARIABLE = "LOCALLLM_START_ERROR_FILE"
# enum ggml_log_level in the pinned llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
# (llama_cpp/_logger.py of 0.3.36 still documents an older order).
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5
# llama-cpp-python's chat formats that turn tool calls in the text into tool_calls themselves.
FUNCTION_CALLING_FORMATS = ("chatml-function-calling", "functionary", "functionary-v1", "functionary-v2")
MAX_BODY_BYTES = 16 << 20  # far above any prompt that fits a context; a bound on what one request can make us hold
# Fields the OpenAPI schema lets be null, which llama-cpp-python passes on as None to
# llama.cpp's sampler (a ctypes TypeError, a 500). See nulls_meaning_default.
NULL_MEANS_DEFAULT = ("frequency_penalty", "presence_penalty")
# How pydantic names a union's members in an error's location: classes, generic types, plain types.
UNION_MEMBER = re.compile(r"[A-Z]|.*\[|(str|int|float|bool|none)$")


# ------------------------------------------------------------------ the log ---

_handed_off = False


class HandoffStreamHandler(logging.StreamHandler):
    """Writes to stdout, the pipe `llm run` reads, up to and including the ready
    line; then points the server's stdout and stderr at the supervisor's log pipe,
    because nobody reads `llm run`'s pipe afterwards."""

    def __init__(self, target: str):
        super().__init__(sys.stdout)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        global _handed_off
        super().emit(record)
        if not _handed_off and READY_LINE in record.getMessage():
            self.flush()
            fd = os.open(self.target, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            _handed_off = True


def uvicorn_log_config(target: str) -> dict:
    """uvicorn's logging: start-up lines reach `llm run`, later lines reach the
    supervisor; the `guard` filter installs the rest of this module when applied."""
    handler = {"()": f"{__name__}.HandoffStreamHandler", "target": target}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"guard": {"()": f"{__name__}.install"}},
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter",
                        "fmt": "%(asctime)s %(levelprefix)s %(message)s", "use_colors": False},
            "access": {"()": "uvicorn.logging.AccessFormatter", "use_colors": False,
                       "fmt": '%(asctime)s %(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'},
        },
        "handlers": {"default": {**handler, "formatter": "default"},
                     "access": {**handler, "formatter": "access"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def install() -> logging.Filter:
    """Applied by uvicorn's log config before the app is imported: wrap the app the
    factory makes in RequestGuard, and let streams drain on stop (uvicorn then waits
    for them up to UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN, which the entrypoint sets)."""
    import llama_cpp.server.app as server_app
    from sse_starlette.sse import AppStatus

    make_app = server_app.create_app
    llama_errors = keep_llama_errors()

    def create_guarded_app(*args, **kwargs):
        from starlette.middleware import Middleware
        try:
            app = make_app(*args, **kwargs)
        except Exception as exc:
            report_start_failure(exc, llama_errors)
            raise
        proxy = server_app._llama_proxy
        model = ServedModel.of(proxy._current_model, proxy._default_model_alias)
        watch_generations(proxy._current_model)
        # Innermost, inside the app's CORS middleware: its answers carry the CORS headers too.
        app.user_middleware.append(Middleware(RequestGuard, model=model))
        return app

    server_app.create_app = create_guarded_app
    refuse_unparsed_grammars()
    AppStatus.disable_automatic_graceful_drain()
    return logging.Filter()  # a filter in name only: it lets every record through


_log_callbacks: list = []  # ctypes callbacks must outlive their registration


def keep_llama_errors() -> list[str]:
    """Collect llama.cpp's error messages while passing every message on to
    llama-cpp-python's own logger, which prints them only when verbose."""
    import ctypes
    import llama_cpp
    from llama_cpp import _logger
    errors: list[str] = []
    last_level = 0

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        nonlocal last_level
        if level == GGML_LOG_ERROR or (level == GGML_LOG_CONT and last_level == GGML_LOG_ERROR):
            errors.append(text.decode("utf-8", "replace"))
        last_level = level if level != GGML_LOG_CONT else last_level
        _logger.llama_log_callback(level, text, user_data)

    _log_callbacks.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return errors


def start_failure(exc: Exception, llama_errors: list[str]) -> str:
    """One line on why the server could not start, in llama.cpp's words where it said any."""
    lines = [" ".join(line.split()) for line in "".join(llama_errors).splitlines() if line.strip()]
    said = " ".join(lines)
    marker = "error loading model: "
    if "Failed to load model" in str(exc):
        reasons = [line.split(marker, 1)[1] for line in lines if marker in line]
        reason = reasons[0] if reasons else (said or "no reason given")
        return f"llama.cpp cannot load the model file {os.environ.get('MODEL', '?')}: {reason}"
    return f"the model server cannot start: {type(exc).__name__}: {exc}" + (f" (llama.cpp: {said})" if said else "")


def report_start_failure(exc: Exception, llama_errors: list[str]) -> None:
    """Hand the reason to the entrypoint and end quietly: a traceback would only bury it."""
    target = os.environ.get(START_ERROR_VARIABLE)
    if not target:
        return  # not started by the entrypoint: the caller raises as usual
    with open(target, "w", encoding="utf-8") as out:
        out.write(start_failure(exc, llama_errors) + "\n")
    os._exit(1)


def refuse_unparsed_grammars() -> None:
    """A safety net under RequestGuard's grammar check: grammars the server builds
    itself (from response_format or tools JSON schemas) raise an error when llama.cpp
    cannot parse them, instead of being added to the sampler as NULL (a SIGSEGV)."""
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    def add_grammar(self, model, grammar) -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar._grammar.encode(), grammar._root.encode())
        if not sampler:
            raise ValueError("llama.cpp cannot parse the grammar made for this request")
        llama_cpp.llama_sampler_chain_add(self.sampler, sampler)

    LlamaSampler.add_grammar = add_grammar


# ---------------------------------------------------------- request checks ---

@dataclass(frozen=True)
class ServedModel:
    """What the checks and translations need to know about the loaded model. The methods only
    read the vocabulary and the chat format, so they are safe while another request generates."""
    vocabulary: int
    logits_all: bool
    embeddings: bool
    alias: str  # MODEL_ALIAS, the id /v1/models shows
    chat_format: str  # llama-cpp-python's name of the format in use; chat_template.* for a GGUF template
    template: str  # the GGUF chat template in use, or "" for one of llama-cpp-python's own formats
    llama: object  # llama_cpp.Llama

    @classmethod
    def of(cls, llama, alias: str) -> "ServedModel":
        chat_format = llama.chat_format or ""
        template = llama.metadata.get(f"tokenizer.{chat_format}".replace(".default", ""), "") \
            if chat_format.startswith("chat_template.") else ""
        return cls(llama.n_vocab(), bool(llama._logits_all), bool(llama.context_params.embeddings), alias,
                   chat_format, template, llama)

    def tools_in_prompt(self) -> bool:
        """A GGUF template that reads `tools` shows them to the model; llama-cpp-python's own
        formats (gemma, chatml, ...) leave them out."""
        return "tools" in self.template

    def reads_its_own_tool_calls(self) -> bool:
        return self.chat_format in FUNCTION_CALLING_FORMATS

    def schema_error(self, schema) -> str | None:
        """Why a JSON schema cannot become a grammar llama.cpp follows; llama-cpp-python would
        fall back to any JSON without a word."""
        from llama_cpp.llama_grammar import json_schema_to_gbnf
        try:
            grammar = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter raises plain exceptions of several kinds
            return re.sub(r"\s*\(use --allow-fetch[^)]*\)", "", str(exc)) or type(exc).__name__  # no CLI here
        return None if self.parses(grammar) else "llama.cpp cannot parse the grammar made from it"

    def parses(self, grammar: str) -> bool:
        """True when llama.cpp accepts the grammar; sampling with one it rejects
        dereferences NULL (llama-cpp-python 0.3.36 does not check)."""
        import llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(self.llama._model.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def is_text(self, tokens: list[int]) -> bool:
        """True when the tokens make valid UTF-8; /extras/detokenize decodes strictly (a 500)."""
        try:
            self.llama.detokenize(tokens).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True


def request_models() -> dict:
    """The body model of each POST route; the same classes FastAPI validates with."""
    from llama_cpp.server import types
    completion = types.CreateCompletionRequest
    return {"/v1/completions": completion, "/v1/engines/copilot-codex/completions": completion,
            "/v1/chat/completions": types.CreateChatCompletionRequest,
            "/v1/embeddings": types.CreateEmbeddingRequest,
            "/extras/tokenize": types.TokenizeInputRequest, "/extras/tokenize/count": types.TokenizeInputRequest,
            "/extras/detokenize": types.DetokenizeInputRequest}


def parse_json(body: bytes, content_type: str) -> dict:
    kind = content_type.split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise BadRequest(f"Content-Type is {kind!r}: send the body as JSON with Content-Type: application/json "
                         "(curl: -H 'Content-Type: application/json')")
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def validated(model_class, data: dict):
    """The body as the route's pydantic model, or BadRequest listing every field at
    fault. A union (a message is one of several classes) adds its members' names to an
    error's location; they are dropped, and one field's errors are joined with "or"."""
    import pydantic
    try:
        return model_class.model_validate(data)
    except pydantic.ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if not UNION_MEMBER.match(str(part))) or "body"
            problems.setdefault(where, []).append(error["msg"])
        message = "; ".join(f"{where}: {' or '.join(dict.fromkeys(what))}" for where, what in problems.items())
        raise BadRequest(message, param=next(iter(problems))) from None


def nulls_meaning_default(model_class) -> frozenset[str]:
    """The sampling settings and flags whose null the server cannot take: those that
    refuse None (`"temperature": null`, a 400 otherwise) and NULL_MEANS_DEFAULT.
    OpenAI's API reads null as "not given", and many clients send unset fields as
    null. (A null prompt or messages list stays an error: no default is meant there.)"""
    import pydantic
    names = set(NULL_MEANS_DEFAULT) & set(model_class.model_fields)
    for name, field in model_class.model_fields.items():
        if not isinstance(field.default, (bool, int, float)):
            continue
        try:
            pydantic.TypeAdapter(field.annotation).validate_python(None)
        except pydantic.ValidationError:
            names.add(name)
    return frozenset(names)


def with_defaults_explicit(data: dict, nulls_to_drop: frozenset[str]) -> dict:
    """What OpenAI's API leaves implicit and llama-cpp-python 0.3.36 refuses or fails
    on: those fields set to null are dropped (an assistant message's null content is
    filled in by openai_compat.translate_message)."""
    return {key: value for key, value in data.items() if not (key in nulls_to_drop and value is None)}


def check_token_ids(ids, model: ServedModel, param: str) -> None:
    bad = [token for token in ids if not 0 <= token < model.vocabulary]
    if bad:
        raise BadRequest(f"{param}: token ids must be from 0 to {model.vocabulary - 1}; got {bad[:5]}", param)


def check_semantics(path: str, request, model: ServedModel) -> None:
    """What the schema allows but llama-cpp-python 0.3.36 cannot run: each would be a
    500 (or kill the server) after the model lock was taken or the stream had begun."""
    if path == "/extras/detokenize":
        check_token_ids(request.tokens, model, "tokens")
        if not model.is_text(request.tokens):
            raise BadRequest("tokens: they do not make valid UTF-8 text (a character split between tokens "
                             "needs all of its tokens)", "tokens")
    if path == "/v1/embeddings" and not model.embeddings:
        raise BadRequest("this server does not compute embeddings: start it with EMBEDDING=true "
                         "(a model loaded for embeddings)", "input")
    if path == "/v1/embeddings" and request.input == []:
        raise BadRequest("input: an empty list; give at least one text to embed", "input")
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest(f"prompt: this server takes one prompt per request, got {len(prompt)}", "prompt")
    if getattr(request, "grammar", None) is not None and not model.parses(request.grammar):
        raise BadRequest("grammar: llama.cpp cannot parse it; expected GBNF with a `root` rule, "
                         'such as root ::= "yes" | "no"', "grammar")
    if getattr(request, "logit_bias", None) and request.logit_bias_type != "tokens":
        keys = list(request.logit_bias)
        if not all(key.lstrip("-").isdigit() for key in keys):
            raise BadRequest("logit_bias: keys must be token ids (or set logit_bias_type to tokens)", "logit_bias")
        check_token_ids([int(key) for key in keys], model, "logit_bias")
    if wants_logprobs(request) and not model.logits_all:
        raise BadRequest("logprobs: this server runs with LOGITS_ALL=false, which makes prompt processing about "
                         "twice as fast; start it with LOGITS_ALL=true to get log probabilities", "logprobs")
    if hasattr(request, "messages"):
        check_forced_function(request)


def check_forced_function(request) -> None:
    """A function the request forces must be one it offers; llama-cpp-python reads the
    legacy functions/function_call before tools/tool_choice, and so does this."""
    if request.functions is not None:
        param, offered = "function_call", [function["name"] for function in request.functions]
        forced = request.function_call.get("name") if isinstance(request.function_call, dict) else None
    else:
        param, offered = "tool_choice", [tool["function"]["name"] for tool in request.tools or []]
        forced = request.tool_choice.get("function", {}).get("name") if isinstance(request.tool_choice, dict) else None
        if isinstance(request.function_call, dict):
            param, forced = "function_call", request.function_call.get("name")
    if forced is not None and forced not in offered:
        raise BadRequest(f"{param}: function {forced!r} is not among those offered ({', '.join(offered) or 'none'})",
                         param)


def wants_logprobs(request) -> bool:
    """Completions take logprobs=N; chat takes logprobs=true with top_logprobs=N."""
    if hasattr(request, "messages"):
        return bool(request.logprobs) and request.top_logprobs is not None
    return getattr(request, "logprobs", None) is not None


class RequestGuard:
    """ASGI middleware in front of llama-cpp-python's app: reads each POST body once,
    answers what cannot run with a 400 naming the field, translates what today's OpenAI
    clients send into what the app runs (openai_compat), and puts the reply together from
    the app's: one run per choice, the served alias as `model`. While the app runs it
    listens for the client, so a client that leaves stops its generation (Generation).
    It runs before the API key check, which is in the app: a caller without the key
    learns no more than /openapi.json says."""

    def __init__(self, app, model: ServedModel):
        self.app, self.model = app, model
        self.models = request_models()
        self.nulls_to_drop = {path: nulls_meaning_default(model) for path, model in self.models.items()}
        self.naming_a_model = {path for path, model in self.models.items() if "model" in model.model_fields}

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in self.models:
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        try:
            body = await read_body(receive)
            data = parse_json(body, headers.get("content-type", ""))
            data = with_defaults_explicit(data, self.nulls_to_drop[path])
            data, plan = openai_compat.translate(path, data, self.model)
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
        reply = openai_compat.Reply(plan)
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


GENERATION: contextvars.ContextVar = contextvars.ContextVar("generation", default=None)


class Generation:
    """One run's tokens, counted where llama-cpp-python makes them (its streams carry no
    usage), and its client, whose leaving ends the generation at the next token."""

    def __init__(self, client: "Client"):
        self.client, self.prompt_tokens, self.completion_tokens = client, 0, 0


def watch_generations(llama) -> None:
    """Wrap this Llama's generate(), the loop every completion runs, to count each request's
    tokens and to stop when its client has left. It finds the request in GENERATION, which
    starlette's worker threads inherit from the request's task."""
    import llama_cpp
    generate, vocab = llama.generate, llama._model.vocab

    def generate_watched(tokens, *args, **kwargs):
        generation = GENERATION.get()
        tokens_made = generate(tokens, *args, **kwargs)
        if generation is None:
            return tokens_made
        generation.prompt_tokens = len(tokens)
        return counted(generation, tokens_made)

    def counted(generation: Generation, tokens_made):
        with contextlib.closing(tokens_made):
            for token in tokens_made:
                if generation.client.gone:
                    logging.getLogger("uvicorn.error").info(
                        "the client left: generation stopped after %d tokens", generation.completion_tokens)
                    return
                if not llama_cpp.llama_vocab_is_eog(vocab, token):
                    generation.completion_tokens += 1
                yield token

    llama.generate = generate_watched


class StreamedResponse:
    """A streamed reply made of the app's event streams, one per choice: their events
    rewritten by openai_compat.Reply, one [DONE] at the very end. The response start is
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


async def answer(send, status: int, body: bytes, headers: list | None = None) -> None:
    kept = [(key, value) for key, value in headers or [(b"content-type", b"application/json")]
            if key.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": status,
                "headers": kept + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
