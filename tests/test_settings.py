"""The settings: precedence, validation, automatic values and where each came from."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from localllm_container import resources, settings
from localllm_container.errors import UserError
from localllm_container.model import model_facts
from localllm_container.settings import load_config
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
    assert config.extra == ["FLASH_ATTN", "INTERRUPT_REQUESTS", "LOGITS_ALL", "N_BATCH", "USE_MLOCK"]


def test_a_new_request_does_not_interrupt_others_by_default(env_file):
    config = load_config({}, env_file)
    assert (config["INTERRUPT_REQUESTS"], config.sources["INTERRUPT_REQUESTS"]) == ("false", "default")
    assert load_config({"INTERRUPT_REQUESTS": "true"}, env_file)["INTERRUPT_REQUESTS"] == "true"


def test_flash_attention_is_on_by_default(env_file):
    """Measured faster on both test models (bench/defaults.py); false turns it off."""
    config = load_config({}, env_file)
    assert (config["FLASH_ATTN"], config.sources["FLASH_ATTN"]) == ("true", "default")
    assert load_config({"FLASH_ATTN": "false"}, env_file)["FLASH_ATTN"] == "false"


# What `docker run --env-file model.env` passes for the shipped model.env: every automatic
# setting present and empty.
EMPTY_AUTOMATIC = {name: "" for name, setting in settings.SETTINGS.items()
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
    code = ("import os; from localllm_container import settings, supervisor; cfg = settings.load(); "
            "settings.resolve_runtime(cfg); env = supervisor.server_env(cfg, dict(os.environ)); "
            "print(sorted(k for k, v in env.items() if not v.strip()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=clean_environ(
        MODEL_ENV_FILE=str(env_file), **EMPTY_AUTOMATIC, N_BATCH="", HF_ENDPOINT="", PORT=""))
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
    ({"MAX_QUEUE": "-1"}, r"MAX_QUEUE='-1' is not valid: expected a whole number from 0 to 100000, or empty"),
    ({"MAX_QUEUE": "lots"}, r"MAX_QUEUE='lots' is not valid: expected a whole number from 0 to 100000"),
    ({"LOG_FORMAT": "JSON5"}, r"LOG_FORMAT='JSON5' is not valid: expected text or json"),
    ({"API_KEY": "sk-one,,sk-two"}, r"API_KEY is not valid: its key 2 of 3 is empty: expected keys of visible ASCII"),
    ({"API_KEY": "sk-one, sk two"}, r"API_KEY is not valid: its key 2 of 2 is not plain text"),  # never the key
    ({"METRICS_NEED_KEY": "true"}, r"METRICS_NEED_KEY=true needs API_KEY"),
    ({"METRICS_NEED_KEY": "maybe"}, r"METRICS_NEED_KEY='maybe' is not valid: expected true or false"),
    ({"CORS_ORIGINS": "app.example.org"}, r"CORS_ORIGINS='app.example.org' is not valid: expected origins such as"),
    ({"CORS_ORIGINS": "https://a.org/"}, r"CORS_ORIGINS='https://a.org/' is not valid"),
    ({"CORS_ORIGINS": "*,https://a.org"}, r"CORS_ORIGINS='\*,https://a.org' is not valid: .*or \* alone"),
    ({"CLIENT_TIMEOUT": "0"}, r"CLIENT_TIMEOUT='0' is not valid: expected a whole number from 1 to 3600"),
    ({"MAX_CONNECTIONS": "8"}, r"MAX_CONNECTIONS='8' is not valid: expected a whole number from 16 to 65536"),
])
def test_bad_values_name_the_variable_and_what_is_valid(env_file, environ, message):
    with pytest.raises(UserError, match=message):
        load_config(environ, env_file)


def test_automatic_values_say_why(env_file):
    config = load_config({}, env_file)
    settings.resolve_runtime(config)
    assert config["MODEL_ALIAS"] == "Foo-7B"
    assert int(config["N_THREADS"]) >= 1 and config.sources["N_THREADS"].startswith("automatic: affinity")
    assert config["N_THREADS_BATCH"] == config["N_THREADS"]


def test_the_automatic_queue_bound_is_four_per_slot(env_file, model_path):
    """The localllm engine answers one request at a time: 4 may wait. A value given stays."""
    facts = model_facts([model_path])
    config = load_config({}, env_file)
    settings.resolve_runtime(config, facts)
    assert (config["MAX_QUEUE"], config.sources["MAX_QUEUE"]) == ("4", "automatic: 4 per slot, 1 slot")
    given = load_config({"MAX_QUEUE": "0"}, env_file)
    settings.resolve_runtime(given, facts)
    assert given["MAX_QUEUE"] == "0"


def test_max_connections_leaves_room_for_the_slots_and_the_queue(env_file, model_path):
    config = load_config({"MAX_QUEUE": "20", "MAX_CONNECTIONS": "28"}, env_file)
    with pytest.raises(UserError, match=r"MAX_CONNECTIONS=28 is too few: the slots and MAX_QUEUE take 21 .* "
                                        r"expected at least 29, or empty for automatic"):
        settings.resolve_runtime(config, model_facts([model_path]))


def test_config_prints_each_setting_with_its_source(tmp_path):
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF", N_BATCH="256",
                               API_KEY="sk-secret-one,sk-secret-two")
    done = run_entrypoint("config", env=clean_environ(MODEL_ENV_FILE=str(env_file), N_CTX="8192"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "MODEL=TheBloke/Foo-7B-GGUF  # model.env" in lines
    assert "N_CTX=8192  # env" in lines
    assert "MODEL_QUANT=Q4_K_M  # default" in lines
    assert "MODEL_ALIAS=Foo-7B  # automatic: repo name" in lines
    assert "N_BATCH=256  # model.env, passed on" in lines
    assert any(line.startswith("N_THREADS=") and "# automatic: affinity" in line for line in lines)
    assert "API_KEY=(2 keys, hidden)  # model.env" in lines and "sk-secret" not in done.stdout


# ------------------------------------------------------------------ engines ---

def test_the_engine_is_localllm_unless_asked(tmp_path):
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    config = load_config({}, env_file)
    assert (config["ENGINE"], config.sources["ENGINE"]) == ("localllm", "default")
    assert load_config({"ENGINE": "llama-server"}, env_file)["ENGINE"] == "llama-server"


def test_llama_server_takes_its_own_variables_and_the_shared_settings(tmp_path):
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF", ENGINE="llama-server",
                               LLAMA_ARG_BATCH="256", API_KEY="sk-1")
    config = load_config({"LLAMA_ARG_FLASH_ATTN": "off", "EMBEDDING": "true"}, env_file)
    assert config.extra == ["EMBEDDING", "LLAMA_ARG_BATCH", "LLAMA_ARG_FLASH_ATTN"]  # no localllm defaults
    assert config["API_KEY"] == "sk-1"  # the image's own: the front checks it for both engines
    assert (config["LLAMA_ARG_FLASH_ATTN"], config.sources["LLAMA_ARG_FLASH_ATTN"]) == ("off", "env")


@pytest.mark.parametrize("chosen, given, message", [
    ("localllm", {"LLAMA_ARG_BATCH": "256"}, "LLAMA_ARG_BATCH is a setting of llama-server, which ENGINE=localllm "
                                             "does not run: set ENGINE=llama-server"),
    ("llama-server", {"N_BATCH": "256"}, "N_BATCH is a setting of llama-cpp-python's server, which "
                                         "ENGINE=llama-server does not run: use llama-server's variable"),
    ("llama-server", {"LLAMA_ARG_BATHC": "1"}, "LLAMA_ARG_BATHC is not a variable of llama-server: check its "
                                               "spelling"),
    ("llama-server", {"LLAMA_ARG_THREADS": "4"}, "LLAMA_ARG_THREADS is set by the image from its own settings: "
                                                 "set N_THREADS"),
    ("llama-server", {"CHAT_FORMAT": "functionary"}, "CHAT_FORMAT='functionary' has no equivalent in llama-server"),
    ("localllm", {"PARALLEL": "4"}, "PARALLEL='4' is a setting of ENGINE=llama-server"),
    ("llama-server", {"LLAMA_API_KEY": "k"}, "LLAMA_API_KEY is set by the image from its own settings: set API_KEY "
                                             "(the front on PORT checks it)"),
    ("llama-server", {"LLAMA_ARG_CORS_ORIGINS": "*"}, "LLAMA_ARG_CORS_ORIGINS is set by the image from its own "
                                                      "settings: set CORS_ORIGINS"),
    ("llama-server", {"LLAMA_ARG_ENDPOINT_METRICS": "0"}, "LLAMA_ARG_ENDPOINT_METRICS is set by the image from its "
                                                          "own settings: leave it: the front on PORT serves /metrics"),
    ("llama-server", {"PARALLEL": "many"}, "PARALLEL='many' is not valid: expected a whole number from 1 to 256, "
                                           "or empty for automatic"),
    ("LLAMA-SERVER", {}, "ENGINE='LLAMA-SERVER' is not valid: expected localllm or llama-server"),
])
def test_a_setting_the_engine_does_not_take_is_an_error(tmp_path, chosen, given, message):
    """From model.env or the environment: never dropped in silence."""
    for in_file in (True, False):
        lines = dict(MODEL="TheBloke/Foo-7B-GGUF", ENGINE=chosen, **(given if in_file else {}))
        env_file = write_model_env(tmp_path / "model.env", **lines)
        with pytest.raises(UserError) as caught:
            load_config({} if in_file else given, env_file)
        assert str(caught.value).startswith(message), caught.value


def test_config_shows_the_engine_and_llama_servers_command(tmp_path, pulled_home):
    """With the model pulled, `config` resolves everything llama-server will be given."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="test-org/gemma-3-270m-GGUF", ENGINE="llama-server",
                               N_CTX="1024", LLAMA_ARG_BATCH="256")
    done = run_entrypoint("config", env=clean_environ(MODEL_ENV_FILE=str(env_file), HF_HOME=str(pulled_home),
                                                      HF_HUB_OFFLINE="1", N_THREADS="2"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "ENGINE=llama-server  # model.env" in lines
    cpus = resources.available_cpus()[0]
    slots = max(4, min(16, cpus))  # the rule; memory is plenty for the test model
    assert f"PARALLEL={slots}  # automatic: {cpus} CPUs, within 4..16" in lines
    assert "LLAMA_ARG_BATCH=256  # model.env, passed on" in lines
    assert f"MAX_QUEUE={4 * slots}  # automatic: 4 per slot, {slots} slots" in lines
    assert f"MAX_CONNECTIONS={max(256, 10 * slots)}  # automatic: at least 256, twice the slots and MAX_QUEUE" in lines
    command = next(line for line in lines if line.startswith("# llama-server's command (BACKEND_PORT: "))
    assert "/llama-server --model " in command and "gemma-3-270m-Q4_K_M.gguf" in command
    assert f" --ctx-size {1024 * slots} --parallel {slots} " in command and " --threads 2 " in command
    assert f" --threads-http {slots + 8} " in command


def test_the_key_goes_to_the_front_only_and_never_on_a_command_line(env_file, model_path):
    """The front checks API_KEY for both engines: an engine given it would refuse the front's
    requests (which carry no key), and `ps` shows any command line in the container."""
    from localllm_container import supervisor
    config = load_config({"API_KEY": "sk-front-only"}, env_file)
    settings.resolve_runtime(config, model_facts([model_path]))
    assert "API_KEY" not in supervisor.server_env(config, {"API_KEY": "sk-front-only", "HOME": "/tmp"})
    command, env = supervisor.front_process(config, 8001, {})
    assert env["API_KEY"] == "sk-front-only" and not any("sk-front-only" in arg for arg in command)
