#!/usr/bin/env python3
"""What the front (localllm_container.front: /health, /metrics, MAX_QUEUE, request ids)
costs: the same running engine measured through the front on PORT and directly on the
port it listens on behind it, in turns, so that both see the same machine load; the
results are ratios front / bare, per engine.

    ~/.cache/localllm-tests/venv/bin/python -m bench.front_overhead [--reps 9]

Measured per turn: /v1/models (answered without the model), a one-token completion,
and a streamed 128-token completion (ms per token after the first: the front's
per-event cost, metrics included), the last with bench.performance's measure_tg.
Uses the test model, pulled into a hub cache of its own as bench.performance does.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

from bench.builds import llama_cpp_source, use_llama_cpp
from bench.performance import READY_DEADLINE, TG_TOKENS, measure_tg, pull_model, start_server
from bench.team import ENGINES, banned_ids, models
from localllm_container import resources
from testkit.server import OPENER, ServerProcess

SMALL_REQUESTS = 20  # per turn; their median is the turn's figure


def behind_the_front(server: ServerProcess) -> ServerProcess:
    """The same server, called on the engine's own port (the entrypoint names it)."""
    bare = copy.copy(server)
    bare.url, bare.name = server.engine_url, server.name + " (bare)"
    return bare


def small_request_ms(server: ServerProcess, call) -> float:
    times = []
    for _ in range(SMALL_REQUESTS):
        start = time.perf_counter()
        call(server)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def models_list(server: ServerProcess) -> None:
    with OPENER.open(server.url + "/v1/models", timeout=30) as reply:
        reply.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="turns per engine (medians reported)")
    args = parser.parse_args()
    use_llama_cpp(llama_cpp_source())  # llama-server on PATH, and what `import llama_cpp` loads
    (model,) = models(["base"])
    ban = banned_ids(model.path)
    pull_model(model.path)
    measures = {
        "/v1/models, ms": lambda s: small_request_ms(s, models_list),
        "1-token completion, ms": lambda s: small_request_ms(
            s, lambda x: x.call("/v1/completions", {"prompt": "Hi", "max_tokens": 1})),
        f"streamed {TG_TOKENS} tokens, ms/token": lambda s: measure_tg(s, ban)["tg_ms"],
    }
    threads = resources.available_cpus()[0]
    print(f"front overhead, {args.reps} turns, medians; the test model, {threads} threads")
    print("| engine | measure | through the front | bare | front / bare |\n|---|---|---|---|---|")
    for engine in ENGINES:
        server = start_server(engine, {"ENGINE": engine})
        try:
            server.wait_ready(READY_DEADLINE)
            variants = {"front": server, "bare": behind_the_front(server)}
            results = {name: {v: [] for v in variants} for name in measures}
            for measure in measures.values():  # warm up once, unrecorded
                for variant in variants.values():
                    measure(variant)
            for rep in range(args.reps):
                order = ("front", "bare") if rep % 2 == 0 else ("bare", "front")
                for name, measure in measures.items():
                    for variant in order:
                        results[name][variant].append(measure(variants[variant]))
        finally:
            server.close()
        for name, by_variant in results.items():
            front, bare = statistics.median(by_variant["front"]), statistics.median(by_variant["bare"])
            print(f"| {engine} | {name} | {front:.2f} | {bare:.2f} | {front / bare:.3f} |", flush=True)


if __name__ == "__main__":
    main()
