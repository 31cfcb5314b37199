"""The bounds on a request body, checked by the front before an engine sees it, the same
for both engines: a body too deep, a grammar or JSON schema that would make llama.cpp
recurse without end (a SIGSEGV that ends the container), or more prompts, stop strings,
inputs or tools than any real client sends, is a 400 naming the field and the bound.
Pure: bytes and parsed JSON in, BadRequest out (docs/*/reliability.md has the table).
"""
from __future__ import annotations

import bisect
import json
import math
import re

from ..server.translate import MAX_CHOICES, BadRequest

# Where each bound comes from: OpenAI's own limits where it has one, else far above what
# llama.cpp's own examples and today's clients send, and far below what breaks llama.cpp.
MAX_JSON_DEPTH = 100  # the deepest real body (a schema in a tool) nests about 30 levels; Python's parser stops near 1,000
MAX_SCHEMA_BYTES = 256 << 10  # OpenAI allows 120,000 characters of names in a schema; the rest is a few times that
MAX_SCHEMA_DEPTH = 64  # OpenAI allows 10 levels of object nesting, about 25 JSON levels
MAX_GRAMMAR_BYTES = 256 << 10  # llama.cpp's largest sample grammar is 1.4 KB; a converted schema stays below this
MAX_GRAMMAR_DEPTH = 64  # parentheses; llama.cpp's samples nest 2 deep; 100,000 overflowed its parser's stack
MAX_PATTERN_DEPTH = 64  # parentheses in a schema's regular expression, which llama.cpp turns into a grammar
# Repetitions nested in a grammar or a schema's pattern, multiplied: llama.cpp's own bound on
# one repetition (MAX_REPETITION_THRESHOLD), which it multiplies only within one rule.
# (a{0,1000}){0,1000} held a slot for 14 minutes on two tokens.
MAX_NESTED_REPETITIONS = 2000
MAX_STOP = 16  # OpenAI takes 4 stop strings
MAX_PROMPTS = 16  # prompts in one completion request; each is a whole answer's work
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own bound (LangChain sends 1,000 at a time)
MAX_TOOLS = 128  # OpenAI's own bound
MAX_LOGPROBS = 20  # OpenAI's own bound on top_logprobs; more made a reply of the whole vocabulary per token
EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/embeddings", "/embedding"})
COMPLETION_ROUTES = frozenset({"/v1/completions", "/completions", "/completion"})


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # half of a UTF-16 pair, escaped in JSON


def parsed_body(body: bytes) -> dict:
    """The body as a JSON object, or BadRequest: not JSON, not an object, or nested deeper
    than MAX_JSON_DEPTH (Python's own parser gives up near 1,000 levels with RecursionError)."""
    try:
        data = json.loads(body, parse_constant=not_json, parse_float=finite, parse_int=finite_int)
    except RecursionError:
        data = None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if data is None or too_deep(data, MAX_JSON_DEPTH):
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    if SURROGATE_ESCAPE.search(body):  # rare: only then is the whole body encoded once more
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the request body holds a lone UTF-16 surrogate (\\ud800 to \\udfff without its pair), "
                             "which is not text") from None
    return data


def not_json(constant: str):
    """NaN and Infinity, which Python's parser takes and JSON (and llama-server: a 500) does not."""
    raise ValueError(f"{constant} is not a JSON value")


def finite(number: str) -> float:
    """A number a double holds: 1e400 was infinity here and a 500 in llama-server."""
    value = float(number)
    if math.isinf(value):
        raise ValueError(f"{number[:40]} is larger than a number can be here")
    return value


def finite_int(number: str) -> int:
    if len(number) > 300:  # past a double's range (Python itself reads at most 4,300 digits)
        raise ValueError(f"{number[:40]}... has more digits than a number can have here")
    return int(number)


def too_deep(value, limit: int) -> bool:
    """True when `value` nests more than `limit` objects and arrays (not recursive: the
    value may be as deep as the parser allows)."""
    pending = [(value, 1)] if isinstance(value, (dict, list)) else []
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def check_request(route: str, data: dict) -> None:
    """Every bound of one request body; BadRequest for the first one it passes."""
    grammar = data.get("grammar")
    if isinstance(grammar, str):
        check_grammar(grammar, "grammar")
    for param, schema in schemas(data):
        check_schema(schema, param)
    check_count(data, "stop", MAX_STOP, "stop strings")
    check_count(data, "stop_sequences", MAX_STOP, "stop sequences")
    check_count(data, "tools", MAX_TOOLS, "tools")
    check_count(data, "functions", MAX_TOOLS, "functions")
    for name in ("n", "n_cmpl"):
        if whole_number(data.get(name)) > MAX_CHOICES:
            raise BadRequest(f"{name}: at most {MAX_CHOICES} choices in one request on this server, got {data[name]} "
                             "(each is a whole answer's work; for more, send the request again)", name)
    for name in ("logprobs", "top_logprobs", "n_probs"):  # chat's logprobs is true or false
        if whole_number(data.get(name)) > MAX_LOGPROBS:
            raise BadRequest(f"{name}: at most {MAX_LOGPROBS} log probabilities a token, got {data[name]}", name)
    if route in COMPLETION_ROUTES:
        check_inputs(data, "prompt", MAX_PROMPTS, "prompts")
    if route in EMBEDDING_ROUTES:
        for name in ("input", "content"):
            check_inputs(data, name, MAX_EMBEDDING_INPUTS, "inputs")
    if "grammar_triggers" in data:  # llama-server's own field
        raise BadRequest("grammar_triggers: not taken on this server (a pattern in it is a regular expression "
                         "llama.cpp matches at every token); send grammar or response_format", "grammar_triggers")


