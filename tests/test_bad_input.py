"""Bad input must get an answer, never crash or hang the shared server: the API
fuzzed with schemathesis from the localllm engine's /openapi.json, then specific cases,
on both engines.

llama-cpp-python 0.3.36 answers much bad input with 500 and some of it by crashing;
localllm_container.server.guard answers it with a 400 naming the field instead.
llama-server (ENGINE=llama-server) has no guard in front: it checks requests itself, in
its own words, and answers any exception of a request handler with 500 (except
std::invalid_argument, 400: ex_wrapper in tools/server/server.cpp). It serves no
/openapi.json, so it is fuzzed with the localllm engine's schema: the same OpenAI routes,
and what clients send there must not break it either.

A 5xx that remains must be named in KNOWN_5XX for its engine, with the reason and a request
that gets it; any other fails the test. Where llama-server answers a case otherwise than the
localllm engine, the case asserts llama-server's real answer (status and the gist of its
message), and docs/*/reliability.md lists the difference.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import NamedTuple

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from conftest import ALIAS, ROOT, launch, serve_from_hub
from localllm_container import cpu
from testkit.hub_standin import HubStandin

N_CTX = 256  # small, so prompts past it are cheap to make
EXAMPLES = 100  # per operation and generation mode
OPERATION_BUDGET = 240  # seconds per operation and mode; examples left after it are not sent
REQUEST_TIMEOUT = 120
MAX_TOKENS = 16  # fuzzed answers are capped: generation length is not what is fuzzed, yet it takes the time

FUZZED = ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models",
          "POST /extras/tokenize", "POST /extras/tokenize/count", "POST /extras/detokenize"]
# llama-server's own route for a route of llama-cpp-python's that takes the same body; for the
# other /extras routes the front answers 404 (llama-server's /tokenize takes "content", not "input").
LLAMA_SERVER_ROUTES = {"/extras/detokenize": "/detokenize"}
NOT_ON_LLAMA_SERVER = "^ENGINE=llama-server does not answer {}; ENGINE=localllm does$"  # the front's 404
# Without the guard these kill the llama-cpp-python server: std::out_of_range in llama.cpp (SIGABRT); a NULL
# sampler (SIGSEGV). Last, what llama-server answers: (status, gist of the message), as in assert_answer.
CRASHERS = [
    ("/extras/detokenize", {"tokens": [-1]}, "tokens", (404, NOT_ON_LLAMA_SERVER.format("/extras/detokenize"))),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "grammar": "nonsense"}, "grammar",
     (400, "^Failed to initialize samplers: failed to parse grammar$")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                              "grammar": "root ::= x"}, "grammar",
     (400, "^Failed to initialize samplers: failed to parse grammar$")),
]


class Known5xx(NamedTuple):
    name: str
    status: int
    message: str  # a regex the error message matches
    why: str
    example: tuple[str, dict]  # a request (path, JSON body; {"raw": text} for a body that is not JSON) that gets it
    server: str = "small"  # which server the example is sent to: small_server, "embedding" or "template"


USER_HI = [{"role": "user", "content": "Hi"}]
ANSWERED = '"finish_reason":"(length|stop)"'  # the gist of a 200 with an answer, plain or streamed
EMBEDDINGS_OFF = r"^This server does not support embeddings\. Start it with `--embeddings`$"  # llama-server's 501
# Engine -> the 5xx it still answers, each with the reason; each comes back at once and the
# server goes on (the fuzzing checks the process and a request after every operation).
KNOWN_5XX: dict[str, list[Known5xx]] = {
    # None is left: the guard answers each 500 fuzzing found with a 400, or fills in the default it meant.
    "localllm": [],
    # llama-server's refusals of bad input that throw from its handlers, hence 500 (module docstring):
    # a wrong status in llama.cpp's C++, not a crash, and no answer is lost, so the image lets them be.
    "llama-server": [
        Known5xx("tokens not numbers", 500, r"^\[json\.exception\.type_error\.302\] type must be ",
                 "/detokenize with tokens that are not a list of numbers: nlohmann::json's type error",
                 ("/detokenize", {"tokens": ["a"]})),
        Known5xx("token id out of the vocabulary", 500,
                 r"^vector::_M_range_check: __n \(which is \d+\) >= this->size\(\) \(which is 262144\)$",
                 "/detokenize with a token id outside the vocabulary: std::out_of_range, caught (unguarded, "
                 "llama-cpp-python dies of it)", ("/detokenize", {"tokens": [-1]})),
        Known5xx("embeddings input", 500, r"^\"prompt\" elements must be a string, a list of tokens",
                 "/v1/embeddings with an input that is not text or tokens (on /v1/completions the same is a 400)",
                 ("/v1/embeddings", {"input": [True]}), server="embedding"),
        Known5xx("tools, built-in template", 500, r"^tools param requires --jinja flag$",
                 "tools on a server with a built-in template (CHAT_FORMAT, or a GGUF without a template, as the "
                 "test model): --no-jinja cannot show tools to the model",
                 ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4, "tools": [
                     {"type": "function", "function": {"name": "f", "parameters": {}}}]})),
        Known5xx("tool_choice, built-in template", 500, r"^tool_choice param requires --jinja flag$",
                 "tool_choice other than auto with a built-in template, as tools",
                 ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4, "tool_choice": "required"})),
        Known5xx("tools", 500, r"^Failed to parse tools: ",
                 "tools that are not a list of functions (common_chat_tools_parse_oaicompat wraps each of its "
                 "refusals in a runtime_error)",
                 ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4, "tools": [{"type": "function"}]}),
                 server="template"),
        Known5xx("tool call arguments", 500, r"^Failed to parse tool call arguments as JSON: ",
                 "an assistant's tool call whose arguments are not JSON (the GGUF's template gets them as an object)",
                 ("/v1/chat/completions", {"max_tokens": 4, "messages": [*USER_HI, {"role": "assistant", "tool_calls": [
                     {"id": "1", "type": "function", "function": {"name": "f", "arguments": "not JSON"}}]},
                     {"role": "tool", "tool_call_id": "1", "content": "done"}]}), server="template"),
        Known5xx("messages", 500, r"^Failed to parse messages: ",
                 "a message llama.cpp's reader refuses (common_chat_msgs_parse_oaicompat wraps each of its refusals "
                 "in a runtime_error): a tool call without its type, function or name; a name or tool_call_id "
                 "that is not a string",
                 ("/v1/chat/completions", {"max_tokens": 4, "messages": [*USER_HI, {"role": "assistant", "tool_calls": [
                     {"id": "1", "type": "function", "function": {"arguments": "{}"}}]}]})),
        Known5xx("image", 500, r"^image input is not supported - hint: ",
                 "an image in a message: the image loads no vision projector (mmproj)",
                 ("/v1/chat/completions", {"max_tokens": 4, "messages": [{"role": "user", "content": [
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})),
        Known5xx("embeddings off", 501, EMBEDDINGS_OFF,
                 "/v1/embeddings without EMBEDDING=true: 501 Not Implemented, in llama-server's words "
                 "(--embeddings is what EMBEDDING=true sets)", ("/v1/embeddings", {"input": "Hi"})),
    ],
}


def error_message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text


def known_5xx(engine: str, response) -> Known5xx | None:
    """The KNOWN_5XX entry of `engine` the response matches, if any."""
    return next((known for known in KNOWN_5XX[engine] if response.status_code == known.status
                 and re.search(known.message, error_message(response))), None)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, pulled_home, engine):
    """One server with a small context for the whole module: prompts past it are cheap to make."""
    entrypoint = launch(tmp_path_factory.mktemp("bad-input"), pulled_home, engine, N_CTX=str(N_CTX))
    try:
        entrypoint.wait_ready()
        yield entrypoint
    finally:
        entrypoint.close()


@pytest.fixture(scope="session")
def localllm_openapi(tmp_path_factory, pulled_home) -> dict:
    """The localllm engine's /openapi.json, from a real localllm server started for it: always the
    schema of the pinned llama-cpp-python as the image serves it, never a copy left behind by an upgrade."""
    entrypoint = launch(tmp_path_factory.mktemp("openapi"), pulled_home, "localllm", N_CTX=str(N_CTX))
    try:
        entrypoint.wait_ready()
        # The engine's own: the front does not pass /openapi.json on.
        return httpx2.get(entrypoint.engine_url + "/openapi.json", timeout=REQUEST_TIMEOUT, trust_env=False).json()
    finally:
        entrypoint.close()


def schema_of(server, engine: str, request):
    """The schema to fuzz `server` with: its own, or the localllm engine's for llama-server (which has none)."""
    if engine == "localllm":
        return schemathesis.openapi.from_url(server.engine_url + "/openapi.json")  # the front does not pass it on
    return schemathesis.openapi.from_dict(request.getfixturevalue("localllm_openapi"))


