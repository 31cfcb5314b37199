"""Concurrent users on one server: bench/loadtest.py, run as anyone would run it,
against a server with the image's defaults (on each engine; three times on llama-server,
whose keep-alive connections once lost requests), against one with llama-cpp-python's
own INTERRUPT_REQUESTS=true, to show why the image changes that default, and openai
clients that reuse their connections as they do by default."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import openai
import pytest

from conftest import ALIAS, ROOT

# 4 clients x 3 requests, client k starting k x 0.5 s after the first: each new
# request arrives while an earlier answer is streaming.
SMALL_RUN = ["--clients", "4", "--requests", "3", "--stagger", "0.5", "--deadline", "300"]


def load_test(entrypoint, tmp_path) -> tuple[int, dict, str]:
    """Run bench.loadtest against the server: (exit status, JSON summary, printed table)."""
    out = tmp_path / f"load-{entrypoint.port}.json"
    done = subprocess.run([sys.executable, "-m", "bench.loadtest", "--url", entrypoint.url, *SMALL_RUN,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=360)
    return done.returncode, json.loads(out.read_text()), done.stdout + done.stderr


def figures(summary: dict) -> str:
    return ", ".join(f"{name} {summary[name]}" for name in ("sent", "completed", "failed", "truncated"))


RUNS = {"localllm": 1, "llama-server": 3}


def test_concurrent_clients_all_get_whole_answers(start_server, engine, tmp_path, report):
    entrypoint = start_server()  # localllm: INTERRUPT_REQUESTS=false, the entrypoint's default
    entrypoint.wait_ready()
    for run in range(1, RUNS[engine] + 1):
        code, summary, table = load_test(entrypoint, tmp_path)
        report(f"load 4 x 3 ({engine}, run {run} of {RUNS[engine]})", figures(summary))
        assert (summary["sent"], summary["completed"], summary["failed"], summary["truncated"]) == (12, 12, 0, 0), \
            table
        assert code == 0, table
        assert any(r["stream"] for r in summary["requests"]) and not all(r["stream"] for r in summary["requests"])


def test_openai_clients_reusing_connections_lose_nothing(start_server, engine, report):
    """4 users, each an openai client with its default connection pool and no retries, each
    sending streamed and plain chat requests in turn: every answer arrives whole."""
    entrypoint = start_server()
    entrypoint.wait_ready()
    failures: list[str] = []
    answered: list[str] = []

    def user(number: int) -> None:
        client = openai.OpenAI(base_url=entrypoint.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for turn in range(6):
            messages = [{"role": "user", "content": f"User {number}, question {turn}: name a colour."}]
            try:
                if turn % 2:
                    reply = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8)
                    finish = reply.choices[0].finish_reason
                else:
                    chunks = list(client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8,
                                                                 stream=True))
                    finish = chunks[-1].choices[0].finish_reason
                (answered if finish in ("stop", "length") else failures).append(f"{number}.{turn}: {finish}")
            except openai.OpenAIError as exc:
                failures.append(f"{number}.{turn}: {type(exc).__name__}: {exc}")

    users = [threading.Thread(target=user, args=(number,)) for number in range(4)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join()
    report(f"openai clients 4 x 6 reusing connections ({engine})", f"{len(answered)} whole, {len(failures)} failed")
    assert failures == [] and len(answered) == 24


@pytest.mark.engines("localllm")  # INTERRUPT_REQUESTS is llama-cpp-python's; llama-server runs requests side by side
def test_interrupt_requests_true_cuts_answers_off(start_server, tmp_path, report):
    """The same run against llama-cpp-python's own default loses answers: a waiting
    request makes the server drop the stream being generated."""
    entrypoint = start_server(INTERRUPT_REQUESTS="true")
    entrypoint.wait_ready()
    code, summary, table = load_test(entrypoint, tmp_path)
    report("load 4 x 3, INTERRUPT_REQUESTS=true", figures(summary))
    assert summary["failed"] + summary["truncated"] > 0, table
    assert code != 0
