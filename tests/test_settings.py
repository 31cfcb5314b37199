"""Unit tests of the entrypoint's settings: precedence, validation and file choice."""
from __future__ import annotations

import dataclasses

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import entrypoint
from entrypoint import UserError, choose_files, load_config, quant_of
from conftest import ROOT, clean_environ, run_entrypoint, write_model_env


@pytest.fixture
def env_file(tmp_path) -> Path:
    return write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF", N_CTX="2048", N_BATCH="256")


def test_environment_wins_over_model_env_over_defaults(env_file):
    config = load_config({"N_CTX": "8192"}, env_file)
    assert (config["N_CTX"], config.sources["N_CTX"]) == ("8192", "env")
    config = load_config({}, env_file)
    assert (config["N_CTX"], config.sources["N_CTX"]) == ("2048", "model.env")
    assert (config["MODEL_QUANT"], config.sources["MODEL_QUANT"]) == ("Q4_K_M", "default")


def test_server_settings_pass_through_with_the_same_precedence(env_file):
    assert load_config({}, env_file)["N_BATCH"] == "256"
    config = load_config({"N_BATCH": "1024", "USE_MLOCK": "false"}, env_file)
    assert (config["N_BATCH"], config.sources["N_BATCH"]) == ("1024", "env")
    assert config.extra == ["INTERRUPT_REQUESTS", "LOGITS_ALL", "N_BATCH", "USE_MLOCK"]


def test_a_new_request_does_not_interrupt_others_by_default(env_file):
    config = load_config({}, env_file)
    assert (config["INTERRUPT_REQUESTS"], config.sources["INTERRUPT_REQUESTS"]) == ("false", "default")
    assert load_config({"INTERRUPT_REQUESTS": "true"}, env_file)["INTERRUPT_REQUESTS"] == "true"


# What `docker run --env-file model.env` passes for the shipped model.env: every automatic
# setting present and empty.
EMPTY_AUTOMATIC = {name: "" for name, setting in entrypoint.SETTINGS.items()
                   if setting.auto or not (setting.default or setting.required)}


def test_an_empty_value_is_as_if_not_given(env_file):
    """`-e N_CTX=`, `--env-file`, a manifest's `value: ""`: model.env's value, else the default."""
    config = load_config({"N_CTX": "", "PORT": " ", "N_BATCH": ""}, env_file)
    assert (config["N_CTX"], config.sources["N_CTX"]) == ("2048", "model.env")
    assert (config["PORT"], config.sources["PORT"]) == ("8000", "default")
    assert (config["N_BATCH"], config.sources["N_BATCH"]) == ("256", "model.env")
    bare = write_model_env(env_file.parent / "bare.env", MODEL="TheBloke/Foo-7B-GGUF", MODEL_QUANT="",
                           N_BATCH="", STOP_TIMEOUT="")
    config = load_config(EMPTY_AUTOMATIC, bare)
    assert all(config[name] == "" and config.sources[name] == "default" for name in EMPTY_AUTOMATIC), config
    assert (config["MODEL_QUANT"], config["STOP_TIMEOUT"]) == ("Q4_K_M", "10")
    assert "N_BATCH" not in config.extra