def whole_number(value) -> int:
    """`value` if it is a whole number (llama-server reads 9.0 as 9), else 0 (the engines
    name other types themselves)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def check_count(data: dict, name: str, limit: int, what: str) -> None:
    value = data.get(name)
    if isinstance(value, list) and len(value) > limit:
        raise BadRequest(f"{name}: at most {limit} {what} in one request on this server, got {len(value)}", name)


def check_inputs(data: dict, name: str, limit: int, what: str) -> None:
    """A list of texts or of token lists is that many inputs; a list of numbers is one."""
    value = data.get(name)
    if isinstance(value, list) and not all(isinstance(item, int) for item in value):
        check_count(data, name, limit, what)


def schemas(data: dict):
    """(param, schema) for each JSON schema in the body that an engine turns into a grammar:
    OpenAI's response_format and tools (Chat Completions and Responses), Anthropic's tools,
    llama-server's json_schema and llama-cpp-python's response_format.schema."""
    def objects(value, *keys):
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    for param in ("json_schema", "response_format.schema", "response_format.json_schema.schema",
                  "text.format.schema"):
        schema = objects(data, *param.split("."))
        if schema is not None:
            yield param, schema
    for name, keys in (("tools", ("function.parameters", "parameters", "input_schema")),
                       ("functions", ("parameters",))):
        tools = data.get(name)
        for index, tool in enumerate(tools if isinstance(tools, list) else []):
            for key in keys:
                schema = objects(tool, *key.split("."))
                if schema is not None:
                    yield f"{name}.{index}.{key}", schema


def check_schema(schema, param: str) -> None:
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise BadRequest(f"{param}: this JSON schema takes {size} bytes; at most {MAX_SCHEMA_BYTES >> 10} KiB "
                         "on this server", param)
    if too_deep(schema, MAX_SCHEMA_DEPTH):
        raise BadRequest(f"{param}: this JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels of objects and "
                         "arrays", param)
    for pattern in patterns(schema):
        if nesting(pattern, regex=True) > MAX_PATTERN_DEPTH:
            raise BadRequest(f"{param}: a pattern in this JSON schema nests more than {MAX_PATTERN_DEPTH} "
                             "parentheses", param)
        product = nested_repetitions(pattern)
        if product > MAX_NESTED_REPETITIONS:
            raise BadRequest(f"{param}: the pattern {pattern[:80]!r} repeats a group that repeats: {product} "
                             f"repetitions in all; at most {MAX_NESTED_REPETITIONS} on this server", param)


def patterns(schema):
    """Every string under a "pattern" key, at any depth (the schema is bounded already)."""
    pending = [schema]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if isinstance(item.get("pattern"), str):
                yield item["pattern"]
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


MAX_RULE_CHAIN = 200  # rules each referring to the next (JSON-schema grammars chain about 30)
# A count as llama.cpp's std::stoi and llama-cpp-python's int() read it: " +1_000x" is 1000.
COUNT = re.compile(r"\s*\+?(\d[\d_]*)")
RULE_NAME = re.compile(r"[A-Za-z0-9-]+")
RULE = re.compile(r"^[ \t]*([A-Za-z0-9-]+)[ \t]*::=", re.M)


def nested_repetitions(pattern: str) -> int:
    """The largest product of the {m,n} counts of a repeated group and of the repetitions
    inside it, in a regular expression; (ab){3} counts 1: it nests nothing."""
    return repetitions(REGEX_INERT.sub("x", pattern))[0]


def grammar_repetitions(grammar: str) -> int:
    """nested_repetitions for a GBNF grammar, through its rules: in `root ::= a{0,100}` with
    `a ::= "x"{0,100}`, 10,000 (llama.cpp multiplies only within one rule)."""
    bare = GBNF_INERT.sub("@", grammar).replace("\r", "\n")  # llama.cpp ends a rule at either
    starts = list(RULE.finditer(bare))
    bodies = {rule[1]: bare[rule.end():after.start() if after else None]
              for rule, after in zip(starts, starts[1:] + [None])}
    products: dict[str, int] = {}
    chain: list[str] = []  # the rules being weighed, each inside the one before

    def weight(name: str) -> int:
        if name not in products:
            if len(chain) >= MAX_RULE_CHAIN:
                raise BadRequest(f"grammar: its rules refer to one another more than {MAX_RULE_CHAIN} deep "
                                 "on this server", "grammar")
            products[name] = 1  # a rule that refers to itself repeats nothing more by it
            chain.append(name)
            products[name] = repetitions(bodies.get(name, ""), weight)[1]
            chain.pop()
        return products[name]

    return max((repetitions(body, weight)[0] for body in bodies.values()), default=1)


def repetitions(text: str, weight=None) -> tuple[int, int]:
    """(the largest product of nested {m,n} counts, the largest product of any) in a regular
    expression, or in a GBNF rule's body when `weight` gives each rule name's own product."""
    braces = {char: [index for index, found in enumerate(text) if found == char] for char in "{}"}
    inside = [1]  # the largest product within each open group
    last = 1  # the product within the atom just read (a closed group's, a rule's)
    largest = 1
    position = 0
    while position < len(text):
        char = text[position]
        name = RULE_NAME.match(text, position) if weight else None
        repeat = repetition_at(text, position, braces, skip="@" if weight else "") if char == "{" else None
        if name:
            last = weight(name[0])
            inside[-1] = max(inside[-1], last)
            position = name.end()
            continue
        if repeat:
            position, count = repeat
            product = last * count
            inside[-1] = max(inside[-1], product)
            if last > 1:
                largest = max(largest, product)
            last = 1
            continue
        if char == "(":
            inside.append(1)
            last = 1
        elif char == ")" and len(inside) > 1:
            last = inside.pop()
            inside[-1] = max(inside[-1], last)
        elif not (weight and char.isspace()):  # GBNF allows a space before {m,n}
            last = 1
        position += 1
    return largest, inside[0]


def repetition_at(text: str, position: int, braces: dict[str, list[int]], skip: str) -> tuple[int, int] | None:
    """(the position after the {m,n} at `position`, its larger count), or None. Read by hand
    (a regular expression backtracked on "{" and 16,000 spaces for 9 s) and as leniently as
    llama.cpp and llama-cpp-python read it; `skip` is what stands for a GBNF comment."""
    def next_one(char: str) -> int:
        found = braces[char]
        after = bisect.bisect_right(found, position)
        return found[after] if after < len(found) else len(text)

    end = next_one("}")
    if end == len(text) or next_one("{") < end:  # each "}" is read for one "{" at most
        return None
    parts = [part.translate({ord(char): " " for char in skip}) for part in text[position + 1:end].split(",")]
    counts = [COUNT.match(part) for part in parts]
    if len(parts) > 2 or not any(counts):
        return None
    return end + 1, max(int(count[1].replace("_", "")[:10]) for count in counts if count)


def check_grammar(grammar: str, param: str) -> None:
    size = len(grammar.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise BadRequest(f"{param}: this grammar takes {size} bytes; at most {MAX_GRAMMAR_BYTES >> 10} KiB on this "
                         "server", param)
    depth = nesting(grammar)
    if depth > MAX_GRAMMAR_DEPTH:
        raise BadRequest(f"{param}: this grammar nests {depth} levels of parentheses; at most {MAX_GRAMMAR_DEPTH} "
                         "on this server", param)
    product = grammar_repetitions(grammar)
    if product > MAX_NESTED_REPETITIONS:
        raise BadRequest(f"{param}: this grammar repeats a rule or group that repeats: {product} repetitions in "
                         f"all; at most {MAX_NESTED_REPETITIONS} on this server", param)


# A GBNF grammar's pieces in which parentheses do not nest: "literals", [classes] and # comments.
GBNF_INERT = re.compile(r'"(?:[^"\\]|\\.)*"?|\[(?:[^\]\\]|\\.)*\]?|#[^\r\n]*', re.S)
# A regular expression's: [classes] and escaped characters.
REGEX_INERT = re.compile(r"\[(?:[^\]\\]|\\.)*\]?|\\.", re.S)


def nesting(text: str, regex: bool = False) -> int:
    """The deepest nesting of parentheses in a GBNF grammar (or a regular expression),
    outside the parts where llama.cpp's parsers read them as characters."""
    bare = (REGEX_INERT if regex else GBNF_INERT).sub(" ", text)
    depth = deepest = 0
    for char in re.sub(r"[^()]", "", bare):
        depth += 1 if char == "(" else -1
        deepest = max(deepest, depth)
    return deepest
