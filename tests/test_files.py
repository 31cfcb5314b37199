"""Which file(s) of a repo are served: quant names, split models, MODEL_FILE."""
from __future__ import annotations

import pytest

from localllm_container.errors import UserError
from localllm_container.files import choose_files, quant_of
from localllm_container.settings import Config


@pytest.mark.parametrize("name, quant", [
    ("mistral-7b-instruct-v0.2.Q4_K_M.gguf", "Q4_K_M"),
    ("gemma-3-270m-q4_k_m.gguf", "Q4_K_M"),
    ("model-q4_K.gguf", "Q4_K"),
    ("Qwen2.5-7B-Instruct-Q5_K_M-00001-of-00002.gguf", "Q5_K_M"),
    ("Phi-3-mini-4k-instruct-fp16.gguf", None),
    ("model-IQ4_XS.gguf", "IQ4_XS"),
    ("llama-3-8b-f16.gguf", "F16"),
    ("README.md", None),
])
def test_quant_is_read_from_the_file_name(name, quant):
    assert quant_of(name) == quant


REPO_FILES = [
    "README.md", "config.json",
    "foo-7b.Q4_K_M.gguf", "foo-7b.Q4_K_S.gguf", "foo-7b.Q8_0.gguf",
    "foo-7b.Q6_K-00001-of-00003.gguf", "foo-7b.Q6_K-00002-of-00003.gguf", "foo-7b.Q6_K-00003-of-00003.gguf",
]


def choose(files=REPO_FILES, **settings):
    environ = {"MODEL": "TheBloke/Foo-7B-GGUF", "MODEL_FILE": "", "MODEL_QUANT": "Q4_K_M", **settings}
    config = Config(environ, {}, [])
    return choose_files(config, files)


@pytest.mark.parametrize("quant", ["Q4_K_M", "q4_k_m", "Q4_k_M"])
def test_quant_matches_case_insensitively(quant):
    assert choose(MODEL_QUANT=quant) == ["foo-7b.Q4_K_M.gguf"]


def test_split_models_pull_every_part():
    assert choose(MODEL_QUANT="Q6_K") == [f"foo-7b.Q6_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert choose(MODEL_FILE="foo-7b.Q6_K-00001-of-00003.gguf")[1:] == [
        "foo-7b.Q6_K-00002-of-00003.gguf", "foo-7b.Q6_K-00003-of-00003.gguf"]


def test_missing_split_part_is_an_error():
    with pytest.raises(UserError, match="lacks foo-7b.Q6_K-00003-of-00003.gguf"):
        choose(REPO_FILES[:-1], MODEL_QUANT="Q6_K")


def test_no_match_lists_the_quants_the_repo_has():
    with pytest.raises(UserError, match=r"MODEL_QUANT='Q5_K_M' matches no .gguf file in TheBloke/Foo-7B-GGUF: "
                                        r"the repo has Q4_K_M, Q4_K_S, Q6_K, Q8_0"):
        choose(MODEL_QUANT="Q5_K_M")


def test_several_matches_list_the_candidates():
    with pytest.raises(UserError, match=r"MODEL_QUANT='Q4_K' matches several files .*foo-7b.Q4_K_M.gguf, "
                                        r"foo-7b.Q4_K_S.gguf.*set MODEL_FILE"):
        choose(MODEL_QUANT="Q4_K")


def test_a_prefix_picks_the_only_family_member():
    assert choose(MODEL_QUANT="Q8") == ["foo-7b.Q8_0.gguf"]


def test_model_file_must_exist_in_the_repo():
    assert choose(MODEL_FILE="foo-7b.Q8_0.gguf") == ["foo-7b.Q8_0.gguf"]
    with pytest.raises(UserError, match="MODEL_FILE='foo-7b.Q2_K.gguf' is not in TheBloke/Foo-7B-GGUF"):
        choose(MODEL_FILE="foo-7b.Q2_K.gguf")
