"""The OpenAI compatibility matrix, as tests: the requests today's openai and LangChain
clients send, each against the real server through `entrypoint.py serve`, on both engines,
written the way the clients' own docs write them. On the localllm engine each row expects
what OpenAI documents, or, where the engine cannot do it, a 400 that names the field and
says what would work. On llama-server each row asserts what llama-server really does where
it differs (a different status or message, a field it ignores), and records it.

The models: the test model with a chat template that shows tools (an instruct GGUF as
users have them, CHAT_FORMAT absent) and with one that does not, both derived from the
real test model (tests/derived_models.py). It is a base model behind an instruct template,
so rows assert what must hold (limits, formats, schemas, equal answers), not what it says;
where a row needs the model to write something particular, a `grammar` (an extension both
engines take) makes it. llama-server takes no `grammar` together with tools: there the
model is shown two earlier answers written as a call and writes the next one the same way
(`imitated`), and llama-server's own reading of the GGUF's template reads it.

Every row records its outcome per engine; the last test checks docs/*/compatibility.md
against them (tests/compat_matrix.py).
"""
from __future__ import annotations

import json
import threading
import time

import httpx2
import openai
import pytest
from pydantic import BaseModel

import compat_matrix
from conftest import serve_from_hub
from localllm_container.server import replies
from testkit.hub_standin import HubStandin

TOOLS_REPO = "test-org/gemma-3-270m-tools-GGUF"
TEMPLATE_REPO = "test-org/gemma-3-270m-it-GGUF"
TOOLS_ALIAS = "gemma-3-270m-tools"
LLAMA_SERVER = "llama-server"
N_CTX = "2048"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "utc": {"type": "boolean"}},
                   "required": ["city", "utc"]}}}
# Answers in JSON that a base model ends (it goes on and on when merely asked for JSON).
JSON_FEW_SHOT = [{"role": "user", "content": "The capital of Spain, in JSON."},
                 {"role": "assistant", "content": '{"city": "Madrid", "country": "Spain"}'},
                 {"role": "user", "content": "The capital of France, in JSON."}]


def grammar_for(text: str) -> str:
    """A GBNF grammar that makes the model write exactly `text`."""
    return "root ::= " + json.dumps(text)


def written_call(form: str, city: str) -> str:
    """A call of get_weather as models write it: the Hermes way (as the tools template asks),
    Llama 3.x's JSON object, Mistral's list with its marker printed and without."""
    call = {"name": "get_weather", "arguments": {"city": city}}
    return {"hermes": f"<tool_call>\n{json.dumps(call)}\n</tool_call>",
            "llama3": json.dumps({"name": "get_weather", "parameters": {"city": city}}),
            "mistral": "[TOOL_CALLS]" + json.dumps([call]),
            "mistral-unprinted": json.dumps([call])}[form]


WRITTEN_CALLS = {form: written_call(form, "Paris") for form in ("hermes", "llama3", "mistral", "mistral-unprinted")}
HERMES_CALL = grammar_for(WRITTEN_CALLS["hermes"])
# llama-server's answers in which the model writes a call: the call (about 22 tokens) and some.
IMITATED_TOKENS = 40


