"""End to end: `entrypoint.py serve` with the real server of each engine (llama-cpp-python's
through localllm, llama-server) and the real model, called through real clients (the openai
package, curl), stopped with real signals."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from conftest import ALIAS, LOG_LINES, REPO, ROOT
from testkit.server import processes_with_env


def test_models_lists_the_alias(server):
    reply = subprocess.run(["curl", "-sS", "--fail", server.url + "/v1/models"],
                           capture_output=True, text=True, check=True)
    assert [m["id"] for m in json.loads(reply.stdout)["data"]] == [ALIAS]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_returns_text(server):
    reply = client(server).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < reply.usage.completion_tokens <= 16


def test_streamed_chat_delivers_chunks_and_ends_cleanly(server):
    stream = client(server).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, temperature=0,
        stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text.strip()
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    # On the wire, the stream ends with the SSE terminator.
    raw = subprocess.run(
        ["curl", "-sS", "--fail", "-N", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True})],
        capture_output=True, text=True, check=True, timeout=60)
    assert raw.stdout.rstrip().endswith("data: [DONE]")


def test_request_with_datasphere_headers_succeeds(server):
    """node-api forwards x-node-id, x-folder-id and the caller's IAM token."""
    reply = subprocess.run(
        ["curl", "-sS", "--fail", server.url + "/v1/completions", "-H", "Content-Type: application/json",
         "-H", "x-node-id: bt1nodeid", "-H", "x-folder-id: b1gfolderid", "-H", "Authorization: Bearer t1.iam-token",
         "-d", json.dumps({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})],
        capture_output=True, text=True, timeout=60)
    assert reply.returncode == 0, reply.stderr
    assert json.loads(reply.stdout)["choices"][0]["text"]


def test_request_log_lines_reach_the_entrypoint_stdout(server, engine):
    """After the engine has taken over, each request's line reaches the container log: the
    front's access line for the localllm engine (whose own lines after `llm run` returned
    are checked when it stops), llama-server's timing lines."""
    assert server.wait_for_line(LOG_LINES[engine]["running"])  # the server has taken over
    client(server).completions.create(model=ALIAS, prompt="Hello", max_tokens=2)
    server.wait_for_line(LOG_LINES[engine]["answered"])


def wait_exit(entrypoint, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = entrypoint.proc.wait(timeout)
    return code, time.monotonic() - started


def test_sigterm_stops_with_status_0_and_leaves_nothing(start_server, engine):
    entrypoint = start_server()
    entrypoint.wait_ready()
    assert entrypoint.leftovers(), "expected the server among the entrypoint's processes"
    entrypoint.proc.send_signal(signal.SIGTERM)
    code, took = wait_exit(entrypoint, 10)
    assert code == 0, entrypoint.output()
    assert took < 10
    assert entrypoint.leftovers() == []
    entrypoint.wait_for_line(LOG_LINES[engine]["stopped"])  # a graceful stop, not the SIGKILL fallback


def test_sigterm_right_after_the_port_opens(start_server):
    """The port opens before `llm run` returns: the stop must reach the whole tree."""
    entrypoint = start_server()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert entrypoint.proc.poll() is None, entrypoint.output()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", entrypoint.port)) == 0:
                break
        time.sleep(0.005)
    entrypoint.proc.send_signal(signal.SIGTERM)
    code, took = wait_exit(entrypoint, 10)
    assert code == 0, entrypoint.output()
    assert entrypoint.leftovers() == []


# How each process of a running entrypoint is told from the others, by its command line.
PROCESS_ARGV = {"localllm": lambda argv: b"llama_cpp.server.app:create_app" in argv,
                "llama-server": lambda argv: argv[0].endswith(b"/llama-server"),
                "front": lambda argv: b"localllm_container.front" in argv}


@pytest.mark.parametrize("dies", ["engine", "front"])
def test_server_death_makes_the_entrypoint_exit_nonzero(start_server, engine, dies):
    entrypoint = start_server()
    entrypoint.wait_ready()
    entrypoint.wait_for_line(LOG_LINES[engine]["running"])  # localllm: `llm run` has returned, the server adopted
    kind = engine if dies == "engine" else "front"
    victims = [pid for pid in entrypoint.leftovers()
               if PROCESS_ARGV[kind](open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0"))]
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    code, took = wait_exit(entrypoint, 5)
    assert code != 0
    assert "exited" in entrypoint.output()
    assert entrypoint.leftovers() == []


def test_a_port_already_taken_ends_the_start_at_once_saying_so(start_server):
    """The front cannot take PORT: the entrypoint says so and exits 1 without loading the model."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        entrypoint = start_server(PORT=str(taken.getsockname()[1]))
        assert entrypoint.proc.wait(60) == 1, entrypoint.output()
    assert "address already in use" in entrypoint.output()
    assert entrypoint.lines[-1].startswith("error: the front on PORT (pid ") and "Traceback" not in entrypoint.output()
    assert "Running " not in entrypoint.output() and "listening on" not in entrypoint.output()
    assert entrypoint.leftovers() == []


def test_run_time_environment_overrides_model_env(start_server):
    entrypoint = start_server(MODEL_ALIAS="my-model", N_CTX="1024")
    entrypoint.wait_ready()
    models = client(entrypoint).models.list()
    assert [m.id for m in models.data] == ["my-model"]
    assert "context 1024" in entrypoint.output()


@pytest.mark.parametrize("settings, message", [
    ({"model_env": {"N_CTX": "2048"}, "MODEL": ""}, "error: MODEL is not set"),  # empty: as if not given
    ({"N_CTX": "abc"}, "error: N_CTX='abc' is not valid"),
    ({"MODEL_QUANT": "Q5_K_M"}, "error: MODEL_QUANT='Q5_K_M' matches no .gguf file"),
    ({"MODEL": "other-org/absent-GGUF"}, "error: MODEL=other-org/absent-GGUF is not in this image's model cache"),
    ({"N_BATCH": "many"}, {"localllm": "error: N_BATCH='many' is not valid",
                           "llama-server": "error: N_BATCH is a setting of llama-cpp-python's server"}),
    ({"CHAT_FORMAT": "gemma-3"}, "error: CHAT_FORMAT='gemma-3' is not valid"),
    ({"ENGINE": "vllm"}, "error: ENGINE='vllm' is not valid: expected localllm or llama-server"),
    ({"PARALLEL": "0"}, "error: PARALLEL='0' is not valid"),
    ({"LLAMA_ARG_BATCH": "256"}, {"localllm": "error: LLAMA_ARG_BATCH is a setting of llama-server, which "
                                              "ENGINE=localllm does not run",
                                  "llama-server": None}),  # taken: this row checks only the localllm engine
    ({"LLAMA_ARG_BATHC": "256"}, {"localllm": "error: LLAMA_ARG_BATHC is a setting of llama-server",
                                  "llama-server": "error: LLAMA_ARG_BATHC is not a variable of llama-server"}),
    ({"LLAMA_ARG_CTX_SIZE": "4096"}, {"localllm": "error: LLAMA_ARG_CTX_SIZE is a setting of llama-server",
                                      "llama-server": "error: LLAMA_ARG_CTX_SIZE is set by the image from its "
                                                      "own settings: set N_CTX"}),
    ({"CHAT_FORMAT": "saiga"}, {"localllm": None, "llama-server": "error: CHAT_FORMAT='saiga' has no equivalent "
                                                                  "in llama-server"}),
])
def test_bad_settings_give_one_line_and_status_2(start_server, engine, settings, message):
    message = message[engine] if isinstance(message, dict) else message
    if message is None:
        pytest.skip(f"valid on the {engine} engine; another row or test serves with it")
    entrypoint = start_server(**settings)
    code = entrypoint.proc.wait(30)
    lines = entrypoint.output().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert processes_with_env(f"LOCALLLM_TEST_MARKER={entrypoint.marker}") == []


def test_serving_needs_no_network(start_server, hub):
    """The model was pulled at build time; start and requests never reach the hub."""
    before = len(hub.requests)
    entrypoint = start_server()
    entrypoint.wait_ready()
    client(entrypoint).completions.create(model=ALIAS, prompt="Hello", max_tokens=4)
    assert len(hub.requests) == before


def health(entrypoint, timeout: float = 4) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, against this server's port."""
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), "health"], capture_output=True, text=True,
                          env={**os.environ, "PORT": str(entrypoint.port)}, timeout=timeout)


