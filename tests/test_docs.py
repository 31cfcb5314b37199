"""The docs' examples run against the real server, so they cannot drift from it.

A fenced block right after one of these HTML comments is run (bash or python):

    <!-- run-against-local -->     `localhost:8000` becomes the test server
    <!-- run-against-node-api -->  the node-api URL becomes a stand-in that requires
                                   DataSphere's headers and forwards to the test server;
                                   NODE_ID, FOLDER_ID and YC_IAM_TOKEN are set

curl runs with --fail-with-body, so an HTTP error fails the block. Blocks that
need Yandex Cloud itself (yc, the console) or Docker are not marked.

The rest keeps the docs in step with the code: every setting has its line in
model.env and its row in both configuration.md, llama-server's refused variables and
CHAT_FORMAT mapping are listed as the code has them, the health check is documented on
the path the image asks, and every link to a heading finds it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from localllm_container import llama_server
from localllm_container.server import HEALTH_PATH
from localllm_container.settings import MODEL_ENV_DEFAULT, SETTINGS
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


def configuration(lang: str) -> str:
    return (ROOT / "docs" / lang / "configuration.md").read_text()


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_is_in_model_env_and_in_both_configurations(name):
    assert re.search(rf"(?m)^{name}=", MODEL_ENV_DEFAULT.read_text()), f"model.env has no {name}= line"
    for lang in ("en", "ru"):
        assert f"| `{name}` |" in configuration(lang), f"docs/{lang}/configuration.md has no row for {name}"


def test_llama_server_variables_and_chat_templates_are_documented_as_the_code_has_them():
    for lang in ("en", "ru"):
        text = configuration(lang)
        for name in llama_server.OWN_VARIABLES:
            assert f"| `{name}` |" in text, f"docs/{lang}/configuration.md: {name} is refused but not listed"
        for chat_format, template in llama_server.CHAT_TEMPLATES.items():
            assert f"| `{chat_format}` | `{template}` |" in text, f"docs/{lang}: CHAT_FORMAT {chat_format}"


def test_the_health_check_is_documented_on_the_path_the_image_asks():
    for lang, field in (("en", "| Health check |"), ("ru", "| Проверка здоровья |")):
        row = next(line for line in (ROOT / "docs" / lang / "datasphere.md").read_text().splitlines()
                   if line.startswith(field))
        assert f"path `{HEALTH_PATH}`" in row or f"путь `{HEALTH_PATH}`" in row, row
        health = next(line for line in configuration(lang).splitlines() if line.startswith("| `health` |"))
        assert f"`{HEALTH_PATH}`" in health, health


def heading_anchors(path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation but - and _
    dropped, spaces as hyphens (letters of any script stay)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"#{1,6} (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


def test_every_link_to_a_heading_finds_it():
    broken = []
    for page in [ROOT / "README.md", *DOCS]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text()):
            linked = page.parent / target if target else page
            if not linked.exists() or anchor not in heading_anchors(linked):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken


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
