"""What the request schema allows but llama-cpp-python 0.3.36 cannot run: each check
turns a would-be 500 (or a crash of the shared server) into a 400 naming the field.
Also what the checks know of the loaded model (ServedModel). Pure reads: no request
is changed here (translate changes them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .translate import BadRequest

# llama-cpp-python's chat formats that turn tool calls in the text into tool_calls themselves.
FUNCTION_CALLING_FORMATS = ("chatml-function-calling", "functionary", "functionary-v1", "functionary-v2")


# Fields the OpenAPI schema lets be null, which llama-cpp-python passes on as None to
# llama.cpp's sampler (a ctypes TypeError, a 500). See nulls_meaning_default.
NULL_MEANS_DEFAULT = ("frequency_penalty", "presence_penalty")
# How pydantic names a union's members in an error's location: classes, generic types, plain types.
UNION_MEMBER = re.compile(r"[A-Z]|.*\[|(str|int|float|bool|none)$")


@dataclass(frozen=True)
class ServedModel:
    """What the checks and translations need to know about the loaded model. The methods only
    read the vocabulary and the chat format, so they are safe while another request generates."""
    vocabulary: int
    logits_all: bool
    embeddings: bool
    alias: str  # MODEL_ALIAS, the id /v1/models shows
    chat_format: str  # llama-cpp-python's name of the format in use; chat_template.* for a GGUF template
    template: str  # the GGUF chat template in use, or "" for one of llama-cpp-python's own formats
    llama: object  # llama_cpp.Llama

    @classmethod
    def of(cls, llama, alias: str) -> "ServedModel":
        chat_format = llama.chat_format or ""
        template = llama.metadata.get(f"tokenizer.{chat_format}".replace(".default", ""), "") \
            if chat_format.startswith("chat_template.") else ""
        return cls(llama.n_vocab(), bool(llama._logits_all), bool(llama.context_params.embeddings), alias,
                   chat_format, template, llama)

    def tools_in_prompt(self) -> bool:
        """A GGUF template that reads `tools` shows them to the model; llama-cpp-python's own
        formats (gemma, chatml, ...) leave them out."""
        return "tools" in self.template

    def reads_its_own_tool_calls(self) -> bool:
        return self.chat_format in FUNCTION_CALLING_FORMATS

    def schema_error(self, schema) -> str | None:
        """Why a JSON schema cannot become a grammar llama.cpp follows; llama-cpp-python would
        fall back to any JSON without a word."""
        from llama_cpp.llama_grammar import json_schema_to_gbnf
        try:
            grammar = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter raises plain exceptions of several kinds
            return re.sub(r"\s*\(use --allow-fetch[^)]*\)", "", str(exc)) or type(exc).__name__  # no CLI here
        return None if self.parses(grammar) else "llama.cpp cannot parse the grammar made from it"

    def parses(self, grammar: str) -> bool:
        """True when llama.cpp accepts the grammar; sampling with one it rejects
        dereferences NULL (llama-cpp-python 0.3.36 does not check)."""
        import llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(self.llama._model.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def is_text(self, tokens: list[int]) -> bool:
        """True when the tokens make valid UTF-8; /extras/detokenize decodes strictly (a 500)."""
        try:
            self.llama.detokenize(tokens).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True


def request_models() -> dict:
    """The body model of each POST route; the same classes FastAPI validates with."""
    from llama_cpp.server import types
    completion = types.CreateCompletionRequest
    return {"/v1/completions": completion, "/v1/engines/copilot-codex/completions": completion,
            "/v1/chat/completions": types.CreateChatCompletionRequest,
            "/v1/embeddings": types.CreateEmbeddingRequest,
            "/extras/tokenize": types.TokenizeInputRequest, "/extras/tokenize/count": types.TokenizeInputRequest,
            "/extras/detokenize": types.DetokenizeInputRequest}


def parse_json(body: bytes, content_type: str) -> dict:
    kind = content_type.split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise BadRequest(f"Content-Type is {kind!r}: send the body as JSON with Content-Type: application/json "
                         "(curl: -H 'Content-Type: application/json')")
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def validated(model_class, data: dict):
    """The body as the route's pydantic model, or BadRequest listing every field at
    fault. A union (a message is one of several classes) adds its members' names to an
    error's location; they are dropped, and one field's errors are joined with "or"."""
    import pydantic
    try:
        return model_class.model_validate(data)
    except pydantic.ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if not UNION_MEMBER.match(str(part))) or "body"
            problems.setdefault(where, []).append(error["msg"])
        message = "; ".join(f"{where}: {' or '.join(dict.fromkeys(what))}" for where, what in problems.items())
        raise BadRequest(message, param=next(iter(problems))) from None


def nulls_meaning_default(model_class) -> frozenset[str]:
    """The sampling settings and flags whose null the server cannot take: those that
    refuse None (`"temperature": null`, a 400 otherwise) and NULL_MEANS_DEFAULT.
    OpenAI's API reads null as "not given", and many clients send unset fields as
    null. (A null prompt or messages list stays an error: no default is meant there.)"""
    import pydantic
    names = set(NULL_MEANS_DEFAULT) & set(model_class.model_fields)
    for name, field in model_class.model_fields.items():
        if not isinstance(field.default, (bool, int, float)):
            continue
        try:
            pydantic.TypeAdapter(field.annotation).validate_python(None)
        except pydantic.ValidationError:
            names.add(name)
    return frozenset(names)


def with_defaults_explicit(data: dict, nulls_to_drop: frozenset[str]) -> dict:
    """What OpenAI's API leaves implicit and llama-cpp-python 0.3.36 refuses or fails
    on: those fields set to null are dropped (an assistant message's null content is
    filled in by translate.translate_message)."""
    return {key: value for key, value in data.items() if not (key in nulls_to_drop and value is None)}


def check_token_ids(ids, model: ServedModel, param: str) -> None:
    bad = [token for token in ids if not 0 <= token < model.vocabulary]
    if bad:
        raise BadRequest(f"{param}: token ids must be from 0 to {model.vocabulary - 1}; got {bad[:5]}", param)


def check_semantics(path: str, request, model: ServedModel) -> None:
    """What the schema allows but llama-cpp-python 0.3.36 cannot run: each would be a
    500 (or kill the server) after the model lock was taken or the stream had begun."""
    if path == "/extras/detokenize":
        check_token_ids(request.tokens, model, "tokens")
        if not model.is_text(request.tokens):
            raise BadRequest("tokens: they do not make valid UTF-8 text (a character split between tokens "
                             "needs all of its tokens)", "tokens")
    if path == "/v1/embeddings" and not model.embeddings:
        raise BadRequest("this server does not compute embeddings: start it with EMBEDDING=true "
                         "(a model loaded for embeddings)", "input")
    if path == "/v1/embeddings" and request.input == []:
        raise BadRequest("input: an empty list; give at least one text to embed", "input")
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest(f"prompt: this server takes one prompt per request, got {len(prompt)}", "prompt")
    if getattr(request, "grammar", None) is not None and not model.parses(request.grammar):
        raise BadRequest("grammar: llama.cpp cannot parse it; expected GBNF with a `root` rule, "
                         'such as root ::= "yes" | "no"', "grammar")
    if getattr(request, "logit_bias", None) and request.logit_bias_type != "tokens":
        keys = list(request.logit_bias)
        if not all(key.lstrip("-").isdigit() for key in keys):
            raise BadRequest("logit_bias: keys must be token ids (or set logit_bias_type to tokens)", "logit_bias")
        check_token_ids([int(key) for key in keys], model, "logit_bias")
    if wants_logprobs(request) and not model.logits_all:
        raise BadRequest("logprobs: this server runs with LOGITS_ALL=false, which makes prompt processing about "
                         "twice as fast; start it with LOGITS_ALL=true to get log probabilities", "logprobs")
    if hasattr(request, "messages"):
        check_forced_function(request)


def check_forced_function(request) -> None:
    """A function the request forces must be one it offers; llama-cpp-python reads the
    legacy functions/function_call before tools/tool_choice, and so does this."""
    if request.functions is not None:
        param, offered = "function_call", [function["name"] for function in request.functions]
        forced = request.function_call.get("name") if isinstance(request.function_call, dict) else None
    else:
        param, offered = "tool_choice", [tool["function"]["name"] for tool in request.tools or []]
        forced = request.tool_choice.get("function", {}).get("name") if isinstance(request.tool_choice, dict) else None
        if isinstance(request.function_call, dict):
            param, forced = "function_call", request.function_call.get("name")
    if forced is not None and forced not in offered:
        raise BadRequest(f"{param}: function {forced!r} is not among those offered ({', '.join(offered) or 'none'})",
                         param)


def wants_logprobs(request) -> bool:
    """Completions take logprobs=N; chat takes logprobs=true with top_logprobs=N."""
    if hasattr(request, "messages"):
        return bool(request.logprobs) and request.top_logprobs is not None
    return getattr(request, "logprobs", None) is not None