def test_no_empty_setting_reaches_the_server(tmp_path):
    """The environment the model server gets, from an --env-file style environment."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF", N_BATCH="")
    code = ("import os, entrypoint; cfg = entrypoint.load(); entrypoint.resolve_runtime(cfg); "
            "env = entrypoint.server_env(cfg, dict(os.environ)); "
            "print(sorted(k for k, v in env.items() if not v.strip()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=clean_environ(
        MODEL_ENV_FILE=str(env_file), **EMPTY_AUTOMATIC, N_BATCH="", API_KEY="", HF_ENDPOINT="", PORT=""))
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("lines, message", [
    ("MODEL=a/b\nN_CTXX=4096\n", "N_CTXX in model.env is not a setting"),
    ("MODEL=a/b\nexport N_CTX=1\n", "model.env line 2: expected KEY=VALUE"),
    ("MODEL=a/b\njust words\n", "model.env line 2: expected KEY=VALUE"),
])
def test_model_env_mistakes_are_named(tmp_path, lines, message):
    path = tmp_path / "model.env"
    path.write_text(lines)
    with pytest.raises(UserError, match=message):
        load_config({}, path)


def test_a_model_given_nowhere_is_named(tmp_path):
    with pytest.raises(UserError, match="MODEL is not set: set it in model.env or the environment"):
        load_config({"MODEL": ""}, write_model_env(tmp_path / "model.env", MODEL=""))


@pytest.mark.parametrize("environ, message", [
    ({"MODEL": "no-slash"}, "MODEL='no-slash' is not valid: expected a Hugging Face repo id"),
    ({"MODEL_FILE": "model.bin"}, "MODEL_FILE='model.bin' is not valid"),
    ({"MODEL_QUANT": "Q4 K"}, "MODEL_QUANT='Q4 K' is not valid"),
    ({"N_CTX": "abc"}, "N_CTX='abc' is not valid: expected a whole number of at least 1"),
    ({"N_CTX": "0"}, "N_CTX='0' is not valid: .* or empty for automatic"),
    ({"N_CTX": "300"}, r"N_CTX='300' is not valid: expected a multiple of 256 such as 256 or 512 \(llama.cpp"),
    ({"N_THREADS": "-2"}, "N_THREADS='-2' is not valid: .* or empty for automatic"),
    ({"PORT": "70000"}, "PORT='70000' is not valid: expected a whole number from 1 to 65535"),
    ({"CHAT_FORMAT": "nope"}, "CHAT_FORMAT='nope' is not valid: .*chatml.*gemma"),
    ({"USE_MLOCK": "perhaps"}, "USE_MLOCK='perhaps' is not valid for llama-cpp-python's server"),
])
def test_bad_values_name_the_variable_and_what_is_valid(env_file, environ, message):
    with pytest.raises(UserError, match=message):
        load_config(environ, env_file)


def test_automatic_values_say_why(env_file):
    config = load_config({}, env_file)
    entrypoint.resolve_runtime(config)
    assert config["MODEL_ALIAS"] == "Foo-7B"
    assert int(config["N_THREADS"]) >= 1 and config.sources["N_THREADS"].startswith("automatic: affinity")
    assert config["N_THREADS_BATCH"] == config["N_THREADS"]


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000"}, (1, "affinity 64, cgroup cpu.max 1.5 (floored)")),  # --cpus 1.5
    ({"cpu.max": "350000 100000"}, (3, "affinity 64, cgroup cpu.max 3.5 (floored)")),  # limits.cpu: 3500m
    ({"cpu.max": "250000 100000"}, (2, "affinity 64, cgroup cpu.max 2.5 (floored)")),
    ({"cpu.max": "max 100000"}, (64, "affinity 64")),
    ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, (4, "affinity 64, cgroup cfs quota 4")),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, (64, "affinity 64")),
    ({"cpu.max": "50000 100000"}, (1, "affinity 64, cgroup cpu.max 0.5 (floored)")),  # at least 1
])
def test_available_cpus_follow_the_cgroup_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(entrypoint.os, "sched_getaffinity", lambda pid: set(range(64)))
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    assert entrypoint.available_cpus(tmp_path) == expected


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
    config = entrypoint.Config(environ, {}, [])
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


def test_config_prints_each_setting_with_its_source(tmp_path):
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF", N_BATCH="256")
    done = run_entrypoint("config", env=clean_environ(MODEL_ENV_FILE=str(env_file), N_CTX="8192"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "MODEL=TheBloke/Foo-7B-GGUF  # model.env" in lines
    assert "N_CTX=8192  # env" in lines
    assert "MODEL_QUANT=Q4_K_M  # default" in lines
    assert "MODEL_ALIAS=Foo-7B  # automatic: repo name" in lines
    assert "N_BATCH=256  # model.env, passed on" in lines
    assert any(line.startswith("N_THREADS=") and "# automatic: affinity" in line for line in lines)


def test_pull_lists_the_hubs_quants_when_none_matches(tmp_path, hub):
    env_file = write_model_env(tmp_path / "model.env", MODEL="test-org/gemma-3-270m-GGUF", MODEL_QUANT="Q5_K_M")
    done = run_entrypoint("pull", env=clean_environ(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url,
                                                    MODEL_ENV_FILE=str(env_file)))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: MODEL_QUANT='Q5_K_M' matches no .gguf file in test-org/gemma-3-270m-GGUF: "
        "the repo has Q4_K_M, Q4_K_S, Q8_0 (or set MODEL_FILE)"]


def test_pull_of_an_unknown_repo_says_so(tmp_path, hub):
    env_file = write_model_env(tmp_path / "model.env", MODEL="test-org/absent-GGUF")
    done = run_entrypoint("pull", env=clean_environ(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url,
                                                    MODEL_ENV_FILE=str(env_file)))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: MODEL=test-org/absent-GGUF was not found at {hub.url} "
                                   "(check the repo id; private repos need HF_TOKEN)")


def test_pull_records_the_choice_for_offline_serving(pulled_home):
    record = (pulled_home / "localllm-model.json").read_text()
    assert '"gemma-3-270m-Q4_K_M.gguf"' in record
    snapshot = next((pulled_home / "hub/models--test-org--gemma-3-270m-GGUF/snapshots").iterdir())
    assert [p.name for p in snapshot.iterdir()] == ["gemma-3-270m-Q4_K_M.gguf"]


def test_model_facts_come_from_the_gguf_header(model_path):
    facts = entrypoint.model_facts([model_path])
    assert (facts.architecture, facts.trained_context, facts.has_chat_template) == ("gemma3", 32768, False)
    assert facts.size == model_path.stat().st_size
    assert facts.kv_bytes_per_token == 18 * 1 * (256 + 256) * 2  # layers x KV heads x (K + V dims) x f16
    assert facts.vocabulary == 262144


@pytest.mark.parametrize("memory, n_ctx, why", [
    (64 << 30, "8192", "automatic: trained 32768, capped at 8192"),
    (930 << 20, "2048", "automatic: trained 32768, capped at 8192, halved to fit memory"),
])
def test_automatic_context_is_capped_and_fits(model_path, monkeypatch, memory, n_ctx, why):
    monkeypatch.setattr(entrypoint, "memory_limit", lambda: (memory, "test limit"))
    assert entrypoint.automatic_context(entrypoint.model_facts([model_path])) == (n_ctx, why)


def test_automatic_context_keeps_to_whole_steps_of_256(model_path, monkeypatch):
    """llama.cpp pads to 256 and llama-cpp-python then fails on prompts in between."""
    facts = dataclasses.replace(entrypoint.model_facts([model_path]), trained_context=3000)
    monkeypatch.setattr(entrypoint, "memory_limit", lambda: (64 << 30, "test limit"))
    assert entrypoint.automatic_context(facts) == ("2816", "automatic: trained 3000, capped at 8192")
    room_for_1280 = entrypoint.memory_needed(facts, 1280)  # 2816 halved is 1408: down to a step
    monkeypatch.setattr(entrypoint, "memory_limit", lambda: (room_for_1280, "test limit"))
    assert entrypoint.automatic_context(facts) == ("1280", "automatic: trained 3000, capped at 8192, "
                                                           "halved to fit memory")


def test_a_model_that_cannot_fit_names_the_numbers(model_path, monkeypatch):
    monkeypatch.setattr(entrypoint, "memory_limit", lambda: (200 << 20, "cgroup limit memory.max"))
    with pytest.raises(UserError, match=r"does not fit in memory \(model 0.2 GiB \+ context 4096 tokens .* "
                                        r"cgroup limit memory.max 0.2 GiB\): choose a smaller MODEL_QUANT"):
        entrypoint.check_memory(entrypoint.model_facts([model_path]), 4096)


@pytest.mark.parametrize("architecture, name, repo, expected", [
    ("gemma3", "Gemma 3 270m", "org/gemma-GGUF", "gemma"),
    ("llama", "Meta Llama 3.1 8B Instruct", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "llama-3"),
    ("llama", "mistralai_mistral-7b-instruct-v0.2", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "mistral-instruct"),
    ("llama", "saiga_mistral_7b", "IlyaGusev/saiga_mistral_7b_gguf", "saiga"),
    ("qwen2", "Qwen2.5 7B Instruct", "Qwen/Qwen2.5-7B-Instruct-GGUF", "chatml"),
    ("phi3", "Phi 3", "org/phi-GGUF", ""),
])
def test_chat_format_follows_the_architecture_without_a_template(model_path, architecture, name, repo, expected):
    facts = entrypoint.model_facts([model_path])
    facts.architecture, facts.name = architecture, name
    assert entrypoint.automatic_chat_format(facts, repo)[0] == expected
    facts.has_chat_template = True
    assert entrypoint.automatic_chat_format(facts, repo) == ("", "automatic: the GGUF's chat template")


def test_taskset_limits_the_automatic_threads(tmp_path):
    """A real affinity mask, as `docker run --cpuset-cpus` or a Kubernetes CPU manager sets it."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run(["taskset", "-c", "0", sys.executable, str(ROOT / "entrypoint.py"), "config"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True)
    assert "N_THREADS=1  # automatic: affinity 1" in done.stdout.splitlines(), done.stdout + done.stderr