def imitated(form: str = "hermes") -> list[dict]:
    """Two weather questions the assistant answered with a call written as `form`, and a third:
    the model writes the next call the same way (llama-server takes no grammar with tools)."""
    turns = [turn for city in ("Rome", "Berlin") for turn in (
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": written_call(form, city)})]
    return [*turns, {"role": "user", "content": "What is the weather in Paris?"}]

recorded: dict[str, dict[str, dict]] = {}  # engine -> row -> outcome


@pytest.fixture(scope="module")
def record(engine):
    """record(row): the row works on this engine; record(row, refusal): the error it answered;
    record(row, note=ID): it answered 200 in a way compat_matrix.NOTES[ID] describes."""
    def record(row: str, refusal: openai.APIStatusError | None = None, note: str | None = None) -> None:
        assert row in compat_matrix.ROWS and (note is None or note in compat_matrix.NOTES), (row, note)
        if refusal is not None:
            outcome = {"status": refusal.status_code, "param": refusal.body.get("param"),
                       "message": refusal.body["message"]}
        else:
            outcome = {"status": 200, **({"note": note} if note else {})}
        recorded.setdefault(engine, {})[row] = outcome
    return record


class Capital(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def compat_hub(derived):
    tools, template = derived.with_tools_template(), derived.with_template()
    with HubStandin({TOOLS_REPO: {tools.name: tools}, TEMPLATE_REPO: {template.name: template}}) as hub:
        yield hub


@pytest.fixture(scope="module")
def serve(compat_hub, tmp_path_factory, engine):
    started = []

    def start(repo: str, ready: bool = True, **environ: str):
        server = serve_from_hub(tmp_path_factory.mktemp("compat"), compat_hub.url, dict(MODEL=repo, N_CTX=N_CTX),
                                ENGINE=engine, **environ)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def server(serve):
    """The tools template model, CHAT_FORMAT absent: the GGUF's template."""
    return serve(TOOLS_REPO)


@pytest.fixture(scope="module")
def plain_server(serve):
    """A model whose GGUF template does not show tools."""
    return serve(TEMPLATE_REPO)


def client(server, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         **{"timeout": 120, **options})


def refused(call, param: str | None, *words: str, status: int = 400):
    """The error a call gets (a 400 unless `status` says otherwise); it must name `param`
    (llama-server's errors name none) and say each of `words`."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value.body
    assert caught.value.status_code == status and error.get("param") == param, (caught.value.status_code, error)
    assert all(word in error["message"] for word in words), error
    return caught.value


def chat(server, **kwargs):
    return client(server).chat.completions.create(model=TOOLS_ALIAS, **{"messages": ASK, "temperature": 0, **kwargs})


def settled(server, **kwargs):
    """chat(), after the same prompt once: llama.cpp's numbers depend a little on how the
    prompt was evaluated (in one batch, or all but its last token reused from the request
    before), so answers compared must start alike. After a request of the same prompt that
    made 2 tokens, every request reuses all but the last prompt token and evaluates that."""
    chat(server, **{**kwargs, "max_completion_tokens": 2, "n": 1, "stream": False})
    return chat(server, **kwargs)


def streamed(server, **kwargs) -> list:
    return list(chat(server, stream=True, **kwargs))


def counts(usage) -> tuple[int, int, int]:
    """The token counts of a usage (llama-server adds how much of the prompt was cached,
    which depends on the requests before)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def slots(server) -> int:
    """llama-server's slots (PARALLEL)."""
    return len(httpx2.get(server.engine_url + "/slots", timeout=30, trust_env=False).json())  # not passed by the front


def text_of(chunks, index: int = 0) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks
                   if chunk.choices and chunk.choices[0].index == index)


# ------------------------------------------------------------ token limits ---

def test_max_completion_tokens_limits_the_answer(server, record):
    reply = chat(server, max_completion_tokens=5)
    assert reply.usage.completion_tokens <= 5, reply.usage
    pieces = [chunk for chunk in streamed(server, max_completion_tokens=5) if chunk.choices
              and chunk.choices[0].delta.content]
    assert len(pieces) <= 5
    record("max_completion_tokens")


def test_max_tokens_and_max_completion_tokens_together(server, engine, record):
    if engine == LLAMA_SERVER:  # it takes both, and reads max_completion_tokens first
        reply = chat(server, max_tokens=5, max_completion_tokens=3)
        assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length", reply
        record("max_tokens_and_max_completion_tokens", note="max_completion_tokens_read")
        return
    error = refused(lambda: chat(server, max_tokens=5, max_completion_tokens=5), "max_tokens",
                    "max_completion_tokens", "not both")
    record("max_tokens_and_max_completion_tokens", error)


# ------------------------------------------------------- structured output ---

def test_parse_returns_the_pydantic_model(server, record):
    reply = client(server).chat.completions.parse(
        model=TOOLS_ALIAS, temperature=0, max_completion_tokens=100, response_format=Capital, messages=JSON_FEW_SHOT)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Capital), reply
    record("parse")


def test_json_schema_strict_is_followed(server, engine, record):
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"],
              "properties": {"answer": {"type": "string", "enum": ["Paris", "Lyon"]}, "sure": {"type": "boolean"}}}
    # llama-server's grammar allows whitespace between the tokens of the JSON (up to 2 line breaks
    # and 20 spaces or tabs at each place), which this model, asked without an example, fills up
    # to the limit: there it is shown an answer first.
    example = [{"role": "user", "content": "The capital of Spain, in JSON."},
               {"role": "assistant", "content": '{"answer": "Madrid", "sure": true}'},
               {"role": "user", "content": "The capital of France, in JSON."}]
    for stream in (False, True):
        kwargs = dict(max_completion_tokens=100, response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "strict": True, "schema": schema}}, **({"messages": example} if engine == LLAMA_SERVER
                                                                        else {}))
        content = text_of(streamed(server, **kwargs)) if stream else chat(server, **kwargs).choices[0].message.content
        value = json.loads(content)
        assert set(value) == {"answer", "sure"} and value["answer"] in ("Paris", "Lyon") and \
            isinstance(value["sure"], bool), content
    record("json_schema_strict", note="json_whitespace" if engine == LLAMA_SERVER else None)


