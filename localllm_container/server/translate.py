"""Today's OpenAI requests as llama-cpp-python 0.3.36's server can run them.

The server implements the chat API of early 2024. The openai and LangChain clients
of today send `max_completion_tokens`, `response_format: json_schema`, `developer`
messages, content as a list of text parts, `stream_options`, `n`, `tool_choice:
required`. Each is translated here into what the server has (`translate`); what has
no equivalent gets a 400 that names the field and says what would work, never a
silently different answer (docs/*/compatibility.md lists every case).

JSON only: it never touches llama-cpp-python or the ASGI plumbing (guard). What it
needs to know of the served model comes in through the `Served` protocol.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol


MAX_CHOICES = 8  # n above this would hold a CPU server for n answers' time: ask again instead
# Accepted and ignored: they steer OpenAI's own platform (storage, billing tiers, reasoning
# models), not a local model. (`user` is the server's own field, which it ignores too.)
IGNORED_FIELDS = ("metadata", "store", "reasoning_effort", "service_tier", "prediction")
TEXT_PART_TYPES = ("text", "refusal")  # a refusal part (an assistant turn) is text too
# OpenAI's API has no repetition penalty (frequency_penalty and presence_penalty are 0 unless
# sent), nor has llama-server by default; llama-cpp-python's server applies 1.1 unless told,
# which also costs 1.4 ms a token over Gemma's 262k-token vocabulary (docs/*/performance.md).
# A request that sends repeat_penalty gets what it sends.
REPEAT_PENALTY = 1.0


class BadRequest(Exception):
    """A request the model server must not run: answered with `status` and an
    OpenAI-style error naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> bytes:
        return json.dumps({"error": {"message": str(self), "type": "invalid_request_error",
                                     "param": self.param, "code": None}}).encode()


class Served(Protocol):
    """What the translation needs to know of the model being served."""

    def tools_in_prompt(self) -> bool:
        """True when the chat format shows offered tools to the model (a GGUF template that reads `tools`)."""

    def reads_its_own_tool_calls(self) -> bool:
        """True for llama-cpp-python's function-calling formats, which return tool_calls themselves."""

    def schema_error(self, schema) -> str | None:
        """Why llama.cpp's JSON-schema grammar cannot follow `schema`, or None when it can."""


@dataclass
class Plan:
    """What the reply needs after the server has answered the translated request."""
    stream: bool = False
    choices: int = 1  # OpenAI's n: the server makes one per run
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    seed: int | None = None  # choice i runs with seed + i, so that n choices differ yet repeat
    tool_names: tuple[str, ...] = ()  # read tool calls out of the text, among these tools
    one_tool_call: bool = False  # parallel_tool_calls=false

    def body_for(self, choice: int, data: dict) -> dict:
        """The request body of one choice's run."""
        if choice == 0 or self.seed is None:
            return data
        return {**data, "seed": self.seed + choice}


def translate(path: str, data: dict, served: Served) -> tuple[dict, Plan]:
    """The request as the server can run it, and the plan for its reply; BadRequest for
    what it cannot run. `data` is a parsed JSON object; it is not changed."""
    data = dict(data)
    if path.endswith("/chat/completions"):
        return data, translate_chat(data, served)
    if path.endswith("/completions"):
        return data, translate_completion(data)
    return data, Plan()


def translate_common(data: dict) -> Plan:
    """stream_options, n and the repetition penalty, the same for chat and completions."""
    stream = data.get("stream") is True
    options = data.pop("stream_options", None)
    if options is not None and not stream:
        raise BadRequest("stream_options: only allowed with stream=true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options: expected an object such as {\"include_usage\": true}", "stream_options")
    choices = data.pop("n", None)
    choices = 1 if choices is None else choices
    if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= MAX_CHOICES:
        raise BadRequest(f"n: expected a whole number from 1 to {MAX_CHOICES} on this server, got {choices!r} "
                         "(each choice is generated in turn; for more, send the request again)", "n")
    data.setdefault("repeat_penalty", REPEAT_PENALTY)
    seed = data.get("seed")
    return Plan(stream=stream, choices=choices, include_usage=bool((options or {}).get("include_usage")),
                seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None)


def translate_completion(data: dict) -> Plan:
    plan = translate_common(data)
    suffix = data.pop("suffix", None)
    if suffix:  # "" and null mean no suffix
        raise BadRequest("suffix: this server does not fill in the middle (llama-cpp-python 0.3.36 sends no "
                         "infill tokens); send the text before the gap as the prompt, without suffix", "suffix")
    best_of = data.pop("best_of", None)
    if best_of is not None and best_of != plan.choices:
        raise BadRequest(f"best_of: this server does not rank candidates, so best_of must equal n ({plan.choices}) "
                         f"or be left out; got {best_of!r}", "best_of")
    return plan


def translate_chat(data: dict, served: Served) -> Plan:
    plan = translate_common(data)
    for name in IGNORED_FIELDS:
        data.pop(name, None)
    translate_token_limit(data)
    if "messages" not in data:  # as OpenAI; llama-cpp-python's default [] made a too long prompt a 500
        raise BadRequest("messages: required: the conversation, a list of messages", "messages")
    if isinstance(data["messages"], list):
        data["messages"] = [translate_message(i, message) for i, message in enumerate(data["messages"])]
    refuse_platform_features(data)
    translate_response_format(data, served)
    plan.tool_names = translate_tools(data, served)
    plan.one_tool_call = data.pop("parallel_tool_calls", None) is False
    if data.get("logprobs") is True and data.get("top_logprobs") is None:
        data["top_logprobs"] = 0  # OpenAI: logprobs alone gives each token's; the server needs a count
    return plan


