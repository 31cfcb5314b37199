"""Attacks on a running server, each as an attacker would send it, on both engines: a request
that crashed the server, clients that hold the queue without sending or reading, routes that
went around the queue, and what the key, CORS and the log let through. Each is answered with
a 4xx (or a closed connection) and the server goes on answering others. The closing note of
issue 23 says which of them failed on the code before.

One server per engine for the module (a key, a small CLIENT_TIMEOUT and MAX_CONNECTIONS),
so the attacks cost seconds each, not a server start each.
"""
from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time

import anthropic
import httpx2
import openai
import pytest

from conftest import ALIAS, launch

KEYS = ("sk-attack-first", "sk-attack-second")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
SLOTS = {"localllm": 1, "llama-server": 2}
MAX_QUEUE = 6
CLIENT_TIMEOUT = 5
MAX_CONNECTIONS = 24
ORIGIN = "https://app.example.org"
DEEP = 100_000
DEEP_GRAMMAR = "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP  # about 200 KB: it killed both engines
EOS_BANNED = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: answers run to max_tokens


@pytest.fixture(scope="module")
def target(tmp_path_factory, pulled_home, engine):
    settings = dict(API_KEY=",".join(KEYS), MAX_QUEUE=str(MAX_QUEUE), CLIENT_TIMEOUT=str(CLIENT_TIMEOUT),
                    MAX_CONNECTIONS=str(MAX_CONNECTIONS), CORS_ORIGINS=ORIGIN)
    if engine == "llama-server":
        settings["PARALLEL"] = str(SLOTS[engine])
    entrypoint = launch(tmp_path_factory.mktemp("attacks"), pulled_home, engine, **settings)
    try:
        entrypoint.wait_ready(headers=AUTH)
        yield entrypoint
    finally:
        entrypoint.close()


def post(server, path: str, body, headers=None, auth=AUTH) -> httpx2.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(server.url + path, content=content, timeout=120, trust_env=False,
                       headers={"Content-Type": "application/json", **auth, **(headers or {})})


def exact(server, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    """A request on exactly this path (an HTTP client would tidy `..` and `//` away)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None,
                           {"Content-Type": "application/json", **AUTH})
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    finally:
        connection.close()


def assert_still_serving(server) -> None:
    assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}:\n{server.output()[-3000:]}"
    reply = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def assert_refused(reply, status: int, *words: str) -> None:
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]["message"]
    assert all(word in message for word in words), message


def raw_connection(server, data: bytes = b"", receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    if data:
        sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, OSError):  # OSError: closed by the test meanwhile
        pass
    return b"".join(chunks)


def request_head(path: str, length: int, key: bool = True) -> bytes:
    auth = f"Authorization: Bearer {KEYS[0]}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_the_grammar_that_crashed_the_server_is_refused_before_the_key_and_after_it(target, engine):
    """Before: the localllm engine's guard compiled it before the key was checked, and both
    engines died of SIGSEGV in llama.cpp's grammar parser."""
    body = {"prompt": "Hi", "max_tokens": 4, "grammar": DEEP_GRAMMAR}
    assert_refused(post(target, "/v1/completions", body, auth={}), 401, "needs an API key")
    assert_refused(post(target, "/v1/completions", body), 400, "grammar: this grammar nests 100000 levels")
    assert_refused(post(target, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Hi"}]}),
                   400, "grammar:")
    if engine == "llama-server":  # its own routes, and its own name for a schema
        assert_refused(post(target, "/completion", body), 400, "grammar:")
        deep = '{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000
        reply = post(target, "/completion", f'{{"prompt": "Hi", "json_schema": {deep}}}'.encode())
        assert_refused(reply, 400, "nests deeper than 100 levels")
    assert_still_serving(target)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "DEEP"}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": "DEEP"}}]},
     "tools.0.function.parameters"),
    ("/v1/completions", {"prompt": "Hi", "response_format": {"type": "json_object", "schema": "DEEP"}},
     "response_format.schema"),
])
def test_a_schema_nested_deep_is_refused_naming_it(target, path, body, param):
    """A schema becomes a grammar through a converter that recurses once per level (llama-server's
    in C++); 90 levels stay under the body's bound, so the schema's own bound must answer."""
    deep = '{"type": "object", "properties": {"a": ' * 45 + '{"type": "string"}' + "}}" * 45
    reply = post(target, path, json.dumps({**body, "max_tokens": 4}).replace('"DEEP"', deep).encode())
    assert_refused(reply, 400, f"{param}: this JSON schema nests deeper than 64")
    assert reply.json()["error"]["param"] == param