@pytest.fixture(scope="module")
def api_schema(small_server, engine, request):
    return schema_of(small_server, engine, request)


def post(server, path: str, **kwargs) -> httpx2.Response:
    return httpx2.post(server.url + path, timeout=REQUEST_TIMEOUT, trust_env=False, **kwargs)


def assert_still_serving(server) -> None:
    """The server process is alive (the entrypoint exits when its server dies) and answers."""
    assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}:\n{server.output()[-3000:]}"
    reply = httpx2.get(server.url + "/v1/models", timeout=10, trust_env=False)
    assert reply.status_code == 200 and [m["id"] for m in reply.json()["data"]] == [ALIAS]


def tame(body, path: str) -> None:
    """Cap the answer's length; absent, null, 0 or negative max_tokens mean "up to the context"
    to the server. A chat without messages gets []: llama-cpp-python's schema shows that default,
    but both engines require messages (test_wrong_types_...), and the fuzz is to reach the model."""
    if isinstance(body, dict) and path == "/v1/chat/completions":
        body.setdefault("messages", [])
    if isinstance(body, dict):
        value = body.get("max_tokens")
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and not 1 <= value <= MAX_TOKENS):
            body["max_tokens"] = MAX_TOKENS


def test_the_schema_has_the_operations_we_fuzz(api_schema):
    """A new operation in a new llama-cpp-python must be fuzzed, or excluded with a reason."""
    assert {result.ok().label for result in api_schema.get_all_operations()} == set(FUZZED)