def test_cpuid_reads_the_same_features_as_the_kernel():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert entrypoint.cpu_features() == flags & set(entrypoint.CPUID_BITS)


@pytest.fixture
def levels_dir(tmp_path, monkeypatch):
    for level in entrypoint.CPU_LEVELS:
        (tmp_path / level).mkdir()
        (tmp_path / level / "libllama.so").touch()
    monkeypatch.setenv("CPU_LEVELS_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("features, level", [
    (entrypoint.CPU_LEVELS["avx512_vnni"] | {"avx512_bf16"}, "avx512_vnni"),  # Ice Lake, Zen 4
    (entrypoint.AVX512, "avx512"),  # Skylake-X, Cascade Lake
    (entrypoint.AVX2, "avx2"),  # Haswell, Broadwell, Zen 1-3
])
def test_the_best_installed_build_the_cpu_supports_is_chosen(levels_dir, monkeypatch, features, level):
    monkeypatch.setattr(entrypoint, "cpu_features", lambda: set(features))
    assert entrypoint.choose_cpu_level("")[0] == level


def test_a_forced_level_the_cpu_lacks_is_refused(levels_dir, monkeypatch):
    monkeypatch.setattr(entrypoint, "cpu_features", lambda: set(entrypoint.AVX2))
    with pytest.raises(UserError, match="CPU_LEVEL=avx512 needs avx512bw, avx512cd, avx512dq, avx512f, avx512vl"):
        entrypoint.choose_cpu_level("avx512")


