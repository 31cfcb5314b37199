"""Models as users have them, end to end through `entrypoint.py serve` and the openai client:
an instruct model whose GGUF carries its own chat template, a split model, and files
llama.cpp cannot load. All are derived from the real test model (tests/derived_models.py)
and downloaded at start from the hub stand-in, as a slim image (PULL_MODEL=0) does; on
each engine."""
from __future__ import annotations

import openai
import pytest

from conftest import serve_from_hub
from localllm_container import model
from testkit.hub_standin import HubStandin
from testkit.server import ServerProcess

TEMPLATE_REPO = "test-org/gemma-3-270m-it-GGUF"
SPLIT_REPO = "test-org/gemma-3-270m-split-GGUF"
FUTURE_REPO = "test-org/gemma-3-270m-future-GGUF"
CUT_REPO = "test-org/gemma-3-270m-cut-GGUF"
JOINED_REPO = "test-org/gemma-3-270m-joined-GGUF"


@pytest.fixture(scope="module")
def models_hub(derived):
    template, future, cut = derived.with_template(), derived.unknown_architecture(), derived.cut_short()
    joined = derived.with_joined_tools_template()
    repos = {TEMPLATE_REPO: {template.name: template}, SPLIT_REPO: {p.name: p for p in derived.split()},
             FUTURE_REPO: {future.name: future}, CUT_REPO: {cut.name: cut}, JOINED_REPO: {joined.name: joined}}
    with HubStandin(repos) as server:
        yield server


@pytest.fixture
def serve_repo(tmp_path, models_hub, engine):
    """Start `serve` for a repo on `engine`: model.env as given, the rest from the environment."""
    started: list[ServerProcess] = []

    def start(model_env: dict[str, str], **environ: str) -> ServerProcess:
        started.append(serve_from_hub(tmp_path, models_hub.url, model_env, **{"ENGINE": engine, **environ}))
        return started[-1]

    yield start
    for server in started:
        server.close()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And the grass?"},
]


@pytest.mark.parametrize("chat_format", ["absent", "empty", "gemma"])
def test_a_model_with_its_own_chat_template_answers(serve_repo, report, chat_format):
    """`docker run --env-file model.env` passes CHAT_FORMAT= empty: as if absent (the GGUF's template)."""
    environ = {} if chat_format == "absent" else {"CHAT_FORMAT": "" if chat_format == "empty" else chat_format}
    server = serve_repo(dict(MODEL=TEMPLATE_REPO, N_CTX="1024"), **environ)
    server.wait_ready()
    chat = client(server).chat.completions
    reply = chat.create(messages=CONVERSATION, max_tokens=12, temperature=0, model="whatever-the-client-says")
    answer = reply.choices[0].message.content
    assert answer.strip() and reply.model == "gemma-3-270m-it"
    pieces = [chunk.choices[0].delta.content or "" for chunk in chat.create(
        messages=CONVERSATION[1:2], max_tokens=12, temperature=0, stream=True, model="gemma-3-270m-it")
        if chunk.choices]
    assert "".join(pieces).strip()
    report(f"template model, CHAT_FORMAT {chat_format}: answer", repr(answer))


def test_the_chat_format_choice_on_both_models(model_path, derived):
    base = model.model_facts([model_path])
    templated = model.model_facts([derived.with_template()])
    assert model.automatic_chat_format(base, "google/gemma-3-270m-GGUF")[0] == "gemma"
    assert model.automatic_chat_format(templated, TEMPLATE_REPO) == ("", "automatic: the GGUF's chat template")


def test_a_split_model_is_pulled_and_served(serve_repo, report):
    server = serve_repo(dict(MODEL=SPLIT_REPO, MODEL_QUANT="Q4_K_M", CHAT_FORMAT="gemma", N_CTX="1024"))
    server.wait_ready()
    reply = client(server).completions.create(model="x", prompt="The capital of France is", max_tokens=8,
                                              temperature=0)
    assert reply.choices[0].text.strip() and reply.model == "gemma-3-270m-split"
    assert "gemma-3-270m-Q4_K_M-00001-of-00003.gguf" in server.output()
    report("split model (3 parts): answer", repr(reply.choices[0].text))


def test_no_reply_names_a_path_of_the_image(serve_repo):
    """The alias /v1/models shows is the `model` of every reply, streamed or not, named or not."""
    server = serve_repo(dict(MODEL=TEMPLATE_REPO, N_CTX="1024"))
    server.wait_ready()
    api = client(server)
    replies = [api.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2),
               api.chat.completions.create(messages=CONVERSATION[1:2], max_tokens=2, model="gpt-4o"),
               *api.chat.completions.create(messages=CONVERSATION[1:2], max_tokens=2, model="", stream=True),
               *api.completions.create(prompt="Hi", max_tokens=2, model="", stream=True)]
    assert {reply.model for reply in replies} == {"gemma-3-270m-it"}
    raw = api.with_raw_response.chat.completions.create(messages=CONVERSATION[1:2], max_tokens=2, model="")
    assert "/" not in raw.http_response.json()["model"]


@pytest.mark.parametrize("repo, reason", [
    (FUTURE_REPO, "unknown model architecture: 'gemma99'"),
    (CUT_REPO, "data is not within the file bounds"),
])
def test_a_file_llama_cpp_cannot_load_says_why_in_one_line(serve_repo, report, repo, reason):
    server = serve_repo(dict(MODEL=repo, CHAT_FORMAT="gemma", N_CTX="1024"))
    assert server.proc.wait(120) == 1, server.output()
    last = server.lines[-1]
    assert last.startswith("error: llama.cpp cannot load the model file ") and reason in last, server.output()
    assert f"models--{repo.replace('/', '--')}/snapshots/" in last and "Traceback" not in server.output()
    report(f"load error ({repo})", last)


@pytest.mark.engines("llama-server")  # llama-cpp-python renders any template Jinja2 renders
def test_a_template_llama_server_cannot_read_says_set_chat_format(serve_repo, report):
    """llama-server's analysis of tool calls cannot read some GGUF templates and stops at start:
    one line that names CHAT_FORMAT, and with it set the same model is served."""
    server = serve_repo(dict(MODEL=JOINED_REPO, N_CTX="1024"))
    assert server.proc.wait(120) == 1, server.output()
    last = server.lines[-1]
    assert last.startswith("error: llama-server cannot read the chat template of gemma-3-270m-joined-Q4_K_M.gguf: "
                           "Unable to generate parser for this template") and "set CHAT_FORMAT (one of " in last
    assert "Traceback" not in server.output()
    report("template llama-server cannot read", last)
    served = serve_repo(dict(MODEL=JOINED_REPO, N_CTX="1024", CHAT_FORMAT="gemma"))
    served.wait_ready()
    reply = client(served).chat.completions.create(messages=CONVERSATION, max_tokens=4, temperature=0, model="")
    assert reply.choices[0].message.content