def fuzz(schema, server, engine: str, label: str, mode: str, report, name: str = "") -> None:
    """Send up to EXAMPLES generated requests to one operation; any 5xx must be in the engine's
    KNOWN_5XX, and the server must still be up and answer afterwards."""
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    route = LLAMA_SERVER_ROUTES.get(path, path) if engine == "llama-server" else path
    stop_at = time.monotonic() + OPERATION_BUDGET
    statuses: Counter = Counter()
    unexplained: list[str] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
    def send(case) -> None:
        if time.monotonic() > stop_at:
            return
        tame(case.body, path)
        case.path = route
        response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT)
        if response.status_code < 500:
            statuses[str(response.status_code)] += 1
        elif known := known_5xx(engine, response):
            statuses[f"{response.status_code} {known.message}"] += 1
        else:
            unexplained.append(f"{response.status_code} {error_message(response)[:300]!r} for {case.body!r:.300}")

    send()
    via = f" (sent to {route})" if route != path else ""
    report(f"fuzz {engine} {label} {mode}{name}{via}",
           ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items())))
    assert not unexplained, "\n".join(unexplained)
    assert_still_serving(server)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", FUZZED)
def test_fuzzed_requests_get_no_unexplained_5xx(api_schema, small_server, engine, label, mode, report):
    fuzz(api_schema, small_server, engine, label, mode, report)


