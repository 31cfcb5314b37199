"""The llama-server engine's own decisions, without starting it: slots, the prompt cache
and the command line from the settings (localllm_container/llama_server.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from localllm_container import cpu, llama_server, model, resources
from localllm_container.errors import UserError
from localllm_container.settings import Config


@pytest.fixture
def facts(model_path):
    return model.model_facts([model_path])


@pytest.mark.parametrize("cpus, slots", [(1, 4), (2, 4), (8, 8), (32, 16)])
def test_one_slot_per_cpu_within_bounds_when_memory_is_plenty(facts, monkeypatch, cpus, slots):
    monkeypatch.setattr(resources, "memory_limit", lambda: (64 << 30, "test limit"))
    assert llama_server.automatic_parallel(facts, 4096, cpus) == (str(slots), f"automatic: {cpus} CPUs, within 4..16")


def test_slots_are_lowered_until_they_fit(facts, monkeypatch):
    need = lambda slots: model.memory_needed(facts, 8192, slots,  # noqa: E731
                                             llama_server.prompt_cache_bytes(facts, 8192, slots))
    monkeypatch.setattr(resources, "memory_limit", lambda: (need(3), "test limit"))
    assert llama_server.automatic_parallel(facts, 8192, 8) == ("3", "automatic: 8 CPUs, within 4..16, "
                                                                    "lowered to fit memory")
    monkeypatch.setattr(resources, "memory_limit", lambda: (need(1) - 1, "test limit"))
    assert llama_server.automatic_parallel(facts, 8192, 8)[0] == "1"  # then check_memory says it cannot fit


def test_the_prompt_cache_is_as_large_as_the_slots_within_the_cap(facts):
    assert llama_server.prompt_cache_bytes(facts, 2048, 4) == 4 * 2048 * facts.kv_bytes_per_token
    assert llama_server.prompt_cache_bytes(facts, 1 << 20, 16) == 8192 << 20


def config(**values: str) -> Config:
    base = dict(MODEL_ALIAS="m", PORT="8000", N_CTX="2048", PARALLEL="4", N_THREADS="2", N_THREADS_BATCH="2",
                CHAT_FORMAT="")
    base.update(values)
    return Config(base, {}, [])


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_n_ctx_is_each_slots_context(facts, tmp_path):
    args = llama_server.command(config(), tmp_path / "m.gguf", facts, 8001)
    assert (option(args, "--ctx-size"), option(args, "--parallel")) == ("8192", "4")
    assert "--no-kv-unified" in args and option(args, "--fit") == "off"
    assert option(args, "--cache-ram") == str(4 * 2048 * facts.kv_bytes_per_token >> 20)
    assert option(args, "--threads-http") == "12"  # a thread for each slot and each other connection of the front


def test_the_ggufs_template_or_a_built_in_one(facts, tmp_path):
    assert "--jinja" in llama_server.command(config(), tmp_path / "m.gguf", facts, 8001)
    args = llama_server.command(config(CHAT_FORMAT="llama-3"), tmp_path / "m.gguf", facts, 8001)
    assert args.index("--no-jinja") < args.index("--chat-template") and option(args, "--chat-template") == "llama3"
    with pytest.raises(UserError, match="CHAT_FORMAT='saiga' has no equivalent in llama-server"):
        llama_server.command(config(CHAT_FORMAT="saiga"), tmp_path / "m.gguf", facts, 8001)


def test_embedding_is_an_option_and_the_api_key_is_the_fronts(facts, tmp_path):
    """The front checks API_KEY: llama-server gets none, on its command line or in its environment."""
    args = llama_server.command(config(API_KEY="sk-1", EMBEDDING="true"), tmp_path / "m.gguf", facts, 8001)
    assert "--embeddings" in args and not any("sk-1" in arg for arg in args)
    assert "sk-1" not in llama_server.environment({}, "").values()
    assert "--embeddings" not in llama_server.command(config(EMBEDDING="false"), tmp_path / "m.gguf", facts, 8001)
    assert "--embeddings" in llama_server.command(config(EMBEDDING="on"), tmp_path / "m.gguf", facts, 8001)  # pydantic's


def test_its_environment_names_the_cpu_variant_to_load():
    """llama-server loads the variant the entrypoint chose (GGML_BACKEND_PATH), none for --help."""
    variant = cpu.choose_cpu_variant("")[0]
    env = llama_server.environment({}, variant)
    assert env["GGML_BACKEND_PATH"] == str(cpu.variant_files()[variant]) and Path(env["GGML_BACKEND_PATH"]).is_file()
    assert "GGML_BACKEND_PATH" not in llama_server.environment({}, "")


def test_its_variables_come_from_its_own_help():
    names = llama_server.documented_variables()
    assert {"LLAMA_ARG_BATCH", "LLAMA_ARG_FLASH_ATTN", "LLAMA_ARG_CTX_SIZE"} <= names and len(names) > 100
    own = {name for name in llama_server.OWN_VARIABLES if name.startswith("LLAMA_ARG_")}
    assert own <= names  # each refused name is a real one


def test_a_bad_value_of_a_variable_does_not_hide_the_names(monkeypatch):
    """llama-server --help fails on LLAMA_ARG_BATCH=abc; the names are read without the user's values."""
    monkeypatch.setenv("LLAMA_ARG_BATCH", "abc")
    llama_server.documented_variables.cache_clear()
    try:
        assert "LLAMA_ARG_BATCH" in llama_server.documented_variables()
    finally:
        llama_server.documented_variables.cache_clear()