QEMU = "qemu-x86_64-static"


def under_qemu(cpu: str, levels_dir: Path) -> subprocess.CompletedProcess:
    """The entrypoint's choice on an emulated CPU: CPUID answers for that CPU."""
    code = "import entrypoint; print(entrypoint.choose_cpu_level('')[0])"
    return subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CPU_LEVELS_DIR": str(levels_dir)}, timeout=120)


def test_an_avx2_cpu_gets_the_avx2_build(levels_dir):
    done = under_qemu("Haswell", levels_dir)
    assert (done.returncode, done.stdout.strip()) == (0, "avx2"), done.stderr


def test_a_cpu_without_avx2_gets_a_clear_message(levels_dir):
    done = under_qemu("Westmere", levels_dir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: this CPU lacks avx, avx2, bmi2, f16c, fma: the image needs an x86-64 CPU with AVX2 "
        "(Intel Haswell or AMD Zen and newer)")


def test_the_whole_serve_command_on_a_cpu_without_avx2(tmp_path):
    """qemu -cpu Westmere (no AVX): `serve` says so in one line before anything loads llama.cpp."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run([QEMU, "-cpu", "Westmere", sys.executable, str(ROOT / "entrypoint.py"), "serve"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: this CPU lacks avx, avx2, bmi2, f16c, fma: the image needs an x86-64 CPU with AVX2 "
        "(Intel Haswell or AMD Zen and newer)"]


def test_another_platform_is_named_before_any_x86_code_runs(tmp_path):
    """`setarch i686` makes the kernel report another machine, as an arm64 container's kernel does."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run(["setarch", "i686", sys.executable, str(ROOT / "entrypoint.py"), "serve"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: this image runs on x86-64 (linux/amd64) only; this machine is i686: build and run it with "
        "--platform linux/amd64 (emulated, and slow, on Apple Silicon; an x86-64 machine or VM is faster)"]