# llama-server takes the model's own pooling type, and a generative model has none ("none"), for
# which it computes no OpenAI embeddings: LLAMA_ARG_POOLING=mean lets /v1/embeddings reach the model.
EMBEDDING_SETTINGS = {"localllm": {}, "llama-server": {"LLAMA_ARG_POOLING": "mean"}}
EMPTY_EMBEDDING_INPUT = {"llama-server": (400, '^"input" must not be empty$')}


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_embeddings_get_no_unexplained_5xx(tmp_path, pulled_home, engine, mode, report, request):
    """With EMBEDDING=true /v1/embeddings reaches the model, which the small server refuses."""
    server = launch(tmp_path, pulled_home, engine, N_CTX=str(N_CTX), EMBEDDING="true", **EMBEDDING_SETTINGS[engine])
    try:
        server.wait_ready()
        fuzz(schema_of(server, engine, request), server, engine, "POST /v1/embeddings", mode, report,
             name=" (EMBEDDING=true)")
        # Fuzzing found this: llama_decode fails on an empty batch (a 500 unguarded).
        reply = post(server, "/v1/embeddings", json={"input": []})
        if engine == "localllm":
            assert_400_naming(reply, "input", "empty list")
        else:
            assert_answer(engine, reply, *EMPTY_EMBEDDING_INPUT[engine])
        assert_examples_get(server, engine, "embedding")
    finally:
        server.close()


@pytest.mark.engines("llama-server")  # the localllm engine computes embeddings of any model (per token without pooling)
def test_embeddings_of_a_model_without_pooling_get_400_on_llama_server(tmp_path, pulled_home, engine):
    """EMBEDDING=true alone, with the test model (a generative one, without a pooling type)."""
    server = launch(tmp_path, pulled_home, engine, N_CTX=str(N_CTX), EMBEDDING="true")
    try:
        server.wait_ready()
        assert_answer(engine, post(server, "/v1/embeddings", json={"input": "Hi"}),
                      400, r"^Pooling type 'none' is not OAI compatible\. Please use a different pooling type$")
        assert_still_serving(server)
    finally:
        server.close()


TEMPLATE_REPO = "test-org/gemma-3-270m-tools-GGUF"


@pytest.fixture(scope="module")
def template_server(tmp_path_factory, derived, engine):
    """A server of the test model with a chat template in its GGUF that shows tools (CHAT_FORMAT empty),
    as an instruct GGUF is served by default: llama-server runs it with --jinja."""
    model = derived.with_tools_template()
    with HubStandin({TEMPLATE_REPO: {model.name: model}}) as hub:
        server = serve_from_hub(tmp_path_factory.mktemp("template"), hub.url,
                                dict(MODEL=TEMPLATE_REPO, MODEL_ALIAS=ALIAS, N_CTX=str(N_CTX)), ENGINE=engine)
        try:
            server.wait_ready()
            yield server
        finally:
            server.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
# With the GGUF's template, messages and tools are read by other code than with a built-in one: on
# llama-server its Jinja (--jinja, common/chat.cpp), on the localllm engine Jinja2 (where a message with
# null content made the template fail, a 500, until the guard refused it).
def test_fuzzed_chat_with_the_ggufs_template_gets_no_unexplained_5xx(api_schema, template_server, engine, mode,
                                                                    report):
    fuzz(api_schema, template_server, engine, "POST /v1/chat/completions", mode, report,
         name=" (the GGUF's template, --jinja)")
    assert_examples_get(template_server, engine, "template")


def assert_400_naming(reply, param: str | None, *words: str) -> None:
    assert reply.status_code == 400, (reply.status_code, reply.text)
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(word in error["message"] for word in words), error


def assert_answer(engine: str, reply, status: int, gist: str) -> None:
    """An answer in the engine's own words: its status, and the gist (a regex) of its error message
    or, when there is none, of its body; a 5xx must be one of the engine's KNOWN_5XX."""
    assert reply.status_code == status and re.search(gist, error_message(reply)), (reply.status_code, reply.text[:500])
    assert status < 500 or known_5xx(engine, reply), f"not in KNOWN_5XX[{engine!r}]: {reply.text[:500]}"


