"""The benchmark's results: the machine they were measured on, the figures the targets
are about (ratios within one run), and the table printed and written into the docs.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess

TARGETS = {"pp_ratio": 0.90, "tg_overhead_ms": 2.0, "threads": 0.95, "portable": 0.98, "cold_extra_s": 1.5}


def machine() -> dict:
    info = dict(re.findall(r"^([^:\n]+):\s*(.*)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
                           re.M))
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16"]
    return {"cpu": info.get("Model name", platform.processor()), "cpus": os.cpu_count(),
            "flags": [f for f in wanted if f in flags], "missing_flags": [f for f in wanted if f not in flags],
            "kernel": platform.release()}


def summarise(api: dict, lb: dict, native: dict, cold: dict, threads: int, variant: str) -> dict:
    """The figures the targets are about, each as a ratio or difference within this run."""
    auto = api["auto"]
    sweep = {k: api[f"threads={k}"] for k in range(1, threads + 1)}
    best_pp = max(sweep, key=lambda k: sweep[k]["pp_tps"])
    best_tg = max(sweep, key=lambda k: sweep[k]["tg_tps"])
    s = {
        "pp_ratio": auto["pp_tps"] / lb["pp512_fa_auto_tps"],
        "pp_ratio_fa_off": auto["pp_tps"] / lb["pp512_fa_off_tps"],
        "tg_overhead_ms": 1000 / auto["tg_tps"] - 1000 / lb["tg128_fa_auto_tps"],
        "tg_overhead_fa_off_ms": 1000 / auto["tg_tps"] - 1000 / lb["tg128_fa_off_tps"],
        "tg_overhead_free_ms": 1000 / auto["free_tg_tps"] - 1000 / lb["tg128_fa_auto_tps"],
        "logit_bias_cost_ms": 1000 / auto["tg_tps"] - 1000 / auto["free_tg_tps"],
        "threads_auto": threads, "threads_best_pp": best_pp, "threads_best_tg": best_tg,
        "threads_pp_ratio": sweep[threads]["pp_tps"] / sweep[best_pp]["pp_tps"],
        "threads_tg_ratio": sweep[threads]["tg_tps"] / sweep[best_tg]["tg_tps"],
        "cpu_variant_auto": variant,
        "portable_pp_ratio": lb["pp512_fa_auto_tps"] / native["pp512_fa_auto_tps"],
        "portable_tg_ratio": lb["tg128_fa_auto_tps"] / native["tg128_fa_auto_tps"],
        "cold_s": cold["serve"]["ready_s"], "bare_s": cold["bare"]["load_s"],
        "cold_extra_s": cold["serve"]["ready_s"] - cold["bare"]["load_s"],
        "logits_all_pp_ratio": api["LOGITS_ALL=true"]["pp_tps"] / auto["pp_tps"],
    }
    t = TARGETS
    s["met"] = {"pp_ratio": s["pp_ratio"] >= t["pp_ratio"],
                "tg_overhead_ms": s["tg_overhead_ms"] <= t["tg_overhead_ms"],
                "threads": min(s["threads_pp_ratio"], s["threads_tg_ratio"]) >= t["threads"],
                "portable": min(s["portable_pp_ratio"], s["portable_tg_ratio"]) >= t["portable"],
                "cold_start": s["cold_extra_s"] <= t["cold_extra_s"]}
    return s


def rows(r: dict) -> list[tuple[dict[str, str], str, tuple[str, bool] | None]]:
    """Table rows: (label by language, value, (target, met) or None); English and Russian labels."""
    api, lb, s, cold = r["api"], r["llama_bench"], r["summary"], r["cold_start"]
    auto, t, met = api["auto"], TARGETS, s["met"]
    out = [
        ({"en": "API prompt processing, 512 tokens (tokens/s)", "ru": "API, обработка промпта 512 токенов (токенов/с)"},
         f"{auto['pp_tps']:.0f}", None),
        ({"en": "llama-bench pp512, flash attention auto / off (tokens/s)",
          "ru": "llama-bench pp512, flash attention auto / off (токенов/с)"},
         f"{lb['pp512_fa_auto_tps']:.0f} / {lb['pp512_fa_off_tps']:.0f}", None),
        ({"en": "API pp / llama-bench pp512 (auto; off)", "ru": "API pp / llama-bench pp512 (auto; off)"},
         f"{s['pp_ratio']:.2f}; {s['pp_ratio_fa_off']:.2f}",
         (f"≥ {t['pp_ratio']:.2f}", met["pp_ratio"])),
        ({"en": "API generation, 128 tokens (tokens/s; ms/token)",
          "ru": "API, генерация 128 токенов (токенов/с; мс/токен)"},
         f"{auto['tg_tps']:.1f}; {auto['tg_ms']:.2f}", None),
        ({"en": "llama-bench tg128, flash attention auto / off (tokens/s)",
          "ru": "llama-bench tg128, flash attention auto / off (токенов/с)"},
         f"{lb['tg128_fa_auto_tps']:.1f} / {lb['tg128_fa_off_tps']:.1f}", None),
        ({"en": "Generation overhead, API − llama-bench (ms/token)",
          "ru": "Накладные расходы генерации, API − llama-bench (мс/токен)"},
         f"{s['tg_overhead_ms']:.2f}", (f"≤ {t['tg_overhead_ms']:.1f}", met["tg_overhead_ms"])),
        ({"en": "… of which the EOS ban (logit_bias) itself (ms/token)",
          "ru": "… из них сам запрет EOS (logit_bias) (мс/токен)"},
         f"{s['logit_bias_cost_ms']:.2f}", None),
        ({"en": "Time to first token: 512-token prompt; short prompt (ms)",
          "ru": "Время до первого токена: промпт 512 токенов; короткий промпт (мс)"},
         f"{auto['ttft_512_ms']:.0f}; {auto['ttft_short_ms']:.0f}", None),
    ]
    for k in range(1, s["threads_auto"] + 1):
        v = api[f"threads={k}"]
        out.append(({"en": f"Threads {k}: pp; tg (tokens/s)", "ru": f"Потоков {k}: pp; tg (токенов/с)"},
                    f"{v['pp_tps']:.0f}; {v['tg_tps']:.1f}", None))
    out += [
        ({"en": f"Automatic threads ({s['threads_auto']}) / best: pp; tg",
          "ru": f"Автоматическое число потоков ({s['threads_auto']}) / лучшее: pp; tg"},
         f"{s['threads_pp_ratio']:.2f}; {s['threads_tg_ratio']:.2f}",
         (f"≥ {t['threads']:.2f}", met["threads"])),
        ({"en": f"llama-bench, CPU variant {s['cpu_variant_auto']} / -march=native: pp; tg",
          "ru": f"llama-bench, вариант CPU {s['cpu_variant_auto']} / -march=native: pp; tg"},
         f"{s['portable_pp_ratio']:.2f}; {s['portable_tg_ratio']:.2f}",
         (f"≥ {t['portable']:.2f}", met["portable"])),
        ({"en": "Cold start to first 200 from /v1/models; bare model load (s)",
          "ru": "Холодный старт до первого 200 от /v1/models; голая загрузка модели (с)"},
         f"{s['cold_s']:.2f}; {s['bare_s']:.2f}",
         (f"≤ +{t['cold_extra_s']:.1f}", met["cold_start"])),
        ({"en": "  entrypoint: settings and checks, until `llm run` (s)",
          "ru": "  точка входа: настройки и проверки до `llm run` (с)"},
         f"{cold['serve']['entrypoint_s']:.2f}", None),
        ({"en": "  `llm run` to model loaded in the server (s); of it bare: python + llama_cpp import; "
                 "model load; server modules",
          "ru": "  от `llm run` до загруженной модели в сервере (с); из них у голой загрузки: python + импорт "
                 "llama_cpp; загрузка модели; модули сервера"},
         f"{cold['serve']['to_server_loaded_s']:.2f}; {cold['bare']['python_import_s']:.2f}; "
         f"{cold['bare']['model_load_s']:.2f}; {cold['bare']['server_import_s']:.2f}", None),
        ({"en": "  model loaded to port open; port open to first 200 (s)",
          "ru": "  от загрузки модели до открытого порта; от порта до первого 200 (с)"},
         f"{cold['serve']['loaded_to_listening_s']:.2f}; {cold['serve']['listening_to_200_s']:.2f}", None),
        ({"en": "LOGITS_ALL=true / default (false): pp", "ru": "LOGITS_ALL=true / по умолчанию (false): pp"},
         f"{s['logits_all_pp_ratio']:.2f}", None),
    ]
    return out


def print_table(r: dict) -> None:
    table = rows(r)
    width = max(len(label["en"]) for label, _, _ in table)
    for label, value, target in table:
        verdict = f"{target[0]} {'met' if target[1] else 'MISSED'}" if target else ""
        print(f"{label['en']:<{width}}  {value:<24} {verdict}")