def test_a_schema_the_grammar_cannot_follow_is_refused(server, engine, record):
    schema = {"type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}
    param, words = {"localllm": ("response_format.json_schema.schema", ["cannot follow"]),
                    LLAMA_SERVER: (None, ["unsupported $ref https://example.com/x.json"])}[engine]
    error = refused(lambda: chat(server, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}), param, *words)
    record("json_schema_unsupported", error)


def test_json_object_gives_a_json_object(server, record):
    reply = chat(server, max_completion_tokens=100, response_format={"type": "json_object"}, messages=JSON_FEW_SHOT)
    assert isinstance(json.loads(reply.choices[0].message.content), dict), reply
    record("json_object")


# ------------------------------------------------------------------ usage ---

def test_include_usage_adds_a_last_chunk_with_the_usage(server, record):
    chunks = streamed(server, max_completion_tokens=8, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    record("include_usage")


def test_streamed_usage_counts_the_tokens_streamed(server, record):
    """Each generated token of an ASCII answer is one chunk; the usage is the unstreamed request's."""
    for route in ("chat", "completions"):
        if route == "chat":
            chunks = streamed(server, max_completion_tokens=8, stream_options={"include_usage": True})
            plain = chat(server, max_completion_tokens=8).usage
            pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            completions = client(server).completions
            request = dict(model=TOOLS_ALIAS, prompt="The capital of France is", max_tokens=8, temperature=0)
            chunks = list(completions.create(stream=True, stream_options={"include_usage": True}, **request))
            plain = completions.create(**request).usage
            pieces = [c for c in chunks if c.choices and c.choices[0].text]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert counts(usage) == counts(plain), (route, usage, plain)
        assert finish == ["length"] and usage.completion_tokens == 8 == len(pieces), (route, usage, len(pieces))
    record("usage_equals_streamed")


# ---------------------------------------------------------------- messages ---

def test_a_developer_message_is_read_as_system(server, record):
    def answer(role: str) -> str:
        return settled(server, max_completion_tokens=12, messages=[
            {"role": role, "content": "Answer in one word."}, *ASK]).choices[0].message.content
    assert answer("developer") == answer("system")
    record("developer_message")


def test_text_parts_read_as_the_text(server, record):
    """Parts are joined with a line break, as llama.cpp's own server joins them."""
    as_parts = settled(server, max_completion_tokens=12, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Name the capital of France."},
                                     {"type": "text", "text": "Then name the capital of Italy."}]}])
    as_strings = settled(server, max_completion_tokens=12, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name the capital of France.\nThen name the capital of Italy."}])
    assert as_parts.choices[0].message.content == as_strings.choices[0].message.content
    assert as_parts.usage == as_strings.usage
    record("text_parts")


@pytest.mark.parametrize("part, row", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}, "image_part"),
    ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, "audio_part"),
])
def test_image_and_audio_parts_are_refused(server, engine, part, row, record):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    if engine == LLAMA_SERVER:
        # llama-server answers a media part with a 500 (server_error) when it runs without a
        # multimodal projector (mmproj), as this image runs it: refused before any work, the server goes on.
        medium = row.removesuffix("_part")
        error = refused(lambda: chat(server, messages=messages), None, f"{medium} input is not supported",
                        status=500)
        assert chat(server, max_completion_tokens=2).choices[0].message.content is not None
    else:
        error = refused(lambda: chat(server, messages=messages), "messages.0.content.1.type", part["type"],
                        "text-only")
    record(row, error)


@pytest.mark.parametrize("fields, param, row", [
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities", "audio_output"),
    ({"web_search_options": {}}, "web_search_options", "web_search"),
])
def test_what_a_local_text_model_has_not_is_refused(server, engine, fields, param, row, record):
    if engine == LLAMA_SERVER:  # it ignores the field and answers in text
        reply = chat(server, max_completion_tokens=4, extra_body=fields)
        assert reply.choices[0].message.content and reply.choices[0].message.audio is None, reply
        record(row, note="ignored_text")
        return
    error = refused(lambda: chat(server, extra_body=fields), param, "leave")
    record(row, error)


# ------------------------------------------------------------------ choices ---