def assert_examples_get(server, engine: str, kind: str) -> None:
    """The examples of the engine's KNOWN_5XX that are sent to this kind of server get what the list says."""
    for known in KNOWN_5XX[engine]:
        if known.server == kind:
            path, body = known.example
            kwargs = dict(content=body["raw"].encode(), headers={"Content-Type": "application/json"}) \
                if "raw" in body else dict(json=body)
            assert_answer(engine, post(server, path, **kwargs), known.status, known.message)
    assert_still_serving(server)


@pytest.mark.engines("llama-server")  # the localllm engine has none left
def test_each_known_5xx_is_real(small_server, engine):
    """Each explained 5xx is what llama-server answers to its example (those for other servers: in the
    tests that start them), so the list cannot keep what no longer happens."""
    assert_examples_get(small_server, engine, "small")


def test_malformed_json_is_refused_saying_where(small_server):
    """The front parses every body before an engine sees it (llama-server answered 500 to this)."""
    reply = post(small_server, "/v1/chat/completions", content=b'{"messages": [',
                 headers={"Content-Type": "application/json"})
    assert_400_naming(reply, None, "not valid JSON", "line 1 column 15")


def test_no_web_page_of_another_origin_reads_an_answer_by_default(small_server):
    """Both engines allow any origin (CORS *); the front drops their CORS headers, and names
    none of its own unless CORS_ORIGINS says (tests/test_attacks.py): the guard's 400 here,
    llama-server's own 400 for the missing prompt."""
    reply = post(small_server, "/v1/completions", json={"max_tokens": "ten"}, headers={"Origin": "https://example.org"})
    assert reply.status_code == 400, reply.text
    assert not [name for name in reply.headers if name.startswith("access-control-")], reply.headers


def test_a_body_not_sent_as_json_gets_400_saying_how(small_server, engine):
    """`curl -d '{...}'` without -H sends a form content type; FastAPI would not parse it.
    llama-server reads the body as JSON whatever its Content-Type, and answers it."""
    reply = post(small_server, "/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 4}',
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    if engine == "localllm":
        assert_400_naming(reply, None, "Content-Type: application/json")
    else:
        assert_answer(engine, reply, 200, ANSWERED)


@pytest.mark.parametrize("path, field, body, llama_server", [
    ("/v1/completions", "max_tokens", {"prompt": "Hello", "max_tokens": "ten"},
     (400, "^Field 'max_tokens': .*type must be number, but is string$")),
    ("/v1/chat/completions", "messages", {"messages": "Hello"}, (400, "^Expected 'messages' to be an array$")),
    ("/v1/chat/completions", "messages.0.role", {"messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 4},
     (200, ANSWERED)),  # llama-server's template shows any role
    ("/v1/chat/completions", "messages", {"messages": None},  # null means no default here
     (400, "^Expected 'messages' to be an array$")),
    ("/v1/chat/completions", "messages", {"max_tokens": 4},  # required, as OpenAI has it
     (400, "^'messages' is required$")),
    ("/v1/chat/completions", "messages.0.content", {"messages": [{"role": "user", "content": None}], "max_tokens": 4},
     (200, ANSWERED)),  # the localllm engine's template would write "None", or fail; llama-server reads ""
])
def test_wrong_types_get_400_naming_the_field(small_server, engine, path, field, body, llama_server):
    reply = post(small_server, path, json=body)
    if engine == "localllm":
        assert_400_naming(reply, field, f"{field}: ")
    else:
        assert_answer(engine, reply, *llama_server)


@pytest.mark.parametrize("path, body, param, words, llama_server", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "logprobs": 2}, "logprobs", ["LOGITS_ALL=true"],
     (200, '"top_logprobs":')),  # llama-server computes them without LOGITS_ALL
    ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4, "logprobs": True, "top_logprobs": 2},
     "logprobs", ["LOGITS_ALL=true"], (200, '"top_logprobs":')),
    ("/v1/embeddings", {"input": "Hi"}, "input", ["EMBEDDING=true"],
     (501, EMBEDDINGS_OFF)),
    ("/v1/completions", {"prompt": ["Hi", "Bye"], "max_tokens": 4}, "prompt", ["one prompt per request"],
     (200, '"index":1')),  # an answer to each prompt
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "logit_bias": {"Hi": 5}}, "logit_bias", ["token ids"],
     (200, ANSWERED)),  # llama-server biases the tokens of the text "Hi"
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "logit_bias": {"999999999": 5}}, "logit_bias",
     ["from 0 to 262143"], (200, ANSWERED)),  # ids outside the vocabulary are left out
    ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4, "tool_choice":
     {"type": "function", "function": {"name": "absent"}}, "tools": []}, "tool_choice", ["'absent'"],
     (200, ANSWERED)),  # no tools, so no tool call is forced
    ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4, "function_call": {"name": "absent"},
     "functions": [{"name": "present", "parameters": {}}]}, "function_call", ["'absent'", "(present)"],
     (200, ANSWERED)),  # the older functions and function_call are not read
])
def test_what_the_schema_allows_but_the_server_cannot_run_gets_400(small_server, engine, path, body, param, words,
                                                                   llama_server):
    for stream in (False, True):  # streamed, it would fail after the 200 had been sent
        if path != "/v1/embeddings":
            body = {**body, "stream": stream}
        reply = post(small_server, path, json=body)
        if engine == "localllm":
            assert_400_naming(reply, param, *words)
        else:
            assert_answer(engine, reply, *llama_server)
    assert_still_serving(small_server)


