"""The settings table and what is done with it: model.env parsing, precedence
(environment > model.env > default), validation of every value before anything heavy
starts, and filling in the automatic values with the reason for each.

It owns the names, defaults and messages of the settings. The facts behind the
automatic values come from resources (CPUs), cpu (the build) and model (context, chat
format); it reads no file but model.env and starts nothing (supervisor does).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import llama_server
from .cpu import check_platform, choose_cpu_variant
from .errors import UserError
from .model import CONTEXT_STEP, ModelFacts, automatic_chat_format, automatic_context, check_memory
from .resources import available_cpus

ENGINES = ("localllm", "llama-server")
LOG_FORMATS = ("text", "json")
QUEUE_PER_SLOT = 4  # automatic MAX_QUEUE: a short wait behind each slot, not minutes in a line
# Automatic MAX_CONNECTIONS: room for every slot and place in the queue twice over (clients
# that keep idle connections, bodies on their way), and never fewer than this.
MIN_CONNECTIONS = 256
SPARE_CONNECTIONS = 8  # a set MAX_CONNECTIONS leaves at least this beyond the slots and the queue (probes, /v1/models)
API_KEY_CHARACTERS = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # visible ASCII but the comma: what a header carries
ORIGIN = re.compile(r"https?://[^/\s,]+")  # scheme://host[:port], as a browser sends it

ROOT = Path(__file__).resolve().parent.parent  # /app in the image: model.env lives beside entrypoint.py
MODEL_ENV_DEFAULT = ROOT / "model.env"


@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # "" means: no default (required) or automatic, see `auto`
    help: str
    auto: bool = False  # empty value is filled in automatically at serve time
    required: bool = False


# The image's own settings. Anything else in model.env must be a setting of the
# engine's server (llama-cpp-python's names for localllm, LLAMA_ARG_* for llama-server)
# or a Hugging Face hub variable (HF_*).
SETTINGS = {s.name: s for s in (
    Setting("MODEL", "", "Hugging Face repo id (ORG/NAME) of the GGUF model", required=True),
    Setting("MODEL_FILE", "", "exact file in the repo; empty = choose by MODEL_QUANT"),
    Setting("MODEL_QUANT", "Q4_K_M", "quantisation to pick when MODEL_FILE is empty"),
    Setting("MODEL_ALIAS", "", "model id shown by /v1/models; empty = repo name", auto=True),
    Setting("N_CTX", "", "context length in tokens; empty = the model's, capped to fit", auto=True),
    Setting("N_THREADS", "", "generation threads; empty = CPUs this container may use", auto=True),
    Setting("N_THREADS_BATCH", "", "prompt threads; empty = same as N_THREADS", auto=True),
    Setting("CHAT_FORMAT", "", "llama-cpp-python chat format; empty = from the GGUF", auto=True),
    Setting("PORT", "8000", "port the server listens on"),
    Setting("STOP_TIMEOUT", "10", "seconds to wait for the server to stop before SIGKILL"),
    Setting("VERIFY_MODEL_SHA256", "false", "hash the model at start and compare with the hub's SHA-256"),
    Setting("CPU_LEVEL", "", "llama.cpp CPU variant to load (haswell, skylakex, icelake, zen4, ...); "
            "empty = the best for this CPU",
            auto=True),
    Setting("ENGINE", "localllm", "localllm (llm run, one request at a time) or llama-server (parallel slots)"),
    Setting("PARALLEL", "", "llama-server's slots (requests answered at once); empty = from CPUs and memory",
            auto=True),
    Setting("MAX_QUEUE", "", "requests that may wait for a slot, beyond them 503 at once; empty = "
            f"{QUEUE_PER_SLOT} per slot", auto=True),
    Setting("LOG_FORMAT", "text", "text, or json: one JSON object a line for log collectors"),
    Setting("API_KEY", "", "keys a client must send (Authorization: Bearer KEY, or x-api-key: KEY), separated "
            "by commas; empty = none"),
    Setting("METRICS_NEED_KEY", "false", "true: /metrics needs API_KEY too (Prometheus sends it as a bearer token)"),
    Setting("CORS_ORIGINS", "", "origins of the web pages that may call the API (https://app.example.org, ...), "
            "or *; empty = none"),
    Setting("CLIENT_TIMEOUT", "60", "seconds a client may take to send its request, or to take the next part of "
            "an answer"),
    Setting("MAX_CONNECTIONS", "", f"open connections at most; empty = {MIN_CONNECTIONS}, or twice the slots "
            "and MAX_QUEUE if more", auto=True),
)}
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# llama-cpp-python server settings whose own defaults are wrong for a shared node.
SERVER_DEFAULTS = {
    # true lets each new request cut off the answer being streamed to someone else
    "INTERRUPT_REQUESTS": "false",
    # true computes logits for every prompt token: prompt processing 2.3x slower
    # (docs/en/performance.md); only `logprobs` requests need it
    "LOGITS_ALL": "false",
    # false makes prompts and generation 5-7 % slower on both test models (bench/defaults.py,
    # docs/en/performance.md); llama-server and llama-bench turn it on for a CPU by default too
    "FLASH_ATTN": "true",
}


def parse_env_file(path: Path) -> dict[str, str]:
    """Read plain KEY=VALUE lines, the same format `docker run --env-file` takes."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"MODEL_ENV_FILE={path}: cannot read it ({exc.strerror})") from None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"{path.name} line {number}: expected KEY=VALUE, got {raw!r}")
        values[key] = value
    return values


