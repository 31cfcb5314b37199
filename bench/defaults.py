#!/usr/bin/env python3
"""Which engine settings the image should change by default (issue 14, point 3): flash
attention, the batch sizes and the prompt threads, measured on both test models and both
engines through `entrypoint.py serve`, each value against the image as shipped.

    nice -n -10 ~/.cache/localllm-tests/venv/bin/python -m bench.defaults [--reps 4] [--write-docs]

(The first run builds llama.cpp as the image does, into ~/.cache/localllm-bench.) About 22
minutes on 2 cores with 4 repetitions; `nice -n -10` (as root) keeps the machine's other jobs
from deciding the result.

Per server, as a client sees it: a prompt of exactly PROMPT_TOKENS tokens streamed with
DEEP_TOKENS tokens after it (prompt processing = tokens / time to the first chunk, and
generation at that depth, the case of a chat with a long history or a RAG prompt), then
bench.performance's 128-token generation after a short prompt. End of generation is
banned, so every answer has its full length. Every server runs alone. A repetition is a
block per model and engine: the image as shipped, each value, the image as shipped again;
a value's ratio is to the mean of the two shipped runs of its block (a machine that drifts
moves both), and the second shipped run over the first shows the noise. Figures are the
medians of the blocks' ratios. A value is worth a default when it is faster on both
models (RULE), else the setting stays as it is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
from pathlib import Path

from localllm_container import cpu, resources

from .builds import CACHE, command_line, llama_cpp_source, log, use_llama_cpp
from .performance import FILLER, READY_DEADLINE, cut_prompt, measure_tg, pull_model, start_server
from .performance_results import machine
from .quiet import undisturbed
from .team import PLACES, banned_ids, models

COMMAND = "~/.cache/localllm-tests/venv/bin/python -m bench.defaults"
PROMPT_TOKENS, DEEP_TOKENS = 1024, 64
FASTER, NO_WORSE = 1.03, 0.98  # RULE: one figure at least 3 % better on both models, none 2 % worse
FIGURES = ("pp_tps", "deep_tg_tps", "tg_tps")
SHIPPED, NOISE = "shipped", "shipped again (noise)"


def candidates(engine: str, threads: int) -> list[tuple[str, dict[str, str]]]:
    """(label, settings) of each value measured against the image as shipped: the other value
    of flash attention, batches of half and twice the shipped 512, fewer prompt threads."""
    threads_batch = [(f"N_THREADS_BATCH={k}", {"N_THREADS_BATCH": str(k)}) for k in range(1, threads)]
    if engine == "localllm":  # llama-cpp-python's server settings
        from localllm_container.settings import SERVER_DEFAULTS
        flash_attn = "false" if SERVER_DEFAULTS.get("FLASH_ATTN") == "true" else "true"
        return [(f"FLASH_ATTN={flash_attn}", {"FLASH_ATTN": flash_attn}),
                *((f"N_BATCH=N_UBATCH={n}", {"N_BATCH": str(n), "N_UBATCH": str(n)}) for n in (256, 1024)),
                *threads_batch]
    return [("LLAMA_ARG_FLASH_ATTN=off", {"LLAMA_ARG_FLASH_ATTN": "off"}),  # shipped: auto, on for a CPU
            *((f"LLAMA_ARG_UBATCH={n}", {"LLAMA_ARG_UBATCH": str(n)}) for n in (256, 1024)),
            *threads_batch]


def exact_prompt(vocab, tokens: int) -> str:
    """A text that both engines read as exactly `tokens` tokens: cut with llama.cpp's tokenizer
    for the model here (the engines use the same; llama-server has no /extras routes)."""
    return cut_prompt(tokens, lambda text: vocab.tokenize(text.encode(), add_bos=True),
                      lambda ids: vocab.detokenize(ids).decode(errors="ignore"), FILLER * 2)


def measure_deep(server, vocab, ban: list[int]) -> dict[str, float]:
    """Prompt processing of PROMPT_TOKENS tokens and generation of DEEP_TOKENS after them."""
    sent, chunks, finish = server.stream({"prompt": exact_prompt(vocab, PROMPT_TOKENS), "max_tokens": DEEP_TOKENS,
                                          "logit_bias": {str(t): -1e4 for t in ban}})
    texts = [t for t, has_text in chunks if has_text]
    if finish != "length" or len(texts) < DEEP_TOKENS // 2:
        raise SystemExit(f"{server.name}: {len(texts)} tokens after the long prompt, finish {finish!r}")
    return {"pp_tps": PROMPT_TOKENS / (chunks[0][0] - sent), "deep_tg_tps": (len(texts) - 1) / (texts[-1] - texts[0])}


def measure_server(model, engine: str, label: str, settings: dict[str, str], vocab, ban: list[int]) -> dict:
    server = start_server(f"{engine} {model.key} {label}", {"ENGINE": engine, **settings}, PLACES / model.key)
    try:
        server.wait_ready(READY_DEADLINE)
        check = server.call("/v1/completions", {"prompt": exact_prompt(vocab, PROMPT_TOKENS), "max_tokens": 1})
        if check["usage"]["prompt_tokens"] != PROMPT_TOKENS:  # also the warm-up
            raise SystemExit(f"{server.name} read {check['usage']['prompt_tokens']} prompt tokens, not {PROMPT_TOKENS}")
        return undisturbed(lambda: {**measure_deep(server, vocab, ban),
                                    "tg_tps": measure_tg(server, ban)["tg_tps"]}, server.leftovers)
    finally:
        server.close()


def measure(chosen, threads: int, reps: int) -> dict:
    """ratios[model][engine][label][figure] = [one per block]: the value's figure over the mean
    of the block's two shipped runs (for NOISE: the second shipped run over the first)."""
    import llama_cpp
    from localllm_container.server.patches import load_cpu_backend
    load_cpu_backend()  # the variant bench.builds.use_llama_cpp named; llama-cpp-python loads none itself
    vocabs = {m.key: llama_cpp.Llama(str(m.path), vocab_only=True, verbose=False) for m in chosen}
    bans = {m.key: banned_ids(m.path) for m in chosen}
    blocks = [(m, engine) for m in chosen for engine in ("localllm", "llama-server")]
    ratios: dict = {}
    for rep in range(reps):
        for m, engine in blocks[rep % len(blocks):] + blocks[:rep % len(blocks)]:
            log(f"repetition {rep + 1}/{reps}: {m.key}, {engine} (load average {os.getloadavg()[0]:.1f})")
            plan = [(SHIPPED, {}), *candidates(engine, threads), (SHIPPED, {})]
            runs = [measure_server(m, engine, label, settings, vocabs[m.key], bans[m.key]) for label, settings in plan]
            first, last = runs[0], runs[-1]
            for (label, _), figures in [*zip(plan[1:-1], runs[1:-1]), ((NOISE, {}), last)]:
                base = first if label == NOISE else {f: (first[f] + last[f]) / 2 for f in FIGURES}
                for f in FIGURES:
                    ratios.setdefault(m.key, {}).setdefault(engine, {}).setdefault(label, {}).setdefault(
                        f, []).append(figures[f] / base[f])
    return ratios