@pytest.mark.parametrize("path, body", [
    # The schema lets them be null; unguarded, None reaches llama.cpp's sampler (a 500).
    ("/v1/completions", {"prompt": "Hi", "frequency_penalty": None, "presence_penalty": None}),
    # The schema refuses these nulls (a 400 unguarded), yet clients send unset fields as null.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": None,
                              "top_p": None, "stream": None}),
    # An assistant turn that only called a tool; unguarded, the gemma chat format reads its content (a 500).
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}]}),
])
def test_what_openai_leaves_implicit_gets_its_default(small_server, path, body):
    reply = post(small_server, path, json={**body, "max_tokens": 4})
    assert reply.status_code == 200, reply.text


def test_tokens_that_do_not_make_text_get_400(small_server, engine):
    """Token 437 is the byte 0xC7 alone, the first half of a two-byte character (found by
    fuzzing); unguarded, the server's strict UTF-8 decode answers 500. llama-server has no
    /extras routes; its own /detokenize puts U+FFFD for each broken byte."""
    if engine == "llama-server":
        assert_answer(engine, post(small_server, "/extras/detokenize", json={"tokens": [437, 437]}),
                      404, NOT_ON_LLAMA_SERVER.format("/extras/detokenize"))
        assert post(small_server, "/detokenize", json={"tokens": [437, 437]}).json() == {"content": "\ufffd\ufffd"}
        tokens = post(small_server, "/tokenize", json={"content": "Привет"}).json()["tokens"]
        assert post(small_server, "/detokenize", json={"tokens": tokens}).json()["content"].endswith("Привет")
        return
    assert_400_naming(post(small_server, "/extras/detokenize", json={"tokens": [437, 437]}), "tokens", "UTF-8")
    tokens = post(small_server, "/extras/tokenize", json={"input": "Привет"}).json()["tokens"]
    reply = post(small_server, "/extras/detokenize", json={"tokens": tokens})
    assert reply.status_code == 200 and reply.json()["text"].endswith("Привет"), reply.text


def test_a_grammar_that_parses_is_followed(small_server):
    reply = post(small_server, "/v1/completions", json={"prompt": "Is the sea wet?", "max_tokens": 8,
                                                         "grammar": 'root ::= "yes" | "no"'})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] in {"yes", "no"}


