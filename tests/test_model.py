"""Model facts from the GGUF header, context and memory sizing, the chat format."""
from __future__ import annotations

import dataclasses

import pytest

from localllm_container import model, resources
from localllm_container.errors import UserError


def test_model_facts_come_from_the_gguf_header(model_path):
    facts = model.model_facts([model_path])
    assert (facts.architecture, facts.trained_context, facts.has_chat_template) == ("gemma3", 32768, False)
    assert facts.size == model_path.stat().st_size
    assert facts.kv_bytes_per_token == 18 * 1 * (256 + 256) * 2  # layers x KV heads x (K + V dims) x f16
    assert facts.vocabulary == 262144


@pytest.mark.parametrize("memory, n_ctx, why", [
    (64 << 30, "8192", "automatic: trained 32768, capped at 8192"),
    (930 << 20, "2048", "automatic: trained 32768, capped at 8192, halved to fit memory"),
])
def test_automatic_context_is_capped_and_fits(model_path, monkeypatch, memory, n_ctx, why):
    monkeypatch.setattr(resources, "memory_limit", lambda: (memory, "test limit"))
    assert model.automatic_context(model.model_facts([model_path])) == (n_ctx, why)


def test_automatic_context_keeps_to_whole_steps_of_256(model_path, monkeypatch):
    """llama.cpp pads to 256 and llama-cpp-python then fails on prompts in between."""
    facts = dataclasses.replace(model.model_facts([model_path]), trained_context=3000)
    monkeypatch.setattr(resources, "memory_limit", lambda: (64 << 30, "test limit"))
    assert model.automatic_context(facts) == ("2816", "automatic: trained 3000, capped at 8192")
    room_for_1280 = model.memory_needed(facts, 1280)  # 2816 halved is 1408: down to a step
    monkeypatch.setattr(resources, "memory_limit", lambda: (room_for_1280, "test limit"))
    assert model.automatic_context(facts) == ("1280", "automatic: trained 3000, capped at 8192, "
                                                           "halved to fit memory")


def test_a_model_that_cannot_fit_names_the_numbers(model_path, monkeypatch):
    monkeypatch.setattr(resources, "memory_limit", lambda: (200 << 20, "cgroup limit memory.max"))
    with pytest.raises(UserError, match=r"does not fit in memory \(model 0.2 GiB \+ context 4096 tokens .* "
                                        r"cgroup limit memory.max 0.2 GiB\): choose a smaller MODEL_QUANT"):
        model.check_memory(model.model_facts([model_path]), 4096)


@pytest.mark.parametrize("architecture, name, repo, expected", [
    ("gemma3", "Gemma 3 270m", "org/gemma-GGUF", "gemma"),
    ("llama", "Meta Llama 3.1 8B Instruct", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "llama-3"),
    ("llama", "mistralai_mistral-7b-instruct-v0.2", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "mistral-instruct"),
    ("llama", "saiga_mistral_7b", "IlyaGusev/saiga_mistral_7b_gguf", "saiga"),
    ("qwen2", "Qwen2.5 7B Instruct", "Qwen/Qwen2.5-7B-Instruct-GGUF", "chatml"),
    ("phi3", "Phi 3", "org/phi-GGUF", ""),
])
def test_chat_format_follows_the_architecture_without_a_template(model_path, architecture, name, repo, expected):
    facts = model.model_facts([model_path])
    facts.architecture, facts.name = architecture, name
    assert model.automatic_chat_format(facts, repo)[0] == expected
    facts.has_chat_template = True
    assert model.automatic_chat_format(facts, repo) == ("", "automatic: the GGUF's chat template")


def test_the_memory_rule_counts_every_slot_and_the_prompt_cache(model_path, monkeypatch):
    facts = model.model_facts([model_path])
    one = model.memory_needed(facts, 4096)
    assert model.memory_needed(facts, 4096, slots=4) == one + 3 * 4096 * facts.kv_bytes_per_token
    assert model.memory_needed(facts, 4096, slots=4, prompt_cache=1 << 20) == \
        model.memory_needed(facts, 4096, slots=4) + (1 << 20)
    monkeypatch.setattr(resources, "memory_limit", lambda: (one + 4096 * facts.kv_bytes_per_token, "test limit"))
    model.check_memory(facts, 4096, slots=2)  # exactly fits
    with pytest.raises(UserError, match=r"context 4096 tokens x 3 slots .*: choose a smaller MODEL_QUANT or a "
                                        r"smaller N_CTX or PARALLEL"):
        model.check_memory(facts, 4096, slots=3)
