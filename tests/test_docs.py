"""The docs' examples run against the real server, so they cannot drift from it.

A fenced block right after one of these HTML comments is run (bash or python):

    <!-- run-against-local -->     `localhost:8000` becomes the test server
    <!-- run-against-node-api -->  the node-api URL becomes a stand-in that requires
                                   DataSphere's headers and forwards to the test server;
                                   NODE_ID, FOLDER_ID and YC_IAM_TOKEN are set

curl runs with --fail-with-body, so an HTTP error fails the block. Blocks that
need Yandex Cloud itself (yc, the console) or Docker are not marked.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from nodeapi_standin import NodeApiStandin

DOCS = sorted((ROOT / "docs").glob("*/*.md"))
NODE_API = "https://node-api.datasphere.yandexcloud.net"
MARKED = re.compile(r"<!-- (run-against-local|run-against-node-api) -->\n```(bash|python)\n(.*?)\n```", re.S)


def marked_blocks(path) -> list[tuple[str, str, str]]:
    """(target, language, code) of every marked block, in order."""
    return MARKED.findall(path.read_text())


def test_marked_blocks_exist_and_both_languages_run_the_same_ones():
    for en in (ROOT / "docs" / "en").glob("*.md"):
        ru = ROOT / "docs" / "ru" / en.name
        assert ru.exists(), f"{en.name} has no Russian version"
        assert [b[:2] for b in marked_blocks(en)] == [b[:2] for b in marked_blocks(ru)], en.name
    assert sum(len(marked_blocks(p)) for p in DOCS) >= 10


BLOCKS = [(path, block) for path in DOCS for block in marked_blocks(path)]


@pytest.mark.parametrize("path, block", BLOCKS,
                         ids=[f"{p.parent.name}/{p.name}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_doc_block_runs(server, path, block):
    target, language, code = block
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "YC_"))}
    with NodeApiStandin(server.url) as node_api:
        if target == "run-against-local":
            code = re.sub(r"(http://)?localhost:8000", server.url, code)
        else:
            code = code.replace(NODE_API, node_api.url)
            env.update(NODE_ID="bt1node", FOLDER_ID="b1gfolder", YC_IAM_TOKEN="t1.test-token")
        if language == "bash":
            command = ["bash", "-euo", "pipefail", "-c", 'curl() { command curl -sS --fail-with-body "$@"; }\n' + code]
        else:
            command = [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{path.name}:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.stdout.strip()
    if target == "run-against-node-api":
        assert node_api.requests, "the block did not call node-api"