@dataclass
class Config:
    """Effective settings: value and where it came from, per name. `extra` holds
    the pass-through ones (the engine's server settings, HF_*) that go to it as-is."""
    values: dict[str, str]
    sources: dict[str, str]
    extra: list[str]

    def __getitem__(self, name: str) -> str:
        return self.values[name]


def given(values: dict[str, str]) -> dict[str, str]:
    """The values that are set: an empty one (`-e N_CTX=`, `--env-file`'s `CHAT_FORMAT=`,
    a manifest's `value: ""`) counts as not given, so the next source or the default applies."""
    return {name: value.strip() for name, value in values.items() if value.strip()}


def load_config(environ: dict[str, str], env_file: Path) -> Config:
    """Merge process environment > model.env > built-in defaults, then validate."""
    file_values = parse_env_file(env_file)
    from_env, from_file = given(environ), given(file_values)
    values, sources = {}, {}

    def take(name: str, default: str | None) -> None:
        if name in from_env:
            values[name], sources[name] = from_env[name], "env"
        elif name in from_file:
            values[name], sources[name] = from_file[name], env_file.name
        elif default is not None:
            values[name], sources[name] = default, "default"

    for name, setting in SETTINGS.items():
        take(name, setting.default)
    engine = values["ENGINE"]
    if engine not in ENGINES:
        raise UserError(f"ENGINE={engine!r} is not valid: expected {' or '.join(ENGINES)}")
    fields = server_settings()
    for name in file_values:
        if name not in SETTINGS and name not in fields and not name.startswith(("HF_", "LLAMA_")):
            raise UserError(f"{name} in {env_file.name} is not a setting of this image, of llama-cpp-python's "
                            "server, of llama-server (LLAMA_ARG_*) or of the Hugging Face hub (HF_*): "
                            "check its spelling")
    own = llama_server.OWN_VARIABLES if engine == "llama-server" else {}  # LLAMA_API_KEY is not LLAMA_ARG_*
    given_names = set(from_file) | {name for name in from_env
                                     if name in fields or name in own or name.startswith("LLAMA_ARG_")}
    defaults = SERVER_DEFAULTS if engine == "localllm" else {}
    extra = sorted((given_names | set(defaults)) - set(SETTINGS))
    for name in extra:
        check_engine_takes(engine, name)
        take(name, defaults.get(name))
    config = Config(values, sources, extra)
    validate(config, fields)
    return config