def schema_request(schema) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def test_repetitions_past_llama_cpps_bound_cost_nothing(target):
    """Before: the localllm engine's converter spelt repetitions out: a maxLength of 10^9 built a
    string of gigabytes (the server died); a repetition of repetitions, in a pattern or across a
    grammar's rules, held the slot for minutes per token."""
    assert post(target, "/v1/chat/completions", schema_request({"type": "string", "maxLength": 10**9})).is_success
    too_many = post(target, "/v1/chat/completions", schema_request({"type": "array", "items": {"type": "string"}, "minItems": 10**8}))
    assert too_many.status_code == 400, too_many.text
    nested = schema_request({"type": "string", "pattern": "^(a{0,1000}){0,1000}$"})
    assert_refused(post(target, "/v1/chat/completions", nested), 400, "1000000 repetitions in all")
    across_rules = 'root ::= "x" a{0,1000}\na ::= "a"{0,1000}'  # llama.cpp multiplies only within one rule
    reply = post(target, "/v1/completions", {"prompt": "a", "max_tokens": 3, "grammar": across_rules})
    assert_refused(reply, 400, "grammar: this grammar repeats a rule or group that repeats: 1000000")
    assert_still_serving(target)


def test_a_chat_of_a_hundred_thousand_messages_is_answered_at_once(target):
    """3.5 MB of short messages: 200,000 special tokens in the prompt. Before
    (scripts/llama-vocab-special-tokens.patch), llama.cpp's tokenizer took time growing with
    their square, and had not finished after 10 minutes: the slot was held."""
    many = {"messages": [{"role": "user", "content": "a"}] * 100_000, "max_tokens": 2}
    reply = post(target, "/v1/chat/completions", many)
    assert reply.status_code == 400 and "context" in reply.text, reply.text  # longer than the context
    assert_still_serving(target)


def test_a_body_nested_deeper_than_a_parser_goes_is_a_400(target):
    """Before: 1,000 levels were a RecursionError in the localllm engine's guard, a 500 with a traceback."""
    deep = b'{"prompt": "Hi", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    assert_refused(post(target, "/v1/completions", deep), 400, "nests deeper than 100 levels")
    assert "Traceback" not in target.output()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "Hi", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("/v1/completions", {"prompt": ["Hi"] * 17}, "prompt"),
    ("/v1/embeddings", {"input": ["Hi"] * 2049}, "input"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tools": [
        {"type": "function", "function": {"name": f"f{i}", "parameters": {}}} for i in range(129)]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 100}, "n"),
])
def test_counts_past_their_bound_are_refused_the_same_on_both_engines(target, path, body, param):
    reply = post(target, path, {**body, "max_tokens": 2})
    assert_refused(reply, 400, f"{param}: at most")
    assert reply.json()["error"]["param"] == param


def test_the_key_is_checked_before_the_body_arrives_in_either_header_and_any_of_the_keys(target):
    sock = raw_connection(target, request_head("/v1/completions", 10_000_000, key=False))
    started = time.monotonic()
    head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 401 ") and time.monotonic() - started < CLIENT_TIMEOUT, head
    sock.close()
    body = {"prompt": "Hi", "max_tokens": 2}
    for auth in ({"Authorization": f"Bearer {KEYS[1]}"}, {"x-api-key": KEYS[1]},
                 {"Authorization": "Bearer iam-token-for-node-api", "x-api-key": KEYS[0]}):
        assert post(target, "/v1/completions", body, auth=auth).status_code == 200
    wrong = post(target, "/v1/completions", body, headers={"Authorization": "Bearer sk-attack-guess"})
    assert_refused(wrong, 401, "not one of this server's")
    assert wrong.headers["www-authenticate"] == "Bearer"
    anthropic = post(target, "/v1/messages", {"messages": []}, auth={"x-api-key": "guess"})
    assert anthropic.status_code == 401 and anthropic.json()["error"]["type"] == "authentication_error"
    open_routes = [httpx2.get(target.url + path, timeout=10, trust_env=False) for path in ("/health", "/metrics")]
    assert [reply.status_code for reply in open_routes] == [200, 200]