def test_n_gives_n_choices(server, engine, record):
    """Choice i is generated with seed + i (on both engines): the choices differ, and each
    repeats a request with n=1."""
    request = dict(max_completion_tokens=6, temperature=1.0)
    reply = settled(server, n=2, seed=7, **request)
    assert [choice.index for choice in reply.choices] == [0, 1], reply
    singles = [chat(server, seed=seed, **request) for seed in (7, 8)]
    assert [c.message.content for c in reply.choices] == [s.choices[0].message.content for s in singles]
    assert reply.usage.prompt_tokens == singles[0].usage.prompt_tokens
    chunks = streamed(server, n=2, seed=7, stream_options={"include_usage": True}, **request)
    assert [text_of(chunks, 0), text_of(chunks, 1)] == [c.message.content for c in reply.choices]
    if engine == LLAMA_SERVER:
        # Its usage is the first choice's alone; a stream sends a usage chunk for each choice.
        # n runs one choice per slot, so it goes up to PARALLEL.
        assert reply.usage.completion_tokens == singles[0].usage.completion_tokens
        assert sorted(counts(chunk.usage) for chunk in chunks if chunk.usage) == sorted(counts(s.usage) for s in singles)
        refused(lambda: chat(server, n=slots(server) + 1), None, f"between 1 <= value <= {slots(server)}")
        record("n", note="n_usage_per_choice")
        return
    assert reply.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    assert chunks[-1].usage == reply.usage
    refused(lambda: chat(server, n=9), "n", "at most 8 choices")  # the front's bound, on both engines
    record("n")


def test_seed_repeats_the_answer(server, record):
    request = dict(max_completion_tokens=12, temperature=1.0, seed=1234)
    assert settled(server, **request).choices[0].message.content == chat(server, **request).choices[0].message.content
    record("seed")


def test_stop_as_string_and_list(server, record):
    free = settled(server, max_completion_tokens=12).choices[0].message.content
    word = next(w for w in free.split() if len(w) > 2 and free.index(w) > 0)
    for stop in (word, [word, "\u2603"]):
        reply = chat(server, max_completion_tokens=12, stop=stop)
        content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert finish == "stop" and content == free[:free.index(word)], (stop, content, free)
        assert text_of(streamed(server, max_completion_tokens=12, stop=stop)) == content
    record("stop")


# ------------------------------------------------------------------ logprobs ---

def check_logprobs(server) -> None:
    """Log probabilities of every token, with the top ones asked for; `logprobs` alone gives the same tokens."""
    reply = settled(server, logprobs=True, top_logprobs=2, max_completion_tokens=4)
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == reply.usage.completion_tokens and all(t.logprob <= 0 for t in tokens), reply
    assert all(len(t.top_logprobs) >= 2 for t in tokens), tokens
    only = chat(server, logprobs=True, max_completion_tokens=4).choices[0].logprobs.content
    assert [t.token for t in only] == [t.token for t in tokens]


def test_logprobs_need_logits_all(server, engine, record):
    if engine == LLAMA_SERVER:  # it has no LOGITS_ALL: log probabilities come at no cost to others
        check_logprobs(server)
        record("logprobs_off", note="logprobs_always")
        return
    error = refused(lambda: chat(server, logprobs=True, top_logprobs=2, max_completion_tokens=2), "logprobs",
                    "LOGITS_ALL=true")
    refused(lambda: chat(server, logprobs=True, max_completion_tokens=2), "logprobs", "LOGITS_ALL=true")
    record("logprobs_off", error)


def test_logprobs_with_logits_all(serve, engine, record):
    if engine == LLAMA_SERVER:  # LOGITS_ALL is llama-cpp-python's setting: this engine refuses it at start
        server = serve(TOOLS_REPO, ready=False, LOGITS_ALL="true")
        assert server.proc.wait(120) != 0
        server.wait_for_line("LOGITS_ALL is a setting of llama-cpp-python's server, which ENGINE=llama-server "
                             "does not run")
        record("logprobs_on", note="logits_all_refused")
        return
    check_logprobs(serve(TOOLS_REPO, LOGITS_ALL="true"))
    record("logprobs_on")


def test_fields_that_mean_nothing_here_are_accepted(server, record):
    plain = settled(server, max_completion_tokens=6).choices[0].message.content
    reply = chat(server, max_completion_tokens=6, user="u-1", metadata={"team": "ml"}, store=False,
                 parallel_tool_calls=False, reasoning_effort="low")
    assert reply.choices[0].message.content == plain
    record("ignored_fields")


# ------------------------------------------------------------------- tools ---

# After a call, llama-server's grammar lets the model write more calls (whatever
# parallel_tool_calls says), and the test model goes on with a second one that the limit
# cuts: its replies with a call end with "length", the complete call read.
AFTER_A_CALL = "length"
PARIS = ("get_weather", {"city": "Paris"})


def call_of(reply, finish: str = "tool_calls") -> tuple[str, dict]:
    choice = reply.choices[0]
    assert choice.finish_reason == finish and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function"
    return call.function.name, json.loads(call.function.arguments)


