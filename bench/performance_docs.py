"""docs/{en,ru}/performance.md from a bench/performance.py result: the prose in
both languages lives here, the figures and the table rows come from the run."""
from __future__ import annotations

from collections.abc import Callable

from testkit.environment import ROOT

from .builds import log

TEXT = {
    "en": {
        "nav": "[Русская версия](../ru/performance.md) · [Configuration](configuration.md)",
        "title": "Performance",
        "intro": ("Measured with `bench/performance.py` on {date} on **{cpu}** ({cpus} CPUs; "
                  "flags that matter: {flags}{missing}), llama-cpp-python {version}, the test model "
                  "`{file}` ({mb} MB, Gemma 3 270M), context {n_ctx}, {threads} threads ({threads_why}), "
                  "CPU variant `{level}` chosen by the entrypoint. Medians of {reps} repetitions. "
                  "Load average during the run: {load} on {cpus} CPUs; other jobs used a median {others:.0%} of "
                  "the CPUs during the measurements kept. The machine is shared, so only the ratios within "
                  "one run count, not the absolute speeds."),
        "missing": "; absent: {}",
        "command": "To repeat (builds and the model are cached in `~/.cache/localllm-bench`, the first run "
                   "compiles llama.cpp twice, as the image does and for `-march=native`):",
        "results": "Results",
        "header": "| Figure | Value | Target |\n|---|---|---|",
        "targets": "Targets",
        "target_lines": {
            "pp_ratio": "API prompt processing at least {t:.2f} of `llama-bench` pp512: **{v:.2f}, {m}**.",
            "tg_overhead_ms": "Generation overhead at most {t:.1f} ms per token: **{v:.2f} ms, {m}**.",
            "threads": "Automatic threads within 5% of the best of the sweep: **{v:.2f} of the best, {m}**.",
            "portable": ("Portable CPU variant at least {t:.2f} of `-march=native`: "
                         "**{v:.2f} (the lower of pp and tg), {m}**."),
            "cold_start": "Cold start at most the bare load plus {t:.1f} s: **bare + {v:.2f} s, {m}**.",
        },
        "met": "met", "missed": "missed", "missed_by": "missed by {}",
        "meaning": "What the figures mean",
        "meaning_items": [
            "**API prompt processing**: a streamed `/v1/completions` request whose prompt is exactly 512 tokens "
            "(cut with the server's own tokenizer, BOS included) with `max_tokens=1`; 512 divided by the time from "
            "sending the request to the first chunk. Each prompt starts with a different word, so "
            "llama-cpp-python cannot reuse the previous prompt from its KV cache.",
            "**llama-bench pp512 / tg128**: llama.cpp's own benchmark, built from the llama.cpp sources that the "
            "pinned llama-cpp-python sdist vendors by `scripts/build-llama-cpp.sh` as the image builds it, "
            "loading the CPU variant the entrypoint chose, on the same model file and thread count, run between the API "
            "measurements. Flash attention `auto` is llama-bench's default (on a CPU it resolves to on), as the "
            "image's `FLASH_ATTN=true`; `off` is llama-cpp-python's own default. The target is against `auto`.",
            "**API generation**: a streamed completion of 128 tokens with the end-of-generation token(s) banned "
            "through `logit_bias`, so that exactly 128 come; the rate between the first and the last chunk, "
            "so the prompt does not count. ms/token = 1000 / rate.",
            "**Generation overhead**: API ms/token minus llama-bench tg128 ms/token: what the serving path adds "
            "to each token (sampling over Gemma's 262,144-token vocabulary, detokenizing, the event stream, "
            "Python). The next row is the part due to the `logit_bias` ban itself, which llama-cpp-python "
            "applies in Python over the whole vocabulary: the same stream without `logit_bias` (stopped early "
            "streams are retried) is that much faster. A user who sends no `logit_bias` does not pay it.",
            "**Time to first token**: from sending to the first chunk, for the 512-token prompt and for a short "
            "prompt of about 20 tokens.",
            "**Threads**: the API measurements with `N_THREADS` = `N_THREADS_BATCH` = 1 … N, N being what "
            "`resources.available_cpus()` allows; the automatic value is the one the entrypoint picks.",
            "**Portable CPU variant**: llama-bench with the CPU variant the entrypoint picks for this CPU (llama.cpp's "
            "`GGML_CPU_ALL_VARIANTS`, built with `GGML_NATIVE=OFF`) against llama-bench built with `-march=native` "
            "for this very machine (`GGML_NATIVE=ON`), both from the same sources, in the same run. On a CPU with "
            "AMX the native build leaves AMX out (`-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`): this llama.cpp's "
            "AMX code dies of SIGILL on the Sapphire Rapids VM, as its `sapphirerapids` variant does "
            "([CPU variants](#cpu-variants)).",
            "**Cold start**: from starting `entrypoint.py serve` to the first HTTP 200 from `/v1/models`, against "
            "a fresh `python` that imports `llama_cpp` and loads the model with `llama_cpp.Llama(path, "
            "n_ctx, n_threads)` from the same library folder. The model file is in the page cache in both "
            "(a cold process, not a cold disk). The indented rows split it by the arrival time of the "
            "entrypoint's output lines (`Serving ...`, uvicorn's `Started server process`, which comes after "
            "the model is loaded, and `Uvicorn running on`); the bare process's own split is given for "
            "comparison.",
            "**LOGITS_ALL**: API prompt processing with this llama-cpp-python server setting changed, as a ratio to "
            "the image's default (false). The other settings are measured on both engines and both test models "
            "in [Defaults, measured](#defaults-measured).",
        ],
        "method": "How it is measured",
        "method_text": (
            "Each repetition goes round-robin over the server variants and `llama-bench`, starting one place "
            "later each time. Each server is started through `entrypoint.py serve` exactly as the image runs it "
            "(offline, from a hub cache filled by `entrypoint.py pull`), given one unmeasured request, measured "
            "and stopped: one server runs at a time, because even an idle entrypoint wakes up five times a second"
            " to watch its server (about 1% of a CPU), which would disturb the others. Each measurement waits (at"
            " most 5 minutes) until other jobs use under 10% of the CPUs, and is taken again (4 tries at most, "
            "the least disturbed kept) when they used more while it ran: on 2 cores even a short compile job "
            "slows llama.cpp's threads, which wait for each other, several times over. Waiting is bounded (40 "
            "minutes in the whole run); after that, each measurement is taken once, as things are. The share "
            "other jobs used is kept with each sample (CPU time of the whole machine, steal included, minus that "
            "of the benchmark, its servers and llama-bench). Cold starts and bare loads alternate afterwards. "
            "Every wait has a deadline and every process the benchmark starts is stopped at the end. The full "
            "samples are in the JSON file."),
    },
    "ru": {
        "nav": "[English version](../en/performance.md) · [Настройка](configuration.md)",
        "title": "Производительность",
        "intro": ("Измерено скриптом `bench/performance.py` {date} на **{cpu}** ({cpus} CPU; "
                  "важные флаги: {flags}{missing}), llama-cpp-python {version}, тестовая модель "
                  "`{file}` ({mb} МБ, Gemma 3 270M), контекст {n_ctx}, потоков {threads} ({threads_why}), "
                  "вариант CPU `{level}` выбран точкой входа. Медианы по {reps} повторам. "
                  "Load average во время прогона: {load} на {cpus} CPU; во время учтённых замеров другие задачи "
                  "занимали (медиана) {others:.0%} CPU. Машина общая, поэтому значение имеют только отношения "
                  "внутри одного прогона, а не абсолютные скорости."),
        "missing": "; нет: {}",
        "command": "Как повторить (сборки и модель кешируются в `~/.cache/localllm-bench`; первый запуск "
                   "дважды компилирует llama.cpp: как в образе и под `-march=native`):",
        "results": "Результаты",
        "header": "| Показатель | Значение | Цель |\n|---|---|---|",
        "targets": "Цели",
        "target_lines": {
            "pp_ratio": "Обработка промпта через API не ниже {t:.2f} от pp512 `llama-bench`: **{v:.2f}, {m}**.",
            "tg_overhead_ms": "Накладные расходы генерации не больше {t:.1f} мс на токен: **{v:.2f} мс, {m}**.",
            "threads": "Автоматическое число потоков в пределах 5% от лучшего: **{v:.2f} от лучшего, {m}**.",
            "portable": "Переносимый вариант CPU не ниже {t:.2f} от `-march=native`: **{v:.2f} (меньшее из pp и tg), {m}**.",
            "cold_start": "Холодный старт не дольше голой загрузки плюс {t:.1f} с: **голая + {v:.2f} с, {m}**.",
        },
        "met": "выполнено", "missed": "не выполнено", "missed_by": "не выполнено (разрыв {})",
        "meaning": "Что означают цифры",
        "meaning_items": [
            "**Обработка промпта через API**: потоковый запрос к `/v1/completions` с промптом ровно в 512 "
            "токенов (обрезан токенизатором самого сервера, BOS учтён) и `max_tokens=1`; 512 делится на время "
            "от отправки запроса до первого фрагмента ответа. Каждый промпт начинается с нового слова, чтобы "
            "llama-cpp-python не мог взять предыдущий промпт из KV-кеша.",
            "**llama-bench pp512 / tg128**: собственный бенчмарк llama.cpp, собранный из исходников llama.cpp, "
            "которые лежат в закреплённом sdist llama-cpp-python, скриптом `scripts/build-llama-cpp.sh`, как в "
            "образе, с тем вариантом CPU, который выбрала точка входа, на том же файле модели и с тем же "
            "числом потоков; запускается между измерениями API. Flash attention `auto` — значение llama-bench по "
            "умолчанию (на CPU оно включает flash attention), как `FLASH_ATTN=true` в образе; `off` — значение по "
            "умолчанию самого llama-cpp-python. Цель считается относительно `auto`.",
            "**Генерация через API**: потоковое дополнение на 128 токенов, в котором токены конца генерации "
            "запрещены через `logit_bias`, так что приходит ровно 128 токенов; скорость считается между первым "
            "и последним фрагментом, промпт в неё не входит. мс/токен = 1000 / скорость.",
            "**Накладные расходы генерации**: мс/токен через API минус мс/токен tg128 у llama-bench — то, что "
            "путь обслуживания добавляет к каждому токену (сэмплирование по словарю Gemma в 262 144 токена, "
            "детокенизация, поток событий, Python). Следующая строка — доля самого запрета через `logit_bias`: "
            "llama-cpp-python применяет его на Python ко всему словарю, и тот же поток без `logit_bias` "
            "(рано оборвавшиеся потоки повторяются) на столько быстрее. Пользователь, не передающий "
            "`logit_bias`, за это не платит.",
            "**Время до первого токена**: от отправки запроса до первого фрагмента — для промпта в 512 токенов "
            "и для короткого промпта примерно в 20 токенов.",
            "**Потоки**: те же измерения через API с `N_THREADS` = `N_THREADS_BATCH` = 1 … N, где N — сколько "
            "разрешает `resources.available_cpus()`; автоматическое значение — то, что выбирает точка входа.",
            "**Переносимый вариант CPU**: llama-bench с вариантом CPU, который точка входа выбирает для этого "
            "процессора (`GGML_CPU_ALL_VARIANTS` из llama.cpp, сборка с `GGML_NATIVE=OFF`), против llama-bench, "
            "собранного с `-march=native` под эту самую машину (`GGML_NATIVE=ON`), из тех же исходников, в том же прогоне. "
            "На CPU с AMX родная сборка собирается без AMX (`-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`): код AMX "
            "этой версии llama.cpp падает с SIGILL на виртуальной машине Sapphire Rapids, как и его вариант "
            "`sapphirerapids` ([Варианты для CPU](#варианты-для-cpu)).",
            "**Холодный старт**: от запуска `entrypoint.py serve` до первого HTTP 200 от `/v1/models` против "
            "нового процесса `python`, который импортирует `llama_cpp` и загружает модель через "
            "`llama_cpp.Llama(path, n_ctx, n_threads)` из той же папки библиотек. Файл модели в обоих случаях "
            "уже в страничном кеше (холодный процесс, а не холодный диск). Строки с отступом делят время по "
            "моментам прихода строк вывода точки входа (`Serving ...`, `Started server process` от uvicorn — "
            "он пишет её после загрузки модели — и `Uvicorn running on`); для сравнения дано такое же деление "
            "у голой загрузки.",
            "**LOGITS_ALL**: обработка промпта через API с этой изменённой настройкой сервера llama-cpp-python — "
            "отношение к значению образа по умолчанию (false). Остальные настройки измерены на обоих движках и "
            "обеих тестовых моделях в разделе [Значения по умолчанию по измерениям]"
            "(#значения-по-умолчанию-по-измерениям).",
        ],
        "method": "Как измеряется",
        "method_text": (
            "Каждый повтор по кругу обходит варианты сервера и `llama-bench`, с каждым повтором начиная на одну "
            "позицию дальше. Каждый сервер запускается через `entrypoint.py serve` ровно как в образе (без сети, "
            "из кеша hub, заполненного `entrypoint.py pull`), получает один неучитываемый запрос, измеряется и "
            "останавливается: одновременно работает только один сервер, потому что даже простаивающая точка входа"
            " пять раз в секунду просыпается проверить свой сервер (около 1% одного CPU) и мешала бы замерам "
            "остальных. Каждый замер ждёт (не дольше 5 минут), пока другие задачи не станут занимать меньше 10% "
            "CPU, и повторяется (не больше 4 попыток, остаётся наименее искажённая), если они заняли больше, пока"
            " он шёл: на 2 ядрах даже короткая компиляция в разы замедляет потоки llama.cpp, которые ждут друг "
            "друга. Ожидание ограничено (40 минут на весь прогон), после этого каждый замер делается один раз, "
            "как есть. Доля CPU, занятая другими задачами, сохраняется с каждым замером (время CPU всей машины, "
            "включая steal, минус время бенчмарка, его серверов и llama-bench). Затем чередуются холодные старты "
            "и голые загрузки. У каждого ожидания есть предельный срок, все запущенные бенчмарком процессы в "
            "конце останавливаются. Все отдельные замеры — в файле JSON."),
    },
}

