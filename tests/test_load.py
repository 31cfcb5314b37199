"""Concurrent users on one server: bench/loadtest.py, run as anyone would run it,
against a server with the image's defaults, and against one with llama-cpp-python's
own INTERRUPT_REQUESTS=true, to show why the image changes that default."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

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


def test_concurrent_clients_all_get_whole_answers(start_server, tmp_path, report):
    entrypoint = start_server()  # INTERRUPT_REQUESTS=false: the entrypoint's default
    entrypoint.wait_ready()
    code, summary, table = load_test(entrypoint, tmp_path)
    report("load 4 x 3, INTERRUPT_REQUESTS default", figures(summary))
    assert (summary["sent"], summary["completed"], summary["failed"], summary["truncated"]) == (12, 12, 0, 0), table
    assert code == 0, table
    assert any(r["stream"] for r in summary["requests"]) and not all(r["stream"] for r in summary["requests"])


def test_interrupt_requests_true_cuts_answers_off(start_server, tmp_path, report):
    """The same run against llama-cpp-python's own default loses answers: a waiting
    request makes the server drop the stream being generated."""
    entrypoint = start_server(INTERRUPT_REQUESTS="true")
    entrypoint.wait_ready()
    code, summary, table = load_test(entrypoint, tmp_path)
    report("load 4 x 3, INTERRUPT_REQUESTS=true", figures(summary))
    assert summary["failed"] + summary["truncated"] > 0, table
    assert code != 0