def streamed_call(chunks, finish: str = "tool_calls") -> tuple[str, dict]:
    """The one tool call a stream carries, put together as the openai client's users do."""
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert calls and finishes == [finish] and {call.index for call in calls} == {0}, chunks
    return calls[0].function.name, json.loads("".join(call.function.arguments or "" for call in calls))


def imitated_call(server, stream: bool = False, **kwargs) -> tuple[str, dict]:
    """The call llama-server reads when the model writes one as the conversation shows."""
    kwargs = dict(messages=imitated(), max_completion_tokens=IMITATED_TOKENS, **kwargs)
    return streamed_call(streamed(server, **kwargs), AFTER_A_CALL) if stream else \
        call_of(chat(server, **kwargs), AFTER_A_CALL)


def test_a_named_tool_is_called(server, engine, record):
    if engine == LLAMA_SERVER:
        # llama-server takes tool_choice as a string only ("none", "auto", "required"): a named tool
        # is read as "auto", and its log says so. Named get_time, the model calls get_weather.
        lines_before = len(server.lines)
        named = {"type": "function", "function": {"name": "get_time"}}
        assert imitated_call(server, tools=[WEATHER, TIME], tool_choice=named) == PARIS
        warning = server.wait_for_line("Wrong type supplied for parameter 'tool_choice'")
        assert server.lines.index(warning) >= lines_before
        record("tool_named", note="tool_named_read_as_auto")
        return
    choice = {"type": "function", "function": {"name": "get_weather"}}
    name, arguments = call_of(chat(server, tools=[WEATHER, TIME], tool_choice=choice, max_completion_tokens=100))
    assert name == "get_weather" and isinstance(arguments["city"], str)
    assert streamed_call(streamed(server, tools=[WEATHER, TIME], tool_choice=choice,
                                  max_completion_tokens=100))[0] == "get_weather"
    record("tool_named")


def test_required_makes_a_tool_call(server, engine, record):
    if engine == LLAMA_SERVER:
        # Its grammar lets text come before the call: asked about France, the model writes text to the limit.
        reply = chat(server, tools=[WEATHER], tool_choice="required", max_completion_tokens=8)
        assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content, reply
        assert not reply.choices[0].message.tool_calls
        for tools in ([WEATHER], [WEATHER, TIME]):
            assert imitated_call(server, tools=tools, tool_choice="required") == PARIS
        assert imitated_call(server, stream=True, tools=[WEATHER, TIME], tool_choice="required") == PARIS
        record("tool_required", note="tool_required_text_first")
        return
    name, arguments = call_of(chat(server, tools=[WEATHER], tool_choice="required", max_completion_tokens=100))
    assert name == "get_weather" and isinstance(arguments["city"], str)
    name, arguments = call_of(chat(server, tools=[WEATHER, TIME], tool_choice="required", max_completion_tokens=100))
    assert name in ("get_weather", "get_time") and isinstance(arguments["city"], str)
    name, _ = streamed_call(streamed(server, tools=[WEATHER, TIME], tool_choice="required", max_completion_tokens=100))
    assert name in ("get_weather", "get_time")
    record("tool_required")


@pytest.mark.parametrize("form", list(WRITTEN_CALLS))
def test_auto_reads_a_tool_call_the_model_writes(server, engine, form, record):
    if engine == LLAMA_SERVER:
        # It reads calls in the form the GGUF's template writes them (Hermes here); other forms stay text.
        kwargs = dict(tools=[WEATHER, TIME], messages=imitated(form), max_completion_tokens=IMITATED_TOKENS)
        reply, chunks = chat(server, **kwargs), streamed(server, **kwargs)
        if form == "hermes":
            assert call_of(reply, AFTER_A_CALL) == PARIS and not reply.choices[0].message.content
            assert streamed_call(chunks, AFTER_A_CALL) == PARIS and not text_of(chunks)
        else:
            start = WRITTEN_CALLS[form][:14]  # the call's start, as the model imitates it
            assert not reply.choices[0].message.tool_calls and reply.choices[0].message.content.startswith(start)
            assert text_of(chunks).startswith(start) and not any(
                chunk.choices[0].delta.tool_calls for chunk in chunks if chunk.choices)
        record("tool_auto_call", note="tool_auto_template_form")
        return
    kwargs = dict(tools=[WEATHER, TIME], tool_choice="auto", max_completion_tokens=100,
                  extra_body={"grammar": grammar_for(WRITTEN_CALLS[form])})
    reply = chat(server, **kwargs)
    assert call_of(reply) == ("get_weather", {"city": "Paris"}) and not reply.choices[0].message.content
    chunks = streamed(server, **kwargs)
    assert streamed_call(chunks) == ("get_weather", {"city": "Paris"}) and not text_of(chunks)
    record("tool_auto_call")


