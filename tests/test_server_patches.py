"""The server's patches of llama-cpp-python, sse-starlette and starlette start only on the
versions they were written for: another version is refused with one line at start."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from localllm_container.server import patches


def test_the_versions_written_for_are_the_pinned_ones():
    pinned = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", (ROOT / "requirements/image.txt").read_text(), re.M))
    assert {name: pinned.get(name) for name in patches.WRITTEN_FOR} == patches.WRITTEN_FOR
    assert patches.version_mismatch(patches.installed_versions()) is None  # what the tests run


def test_each_other_version_is_named():
    installed = {**patches.WRITTEN_FOR, "sse-starlette": "3.8.0", "starlette": None}
    assert patches.version_mismatch(installed) == (
        "the server's patches (localllm_container/server/patches.py) do not fit sse-starlette 3.8.0 (written for "
        "3.7.0), starlette missing (written for 1.10.0): install the versions in requirements/image.txt, or check "
        "each patch against the new version and update WRITTEN_FOR")


@pytest.mark.parametrize("schema, rule", [
    ({"type": "string", "maxLength": 10**9}, 'root ::= "\\"" char{0,1000000000} "\\"" space'),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
     'root ::= "[" space integer ("," space integer){1,4} "]" space'),
    ({"type": "array", "items": {"type": "integer"}}, 'root ::= "[" space (integer ("," space integer)*)? "]" space'),
    ({"type": "string", "pattern": "^(ab){2,3}c?$"}, 'root ::= "\\"" root-1{2,3} "c"? "\\"" space'),
])
def test_schemas_repeat_as_llama_cpp_writes_it(schema, rule):
    """llama-cpp-python spelt a maxLength of 10^9 out (gigabytes: the server died); llama.cpp
    bounds x{m,n} itself, as llama-server's converter writes it."""
    import json
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    patches.write_repetitions_as_llama_cpp_does()
    assert rule in json_schema_to_gbnf(json.dumps(schema)).splitlines()


@pytest.mark.engines("localllm")  # the patches are of llama-cpp-python's server; llama-server is C++
def test_a_server_with_another_llama_cpp_python_refuses_to_start(start_server, tmp_path):
    """A real start whose server process finds llama-cpp-python 0.3.99 first on its path
    (a distribution's metadata only: what importlib.metadata reports)."""
    info = tmp_path / "newer" / "llama_cpp_python-0.3.99.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.99\n")
    server = start_server(PYTHONPATH=str(info.parent))
    assert server.proc.wait(120) == 1, server.output()
    assert server.lines[-1] == (
        "error: the server's patches (localllm_container/server/patches.py) do not fit llama-cpp-python 0.3.99 "
        "(written for 0.3.36): install the versions in requirements/image.txt, or check each patch against the new "
        "version and update WRITTEN_FOR"), server.output()
    assert "Traceback" not in server.output()