def test_a_body_over_the_limit_gets_413(small_server, engine):
    """The front reads every body with the guard's bound, so both engines answer the same 413
    (llama-server alone read up to 100 MiB, cpp-httplib's limit)."""
    from localllm_container.server.client import MAX_BODY_BYTES
    reply = post(small_server, "/v1/completions", content=b" " * (MAX_BODY_BYTES + 1),
                 headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and "larger than" in error_message(reply), reply.text
    assert_still_serving(small_server)


def test_max_tokens_far_beyond_the_context_ends_at_the_context(small_server):
    reply = post(small_server, "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 10**6})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["choices"][0]["finish_reason"] in {"length", "stop"}
    assert answer["usage"]["total_tokens"] <= N_CTX


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hello " * (2 * N_CTX), "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * (2 * N_CTX)}], "max_tokens": 4}),
])
def test_prompt_longer_than_the_context_gets_400_naming_it(small_server, engine, path, body, stream):
    """Streamed, the server finds this only once the stream has begun; the guard holds
    the 200 back until the first event, so the client gets the 400 all the same.
    llama-server checks before it streams; its error has its own type and words."""
    reply = post(small_server, path, json={**body, "stream": stream})
    assert reply.status_code == 400, reply.text
    if engine == "localllm":
        assert reply.json()["error"]["code"] == "context_length_exceeded"
        assert f"maximum context length is {N_CTX} tokens" in error_message(reply)
    else:
        error = reply.json()["error"]
        assert (error["type"], error["n_ctx"]) == ("exceed_context_size_error", N_CTX), error
        assert re.match(rf"request \(\d+ tokens\) exceeds the available context size \({N_CTX} tokens\)",
                        error["message"]), error
    assert_still_serving(small_server)


def test_unknown_model_id_is_answered_by_the_served_model(small_server):
    """llama-cpp-python serves one model here and falls back to it for any id it does not
    know (LlamaProxy); the answer names the model that answered, the alias /v1/models lists.
    llama-server does the same with its one model."""
    reply = post(small_server, "/v1/completions", json={"model": "gpt-4o", "prompt": "Hello", "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == ALIAS and reply.json()["choices"][0]["finish_reason"]
    assert_still_serving(small_server)


def test_empty_messages_list_gets_a_clean_answer(small_server, engine, report):
    """The chat template renders an empty conversation; the model answers it (no 4xx, no 5xx)."""
    reply = post(small_server, "/v1/chat/completions", json={"messages": [], "max_tokens": 8})
    report(f"empty messages list ({engine})", f"HTTP {reply.status_code}")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in {"length", "stop"}
    assert_still_serving(small_server)


@pytest.mark.parametrize("path, body, param, llama_server", CRASHERS)
def test_requests_that_would_kill_the_server_get_400(small_server, engine, path, body, param, llama_server):
    """llama-server refuses the grammars itself; it has no /extras/detokenize, and its own
    /detokenize answers the same token id with a known 500 (KNOWN_5XX)."""
    reply = post(small_server, path, json=body)
    if engine == "localllm":
        assert_400_naming(reply, param)
    else:
        assert_answer(engine, reply, *llama_server)
    assert_still_serving(small_server)


GRAMMAR_INSIDE_THE_SERVER = """
import sys
sys.path.insert(0, {root!r})
import llama_cpp
from localllm_container.server import patches
patches.load_cpu_backend()  # as in the server process (GGML_BACKEND_PATH below)
if {patched!r}:
    patches.refuse_unparsed_grammars()
llama = llama_cpp.Llama({model!r}, n_ctx=256, verbose=False)
try:
    llama.create_completion("Hi", max_tokens=2, grammar=llama_cpp.LlamaGrammar.from_string("root ::= x"))
except ValueError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("patched", [True, False])
def test_a_grammar_the_server_builds_itself_cannot_crash_it(model_path, patched):
    """The safety net under the guard for grammars made from response_format or tool schemas,
    which no request field shows: run in a process of its own, since without it the process dies."""
    code = GRAMMAR_INSIDE_THE_SERVER.format(root=str(ROOT), patched=patched, model=str(model_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **cpu.backend_environ(cpu.choose_cpu_variant("")[0])})
    if patched:
        assert (done.returncode, done.stdout.strip()) == (0, "refused: llama.cpp cannot parse the grammar made for "
                                                             "this request"), done.stderr[-2000:]
    else:  # what the safety net prevents: llama-cpp-python 0.3.36 adds the NULL sampler and crashes
        assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr[-2000:])