def summarise(samples: dict) -> dict:
    """ratios[engine][label][model][figure]: the median of the blocks' ratios;
    verdict[engine][label]: whether RULE holds on every model."""
    ratios: dict = {}
    for model, engines in samples.items():
        for engine, labels in engines.items():
            for label, figures in labels.items():
                ratios.setdefault(engine, {}).setdefault(label, {})[model] = {
                    f: statistics.median(figures[f]) for f in FIGURES}
    verdict = {engine: {label: label != NOISE and all(max(r.values()) >= FASTER and min(r.values()) >= NO_WORSE
                                                      for r in by_model.values())
                        for label, by_model in labels.items()} for engine, labels in ratios.items()}
    return {"ratios": ratios, "faster_on_every_model": verdict}


TEXT = {
    "en": {
        "title": "Defaults, measured",
        "intro": "Measured with `bench/defaults.py` on {date} on **{cpu}** ({cpus} CPUs; CPU variant `{variant}`), "
                 "llama-cpp-python {version}, {threads} threads (automatic). Each engine started by `entrypoint.py "
                 "serve` as shipped, and once per value below with that one setting changed, on both test models "
                 "(Gemma 3 270M Q4_K_M with `CHAT_FORMAT=gemma`, and the same weights with a chat template of their "
                 "own); one server at a time, {reps} repetitions. A cell is the value's figure over the shipped "
                 "image's, measured just before and after it (the median over the repetitions): above 1 is faster. "
                 "The noise row is the second shipped run over the first.",
        "header": "| Engine | Setting | {models} |\n|---|---|{cols}",
        "figures": "pp {p}; tg at {p}; tg",
        "rule": "A value becomes a default when, on both models, one figure is at least {faster:.2f} and none "
                "below {worse:.2f}. Values that pass: {passed}.",
        "none": "none",
        "decided": "Decided from the run of 2026-12-05 above: the localllm engine runs with `FLASH_ATTN=true` by "
                   "default (llama-cpp-python's own default is false; llama-server's `auto` turns it on for a CPU), "
                   "`config` shows it as `default, passed on`, and `FLASH_ATTN=false` turns it off. Every other "
                   "setting stays as it was: no other value passed, and `N_THREADS_BATCH` below `N_THREADS` makes "
                   "prompts about 1.8 times slower on both engines.",
        "meaning": "pp: a prompt of exactly {p} tokens, tokens per second to the first streamed token; tg at {p}: "
                   "the {d} tokens generated after it; tg: {tg} tokens after a short prompt.",
    },
    "ru": {
        "title": "Значения по умолчанию по измерениям",
        "intro": "Измерено `bench/defaults.py` {date} на **{cpu}** ({cpus} CPU; вариант CPU `{variant}`), "
                 "llama-cpp-python {version}, {threads} потока (автоматически). Каждый движок запущен через "
                 "`entrypoint.py serve` как поставляется и по разу для каждого значения ниже, с одной изменённой "
                 "настройкой, на обеих тестовых моделях (Gemma 3 270M Q4_K_M с `CHAT_FORMAT=gemma` и те же веса со "
                 "своим шаблоном чата); по одному серверу за раз, {reps} повторения. В ячейке показатель "
                 "значения, делённый на показатель образа как он есть, измеренный сразу до и после (медиана по "
                 "повторениям): больше 1 — быстрее. Строка шума — второй запуск образа как он есть, делённый на первый.",
        "header": "| Движок | Настройка | {models} |\n|---|---|{cols}",
        "figures": "pp {p}; tg после {p}; tg",
        "rule": "Значение становится значением по умолчанию, если на обеих моделях один показатель не ниже "
                "{faster:.2f}, а ни один не ниже {worse:.2f}. Прошли: {passed}.",
        "none": "ни одно",
        "decided": "Решено по прогону 2026-12-05 выше: движок localllm по умолчанию работает с `FLASH_ATTN=true` "
                   "(у самого llama-cpp-python по умолчанию false; `auto` у llama-server включает его на CPU), "
                   "`config` показывает его как `default, passed on`, а `FLASH_ATTN=false` выключает. Остальные "
                   "настройки остались как были: другие значения не прошли, а `N_THREADS_BATCH` меньше `N_THREADS` "
                   "замедляет промпты примерно в 1,8 раза на обоих движках.",
        "meaning": "pp: промпт ровно из {p} токенов, токенов в секунду до первого токена потока; tg после {p}: "
                   "{d} токенов, сгенерированных после него; tg: {tg} токенов после короткого промпта.",
    },
}
MODEL_NAMES = {"base": "base", "template": "template"}


