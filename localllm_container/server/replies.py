"""The server's replies as OpenAI's clients read them: choices merged, usage counted,
and tool calls that the model wrote as text read back into `tool_calls`, streamed or
not. JSON only, like translate.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .translate import Plan

# How instruct models write a tool call in text, tried in this order (see ToolCallReader).
TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)  # Hermes, Qwen 2.5 and 3
MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"  # Mistral: a JSON list after this marker


@dataclass
class ToolCallReader:
    """Reads tool calls out of a reply's text, in the forms instruct models write them:
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen), `[TOOL_CALLS]
    [{...}]` (Mistral, the marker printed or not), or the whole reply one JSON object with
    "name" and "arguments" or "parameters" (Llama 3.x). Only calls of offered tools count;
    anything else stays text."""
    names: tuple[str, ...]
    one_only: bool = False

    def calls(self, text: str) -> tuple[str | None, list[dict]]:
        """The text before the calls (None when empty) and the calls, or (text, []) if none."""
        stripped = text.strip()
        found: list = []
        before = ""
        if "<tool_call>" in stripped:
            before, _, rest = stripped.partition("<tool_call>")
            found = [parse_json_or_none(body) for body in TOOL_CALL_TAG.findall("<tool_call>" + rest)]
        elif stripped.startswith(("{", "[")):  # a call, or a list of calls (Mistral's marker may be unprinted)
            value = parse_json_or_none(stripped.removeprefix(MISTRAL_TOOL_CALLS))
            found = value if isinstance(value, list) else [value]
        calls = [self.call(item) for item in found]
        if not calls or None in calls:
            return text, []
        return before.strip() or None, calls[:1] if self.one_only else calls

    def call(self, item) -> dict | None:
        if not isinstance(item, dict) or item.get("name") not in self.names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = parse_json_or_none(arguments)
        if not isinstance(arguments, dict):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolCallStream:
    """One streamed choice's text as it arrives: passed on at once, except from where a tool
    call may begin (a tag anywhere; a marker or `{` at the very start), which is held back
    until the end decides between tool calls and text."""
    TAGS = ("<tool_call>",)
    OPENINGS = ("{", "[")  # [TOOL_CALLS] too

    def __init__(self, reader: ToolCallReader):
        self.reader, self.held, self.said, self.calling = reader, "", False, False

    def feed(self, text: str) -> str:
        """The part of the text seen so far that can be sent now."""
        self.held += text
        if self.calling:
            return ""
        starts = [self.held.find(tag) for tag in self.TAGS if tag in self.held]
        if not self.said and self.held.lstrip().startswith(self.OPENINGS):
            starts.append(len(self.held) - len(self.held.lstrip()))
        if starts:
            self.calling = True
            return self.release(min(starts))
        keep = max((n for tag in self.TAGS for n in range(1, len(tag)) if self.held.endswith(tag[:n])), default=0)
        if not self.said and any(opening.startswith(self.held.lstrip()) for opening in self.OPENINGS):
            keep = len(self.held)
        return self.release(len(self.held) - keep)

    def release(self, upto: int) -> str:
        out, self.held = self.held[:upto], self.held[upto:]
        self.said = self.said or bool(out.strip())
        return out

    def end(self) -> tuple[str, list[dict]]:
        """What is left to send as text, and the tool calls read from what was held."""
        content, calls = self.reader.calls(self.held) if self.calling else (self.held, [])
        return (content or "") if calls else self.held, calls


def parse_json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class Reply:
    """The reply to a translated request, put together from the server's replies to its
    runs (one per choice): choice indexes, tool calls read out of text, the usage."""
    plan: Plan
    merged: dict | None = None  # the unstreamed reply so far
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    template: dict | None = None  # a chunk's id, object, created and model, for the chunks made here
    stream: ToolCallStream | None = None  # the streamed choice being read for tool calls
    reader: ToolCallReader | None = field(init=False)  # None when no tool calls are read from text

    def __post_init__(self) -> None:
        self.reader = ToolCallReader(self.plan.tool_names, self.plan.one_tool_call) if self.plan.tool_names else None

    @property
    def rewrites_chunks(self) -> bool:
        """False when the server's chunks go out as they are (but the [DONE] between choices)."""
        return self.plan.choices > 1 or bool(self.plan.tool_names)

    # unstreamed
    def add(self, choice: int, reply: dict) -> None:
        for item in reply.get("choices", []):
            item["index"] = choice
            message = item.get("message")
            if self.reader and isinstance(message, dict) and isinstance(message.get("content"), str):
                content, calls = self.reader.calls(message["content"])
                if calls:
                    message.update(content=content, tool_calls=calls)
                    item["finish_reason"] = "tool_calls"
        usage = reply.get("usage")
        if self.merged is None:
            self.merged = reply
        else:
            self.merged["choices"].extend(reply.get("choices", []))
            if usage and self.merged.get("usage"):
                self.merged["usage"]["completion_tokens"] += usage["completion_tokens"]
                self.merged["usage"]["total_tokens"] += usage["completion_tokens"]

    # streamed
    def chunk(self, choice: int, chunk: dict) -> list[dict]:
        """The chunks to send for one chunk of the server's stream of choice `choice`."""
        self.template = self.template or {key: chunk[key] for key in ("id", "object", "created", "model")
                                          if key in chunk}
        items = chunk.get("choices") or []
        for item in items:
            item["index"] = choice
        if not (self.reader and len(items) == 1 and chunk.get("object") == "chat.completion.chunk"):
            return [chunk]
        item = items[0]
        if self.stream is None:
            self.stream = ToolCallStream(self.reader)
        text = (item.get("delta") or {}).get("content")
        if item.get("finish_reason") is None:
            if not isinstance(text, str):
                return [chunk]
            ready = self.stream.feed(text)
            return [self.delta(choice, {"content": ready})] if ready else []
        content, calls = self.stream.end()
        self.stream = None
        out = [self.delta(choice, {"content": content})] if content else []
        if calls:
            out.append(self.delta(choice, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}))
            return out + [self.delta(choice, {}, "tool_calls")]
        return out + [chunk]

    def delta(self, choice: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {**(self.template or {}), "choices": [{"index": choice, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish_reason}]}

    def count(self, choice: int, prompt_tokens: int, completion_tokens: int) -> None:
        """A streamed choice's tokens, counted where the server generated them."""
        if choice == 0:
            self.usage["prompt_tokens"] = prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        self.usage["total_tokens"] = self.usage["prompt_tokens"] + self.usage["completion_tokens"]

    def usage_chunk(self) -> dict:
        """stream_options.include_usage: the last chunk, with no choices and the usage."""
        return {**(self.template or {}), "choices": [], "usage": dict(self.usage)}
