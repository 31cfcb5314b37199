"""The front's bounds on a request body (localllm_container/front/limits.py), without a server:
each bound refuses one past it with a 400 naming the field, and lets real requests through."""
from __future__ import annotations

import json

import pytest

from localllm_container.front import limits
from localllm_container.server.translate import BadRequest

DEEP_GRAMMAR = "root ::= " + "(" * 100000 + '"a"' + ")" * 100000  # the issue's: it killed both engines


def refused(call, *args) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        call(*args)
    return caught.value


def test_a_body_nested_past_the_bound_is_refused_without_a_recursion_error():
    for depth in (limits.MAX_JSON_DEPTH + 1, 100_000):  # Python's own parser gives up near 1,000
        problem = refused(limits.parsed_body, ("[" * depth + "]" * depth).encode())
        assert problem.status == 400 and f"deeper than {limits.MAX_JSON_DEPTH} levels" in str(problem)
    depth = limits.MAX_JSON_DEPTH - 1
    assert limits.parsed_body(('{"a": ' + "[" * depth + "]" * depth + "}").encode()) == {"a": json.loads(
        "[" * depth + "]" * depth)}


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [', "not valid JSON: Expecting value: line 1 column 15"),
    (b"\xff", "not valid JSON"),
    (b"[1]", "must be a JSON object, not list"),
    (b"", "not valid JSON"),
])
def test_a_body_that_is_not_a_json_object_is_refused_saying_why(body, words):
    assert words in str(refused(limits.parsed_body, body))


def test_nan_infinity_and_numbers_past_a_double_are_refused():
    """llama-server answered each with a 500 (its parser's own error)."""
    assert "NaN is not a JSON value" in str(refused(limits.parsed_body, b'{"prompt": "Hi", "temperature": NaN}'))
    assert "-Infinity" in str(refused(limits.parsed_body, b'{"prompt": "Hi", "top_p": -Infinity}'))
    assert "1e400 is larger" in str(refused(limits.parsed_body, b'{"prompt": "Hi", "temperature": 1e400}'))
    assert "more digits" in str(refused(limits.parsed_body, b'{"prompt": "Hi", "seed": 1' + b"0" * 400 + b"}"))
    assert limits.parsed_body(b'{"temperature": 1e300, "seed": 18446744073709551615}')["temperature"] == 1e300


def test_a_lone_surrogate_is_refused_and_a_pair_passes():
    """A lone half of a UTF-16 pair cannot be encoded: the localllm engine answered 500."""
    assert "lone UTF-16 surrogate" in str(refused(limits.parsed_body, b'{"prompt": "\\ud800 hi"}'))
    assert limits.parsed_body(b'{"prompt": "\\ud83d\\ude00"}')["prompt"] == "\U0001F600"


def test_the_deep_grammar_that_crashed_llama_cpp_is_refused_naming_the_field():
    problem = refused(limits.check_request, "/v1/completions", {"prompt": "Hi", "grammar": DEEP_GRAMMAR})
    assert problem.param == "grammar" and "nests 100000 levels of parentheses; at most 64" in str(problem)


@pytest.mark.parametrize("grammar, depth", [
    ('root ::= "yes" | "no"', 0),
    ('root ::= ("a" ("b" | "c"))*', 2),
    ('root ::= "((((" [(()] # ((((\n', 0),  # in a literal, a class and a comment they are characters
    ('root ::= "\\"(" ("x")', 1),  # an escaped quote does not end the literal
    ("root ::= " + "(" * 64 + '"a"' + ")" * 64, 64),
])
def test_grammar_nesting_counts_only_the_parentheses_llama_cpp_nests(grammar, depth):
    assert limits.nesting(grammar) == depth
    limits.check_grammar(grammar, "grammar")  # all within the bound


def test_a_grammar_past_its_size_is_refused():
    grammar = 'root ::= "' + "a" * limits.MAX_GRAMMAR_BYTES + '"'
    assert "at most 256 KiB" in str(refused(limits.check_grammar, grammar, "grammar"))


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("body, param", [
    ({"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(80)}}},
     "response_format.json_schema.schema"),
    ({"prompt": "Hi", "response_format": {"type": "json_object", "schema": deep_schema(80)}}, "response_format.schema"),
    ({"prompt": "Hi", "json_schema": deep_schema(80)}, "json_schema"),
    ({"messages": [], "tools": [{"type": "function", "function": {"name": "f", "parameters": deep_schema(80)}}]},
     "tools.0.function.parameters"),
    ({"input": "Hi", "tools": [{"type": "function", "name": "f", "parameters": deep_schema(80)}]},
     "tools.0.parameters"),  # the Responses API
    ({"messages": [], "tools": [{"name": "f", "input_schema": deep_schema(80)}]}, "tools.0.input_schema"),  # Messages
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": deep_schema(80)}}},
     "text.format.schema"),
])
def test_a_schema_nested_past_the_bound_is_refused_wherever_it_comes(body, param):
    problem = refused(limits.check_request, "/v1/chat/completions", body)
    assert problem.param == param and f"nests deeper than {limits.MAX_SCHEMA_DEPTH}" in str(problem)


def test_a_schema_of_ten_object_levels_as_openai_allows_passes():
    limits.check_request("/v1/chat/completions", {"messages": [], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(20)}}})


def test_a_schema_past_its_size_or_with_a_deeply_nested_pattern_is_refused():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20000)}}
    assert "at most 256 KiB" in str(refused(limits.check_schema, big, "json_schema"))
    nested = {"type": "string", "pattern": "(" * 65 + "a" + ")" * 65}
    assert "pattern" in str(refused(limits.check_schema, {"type": "object", "properties": {"a": nested}}, "x"))
    limits.check_schema({"type": "string", "pattern": r"^\((\d{3})\) [(]\d+$"}, "x")  # escaped and in a class