def test_each_client_sends_the_key_its_own_way(target, engine):
    """As their docs write them: openai's api_key (Bearer), on DataSphere beside node-api's token
    (x-api-key in default_headers); anthropic's api_key (x-api-key), and beside node-api's token
    (auth_token, the key in default_headers: the client refuses api_key and auth_token together)."""
    def openai_client(**kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=target.url + "/v1", max_retries=0, timeout=60, **kwargs)

    assert openai_client(api_key=KEYS[1]).models.list().data[0].id == ALIAS
    datasphere = openai_client(api_key="t1.iam-token", default_headers={"x-api-key": KEYS[0]})
    assert datasphere.completions.create(model=ALIAS, prompt="Hi", max_tokens=2).choices[0].finish_reason
    with pytest.raises(openai.AuthenticationError):
        openai_client(api_key="sk-attack-guess").models.list()
    if engine == "llama-server":  # the Messages API is llama-server's (the localllm engine: 404)
        message = dict(model=ALIAS, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        for kwargs in ({"api_key": KEYS[1]},
                       {"auth_token": "t1.iam-token", "default_headers": {"x-api-key": KEYS[0]}}):
            client = anthropic.Anthropic(base_url=target.url, max_retries=0, timeout=60, **kwargs)
            assert client.messages.create(**message).stop_reason
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=target.url, api_key="sk-attack-guess", max_retries=0).messages.create(**message)