def test_health_answers_while_the_model_is_busy(server):
    """/v1/models waits for the model lock; the health path must not."""
    stream = client(server).completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=300,
                                               stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # generation is under way
    done = health(server, timeout=10)
    assert done.returncode == 0, done.stderr
    stream.close()


READ_ONLY_ROOT = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount -o remount,bind,ro / && exec "$0" "$@"')


def test_serves_with_a_read_only_root_filesystem(start_server, engine):
    """As `docker run --read-only` (or readOnlyRootFilesystem): only /dev/shm stays writable."""
    entrypoint = start_server(prefix=READ_ONLY_ROOT)
    entrypoint.wait_ready()
    assert client(entrypoint).completions.create(model=ALIAS, prompt="Hi", max_tokens=4, temperature=0).choices[0].text
    entrypoint.wait_for_line(LOG_LINES[engine]["answered"])


def test_chat_format_is_chosen_from_the_model_when_not_set(start_server):
    """The test model's GGUF has no chat template: without `gemma` its answers come back empty."""
    entrypoint = start_server(model_env=dict(MODEL=REPO, N_CTX="2048"), CHAT_FORMAT="")
    entrypoint.wait_ready()
    reply = client(entrypoint).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=0)
    assert reply.choices[0].message.content.strip()


def get_json(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=10) as reply:
        return json.load(reply)


@pytest.mark.engines("llama-server")  # slots are llama-server's; localllm answers one request at a time
def test_llama_server_has_the_slots_and_context_asked_for(start_server):
    """PARALLEL empty: one slot per CPU, at least 4; N_CTX is each slot's context; a LLAMA_ARG_*
    variable reaches llama-server."""
    entrypoint = start_server(PARALLEL="", LLAMA_ARG_ENDPOINT_PROPS="true")
    entrypoint.wait_ready()
    slots = get_json(entrypoint.engine_url, "/slots")  # llama-server's own: the front does not pass it on
    assert len(slots) == max(4, min(16, len(os.sched_getaffinity(0))))
    assert {slot["n_ctx"] for slot in slots} == {2048}
    assert f"context 2048 in each of {len(slots)} slots" in entrypoint.output()
    assert get_json(entrypoint.engine_url, "/props")["endpoint_props"] is True
    fixed = start_server(PARALLEL="2")
    fixed.wait_ready()
    assert [slot["n_ctx"] for slot in get_json(fixed.engine_url, "/slots")] == [2048, 2048]


@pytest.mark.engines("llama-server")  # the prompt localllm builds is llama-cpp-python's own gemma format
def test_chat_format_is_llama_servers_template_of_the_same_layout(start_server):
    """CHAT_FORMAT=gemma must build a Gemma prompt, not a template whose text is "gemma"."""
    entrypoint = start_server(CHAT_FORMAT="gemma")
    entrypoint.wait_ready()
    request = urllib.request.Request(entrypoint.url + "/apply-template", json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}).encode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        prompt = json.load(reply)["prompt"]
    assert prompt == "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