TARGET_VALUES = {  # target key -> (value in the summary, shortfall as text)
    "pp_ratio": (lambda s: s["pp_ratio"], lambda s, t: f"{t - s['pp_ratio']:.2f}"),
    "tg_overhead_ms": (lambda s: s["tg_overhead_ms"], lambda s, t: f"{s['tg_overhead_ms'] - t:.2f} ms"),
    "threads": (lambda s: min(s["threads_pp_ratio"], s["threads_tg_ratio"]),
                lambda s, t: f"{t - min(s['threads_pp_ratio'], s['threads_tg_ratio']):.2f}"),
    "portable": (lambda s: min(s["portable_pp_ratio"], s["portable_tg_ratio"]),
                 lambda s, t: f"{t - min(s['portable_pp_ratio'], s['portable_tg_ratio']):.2f}"),
    "cold_start": (lambda s: s["cold_extra_s"], lambda s, t: f"{s['cold_extra_s'] - t:.2f} s"),
}
TARGET_KEYS = {"threads": "threads", "portable": "portable", "cold_start": "cold_extra_s"}


def render(result: dict, rows: list, lang: str) -> str:
    """The page: intro with machine and date, command, table, targets, meanings, method."""
    from .performance_results import TARGETS
    text, s, m = TEXT[lang], result["summary"], result["machine"]
    intro = text["intro"].format(
        date=result["date"][:10], cpu=m["cpu"], cpus=m["cpus"], flags=", ".join(m["flags"]),
        missing=text["missing"].format(", ".join(m["missing_flags"])) if m["missing_flags"] else "",
        version=result["llama_cpp_python"], file=result["model"]["file"],
        mb=round(result["model"]["bytes"] / 1e6), n_ctx=result["n_ctx"], threads=result["threads"]["auto"],
        threads_why=result["threads"]["why"], level=result["cpu_variant"]["auto"], reps=result["reps"],
        load=", ".join(f"{x:.1f}" for x in result["load_average"]), others=result["others_median"])
    verdict = {True: text["met"], False: text["missed"]}
    table = [text["header"]] + [f"| {label[lang]} | {value} | {f'{t[0]} {verdict[t[1]]}' if t else ''} |"
                                for label, value, t in rows]
    targets = []
    for key, line in text["target_lines"].items():
        value, shortfall = TARGET_VALUES[key]
        limit = TARGETS[TARGET_KEYS.get(key, key)]
        met = text["met"] if s["met"][key] else text["missed_by"].format(shortfall(s, limit))
        targets.append(f"- {line.format(t=limit, v=value(s), m=met)}")
    parts = [text["nav"], f"# {text['title']}", intro, text["command"],
             f"```sh\n{result['command']}\n```", f"## {text['results']}", "\n".join(table),
             f"## {text['targets']}", "\n".join(targets), f"## {text['meaning']}",
             "\n".join(f"- {item}" for item in text["meaning_items"]), f"## {text['method']}",
             text["method_text"]]
    return "\n\n".join(parts) + "\n"


