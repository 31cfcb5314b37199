"""llama.cpp's own server as the image builds it (scripts/build-llama-server.sh), run
directly: what the second engine (ENGINE=llama-server) stands on."""
from __future__ import annotations

import httpx
import pytest

from localllm_container import cpu
from localllm_container import llama_server as engine
from testkit.environment import clean_environ, free_port
from testkit.server import ServerProcess

PAIRS = 20  # a stream, then a plain request on the same connection; unpatched, 8 of 20 failed here


@pytest.fixture(scope="module")
def llama_server(model_path):
    """llama-server on PATH (tests/run builds it), loading the CPU variant the entrypoint would choose."""
    port = free_port()
    command = [engine.binary(), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
               "-c", "2048", "-np", "2", "-t", "2"]
    server = ServerProcess(command, engine.environment(clean_environ(), cpu.choose_cpu_variant("")[0]), port, "llama-server")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def test_a_request_after_a_stream_on_the_same_connection_is_answered(llama_server):
    """The regression test of scripts/llama-server-stream-keepalive.patch: unpatched, the server
    closed the connection after each stream without saying so, and a client that reused it (httpx
    and the openai client do) got "Server disconnected without sending a response"."""
    failures = []
    with httpx.Client(base_url=llama_server.url, timeout=120, trust_env=False) as http:
        for i in range(PAIRS):
            try:
                with http.stream("POST", "/v1/completions",
                                 json={"prompt": "Hello", "max_tokens": 4, "stream": True}) as reply:
                    for _ in reply.iter_lines():
                        pass
                http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).raise_for_status()
            except httpx.HTTPError as exc:
                failures.append(f"pair {i}: {type(exc).__name__}: {exc}")
    assert failures == [], failures


@pytest.mark.parametrize("body", [
    {"prompt": ["Hi", "Bye"], "max_tokens": 4, "logprobs": 177242110985},
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 100000},
], ids=["completions-logprobs", "chat-top_logprobs"])
def test_more_than_20_log_probabilities_are_refused_and_the_server_stays_up(llama_server, body):
    """The regression test of scripts/llama-server-logprobs-limit.patch: unpatched, such a request
    made a reply with every vocabulary entry for every token, and a fuzzed one killed the server."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with httpx.Client(base_url=llama_server.url, timeout=120, trust_env=False) as http:
        refused = http.post(path, json=body)
        assert refused.status_code == 400 and "Value must be between 0 <= value <= 20" in refused.text, refused.text
        allowed = http.post(path, json={**body, "logprobs": True, "top_logprobs": 20} if "messages" in body
                            else {**body, "logprobs": 20})
        assert allowed.status_code == 200 and len(allowed.json()["choices"][0]["logprobs"]["content"][0]
                                                  ["top_logprobs"]) == 20
        assert http.get("/health").status_code == 200


def test_a_grammar_nested_past_256_levels_is_refused_by_llama_cpp_itself(llama_server):
    """The regression test of scripts/llama-grammar-nesting.patch, on llama-server without the front
    (which refuses such a grammar first): unpatched, 100,000 levels were a SIGSEGV of the server."""
    def nested(depth: int) -> str:
        return "root ::= " + "(" * depth + '"a"' + ")" * depth

    with httpx.Client(base_url=llama_server.url, timeout=120, trust_env=False) as http:
        for depth in (300, 100_000):
            refused = http.post("/completion", json={"prompt": "Hi", "n_predict": 2, "grammar": nested(depth)})
            assert refused.status_code == 400 and "failed to parse grammar" in refused.text, refused.text
        allowed = http.post("/completion", json={"prompt": "Hi", "n_predict": 2, "grammar": nested(250)})
        assert allowed.status_code == 200 and allowed.json()["content"] == "a", allowed.text
        assert http.get("/health").status_code == 200
    assert llama_server.wait_for_line("grammar nests more than 256 levels of parentheses")