def check_engine_takes(engine: str, name: str) -> None:
    """A pass-through setting the chosen engine would not read is an error, never dropped."""
    if name.startswith("HF_"):
        return
    if engine == "localllm" and name.startswith("LLAMA_"):
        raise UserError(f"{name} is a setting of llama-server, which ENGINE=localllm does not run: "
                        "set ENGINE=llama-server, or use llama-cpp-python's setting of the same meaning "
                        "(docs/en/configuration.md)")
    if engine == "llama-server" and not name.startswith("LLAMA_"):
        if name not in llama_server.SHARED_SETTINGS:
            raise UserError(f"{name} is a setting of llama-cpp-python's server, which ENGINE=llama-server does "
                            "not run: use llama-server's variable of the same meaning (LLAMA_ARG_*, "
                            "docs/en/configuration.md), or set ENGINE=localllm")
    elif engine == "llama-server":
        llama_server.check_variable(name)


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _positive_int(config: Config, name: str, allow_empty: bool = False, upper: int | None = None,
                  lower: int = 1) -> None:
    value = config[name]
    if allow_empty and value == "":
        return
    valid = f"a whole number from {lower} to {upper}" if upper else f"a whole number of at least {lower}"
    if allow_empty:
        valid += ", or empty for automatic"
    if not value.isdigit() or not lower <= int(value) <= (upper or math.inf):
        raise UserError(f"{name}={value!r} is not valid: expected {valid}")


def validate(config: Config, server_fields: dict) -> None:
    """Check every setting cheaply, so mistakes surface before a model loads."""
    model = config["MODEL"]
    if not model:
        raise UserError("MODEL is not set: set it in model.env or the environment "
                        "to a Hugging Face repo id such as TheBloke/Mistral-7B-Instruct-v0.2-GGUF")
    if not REPO_ID.fullmatch(model) or len(model) > 96:
        raise UserError(f"MODEL={model!r} is not valid: expected a Hugging Face repo id ORG/NAME")
    file = config["MODEL_FILE"]
    if file and not file.lower().endswith(".gguf"):
        raise UserError(f"MODEL_FILE={file!r} is not valid: expected a .gguf file name in {model}, or empty")
    if not file and not re.fullmatch(r"[A-Za-z0-9_]+", config["MODEL_QUANT"]):
        raise UserError(f"MODEL_QUANT={config['MODEL_QUANT']!r} is not valid: "
                        "expected a quantisation name such as Q4_K_M, Q5_K_M or Q8_0")
    _positive_int(config, "N_CTX", allow_empty=True)
    if config["N_CTX"] and int(config["N_CTX"]) % CONTEXT_STEP:
        near = max(CONTEXT_STEP, int(config["N_CTX"]) // CONTEXT_STEP * CONTEXT_STEP)
        raise UserError(f"N_CTX={config['N_CTX']!r} is not valid: expected a multiple of {CONTEXT_STEP} such as "
                        f"{near} or {near + CONTEXT_STEP} (llama.cpp sizes the context in steps of {CONTEXT_STEP}), "
                        "or empty for automatic")
    _positive_int(config, "N_THREADS", allow_empty=True, upper=1024)
    _positive_int(config, "N_THREADS_BATCH", allow_empty=True, upper=1024)
    _positive_int(config, "PORT", upper=65535)
    _positive_int(config, "STOP_TIMEOUT", upper=3600)
    _positive_int(config, "PARALLEL", allow_empty=True, upper=256)
    if config["PARALLEL"] and config["ENGINE"] != "llama-server":
        raise UserError(f"PARALLEL={config['PARALLEL']!r} is a setting of ENGINE=llama-server (localllm answers "
                        "one request at a time): set ENGINE=llama-server, or leave PARALLEL empty")
    _positive_int(config, "MAX_QUEUE", allow_empty=True, upper=100000, lower=0)
    if config["LOG_FORMAT"] not in LOG_FORMATS:
        raise UserError(f"LOG_FORMAT={config['LOG_FORMAT']!r} is not valid: expected {' or '.join(LOG_FORMATS)}")
    for name in ("VERIFY_MODEL_SHA256", "METRICS_NEED_KEY"):
        if config[name].lower() not in BOOLEANS:
            raise UserError(f"{name}={config[name]!r} is not valid: expected true or false")
    validate_access(config)
    _positive_int(config, "CLIENT_TIMEOUT", upper=3600)
    _positive_int(config, "MAX_CONNECTIONS", allow_empty=True, upper=65536, lower=16)
    if config["CHAT_FORMAT"]:
        formats = chat_formats()
        if config["CHAT_FORMAT"] not in formats:
            raise UserError(f"CHAT_FORMAT={config['CHAT_FORMAT']!r} is not valid: expected empty "
                            f"(use the GGUF's template) or one of {', '.join(sorted(formats))}")
        if config["ENGINE"] == "llama-server":
            llama_server.chat_template(config["CHAT_FORMAT"])
    if config["ENGINE"] == "llama-server":
        llama_server.binary()
    for name in config.extra:
        if name in server_fields:
            check_server_setting(name, config[name], server_fields[name])


def validate_access(config: Config) -> None:
    """API_KEY, METRICS_NEED_KEY and CORS_ORIGINS; a message never shows a key."""
    keys = config["API_KEY"].split(",") if config["API_KEY"] else []
    for number, key in enumerate(keys, 1):
        if not API_KEY_CHARACTERS.fullmatch(key.strip()):
            raise UserError(f"API_KEY is not valid: its key {number} of {len(keys)} is "
                            f"{'empty' if not key.strip() else 'not plain text'}: expected keys of visible ASCII "
                            "characters (no spaces), separated by commas")
    if BOOLEANS[config["METRICS_NEED_KEY"].lower()] and not keys:
        raise UserError("METRICS_NEED_KEY=true needs API_KEY: set the keys, or METRICS_NEED_KEY=false")
    origins = [origin.strip() for origin in config["CORS_ORIGINS"].split(",")] if config["CORS_ORIGINS"] else []
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin) or origin == "*" and len(origins) > 1:
            raise UserError(f"CORS_ORIGINS={config['CORS_ORIGINS']!r} is not valid: expected origins such as "
                            "https://app.example.org or http://localhost:3000 (no path), separated by commas, "
                            "or * alone for any")