@pytest.mark.parametrize("text", [*WRITTEN_CALLS.values(), "Let me look.\n" + WRITTEN_CALLS["hermes"],
                                  "It is sunny {today}.", "[1] is a footnote.", "A < B, and <tool", ""])
def test_a_stream_reads_tool_calls_as_the_whole_text_does(text):
    """However the text is cut into chunks, the stream sends what reading the whole text gives
    (what it passes on early is text that cannot start a call)."""
    reader = replies.ToolCallReader(("get_weather",))
    whole_content, whole_calls = reader.calls(text)
    for size in (1, 2, 3, 7, len(text) or 1):
        stream = replies.ToolCallStream(reader)
        early = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
        late, calls = stream.end()
        assert [call["function"] for call in calls] == [call["function"] for call in whole_calls], (size, text)
        assert ((early + late).strip() == (whole_content or "")) if calls else early + late == text, (size, early, late)
        if not calls and "{" not in text and "<tool" not in text and not text.startswith("["):
            assert early == text  # plain text goes out as it comes


def test_auto_passes_text_on(server, engine, record):
    if engine == LLAMA_SERVER:  # no grammar with tools: asked about France, the model answers in text
        kwargs, text, finish = dict(tools=[WEATHER], max_completion_tokens=12), None, "length"
    else:
        text, finish = "It is sunny {today}.", "stop"
        kwargs = dict(tools=[WEATHER], max_completion_tokens=100, extra_body={"grammar": grammar_for(text)})
    reply = settled(server, **kwargs)
    text = text or reply.choices[0].message.content
    assert reply.choices[0].message.content == text and text and not reply.choices[0].message.tool_calls, reply
    assert reply.choices[0].finish_reason == finish, reply
    chunks = streamed(server, **kwargs)
    assert text_of(chunks) == text and not any(chunk.choices[0].delta.tool_calls for chunk in chunks if chunk.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # passed on as it came
    record("tool_auto_text")


def test_none_answers_in_text(server, record):
    reply = chat(server, tools=[WEATHER], tool_choice="none", max_completion_tokens=100,
                 extra_body={"grammar": HERMES_CALL})
    assert reply.choices[0].message.tool_calls is None and "<tool_call>" in reply.choices[0].message.content
    record("tool_none")


def test_a_tool_result_round_trip(server, engine, record):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    answered = [*asked, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees."}]
    before = chat(server, tools=[WEATHER], tool_choice="none", messages=asked, max_completion_tokens=1).usage
    if engine == LLAMA_SERVER:  # no grammar with tools: the answer is the model's own, text or a call
        reply = chat(server, tools=[WEATHER], messages=answered, max_completion_tokens=12)
        assert reply.choices[0].message.content or reply.choices[0].message.tool_calls, reply
    else:
        reply = chat(server, tools=[WEATHER], messages=answered, max_completion_tokens=12,
                     extra_body={"grammar": grammar_for("It is sunny.")})
        assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > before.prompt_tokens + 10  # the call and its result are in the prompt
    record("tool_result")


def tools_ignored(server, **kwargs) -> None:
    """llama-server with a template that does not show tools: the prompt and the answer are
    those of the request without tools, and no call is read."""
    without = settled(server, max_completion_tokens=4)
    reply = chat(server, max_completion_tokens=4, **kwargs)
    assert counts(reply.usage) == counts(without.usage) and not reply.choices[0].message.tool_calls, reply
    assert reply.choices[0].message.content == without.choices[0].message.content


def test_auto_on_a_template_without_tools_is_refused(plain_server, engine, record):
    if engine == LLAMA_SERVER:
        tools_ignored(plain_server, tools=[WEATHER])
        tools_ignored(plain_server, tools=[WEATHER], tool_choice="auto")
        record("tool_auto_template_without_tools", note="tools_ignored")
        return
    error = refused(lambda: chat(plain_server, tools=[WEATHER]), "tools", "does not show tools", "tool_choice")
    refused(lambda: chat(plain_server, tools=[WEATHER], tool_choice="auto"), "tools", "does not show tools")
    record("tool_auto_template_without_tools", error)


def test_forced_calls_on_a_template_without_tools(plain_server, engine, record):
    named = {"type": "function", "function": {"name": "get_time"}}
    if engine == LLAMA_SERVER:
        for choice in (named, "required", "none"):
            tools_ignored(plain_server, tools=[WEATHER, TIME], tool_choice=choice)
        record("tool_forced_template_without_tools", note="tools_ignored")
        return
    assert call_of(chat(plain_server, tools=[WEATHER, TIME], tool_choice=named, max_completion_tokens=100))[0] == \
        "get_time"
    assert call_of(chat(plain_server, tools=[WEATHER, TIME], tool_choice="required",
                        max_completion_tokens=100))[0] in ("get_weather", "get_time")
    reply = chat(plain_server, tools=[WEATHER], tool_choice="none", max_completion_tokens=4)
    assert reply.choices[0].message.tool_calls is None
    record("tool_forced_template_without_tools")


def test_finish_reasons(server, engine, record):
    assert chat(server, max_completion_tokens=3).choices[0].finish_reason == "length"
    assert chat(server, max_completion_tokens=8, extra_body={"grammar": grammar_for("Paris.")}).choices[0] \
        .finish_reason == "stop"
    if engine == LLAMA_SERVER:  # see AFTER_A_CALL
        imitated_call(server, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
        record("finish_reason", note="finish_after_a_call")
        return
    assert chat(server, tools=[WEATHER], tool_choice="required", max_completion_tokens=100).choices[0] \
        .finish_reason == "tool_calls"
    record("finish_reason")


def test_the_reply_names_the_served_model(server, record):
    replies = [chat(server, max_completion_tokens=2), *streamed(server, max_completion_tokens=2),
               client(server).chat.completions.parse(model="gpt-4o", messages=JSON_FEW_SHOT,
                                                     max_completion_tokens=100, response_format=Capital)]
    assert {reply.model for reply in replies} == {TOOLS_ALIAS}
    record("reply_model")


# ------------------------------------------------------------- completions ---

def completion(server, prompt: str, **kwargs) -> str:
    """The text of a completion of `prompt` at temperature 0, after the same prompt once (see settled)."""
    completions = client(server).completions
    completions.create(model=TOOLS_ALIAS, prompt=prompt, max_tokens=2)
    return completions.create(model=TOOLS_ALIAS, prompt=prompt, max_tokens=4, temperature=0, **kwargs).choices[0].text


def test_completions_echo(server, engine, record):
    prompt = "The capital of France is"
    plain, echoed = completion(server, prompt), completion(server, prompt, echo=True)
    if engine == LLAMA_SERVER:  # it ignores echo
        assert echoed == plain, echoed
        record("completions_echo", note="completions_field_ignored")
        return
    assert echoed == prompt + plain, echoed
    record("completions_echo")


def test_completions_suffix_is_refused(server, engine, record):
    if engine == LLAMA_SERVER:  # it ignores suffix: the prompt is completed as if it were not there
        prompt = "def add(a, b):"
        assert completion(server, prompt, suffix="    return c") == completion(server, prompt)
        record("completions_suffix", note="completions_field_ignored")
        return
    error = refused(lambda: client(server).completions.create(model=TOOLS_ALIAS, prompt="def add(a, b):",
                                                              suffix="    return c", max_tokens=4),
                    "suffix", "fill in the middle")
    record("completions_suffix", error)


def test_completions_best_of_is_refused_unless_it_equals_n(server, engine, record):
    completions = client(server).completions
    reply = completions.create(model=TOOLS_ALIAS, prompt="Hi", best_of=2, n=2, max_tokens=2)
    assert [choice.index for choice in reply.choices] == [0, 1]
    if engine == LLAMA_SERVER:  # it ignores best_of: one choice unless n asks for more
        reply = completions.create(model=TOOLS_ALIAS, prompt="Hi", best_of=2, max_tokens=2)
        assert [choice.index for choice in reply.choices] == [0]
        record("completions_best_of", note="completions_field_ignored")
        return
    error = refused(lambda: completions.create(model=TOOLS_ALIAS, prompt="Hi", best_of=2, max_tokens=2), "best_of",
                    "equal n")
    record("completions_best_of", error)


def test_no_repetition_penalty_unless_asked(server):
    """As OpenAI and llama-server: a request without repeat_penalty gets none (llama-cpp-python's
    own default is 1.1). The prompt is one the test model repeats, so a penalty shows."""
    prompt = "apple apple apple apple apple apple apple apple apple apple"
    plain = completion(server, prompt)
    assert plain == completion(server, prompt, extra_body={"repeat_penalty": 1.0}), plain
    assert plain != completion(server, prompt, extra_body={"repeat_penalty": 1.5}), plain


# ---------------------------------------------------------------- LangChain ---

def langchain(server, **options):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=TOOLS_ALIAS, temperature=0,
                      max_retries=0, **options)


def test_langchain_with_structured_output(server, record):
    structured = langchain(server, max_completion_tokens=100).with_structured_output(Capital)
    answer = structured.invoke([(turn["role"], turn["content"]) for turn in JSON_FEW_SHOT])
    assert isinstance(answer, Capital), answer
    record("langchain_structured_output")


def test_langchain_bind_tools(server, plain_server, engine, record):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "sunny"

    if engine == LLAMA_SERVER:
        # The model writes the call the conversation shows: read with the tools template (a named
        # tool is read as "auto"), not with a template that does not show tools.
        conversation = [(turn["role"], turn["content"]) for turn in imitated()]
        for target, choice, calls in ((server, "get_weather", [PARIS]), (server, "any", [PARIS]),
                                      (plain_server, "get_weather", [])):
            message = langchain(target, max_completion_tokens=IMITATED_TOKENS).bind_tools(
                [get_weather], tool_choice=choice).invoke(conversation)
            assert [(call["name"], call["args"]) for call in message.tool_calls] == calls, message
        record("langchain_bind_tools", note="langchain_tools_as_written")
        return
    for target, choice in ((server, "get_weather"), (server, "any"), (plain_server, "get_weather")):
        message = langchain(target, max_completion_tokens=100).bind_tools([get_weather], tool_choice=choice).invoke(
            "What is the weather in Paris?")
        assert [call["name"] for call in message.tool_calls] == ["get_weather"], message
        assert isinstance(message.tool_calls[0]["args"].get("city"), str)
    record("langchain_bind_tools")


# ------------------------------------------------------- a client that leaves ---

@pytest.mark.parametrize("stream", [False, True], ids=["unstreamed", "streamed"])
def test_a_client_that_leaves_frees_the_server(server, engine, report, stream, record):
    """One client asks for a long answer and gives up after 2 s; another, waiting behind it
    (one request at a time on the localllm engine; in a slot of its own on llama-server), is
    answered soon after, not when the long answer would end."""
    long = dict(model=TOOLS_ALIAS, messages=ASK, max_completion_tokens=1500, temperature=0,
                extra_body={"logit_bias": {"1": -100, "106": -100}})  # no end of turn: it would go on
    gave_up = threading.Event()

    def leave() -> None:
        started = time.monotonic()
        try:
            if stream:
                with httpx2.stream("POST", server.url + "/v1/chat/completions", json={**long, "stream": True,
                                   **long["extra_body"]}, timeout=60, trust_env=False) as response:
                    for _ in response.iter_lines():
                        if time.monotonic() - started > 2:
                            break
            else:
                client(server, timeout=2).chat.completions.create(**long)
        except openai.APITimeoutError:
            pass
        gave_up.set()

    leaving = threading.Thread(target=leave)
    lines_before = len(server.lines)
    leaving.start()
    time.sleep(0.5)
    asked = time.monotonic()
    reply = client(server).chat.completions.create(model=TOOLS_ALIAS, messages=ASK, max_completion_tokens=4)
    answered = time.monotonic()
    leaving.join()
    assert gave_up.is_set() and reply.choices[0].message.content is not None
    waited = answered - asked
    if engine == LLAMA_SERVER:  # it cancels the task of a client that left, and its log says so
        deadline = time.monotonic() + 30
        while not any("cancel task" in line for line in server.lines[lines_before:]):
            assert time.monotonic() < deadline, "\n".join(server.lines[lines_before:])
            time.sleep(0.1)
    else:
        stopped = server.wait_for_line("the client left: generation stopped after", timeout=10)
        assert server.lines.index(stopped) >= lines_before
        # 1500 tokens take over 20 s here; the waiting client got its answer about 2 s after it asked.
        assert waited < 12, f"the waiting client waited {waited:.1f} s: the generation went on after its client left"
    report(f"client left ({engine}, {'streamed' if stream else 'unstreamed'}): the waiting client waited",
           f"{waited:.1f} s")
    record("client_leaves")


# --------------------------------------------------------------- the matrix ---

def test_the_docs_show_this_runs_matrix():
    """Last in the module: every row ran on an engine, and docs/*/compatibility.md show what
    it recorded; the recorded rows of an engine not run in this selection are kept."""
    complete = {engine: rows for engine, rows in recorded.items() if set(rows) == set(compat_matrix.ROWS)}
    if not complete:
        missing = {engine: sorted(set(compat_matrix.ROWS) - set(rows)) for engine, rows in recorded.items()}
        pytest.skip(f"rows not run in this selection: {missing or 'all'}")
    path = compat_matrix.results_path()
    results = {**(json.loads(path.read_text()) if path.exists() else {}), **complete}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    stale = compat_matrix.stale_docs(results)
    assert not stale, f"{', '.join(stale)} differ from this run: run `python tests/compat_matrix.py` to rewrite them"