def split_sections(page: str) -> tuple[str, list[tuple[str, str]]]:
    """A page split at its level-2 headings (outside code blocks): the text before the
    first, and (heading line, whole section) for each."""
    head, found, fenced = "", [], False
    for line in page.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        if line.startswith("## ") and not fenced:
            found.append([line.strip(), line])
        elif found:
            found[-1][1] += line
        else:
            head += line
    return head, [(heading, text) for heading, text in found]


def merge_page(old: str, new: str) -> str:
    """The page `old` with what a benchmark wrote (`new`): its sections in place of those
    with the same heading, its other sections at the end, and its top (title, intro) when
    it has one. Each benchmark writes its own sections and keeps the others' (a section
    no benchmark writes any more stays until deleted by hand)."""
    old_head, old_sections = split_sections(old)
    new_head, new_sections = split_sections(new)
    fresh = dict(new_sections)
    parts = [new_head if new_head.strip() else old_head,
             *(fresh.pop(heading, text) for heading, text in old_sections), *fresh.values()]
    return "\n\n".join(part.strip("\n") for part in parts if part.strip()) + "\n"


def write_docs(render: Callable[[str], str]) -> None:
    """Merge the sections `render(lang)` gives into docs/{en,ru}/performance.md: the one way
    every benchmark writes its part of the page."""
    for lang in ("en", "ru"):
        path = ROOT / "docs" / lang / "performance.md"
        path.write_text(merge_page(path.read_text() if path.exists() else "", render(lang)))
        log(f"wrote {path}")