@pytest.mark.parametrize("grammar, repetitions", [
    ('root ::= "x" a{0,1000}\na ::= "a"{0,1000}', 1_000_000),  # llama.cpp multiplies only within a rule
    ('root ::= ("b" a) {0,1000}\na ::= [a-z]{0,1000}', 1_000_000),
    ('root ::= a{3}\na ::= b{4}\nb ::= "c"{5} # x{99}\n', 60), ('root ::= a*\na ::= "a"{0,1000}', 1),
    ('root ::= "{" [0-9]{1,4} "}"  # "x"{99}', 1), ('root ::= "yes" | "no"', 1),
    ("root ::= (a{2}){" + "9" * 5000 + "}\na ::= \"x\"", 19_999_999_998),  # Python reads 4,300 digits at most
    ('root ::= a{0,1000}\ra ::= "x"{0,1000}', 1_000_000),  # llama.cpp ends a rule at a lone CR too
    ('root ::= ( ("x"{0,1000}){0,#\n1000} )', 1_000_000),  # a comment inside the braces
    ('root ::= "x"{' + " " * 100_000, 1),  # a regular expression backtracked on this for minutes
])
def test_repetitions_nested_across_a_grammars_rules_are_multiplied(grammar, repetitions):
    assert limits.grammar_repetitions(grammar) == repetitions
    if repetitions > limits.MAX_NESTED_REPETITIONS:
        assert f"{repetitions} repetitions" in str(refused(limits.check_grammar, grammar, "grammar"))
    else:
        limits.check_grammar(grammar, "grammar")


def test_a_grammar_whose_rules_chain_past_the_bound_is_refused():
    chain = "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(300)) + 'r300 ::= "a"'
    assert "more than 200 deep" in str(refused(limits.check_grammar, chain, "grammar"))
    limits.check_grammar("\n".join(chain.splitlines()[:150]) + '\nr149 ::= "a"', "grammar")


@pytest.mark.parametrize("pattern, repetitions", [
    ("^(a{0,1000}){0,1000}$", 1_000_000),  # held a slot for 14 minutes on two tokens
    ("(?:a{0,45}){0,45}", 2025), ("(a{,50}){50}", 2500), ("((a{2}){3}){4}", 24), (r"\{(a{100}){100}", 10_000),
    ("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}$", 1), ("(ab){3}", 1), ("[({]{9}(a){100}", 1), ("(x{3}y){9}", 27),
    ("(a{0,1000}){0,+1000}", 1_000_000), ("(a{0,1000}){0,1000x}", 1_000_000),  # as std::stoi reads them
    ("(a{0,1000}){0,1_000}", 1_000_000), ("a{" + " " * 100_000, 1), ("{{{{" * 10_000 + "}", 1),
])
def test_repetitions_nested_in_a_pattern_are_multiplied(pattern, repetitions):
    assert limits.nested_repetitions(pattern) == repetitions
    schema = {"type": "string", "pattern": pattern}
    if repetitions > limits.MAX_NESTED_REPETITIONS:
        assert f"{repetitions} repetitions" in str(refused(limits.check_schema, schema, "x"))
    else:
        limits.check_schema(schema, "x")


@pytest.mark.parametrize("route, body, param, bound", [
    ("/v1/completions", {"prompt": "Hi", "stop": ["x"] * 17}, "stop", "16 stop strings"),
    ("/v1/messages", {"messages": [], "stop_sequences": ["x"] * 17}, "stop_sequences", "16 stop sequences"),
    ("/v1/completions", {"prompt": ["Hi"] * 17}, "prompt", "16 prompts"),
    ("/completion", {"prompt": [[1, 2]] * 17}, "prompt", "16 prompts"),
    ("/v1/embeddings", {"input": ["Hi"] * 2049}, "input", "2048 inputs"),
    ("/embeddings", {"content": ["Hi"] * 2049}, "content", "2048 inputs"),
    ("/v1/chat/completions", {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}] * 129},
     "tools", "128 tools"),
    ("/v1/chat/completions", {"messages": [], "n": 9}, "n", "8 choices"),
    ("/v1/chat/completions", {"messages": [], "n": 1e6}, "n", "8 choices"),  # llama-server reads 1e6 as a number
    ("/completion", {"prompt": "Hi", "n_cmpl": 9}, "n_cmpl", "8 choices"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 177242110985}, "logprobs", "20 log probabilities"),
    ("/v1/chat/completions", {"messages": [], "logprobs": True, "top_logprobs": 21}, "top_logprobs", "at most 20"),
    ("/completion", {"prompt": "Hi", "grammar_lazy": True, "grammar_triggers": [{"type": 2, "value": "(a+)+$"}]},
     "grammar_triggers", "regular expression"),
])
def test_counts_past_their_bound_are_refused_naming_the_field(route, body, param, bound):
    problem = refused(limits.check_request, route, body)
    assert problem.param == param and bound in str(problem), str(problem)


def test_what_real_clients_send_passes():
    limits.check_request("/v1/completions", {"prompt": [1, 2, 3] * 1000, "stop": ["\n"] * 16})  # one prompt of tokens
    limits.check_request("/v1/embeddings", {"input": ["chunk"] * 1000})  # LangChain's batch
    limits.check_request("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 8,
                                                  "logprobs": True, "top_logprobs": 20,
                                                  "tools": [{"type": "function", "function": {"name": "f"}}] * 128})
