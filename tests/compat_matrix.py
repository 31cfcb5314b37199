"""The OpenAI compatibility matrix: one row per request today's clients send, what OpenAI
documents for it, and what each engine answered in the last run of
tests/test_openai_compat.py (which records every row it checks, per engine: "works", the
error the server answered, or a 200 that differs from OpenAI's, described in NOTES).

The tables in docs/en/compatibility.md and docs/ru/compatibility.md are made from that
record, never by hand: after a run, `python tests/compat_matrix.py` rewrites them, and
the run's last test fails while they differ from what it saw.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"en": ROOT / "docs/en/compatibility.md", "ru": ROOT / "docs/ru/compatibility.md"}
BEGIN, END = "<!-- matrix: made by tests/compat_matrix.py from the test run -->", "<!-- end of matrix -->"
ENGINES = ("localllm", "llama-server")

# id: ((request, what OpenAI documents) in English, the same in Russian)
ROWS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "max_completion_tokens": (
        ("`max_completion_tokens=5`", "at most 5 tokens"),
        ("`max_completion_tokens=5`", "не больше 5 токенов")),
    "max_tokens_and_max_completion_tokens": (
        ("`max_tokens` and `max_completion_tokens` together", "400: set one"),
        ("`max_tokens` и `max_completion_tokens` вместе", "400: нужен один из них")),
    "parse": (
        ("`chat.completions.parse(response_format=PydanticModel)`", "JSON that follows the schema, parsed"),
        ("`chat.completions.parse(response_format=PydanticModel)`", "JSON по схеме, разобранный клиентом")),
    "json_schema_strict": (
        ("`response_format: json_schema` with `strict: true`", "JSON that follows the schema"),
        ("`response_format: json_schema` со `strict: true`", "JSON по схеме")),
    "json_schema_unsupported": (
        ("`json_schema` with a schema llama.cpp's grammar cannot follow", "(OpenAI: a 400 for unsupported schemas)"),
        ("`json_schema` со схемой, которую грамматика llama.cpp не выражает", "(OpenAI: 400 для неподдерживаемых схем)")),
    "json_object": (
        ("`response_format: json_object`", "a JSON object"),
        ("`response_format: json_object`", "JSON-объект")),
    "include_usage": (
        ("`stream_options={\"include_usage\": true}`", "a last chunk with the usage"),
        ("`stream_options={\"include_usage\": true}`", "последний чанк с usage")),
    "usage_equals_streamed": (
        ("streamed `usage`", "counts equal to the tokens streamed"),
        ("`usage` в потоке", "равен числу переданных токенов")),
    "developer_message": (
        ("a `developer` message", "instructions, as `system`"),
        ("сообщение `developer`", "инструкции, как `system`")),
    "text_parts": (
        ("content as a list of text parts", "the same as the text as a string"),
        ("content списком текстовых частей", "то же, что текст строкой")),
    "image_part": (
        ("an `image_url` part", "read by a vision model"),
        ("часть `image_url`", "читается моделью со зрением")),
    "audio_part": (
        ("an `input_audio` part", "read by an audio model"),
        ("часть `input_audio`", "читается аудиомоделью")),
    "audio_output": (
        ("`modalities=[\"text\", \"audio\"]`, `audio`", "a spoken answer"),
        ("`modalities=[\"text\", \"audio\"]`, `audio`", "ответ голосом")),
    "web_search": (
        ("`web_search_options`", "an answer from a web search"),
        ("`web_search_options`", "ответ с поиском в интернете")),
    "n": (
        ("`n=2` (also streamed)", "two choices"),
        ("`n=2` (и в потоке)", "два варианта ответа")),
    "seed": (
        ("`seed` twice, `temperature=1`", "the same answer (best effort)"),
        ("`seed` дважды, `temperature=1`", "тот же ответ (по возможности)")),
    "stop": (
        ("`stop` as a string and as a list", "ends before the stop text, `finish_reason: stop`"),
        ("`stop` строкой и списком", "конец перед стоп-текстом, `finish_reason: stop`")),
    "logprobs_off": (
        ("`logprobs`, `top_logprobs` (server with `LOGITS_ALL=false`, the default)", "log probabilities"),
        ("`logprobs`, `top_logprobs` (сервер с `LOGITS_ALL=false`, по умолчанию)", "логарифмы вероятностей")),
    "logprobs_on": (
        ("`logprobs`, `top_logprobs` (server with `LOGITS_ALL=true`)", "log probabilities"),
        ("`logprobs`, `top_logprobs` (сервер с `LOGITS_ALL=true`)", "логарифмы вероятностей")),
    "ignored_fields": (
        ("`user`, `metadata`, `store`, `parallel_tool_calls`, `reasoning_effort`", "accepted"),
        ("`user`, `metadata`, `store`, `parallel_tool_calls`, `reasoning_effort`", "принимаются")),
    "tool_named": (
        ("`tool_choice` naming a tool", "a call of that tool"),
        ("`tool_choice` с именем инструмента", "вызов этого инструмента")),
    "tool_required": (
        ("`tool_choice=\"required\"`, one tool and two tools", "a tool call"),
        ("`tool_choice=\"required\"`, один и два инструмента", "вызов инструмента")),
    "tool_auto_call": (
        ("`tool_choice=\"auto\"`, the model writes a call (also streamed)", "`tool_calls`"),
        ("`tool_choice=\"auto\"`, модель пишет вызов (и в потоке)", "`tool_calls`")),
    "tool_auto_text": (
        ("`tool_choice=\"auto\"`, the model answers in text", "`content`, no `tool_calls`"),
        ("`tool_choice=\"auto\"`, модель отвечает текстом", "`content` без `tool_calls`")),
    "tool_none": (
        ("`tool_choice=\"none\"`", "`content`, no `tool_calls`"),
        ("`tool_choice=\"none\"`", "`content` без `tool_calls`")),
    "tool_result": (
        ("a tool result round trip (`role: tool`)", "an answer that reads the result"),
        ("ответ инструмента (`role: tool`)", "ответ с учётом результата")),
    "tool_auto_template_without_tools": (
        ("tools with `tool_choice=\"auto\"`, a chat template without tools", "(the model sees the tools)"),
        ("инструменты с `tool_choice=\"auto\"`, шаблон чата без инструментов", "(модель видит инструменты)")),
    "tool_forced_template_without_tools": (
        ("named or `required` `tool_choice`, a chat template without tools", "a tool call"),
        ("`tool_choice` с именем или `required`, шаблон чата без инструментов", "вызов инструмента")),
    "finish_reason": (
        ("`finish_reason`", "`length`, `stop`, `tool_calls`"),
        ("`finish_reason`", "`length`, `stop`, `tool_calls`")),
    "reply_model": (
        ("the reply's `model`", "the model that answered"),
        ("`model` в ответе", "модель, которая ответила")),
    "completions_echo": (
        ("`/v1/completions` with `echo`", "the prompt, then the completion"),
        ("`/v1/completions` с `echo`", "промпт, затем продолжение")),
    "completions_suffix": (
        ("`/v1/completions` with `suffix`", "text to insert before the suffix"),
        ("`/v1/completions` с `suffix`", "вставка перед суффиксом")),
    "completions_best_of": (
        ("`/v1/completions` with `best_of=2`", "the best of 2 candidates"),
        ("`/v1/completions` с `best_of=2`", "лучший из 2 вариантов")),
    "langchain_structured_output": (
        ("LangChain `with_structured_output(PydanticModel)`", "a model instance"),
        ("LangChain `with_structured_output(PydanticModel)`", "экземпляр модели")),
    "langchain_bind_tools": (
        ("LangChain `bind_tools(..., tool_choice=...)`", "`tool_calls` on the message"),
        ("LangChain `bind_tools(..., tool_choice=...)`", "`tool_calls` в сообщении")),
    "client_leaves": (
        ("a client that gives up mid-answer (streamed or not)", "(the server stops generating)"),
        ("клиент уходит посреди ответа (с потоком и без)", "(сервер прекращает генерацию)")),
}
WORKS = {"en": "works", "ru": "работает"}
# A 200 that is not quite what OpenAI documents: what it is (English, Russian).
NOTES: dict[str, tuple[str, str]] = {
    "max_completion_tokens_read": (
        "200: both taken, `max_completion_tokens` is used",
        "200: принимаются оба, действует `max_completion_tokens`"),
    "json_whitespace": (
        "works; its grammar allows whitespace between the JSON's tokens, which a small model may fill up "
        "to the token limit (the test model, asked without an example answer, does)",
        "работает; грамматика разрешает пробелы между токенами JSON, и маленькая модель может заполнять их "
        "до лимита токенов (тестовая модель без примера ответа так и делает)"),
    "ignored_text": (
        "200: ignored, the answer is text",
        "200: поле не учитывается, ответ текстом"),
    "n_usage_per_choice": (
        "works, up to `PARALLEL` choices (more: 400); `usage` counts the first choice only, and a stream "
        "sends a usage chunk per choice",
        "работает, не больше `PARALLEL` вариантов (больше: 400); `usage` считает только первый вариант, "
        "а поток присылает чанк с usage для каждого варианта"),
    "logprobs_always": (
        "works: llama-server has no `LOGITS_ALL` and always gives log probabilities",
        "работает: у llama-server нет `LOGITS_ALL`, логарифмы вероятностей есть всегда"),
    "logits_all_refused": (
        "`LOGITS_ALL` (a setting of llama-cpp-python's server) stops the start with a one-line error; "
        "log probabilities need no setting",
        "`LOGITS_ALL` (настройка сервера llama-cpp-python) останавливает запуск с ошибкой в одну строку; "
        "логарифмам вероятностей настройка не нужна"),
    "tool_named_read_as_auto": (
        "200, read as `\"auto\"`: llama-server takes `tool_choice` as a string only (`none`, `auto`, "
        "`required`) and logs `Wrong type supplied for parameter 'tool_choice'`",
        "200, читается как `\"auto\"`: llama-server понимает `tool_choice` только строкой (`none`, `auto`, "
        "`required`) и пишет в лог `Wrong type supplied for parameter 'tool_choice'`"),
    "tool_required_text_first": (
        "a call, once the model starts one: the grammar lets text come first, so a model that does not "
        "start a call runs to the token limit without one",
        "вызов, когда модель его начинает: грамматика разрешает сначала текст, и модель, которая не "
        "начинает вызов, доходит до лимита токенов без него"),
    "tool_auto_template_form": (
        "works for calls written as the GGUF's template writes them (`<tool_call>` here); Llama 3's JSON "
        "and Mistral's `[TOOL_CALLS]` stay text",
        "работает для вызовов в той форме, в какой их пишет шаблон GGUF (здесь `<tool_call>`); JSON "
        "Llama 3 и `[TOOL_CALLS]` Mistral остаются текстом"),
    "tools_ignored": (
        "200, tools ignored: the prompt is the one without tools, and no call is read",
        "200, инструменты не учитываются: промпт тот же, что без них, вызовы не читаются"),
    "finish_after_a_call": (
        "`length`, `stop`; after a call, `tool_calls` only if the model ends its turn there: the grammar "
        "lets it write more calls (`parallel_tool_calls: false` too), and the test model does, up to "
        "`length`, the complete call read",
        "`length`, `stop`; после вызова `tool_calls`, только если модель на нём заканчивает ход: грамматика "
        "разрешает новые вызовы (и при `parallel_tool_calls: false`), и тестовая модель их пишет до "
        "`length`, полный вызов прочитан"),
    "completions_field_ignored": (
        "200: ignored, the completion of the prompt alone",
        "200: поле не учитывается, продолжение одного промпта"),
    "langchain_tools_as_written": (
        "a call when the model writes one, as `tool_choice=\"auto\"` (a named tool or `\"any\"` does not "
        "force it at once); none with a template that does not show tools",
        "вызов, когда модель его пишет, как при `tool_choice=\"auto\"` (имя инструмента или `\"any\"` не "
        "заставляют вызвать сразу); с шаблоном без инструментов вызовов нет"),
}


def results_path() -> Path:
    cache = Path(os.environ.get("LOCALLLM_TEST_CACHE", Path.home() / ".cache/localllm-tests"))
    return cache / "compat-matrix.json"


def outcome(result: dict, language: str) -> str:
    if result["status"] == 200:
        return NOTES[result["note"]][language == "ru"] if "note" in result else WORKS[language]
    param = f" `{result['param']}`" if result.get("param") else ""
    return f"{result['status']}{param}: {result['message']}"


def table(results: dict[str, dict[str, dict]], language: str) -> str:
    header = {"en": ("request", "OpenAI documents"), "ru": ("запрос", "по документации OpenAI")}[language]
    lines = [f"| {header[0]} | {header[1]} | " + " | ".join(f"`{engine}`" for engine in ENGINES) + " |",
             "|---|---|" + "---|" * len(ENGINES)]
    for row, texts in ROWS.items():
        request, documented = texts[0] if language == "en" else texts[1]
        cells = [outcome(results[engine][row], language) if row in results.get(engine, {}) else "not run"
                 for engine in ENGINES]
        lines.append(f"| {request} | {documented} | " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def rendered(text: str, results: dict, language: str) -> str:
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    return f"{before}{BEGIN}\n{table(results, language)}\n{END}{after}"


def stale_docs(results: dict) -> list[str]:
    """The docs whose matrix differs from `results`."""
    return [str(path.relative_to(ROOT)) for language, path in DOCS.items()
            if path.read_text() != rendered(path.read_text(), results, language)]


def write_docs(results: dict) -> None:
    for language, path in DOCS.items():
        path.write_text(rendered(path.read_text(), results, language))


if __name__ == "__main__":
    recorded = json.loads(results_path().read_text())
    write_docs(recorded)
    print(f"wrote the matrix of {results_path()} into " + ", ".join(str(path) for path in DOCS.values()),
          file=sys.stderr)
