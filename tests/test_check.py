"""`entrypoint.py check`, the client users run against a container or a DataSphere
node: against the real server, directly and through a stand-in for node-api that
insists on DataSphere's headers (tests/nodeapi_standin.py), and against failures."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ALIAS, LOG_LINES, ROOT, free_port
from nodeapi_standin import NodeApiStandin


def check(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("YC_IAM_TOKEN", "API_KEY")}
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), "check", *args], env={**environ, **env},
                          capture_output=True, text=True, timeout=180)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_check_passes_and_prints_the_figures(server, report):
    done = check(server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^models: HTTP 200 in [\d.]+ s, model '{ALIAS}'$", done.stdout, re.M), done.stdout
    chat = re.search(r"^chat: HTTP 200, first token after ([\d.]+) s, (\d+) tokens at ([\d.]+) tokens/s, "
                     r"total ([\d.]+) s$", done.stdout, re.M)
    assert chat, done.stdout
    assert done.stdout.splitlines()[-1] == f"ok: {server.url} serves '{ALIAS}'"
    report("check against the test server", chat.group(0))


def test_check_runs_with_click_alone(server, tmp_path):
    """As on a laptop: no site-packages (python -S), only click beside the standard library."""
    import click
    shutil.copytree(Path(click.__file__).parent, tmp_path / "click")
    done = subprocess.run([sys.executable, "-S", str(ROOT / "entrypoint.py"), "check", server.url],
                          env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == f"ok: {server.url} serves '{ALIAS}'", (
        done.stdout + done.stderr)


def test_a_url_ending_in_v1_works_too(server):
    assert check(server.url + "/v1/").returncode == 0


def test_closed_port_is_one_line(server):
    done = check(f"http://127.0.0.1:{free_port()}")
    assert "connection refused" in one_error_line(done)
    assert done.stdout == ""


def test_a_silent_server_is_a_timeout():
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        done = check(f"http://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "0.5")
    assert "no answer within 0.5 s (--timeout)" in one_error_line(done)


def test_a_server_that_is_not_http():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()

        def answer() -> None:
            conn, _ = other.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        threading.Thread(target=answer, daemon=True).start()
        done = check(f"http://127.0.0.1:{other.getsockname()[1]}", "--timeout", "5")
    assert "not an HTTP answer" in one_error_line(done)


@pytest.mark.parametrize("option, header", [
    (["--node-id", "bt1node"], ("x-node-id", "bt1node")),
    (["--alias", "llm"], ("x-node-alias", "datasphere.user.llm")),
])
def test_header_mode_passes_through_node_api(server, option, header):
    with NodeApiStandin(server.url) as node_api:
        done = check(node_api.url, *option, "--folder-id", "b1gfolder", YC_IAM_TOKEN="t1.token")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(node_api.requests) == 2  # the model list and the streamed chat
    for sent in node_api.requests:
        assert sent[header[0]] == header[1]
        assert sent["x-folder-id"] == "b1gfolder"
        assert sent["authorization"] == "Bearer t1.token"


def test_missing_token_is_the_401_line(server):
    with NodeApiStandin(server.url) as node_api:
        line = one_error_line(check(node_api.url, "--node-id", "bt1node", "--folder-id", "b1gfolder"))
    assert "HTTP 401 Unauthorized: the token or key is missing or refused" in line
    assert "YC_IAM_TOKEN" in line


def test_node_api_503_is_the_not_ready_line():
    with NodeApiStandin("http://127.0.0.1:9", status=503) as node_api:
        line = one_error_line(check(node_api.url, "--alias", "llm", "--folder-id", "f", "--iam-token", "t"))
    assert "HTTP 503 Service Unavailable: not ready: the model is still loading" in line


def test_api_key_of_the_server(start_server, engine):
    """From the option, or from API_KEY as inside the container (the first of its keys)."""
    entrypoint = start_server(API_KEY="sk-test-key,sk-second-key")
    entrypoint.wait_for_line(LOG_LINES[engine]["running"], timeout=120)
    assert check(entrypoint.url, "--api-key", "sk-second-key").returncode == 0
    assert check(entrypoint.url, API_KEY="sk-test-key,sk-second-key").returncode == 0
    assert "HTTP 401" in one_error_line(check(entrypoint.url))


def test_the_key_goes_beside_node_apis_token(server):
    """On DataSphere, Authorization carries the IAM token for node-api: the key is sent as x-api-key."""
    with NodeApiStandin(server.url) as node_api:
        done = check(node_api.url, "--node-id", "bt1node", "--folder-id", "b1gfolder", "--iam-token", "t1.token",
                     API_KEY="sk-test-key")
    assert done.returncode == 0, done.stdout + done.stderr
    assert {(sent["authorization"], sent["x-api-key"]) for sent in node_api.requests} == {
        ("Bearer t1.token", "sk-test-key")}


@pytest.mark.parametrize("args, message", [
    (["--node-id", "n"], "need --folder-id"),
    (["--node-id", "n", "--alias", "a", "--folder-id", "f"], "--node-id or --alias, not both"),
])
def test_contradictory_options_are_usage_errors(args, message):
    done = check("http://127.0.0.1:9", *args)
    assert done.returncode == 2 and message in done.stderr


def test_the_stream_reader_reads_each_kind_of_line():
    """The one reader of OpenAI event streams (check, the load test, the benchmark)."""
    from localllm_container.check import DONE, stream_event
    assert stream_event(b'data: {"choices": []}\n') == {"choices": []}
    assert stream_event("data:[DONE]") == DONE
    assert [stream_event(line) for line in ("", "\n", ": ping - 2026-12-04", "event: x")] == [None] * 4
    with pytest.raises(ValueError):
        stream_event("data: {not json")
