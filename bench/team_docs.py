"""The section "Team workload: both engines" of docs/{en,ru}/performance.md from a
bench/team.py result: the prose in both languages lives here, the figures come from the
run. bench.team prints the English one and writes both with performance_docs.write_docs.
"""
from __future__ import annotations

import re

from .team import TARGETS

TEXT = {
    "en": {
        "title": "Team workload: both engines",
        "intro": ("Measured with `bench/team.py` on {date} on **{cpu}** ({cpus} CPUs; flags that matter: "
                  "{flags}{missing}), llama-cpp-python {version}; both engines started by `entrypoint.py serve` "
                  "(`ENGINE=localllm`, `ENGINE=llama-server`) on the same model file, with the same threads "
                  "({threads}: {threads_why}) and CPU variant `{level}`, N_CTX {n_ctx} per conversation; llama-server with "
                  "PARALLEL {parallel} ({slots} slots). {users} users start together; each asks {turns} questions in "
                  "turn, sending the whole conversation (the team's notes, about 600 tokens, opening the first "
                  "question, then the questions and answers so far; {context} tokens at the first question) as a chat UI does, and asks the next "
                  "as soon as the answer is in. Every answer is {answer} tokens (end of generation banned through "
                  "`logit_bias`, temperature 0), so both engines do the same work. Medians of {reps} runs per engine "
                  "and model, the engines alternating; {minutes:.0f} minutes in all{nice}. Load average during the run: "
                  "{load} on {cpus} CPUs; other jobs used a median {others:.0%} of the CPUs during the team runs. The "
                  "machine is shared: the ratios within the run count, not the absolute values."),
        "missing": "; absent: {}",
        "nice": ", the benchmark, its servers and llama-bench at niceness {}, so that the machine's other jobs "
                "disturbed them less",
        "command": "To repeat (llama-server built by `./tests/run`; the models and llama-bench are cached in "
                   "`~/.cache/localllm-bench`):",
        "models": {"base": "Gemma 3 270M base, CHAT_FORMAT=gemma",
                   "template": "Gemma 3 270M with a chat template of its own (in the GGUF)"},
        "threads_set": "set; automatic would be {}", "threads_auto": "automatic, {}", "automatic": "automatic",
        "team_header": "| Figure | localllm | llama-server | llama-server / localllm | Target |\n|---|---|---|---|---|",
        "single": "One user alone",
        "single_intro": ("{label}, threads: {threads}, one request at a time on a freshly started server: "
                         "prompt processing of {pp} tokens and generation of {tg} tokens, against llama.cpp's own "
                         "`llama-bench` pp{pp} / tg{tg} (flash attention auto, its default and llama-server's) "
                         "built from the same llama.cpp sources and run on the same CPU variant, between the two engines "
                         "in each repetition. In parentheses: the ratio to llama-bench (the median of the "
                         "repetitions' ratios)."),
        "single_header": ("| Figure | llama-bench | llama-server, own timings | llama-server, client | "
                          "localllm, client | Target |\n|---|---|---|---|---|---|"),
        "met": "met", "missed": "missed",
        "meaning": "What the figures mean",
        "meaning_items": [
            "**Time to first token**: from sending a question to the first streamed piece of answer text, over "
            "every question of every user (median and 95th percentile, nearest rank); per question: the mean over "
            "the users of their 1st, 2nd, 3rd question. A later question carries a longer conversation; an engine "
            "that reuses the conversation's earlier prompt only processes what is new.",
            "**Latency**: from sending to the end of the streamed answer.",
            "**Generated tokens/s, all users together**: the answers' tokens (`usage.completion_tokens`) divided by "
            "the time from the start of the users to the last answer.",
            "**Prompt tokens**: `usage.prompt_tokens` of each question, mean over the users: the same on both engines "
            "when both build the same prompt. The notes open the first question rather than a system message: "
            "llama-cpp-python's `gemma` chat format (the localllm engine with `CHAT_FORMAT=gemma`) drops system "
            "messages, llama-server's `gemma` template keeps them.",
            "**Failed; truncated**: a failure is an error the client raised (HTTP or connection); a truncated answer "
            "came without `finish_reason` `length` or with fewer tokens than asked. Summed over all runs.",
            "**One user, own timings**: llama-server's `timings` in its reply (`prompt_per_second` of a prompt of "
            "exactly {pp} token ids, `predicted_per_second` of {tg} tokens): what llama.cpp does inside the "
            "server. **Client**: as a client sees it, streamed: {pp} divided by the time to the first chunk, and the "
            "rate between the first and the last token (as `bench/performance.py` measures the localllm engine).",
        ],
        "method": "How it is measured",
        "method_text": (
            "Each model is pulled by the real `entrypoint.py pull` from `testkit`'s hub stand-in into a hub cache "
            "of its own and served offline. Each repetition measures one user alone on the first model (a server "
            "with localllm, then llama-bench, then a server with llama-server), then the team on each model, "
            "localllm then llama-server. One server runs at a time: started, asked one short unmeasured "
            "question, measured and stopped. Each user is an `openai.AsyncOpenAI` client of its own with the "
            "openai package's default keep-alive connection pool and `max_retries=0`, streaming "
            "`chat.completions` with `stream_options.include_usage`. Each figure is the median of the "
            "repetitions; each ratio is the median of the repetitions' ratios, each between runs made one after "
            "the other, so that a machine that gets slower or faster during the run does not move it. On a "
            "shared machine `--threads` and `--nice` keep other jobs from deciding the result: llama.cpp's "
            "threads wait for each other at every step of a token, so when other jobs hold the CPUs, two threads "
            "on two CPUs lose much of their time waiting for each other. The share of the "
            "CPUs that other jobs used is kept with each run in the JSON file, with every answer's figures."),
        "rows": {
            "ttft_p50": "Median time to first token (s)",
            "ttft_p95": "p95 time to first token (s)",
            "ttft_turns": "Mean first token, question {} (s)",
            "turn3": "3rd question's first token / 2nd's",
            "latency_p50": "Median latency (s)",
            "latency_p95": "p95 latency (s)",
            "tokens_per_s": "Generated tokens/s, all users together",
            "prompt_tokens": "Prompt tokens, question {}",
            "lost": "Failed; truncated answers (sum over {} runs)",
            "wall": "Duration of a run (s)",
            "pp": "Prompt processing, {} tokens (tokens/s)",
            "tg": "Generation, {} tokens (tokens/s)",
        },
    },
    "ru": {
        "title": "Командная нагрузка: оба движка",
        "intro": ("Измерено скриптом `bench/team.py` {date} на **{cpu}** ({cpus} CPU; важные флаги: "
                  "{flags}{missing}), llama-cpp-python {version}; оба движка запущены через `entrypoint.py serve` "
                  "(`ENGINE=localllm`, `ENGINE=llama-server`) на одном файле модели, с одинаковым числом потоков "
                  "({threads}: {threads_why}) и вариантом CPU `{level}`, N_CTX {n_ctx} на разговор; у llama-server "
                  "PARALLEL {parallel} (слотов: {slots}). Пользователи (их {users}) начинают одновременно; каждый задаёт по "
                  "очереди вопросы (всего {turns}) и каждый раз отправляет весь разговор (заметки команды, около 600 "
                  "токенов, в начале первого вопроса, затем прежние вопросы и ответы; в первом вопросе токенов: "
                  "{context}), как "
                  "делает чат-интерфейс, а следующий вопрос задаёт сразу после ответа. Каждый ответ — {answer} токенов "
                  "(конец генерации запрещён через `logit_bias`, temperature 0), так что оба движка делают одну "
                  "и ту же работу. Медианы по {reps} прогонам на движок и модель, движки чередуются; всего "
                  "{minutes:.0f} мин{nice}. Load average во время прогона: {load} на {cpus} CPU; во время командных "
                  "прогонов другие задачи занимали (медиана) {others:.0%} CPU. Машина общая: значение имеют "
                  "отношения внутри прогона, а не абсолютные значения."),
        "missing": "; нет: {}",
        "nice": ", бенчмарк, его серверы и llama-bench с niceness {}, чтобы другие задачи на машине меньше им "
                "мешали",
        "command": "Как повторить (llama-server собирает `./tests/run`; модели и llama-bench кешируются в "
                   "`~/.cache/localllm-bench`):",
        "models": {"base": "Gemma 3 270M base, CHAT_FORMAT=gemma",
                   "template": "Gemma 3 270M со своим шаблоном чата (в GGUF)"},
        "threads_set": "задано; автоматически было бы {}", "threads_auto": "автоматически, {}",
        "automatic": "автоматически",
        "team_header": "| Показатель | localllm | llama-server | llama-server / localllm | Цель |\n|---|---|---|---|---|",
        "single": "Один пользователь",
        "single_intro": ("{label}, потоков: {threads}, по одному запросу на только что запущенном сервере: "
                         "обработка промпта в {pp} токенов и генерация {tg} токенов против собственного бенчмарка "
                         "llama.cpp `llama-bench` pp{pp} / tg{tg} (flash attention auto — его значение по умолчанию "
                         "и значение llama-server), собранного из тех же исходников llama.cpp и работающего на том же "
                         "варианте CPU; в каждом повторе он запускается между двумя движками. В скобках — отношение к llama-bench "
                         "(медиана отношений по повторам)."),
        "single_header": ("| Показатель | llama-bench | llama-server, свои timings | llama-server, клиент | "
                          "localllm, клиент | Цель |\n|---|---|---|---|---|---|"),
        "met": "выполнено", "missed": "не выполнено",
        "meaning": "Что означают цифры",
        "meaning_items": [
            "**Время до первого токена**: от отправки вопроса до первого фрагмента текста ответа в потоке, по всем "
            "вопросам всех пользователей (медиана и 95-й процентиль по ближайшему рангу); по вопросам — среднее "
            "по пользователям для их 1-го, 2-го, 3-го вопроса. Более поздний вопрос несёт более длинный разговор; "
            "движок, который переиспользует прежний промпт разговора, обрабатывает только новое.",
            "**Задержка**: от отправки до конца потокового ответа.",
            "**Токенов/с всех пользователей вместе**: токены ответов (`usage.completion_tokens`), делённые на время "
            "от старта пользователей до последнего ответа.",
            "**Токены промпта**: `usage.prompt_tokens` каждого вопроса, среднее по пользователям; на обоих движках "
            "одинаковы, когда оба строят один и тот же промпт. Заметки стоят в начале первого вопроса, а не в "
            "системном сообщении: формат чата `gemma` у llama-cpp-python (движок localllm с `CHAT_FORMAT=gemma`) "
            "отбрасывает системные сообщения, а шаблон `gemma` у llama-server их сохраняет.",
            "**Ошибки; обрезанные**: ошибка — исключение клиента (HTTP или соединение); обрезанный ответ пришёл без "
            "`finish_reason` `length` или с меньшим числом токенов, чем запрошено. Сумма по всем прогонам.",
            "**Один пользователь, свои timings**: поле `timings` в ответе llama-server (`prompt_per_second` для "
            "промпта ровно из {pp} id токенов, `predicted_per_second` для {tg} токенов) — то, что делает llama.cpp "
            "внутри сервера. **Клиент**: как видит клиент, потоком: {pp}, делённое на время до первого фрагмента, и "
            "скорость между первым и последним токеном (так `bench/performance.py` измеряет движок localllm).",
        ],
        "method": "Как измеряется",
        "method_text": (
            "Каждая модель скачивается настоящим `entrypoint.py pull` с заменителя hub из `testkit` в собственный "
            "кеш hub и обслуживается без сети. Каждый повтор измеряет одного пользователя на первой модели "
            "(сервер с localllm, затем llama-bench, затем сервер с llama-server), затем команду на каждой модели: "
            "сначала localllm, затем llama-server. Одновременно работает один сервер: запускается, получает один "
            "короткий неучитываемый вопрос, измеряется и останавливается. Каждый пользователь — собственный "
            "клиент `openai.AsyncOpenAI` с пулом keep-alive соединений пакета openai по умолчанию и "
            "`max_retries=0`, потоковые `chat.completions` с `stream_options.include_usage`. Каждая цифра — "
            "медиана по повторам; каждое отношение — медиана отношений по повторам, каждое между прогонами, "
            "сделанными друг за другом, чтобы машина, которая по ходу прогона становится медленнее или быстрее, "
            "его не сдвигала. На общей машине `--threads` и `--nice` не дают другим задачам решать исход: потоки "
            "llama.cpp на каждом шаге токена ждут друг друга, и когда CPU заняты другими задачами, два потока на "
            "двух CPU теряют много времени на ожидание друг друга. Доля CPU, занятая другими "
            "задачами, сохраняется с каждым прогоном в файле JSON вместе с цифрами каждого ответа."),
        "rows": {
            "ttft_p50": "Медиана времени до первого токена (с)",
            "ttft_p95": "p95 времени до первого токена (с)",
            "ttft_turns": "Среднее время до первого токена, вопрос {} (с)",
            "turn3": "Первый токен 3-го вопроса / 2-го",
            "latency_p50": "Медиана задержки (с)",
            "latency_p95": "p95 задержки (с)",
            "tokens_per_s": "Токенов/с, все пользователи вместе",
            "prompt_tokens": "Токенов промпта, вопрос {}",
            "lost": "Ошибки; обрезанные ответы (сумма по прогонам: {})",
            "wall": "Длительность прогона (с)",
            "pp": "Обработка промпта, {} токенов (токенов/с)",
            "tg": "Генерация, {} токенов (токенов/с)",
        },
    },
}


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def team_rows(s: dict, turns: int, reps: int, lang: str) -> list[str]:
    """Table lines for one model: figure, localllm, llama-server, ratio, target."""
    text, t = TEXT[lang], TARGETS
    labels, local, server, ratio, met = text["rows"], s["localllm"], s["llama-server"], s["ratio"], s["met"]
    verdict = {True: text["met"], False: text["missed"]}

    def row(label, key=None, digits=2, target="", values=None):
        lv, sv, r = values or (_num(local[key], digits), _num(server[key], digits), _num(ratio.get(key)))
        return f"| {label} | {lv} | {sv} | {r} | {target} |"

    lines = [row(labels["ttft_p50"], "ttft_p50_s", target=f"≤ {t['ttft_ratio']:.2f} {verdict[met['ttft_ratio']]}"),
             row(labels["ttft_p95"], "ttft_p95_s")]
    lines += [row(labels["ttft_turns"].format(k), f"ttft_turn{k}_s") for k in range(1, turns + 1)]
    if "turn3_over_turn2" in met:
        lines.append(row(labels["turn3"], values=(_num(local["turn3_over_turn2"]), _num(server["turn3_over_turn2"]), ""),
                         target=f"llama-server ≤ {t['turn3_over_turn2']:.1f} {verdict[met['turn3_over_turn2']]}"))
    lines += [row(labels["latency_p50"], "latency_p50_s"), row(labels["latency_p95"], "latency_p95_s"),
              row(labels["tokens_per_s"], "tokens_per_s", 1,
                  target=f"≥ {t['tokens_per_s_ratio']:.1f} {verdict[met['tokens_per_s_ratio']]}")]
    lines += [row(labels["prompt_tokens"].format(k), values=(_num(local[f"prompt_tokens_turn{k}"], 0),
                                                             _num(server[f"prompt_tokens_turn{k}"], 0), ""))
              for k in range(1, turns + 1)]
    lines += [row(labels["lost"].format(reps), values=(f"{local['failed']}; {local['truncated']}",
                                                       f"{server['failed']}; {server['truncated']}", ""),
                  target=f"llama-server 0; 0 {verdict[met['no_loss']]}"),
              row(labels["wall"], "wall_s", 1)]
    return [text["team_header"], *lines]