def chat_formats() -> set[str]:
    """Names llama-cpp-python accepts for CHAT_FORMAT."""
    from llama_cpp import llama_chat_format
    return set(llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers)


@functools.cache
def server_settings() -> dict:
    """llama-cpp-python server settings by environment name (pydantic-settings, upper case)."""
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    fields = {**ModelSettings.model_fields, **ServerSettings.model_fields}
    own = {"MODEL"} | set(SETTINGS)  # ours are validated above; MODEL is set by localllm
    return {name.upper(): field for name, field in fields.items() if name.upper() not in own}


def check_server_setting(name: str, value: str, field) -> None:
    """Validate one pass-through value the way the server will parse it."""
    import pydantic
    try:
        parsed = json.loads(value) if value[:1] in "[{" else value
        pydantic.TypeAdapter(field.annotation).validate_python(parsed)
    except (ValueError, pydantic.ValidationError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, pydantic.ValidationError) else str(exc)
        raise UserError(f"{name}={value!r} is not valid for llama-cpp-python's server: {reason}") from None


def resolve_runtime(config: Config, model: ModelFacts | None = None) -> None:
    """Fill in the automatic values and say why; those that depend on the model
    file (context, chat format) only when its facts are known."""
    if not config["N_THREADS"]:
        count, why = available_cpus()
        config.values["N_THREADS"], config.sources["N_THREADS"] = str(count), f"automatic: {why}"
    if not config["N_THREADS_BATCH"]:
        config.values["N_THREADS_BATCH"] = config["N_THREADS"]
        config.sources["N_THREADS_BATCH"] = "automatic: same as N_THREADS"
    if not config["MODEL_ALIAS"]:
        config.values["MODEL_ALIAS"] = re.sub(r"(?i)-gguf$", "", config["MODEL"].split("/")[1])
        config.sources["MODEL_ALIAS"] = "automatic: repo name"
    config.values["CPU_LEVEL"], config.sources["CPU_LEVEL"] = choose_cpu_variant(config["CPU_LEVEL"])
    if model is None:
        for name in ("N_CTX", "CHAT_FORMAT", "MAX_QUEUE", "MAX_CONNECTIONS") + (
                ("PARALLEL",) if config["ENGINE"] == "llama-server" else ()):
            if not config[name]:
                config.sources[name] = "automatic: decided at start from the model file"
        return
    if not config["N_CTX"]:
        config.values["N_CTX"], config.sources["N_CTX"] = automatic_context(model)
    if not config["CHAT_FORMAT"]:
        config.values["CHAT_FORMAT"], config.sources["CHAT_FORMAT"] = automatic_chat_format(model, config["MODEL"])
    n_ctx = int(config["N_CTX"])
    if config["ENGINE"] != "llama-server":
        check_memory(model, n_ctx)
    else:
        if config["CHAT_FORMAT"]:
            llama_server.chat_template(config["CHAT_FORMAT"])  # an automatic choice may have no equivalent
        if not config["PARALLEL"]:
            config.values["PARALLEL"], config.sources["PARALLEL"] = llama_server.automatic_parallel(
                model, n_ctx, available_cpus()[0])
        slots = int(config["PARALLEL"])
        check_memory(model, n_ctx, slots, llama_server.prompt_cache_bytes(model, n_ctx, slots))
    if not config["MAX_QUEUE"]:
        slots = answered_at_once(config)
        config.values["MAX_QUEUE"] = str(QUEUE_PER_SLOT * slots)
        config.sources["MAX_QUEUE"] = f"automatic: {QUEUE_PER_SLOT} per slot, {slots} slot{'s' * (slots > 1)}"
    requests = answered_at_once(config) + int(config["MAX_QUEUE"])
    if not config["MAX_CONNECTIONS"]:
        config.values["MAX_CONNECTIONS"] = str(max(MIN_CONNECTIONS, 2 * requests))
        config.sources["MAX_CONNECTIONS"] = f"automatic: at least {MIN_CONNECTIONS}, twice the slots and MAX_QUEUE"
    elif int(config["MAX_CONNECTIONS"]) < requests + SPARE_CONNECTIONS:
        raise UserError(f"MAX_CONNECTIONS={config['MAX_CONNECTIONS']} is too few: the slots and MAX_QUEUE take "
                        f"{requests} and the health probes need room too; expected at least "
                        f"{requests + SPARE_CONNECTIONS}, or empty for automatic")