def render_section(result: dict, lang: str) -> str:
    from .performance import TG_TOKENS
    text, m, s = TEXT[lang], result["machine"], result["summary"]
    keys = list(result["models"])
    figures = text["figures"].format(p=PROMPT_TOKENS)
    lines = [text["header"].format(models=" | ".join(f"{MODEL_NAMES[k]}: {figures}" for k in keys),
                                   cols="---|" * len(keys))]
    for engine, labels in s["ratios"].items():
        for label, by_model in labels.items():
            cells = ["; ".join(f"{by_model[k][f]:.2f}" for f in FIGURES) for k in keys]
            lines.append(f"| {engine} | `{label}` | {' | '.join(cells)} |")
    passed = [f"{engine} `{label}`" for engine, labels in s["faster_on_every_model"].items()
              for label, ok in labels.items() if ok]
    intro = text["intro"].format(date=result["date"][:10], cpu=m["cpu"], cpus=m["cpus"],
                                 variant=result["cpu_variant"], version=result["llama_cpp_python"],
                                 threads=result["threads"], reps=result["reps"])
    parts = [f"## {text['title']}", intro, f"```sh\n{result['command']}\n```", "\n".join(lines),
             text["meaning"].format(p=PROMPT_TOKENS, d=DEEP_TOKENS, tg=TG_TOKENS),
             text["rule"].format(faster=FASTER, worse=NO_WORSE, passed=", ".join(passed) or text["none"]),
             text["decided"]]
    return "\n\n".join(parts) + "\n"


def run(args) -> dict:
    use_llama_cpp(llama_cpp_source())
    import llama_cpp
    chosen = models(["base", "template"])
    threads = resources.available_cpus()[0]
    for m in chosen:
        pull_model(m.path, m.repo, m.file, PLACES / m.key, MODEL=m.repo, MODEL_QUANT="Q4_K_M", N_CTX="2048",
                   **({"CHAT_FORMAT": m.chat_format} if m.chat_format else {}))
    samples = measure(chosen, threads, args.reps)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(COMMAND),
            "machine": machine(),
            "llama_cpp_python": llama_cpp.__version__, "threads": threads, "reps": args.reps,
            "cpu_variant": cpu.choose_cpu_variant("")[0],
            "models": {m.key: {"repo": m.repo, "file": m.file} for m in chosen}, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4, help="repetitions (medians reported; default 4)")
    parser.add_argument("--json", type=Path, default=CACHE / "defaults.json", help="where to write the results")
    parser.add_argument("--from-json", type=Path, help="measure nothing: the table from an earlier run's JSON")
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/*/performance.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    result["summary"] = summarise(result["samples"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(render_section(result, "en"))
    log(f"results in {args.json}")
    if args.write_docs:
        from .performance_docs import write_docs
        write_docs(lambda lang: render_section(result, lang))


if __name__ == "__main__":
    main()