def single_rows(s: dict, pp: int, tg: int, lang: str) -> list[str]:
    text, t = TEXT[lang], TARGETS
    lb, local, server, ratio, met = s["llama-bench"], s["localllm"], s["llama-server"], s["ratio"], s["met"]
    verdict = {True: text["met"], False: text["missed"]}
    lines = []
    for kind, label, bench in (("pp", text["rows"]["pp"].format(pp), lb["pp512_fa_auto_tps"]),
                               ("tg", text["rows"]["tg"].format(tg), lb["tg128_fa_auto_tps"])):
        digits = 0 if kind == "pp" else 1
        cells = [_num(bench, digits),
                 f"{_num(server[f'own_{kind}_tps'], digits)} ({ratio[f'own_{kind}']:.2f})",
                 f"{_num(server[f'{kind}_tps'], digits)} ({ratio[f'api_{kind}']:.2f})",
                 f"{_num(local[f'{kind}_tps'], digits)} ({ratio[f'localllm_{kind}']:.2f})",
                 f"llama-server ≥ {t['single_ratio']:.2f} {verdict[met[f'own_{kind}']]}"]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return [text["single_header"], *lines]


def render_section(result: dict, lang: str) -> str:
    """The section: intro (machine, date, workload), command, a table per model, one user alone,
    meanings, method."""
    from .performance import PP_TOKENS, TG_TOKENS
    text, m, w, s = TEXT[lang], result["machine"], result["workload"], result["summary"]
    first = next(iter(s["team"].values()))
    slots = result["serving"][f"{next(iter(s['team']))} llama-server"]  # the entrypoint's `Serving ...` line
    intro = text["intro"].format(
        date=result["date"][:10], cpu=m["cpu"], cpus=m["cpus"], flags=", ".join(m["flags"]),
        missing=text["missing"].format(", ".join(m["missing_flags"])) if m["missing_flags"] else "",
        version=result["llama_cpp_python"], threads=result["threads"]["used"],
        threads_why=(text["threads_set"].format(result["threads"]["auto"]) if result["threads"]["set"]
                     else text["threads_auto"].format(result["threads"]["why"])), level=result["cpu_variant"]["auto"], n_ctx=result["n_ctx"],
        parallel=text["automatic"] if w["parallel"] == "automatic" else w["parallel"],
        slots=re.search(r"in each of (\d+) slots", slots)[1],
        users=w["users"], turns=w["turns"], context=round(first["llama-server"]["prompt_tokens_turn1"]),
        answer=w["answer_tokens"], reps=w["reps"], minutes=result["minutes"],
        load=", ".join(f"{x:.1f}" for x in result["load_average"]), others=result["others_median"],
        nice=text["nice"].format(w["nice"]) if w.get("nice") else "")
    parts = [f"## {text['title']}", intro, text["command"], f"```sh\n{result['command']}\n```"]
    for key, figures in s["team"].items():
        parts += [f"### {text['models'][key]}",
                  "\n".join(team_rows(figures, w["turns"], w["reps"], lang))]
    if "single" in s:
        label = text["models"][next(iter(result["models"]))]
        parts += [f"### {text['single']}", text["single_intro"].format(label=label, threads=result["threads"]["used"],
                                                                        pp=PP_TOKENS, tg=TG_TOKENS),
                  "\n".join(single_rows(s["single"], PP_TOKENS, TG_TOKENS, lang))]
    parts += [f"### {text['meaning']}",
              "\n".join(f"- {item.format(pp=PP_TOKENS, tg=TG_TOKENS)}" for item in text["meaning_items"]),
              f"### {text['method']}", text["method_text"]]
    return "\n\n".join(parts) + "\n"