def translate_token_limit(data: dict) -> None:
    """max_completion_tokens is today's name of max_tokens, which the server reads."""
    if data.get("max_completion_tokens") is None:
        data.pop("max_completion_tokens", None)
        return
    limit = data["max_completion_tokens"]
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise BadRequest(f"max_completion_tokens: expected a whole number of tokens, got {limit!r}",
                         "max_completion_tokens")
    if data.get("max_tokens") is not None:
        raise BadRequest("max_tokens and max_completion_tokens: set one, not both (max_completion_tokens is the "
                         "current name; max_tokens is deprecated for chat)", "max_tokens")
    data["max_tokens"] = data.pop("max_completion_tokens")


def translate_message(index: int, message):
    """developer is today's name of system; content given as parts becomes the text of its
    parts; an assistant turn without content (one that only called tools, sent with null or
    no content) gets empty content, which the chat formats read; any other turn needs content."""
    if not isinstance(message, dict):
        return message
    message = dict(message)
    if message.get("role") == "developer":
        message["role"] = "system"
    if message.get("role") == "assistant" and message.get("content") is None:
        message["content"] = ""
    content = message.get("content")
    if content is None:  # else a template writes "None" or fails (a 500), as OpenAI answers 400
        raise BadRequest(f"messages.{index}.content: a {message.get('role') or 'message'} message needs "
                         "content: a string or a list of text parts", f"messages.{index}.content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PART_TYPES:
                raise BadRequest(f"messages.{index}.content.{j}: this server serves a text-only model and cannot "
                                 f"read a part of type {kind or type(part).__name__!r}; send text parts (or the "
                                 "content as a string)", f"messages.{index}.content.{j}.type")
            text = part.get(kind)
            if not isinstance(text, str):
                raise BadRequest(f"messages.{index}.content.{j}.{kind}: expected a string",
                                 f"messages.{index}.content.{j}.{kind}")
            texts.append(text)
        message["content"] = "\n".join(texts)
    return message


def refuse_platform_features(data: dict) -> None:
    """OpenAI's spoken answers and web search: a local text model has neither."""
    modalities = data.pop("modalities", None)
    if data.pop("audio", None) is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise BadRequest("modalities: this server answers in text only; leave out audio and modalities "
                         "(or send [\"text\"])", "modalities")
    if data.pop("web_search_options", None) is not None:
        raise BadRequest("web_search_options: this server cannot search the web; leave it out and put what the "
                         "model needs to know in the messages", "web_search_options")


def translate_response_format(data: dict, served: Served) -> None:
    """json_schema becomes the server's schema-constrained json_object; a schema llama.cpp's
    grammar cannot follow is refused (the server would quietly fall back to any JSON)."""
    response_format = data.get("response_format")
    if not isinstance(response_format, dict):
        return
    if response_format.get("type") == "text":
        data.pop("response_format")
    elif response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("response_format.json_schema: expected an object with a name and a schema",
                             "response_format.json_schema")
        schema = spec.get("schema")
        data["response_format"] = {"type": "json_object"} if schema is None else \
            {"type": "json_object", "schema": checked_schema(schema, served, "response_format.json_schema.schema")}


def checked_schema(schema, served: Served, param: str):
    problem = served.schema_error(schema)
    if problem:
        raise BadRequest(f"{param}: llama.cpp's JSON-schema grammar cannot follow this schema ({problem}); "
                         "simplify it (plain objects, arrays, enums, strings, numbers)", param)
    return schema


def translate_tools(data: dict, served: Served) -> tuple[str, ...]:
    """tool_choice as the server runs it; returns the tools whose calls must be read out of
    the reply's text (auto on a template that shows tools, required with several tools)."""
    tools = data.get("tools")
    if not tools or data.get("functions") is not None or not isinstance(tools, list):
        return ()
    names = tuple(tool["function"]["name"] for tool in tools
                  if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
                  and isinstance(tool["function"].get("name"), str))
    if len(names) != len(tools):
        return ()  # malformed: validation names the field
    choice = data.get("tool_choice")
    if choice is None or choice == "auto":
        if served.reads_its_own_tool_calls():
            return ()
        if not served.tools_in_prompt():
            raise BadRequest("tools: this model's chat format does not show tools to the model, so with tool_choice "
                             "auto it would never call one; name the tool to call in tool_choice "
                             "({\"type\": \"function\", \"function\": {\"name\": ...}}), or serve a model whose GGUF "
                             "chat template supports tools", "tools")
        return names
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        if choice["function"].get("name") in names:  # one not offered: check_forced_function names it
            check_parameters(tools, names.index(choice["function"]["name"]), served)
        return ()
    if choice == "required":
        if len(tools) == 1:
            data["tool_choice"] = {"type": "function", "function": {"name": names[0]}}
            check_parameters(tools, 0, served)
            return ()
        if data.get("response_format") is not None:
            raise BadRequest("response_format: cannot be combined with tool_choice required (the reply is a tool "
                             "call)", "response_format")
        # One call among several tools: a JSON object {"name", "arguments"} the grammar holds to
        # the offered tools, read back as a tool call.
        data["response_format"] = {"type": "json_object", "schema": checked_schema(
            {"anyOf": [call_schema(tool["function"]) for tool in tools]}, served, "tools")}
        data.pop("tool_choice")
        return names
    return ()


def check_parameters(tools: list, index: int, served: Served) -> None:
    """A forced call's arguments follow the tool's schema; llama-cpp-python would fall back to any JSON."""
    checked_schema(tools[index]["function"].get("parameters") or {}, served, f"tools.{index}.function.parameters")


def call_schema(function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"]}