def answered_at_once(config: Config) -> int:
    """Requests the engine answers at once: llama-server's slots, localllm's one."""
    return int(config["PARALLEL"]) if config["ENGINE"] == "llama-server" else 1


def passed_at_once(config: Config) -> int:
    """Requests the front lets reach the engine at once: one per slot, so that those waiting
    wait at the front; with INTERRUPT_REQUESTS=true every admitted one, since a new request
    must reach llama-cpp-python to cut off the answer it is giving."""
    if config["ENGINE"] == "localllm" and llama_server.server_flag(config.values.get("INTERRUPT_REQUESTS", "")):
        return answered_at_once(config) + int(config["MAX_QUEUE"])
    return answered_at_once(config)


def model_env_path() -> Path:
    return Path(os.environ.get("MODEL_ENV_FILE", "").strip() or MODEL_ENV_DEFAULT)


def load() -> Config:
    """Check the machine, load the settings and export the pass-through ones, so that
    the hub client (imported later) and localllm's children see model.env's HF_* and
    server lines, and none of them sees an empty value."""
    check_platform()  # first: reading the settings imports llama_cpp
    fields = server_settings()
    for name, value in list(os.environ.items()):
        if not value.strip() and (name in SETTINGS or name in fields or name.startswith("HF_")):
            del os.environ[name]  # empty means not given, for the hub client and the server too
    env_file = model_env_path()
    cfg = load_config(dict(os.environ), env_file)
    for name in cfg.extra:
        os.environ.setdefault(name, cfg[name])
    return cfg