def test_stalled_uploads_take_no_place_in_the_queue_and_get_408(target, engine):
    """Before: each request counted toward the slots and MAX_QUEUE from its headers on, so
    slots + MAX_QUEUE connections that sent half a body locked everyone out (503 queue_full)."""
    stalled = [raw_connection(target, request_head("/v1/completions", 200) + b'{"prompt": "Hi", ')
               for _ in range(SLOTS[engine] + MAX_QUEUE + 1)]
    started = time.monotonic()
    assert post(target, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert time.monotonic() - started < CLIENT_TIMEOUT, "the stalled uploads were still stalled: nothing was shown"
    for sock in stalled:
        answer = read_all(sock)  # the server closes each after CLIENT_TIMEOUT
        assert answer.startswith(b"HTTP/1.1 408 ") and b"CLIENT_TIMEOUT" in answer, answer
        sock.close()
    assert time.monotonic() - started < CLIENT_TIMEOUT + 10


def test_routes_are_named_not_guessed(target, engine):
    """Before: /v1/completions%3Fx was answered by the engine outside the queue, and so were
    llama-server's /v1/responses and /v1/messages and llama-cpp-python's copilot route."""
    body = {"prompt": "Hi", "max_tokens": 2}
    for path in ("/v1/completions%3Fx", "//v1/completions", "/v1/../v1/completions", "/v1/./completions",
                 "/v1/completions/", "/v1/%63ompletions", "/v1/engines/copilot-codex/completions", "/slots",
                 "/slots/0?action=erase", "/props", "/lora-adapters", "/v1/chat/completions/control",
                 "/v1/streams/lookup", "/openapi.json"):
        status, text = exact(target, "POST", path, body)
        assert status == 404 and "Invalid URL" in json.loads(text)["error"]["message"], (path, text)
    assert exact(target, "GET", "/v1/stream?conversation_id=x")[0] == 404
    assert exact(target, "GET", "/v1/completions")[0] == 405
    other_engine = "/v1/messages" if engine == "localllm" else "/extras/tokenize"
    status, text = exact(target, "POST", other_engine, {"messages": []})
    assert status == 404 and f"ENGINE={engine} does not answer" in text, text


@pytest.mark.engines("llama-server")  # the header is llama-server's own
def test_a_conversation_id_does_not_reach_llama_server(target):
    """Before: X-Conversation-Id went through, and llama-server kept the generation going after the
    client left, for anyone who knew the id to read or cancel at /v1/stream."""
    with httpx2.stream("POST", target.url + "/v1/completions", headers={**AUTH, "X-Conversation-Id": "conv-attack"},
                       json={"prompt": "Count:", "max_tokens": 200, "stream": True}, trust_env=False) as reply:
        next(reply.iter_raw())  # the answer is under way
        lookup = httpx2.post(target.engine_url + "/v1/streams/lookup", json={"conversation_ids": ["conv-attack"]},
                             trust_env=False)  # on the engine itself: the front does not pass this route
        assert lookup.status_code == 200 and "conv-attack" not in lookup.text, lookup.text


def test_a_logged_path_cannot_write_a_line_of_its_own(target):
    """Before: the access line showed the path percent-decoded, so %0A began a line of the caller's."""
    assert exact(target, "GET", "/v1/models%0AFORGED%20LINE")[0] == 404
    target.wait_for_line("/v1/models%0AFORGED%20LINE")
    assert not [line for line in target.lines if line.startswith("FORGED")], target.output()[-2000:]


def test_cors_answers_only_the_origins_named(target):
    """Before: both engines let any origin's page read every answer (CORS *)."""
    evil = post(target, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 200 and "access-control-allow-origin" not in evil.headers, evil.headers
    named = post(target, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers={"Origin": ORIGIN})
    assert named.headers["access-control-allow-origin"] == ORIGIN
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx2.options(target.url + "/v1/chat/completions", headers=preflight, trust_env=False)
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-headers"] == "authorization, content-type"
    assert allowed.headers.get_list("access-control-allow-origin") == [ORIGIN]  # once: browsers refuse two
    refused = httpx2.options(target.url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                             trust_env=False)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_a_client_that_stops_reading_is_dropped_and_its_generation_stopped(target, engine):
    """Before: the answer waited for the client for ever, holding its slot (and on the
    localllm engine, the model) until the client came back or left."""
    body = {"prompt": "Count:", "max_tokens": 1800, "stream": True, "logit_bias": EOS_BANNED}
    data = json.dumps(body).encode()
    sock = raw_connection(target, request_head("/v1/completions", len(data)) + data, receive_buffer=4096)
    try:
        target.wait_for_line("took no part of its answer", timeout=60)  # about 150 KB of answer, then CLIENT_TIMEOUT
        started = time.monotonic()  # 1,800 tokens take a minute: the next answer shows the slot is free
        assert post(target, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert time.monotonic() - started < 15
        if engine == "llama-server":  # its slots, read behind the front: none is still generating
            slots = httpx2.get(target.engine_url + "/slots", trust_env=False).json()
            assert not any(slot["is_processing"] for slot in slots), slots
    finally:
        sock.close()
    assert "Traceback" not in target.output()


def test_connections_past_max_connections_get_503_and_idle_ones_are_closed(target):
    """Before: uvicorn took any number of connections and waited for their requests for ever."""
    sockets = [raw_connection(target) for _ in range(MAX_CONNECTIONS + 2)]
    try:
        time.sleep(2)  # the refusals are written at once; the idle ones time out after CLIENT_TIMEOUT
        answered, _, _ = select.select(sockets, [], [], 0)
        refused = [sock.recv(65536) for sock in answered]
        assert 2 <= len(refused) <= 3, refused  # at most one left over from an earlier test
        assert all(answer.startswith(b"HTTP/1.1 503 ") and b"MAX_CONNECTIONS" in answer for answer in refused)
        idle = next(sock for sock in sockets if sock not in answered)
        assert read_all(idle).startswith(b"HTTP/1.1 408 ")  # no request within CLIENT_TIMEOUT
    finally:
        for sock in sockets:
            sock.close()
    assert_still_serving(target)


def test_health_answers_while_every_slot_and_queue_place_is_taken(target, engine):
    """slots + MAX_QUEUE long streams, /health every 0.5 s for 30 s: every answer 200, while every
    generating route (the ones named since, too) gets 503 queue_full and llama-server's /v1/models answers."""
    body = json.dumps({"prompt": "Count:", "max_tokens": 1800, "stream": True, "logit_bias": EOS_BANNED}).encode()
    holders = [raw_connection(target, request_head("/v1/completions", len(body)) + body)
               for _ in range(SLOTS[engine] + MAX_QUEUE)]
    for sock in holders:
        sock.settimeout(None)  # a place in the queue may wait minutes for its first byte
    readers = [threading.Thread(target=read_all, args=(sock,), daemon=True) for sock in holders]  # as clients do
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 60
        while health(target)["waiting"] < MAX_QUEUE:
            assert time.monotonic() < deadline, health(target)
            time.sleep(0.2)
        answers, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            answers.append(httpx2.get(target.url + "/health", timeout=10, trust_env=False).status_code)
            time.sleep(0.5)
        assert set(answers) == {200} and len(answers) >= 30, answers
        assert health(target)["processing"] == SLOTS[engine]
        assert_refused(post(target, "/v1/completions", {"prompt": "Hi"}), 503, f"MAX_QUEUE={MAX_QUEUE}")
        if engine == "llama-server":  # llama-cpp-python's /v1/models waits for the model, as before
            assert httpx2.get(target.url + "/v1/models", headers=AUTH, trust_env=False).json()["data"][0]["id"] == ALIAS
            assert post(target, "/v1/responses", {"input": "Hi"}).status_code == 503
            busy = post(target, "/v1/messages", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "overloaded_error", busy.text
    finally:
        for sock in holders:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
    assert_still_serving(target)


def health(server) -> dict:
    return httpx2.get(server.url + "/health", timeout=10, trust_env=False).json()
