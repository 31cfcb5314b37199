"""The second engine, llama.cpp's own server (ENGINE=llama-server): parallel slots with
continuous batching and a prompt cache, for a node a team shares. It owns what is
particular to this engine: where the binary is, which of its variables a user may
set, how CHAT_FORMAT maps to its templates, how many slots, and its command line.
The supervisor runs the command as its direct child; settings decide the values.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from .cpu import backend_environ
from .errors import UserError
from .front.routes import OTHER_CONNECTIONS, PROBE_CONNECTIONS
from .model import ModelFacts, fits_in_memory
from .server.log import load_failure

NAME = "llama-server"
# CHAT_FORMAT (llama-cpp-python's names) -> llama-server's built-in template of the same
# prompt layout. Names without one (saiga, functionary, alpaca, ...) are refused.
CHAT_TEMPLATES = {"chatml": "chatml", "qwen": "chatml", "llama-2": "llama2", "llama-3": "llama3",
                  "gemma": "gemma", "mistral-instruct": "mistral-v1", "zephyr": "zephyr",
                  "vicuna": "vicuna", "openchat": "openchat", "chatglm3": "chatglm3"}
# llama-server variables of the options the image passes on its command line, where they
# would lose to it in silence: each is refused with what to set instead.
OWN_VARIABLES = {"LLAMA_ARG_MODEL": "set MODEL and MODEL_FILE", "LLAMA_ARG_CTX_SIZE": "set N_CTX",
                 "LLAMA_ARG_THREADS": "set N_THREADS", "LLAMA_ARG_N_PARALLEL": "set PARALLEL",
                 "LLAMA_ARG_ALIAS": "set MODEL_ALIAS", "LLAMA_ARG_PORT": "set PORT",
                 "LLAMA_ARG_HOST": "leave it: llama-server listens on 127.0.0.1, behind the front on PORT",
                 "LLAMA_ARG_EMBEDDINGS": "set EMBEDDING", "LLAMA_ARG_CHAT_TEMPLATE": "set CHAT_FORMAT",
                 "LLAMA_ARG_JINJA": "set CHAT_FORMAT (empty: the GGUF's template with Jinja)",
                 "LLAMA_ARG_KV_UNIFIED": "set N_CTX and PARALLEL (each slot gets N_CTX)",
                 "LLAMA_ARG_CACHE_RAM": "leave it: the prompt cache is sized to fit memory (docs/en/configuration.md)",
                 "LLAMA_ARG_FIT": "leave it: N_CTX and PARALLEL are sized to fit memory before the start",
                 "LLAMA_ARG_OFFLINE": "leave it: the engine never downloads",
                 "LLAMA_ARG_ENDPOINT_METRICS": "leave it: the front on PORT serves /metrics",
                 "LLAMA_ARG_UI": "leave it: the web UI is not in the image",
                 "LLAMA_API_KEY": "set API_KEY (the front on PORT checks it)",
                 "LLAMA_ARG_API_KEY_FILE": "set API_KEY (the front on PORT checks it)",
                 "LLAMA_ARG_CORS_ORIGINS": "set CORS_ORIGINS (the front on PORT answers CORS)",
                 "LLAMA_ARG_THREADS_HTTP": "leave it: one thread for each connection the front may open",
                 "LLAMA_ARG_API_PREFIX": "leave it: /health, /v1 and the probes are at the root",
                 "LLAMA_ARG_SSL_KEY_FILE": "leave it: the container speaks HTTP (node-api and the ingress add TLS)",
                 "LLAMA_ARG_SSL_CERT_FILE": "leave it: the container speaks HTTP (node-api and the ingress add TLS)"}
# llama-cpp-python settings both engines take: EMBEDDING becomes --embeddings.
SHARED_SETTINGS = ("EMBEDDING",)
# HTTP threads beyond one per slot: the front's other connections to the engine, and 2 for
# a connection still closing while its successor opens.
HTTP_THREADS_BEYOND_SLOTS = OTHER_CONNECTIONS + PROBE_CONNECTIONS + 2
# Slots from the CPUs: one per CPU, at least MIN (a few users never wait in line even on
# 2 CPUs) and at most MAX (beyond, each answer gets too small a share of the CPUs).
MIN_SLOTS, MAX_SLOTS = 4, 16
PROMPT_CACHE_CAP_MIB = 8192  # llama-server's own default bound on its prompt cache


def binary() -> str:
    """The llama-server executable: on PATH (/opt/llama-server in the image)."""
    found = shutil.which(NAME)
    if not found:
        raise UserError("ENGINE=llama-server: this installation has no llama-server on PATH: build the image "
                        "from this repository's Dockerfile, or set ENGINE=localllm")
    return found


def environment(environ: dict[str, str], cpu_variant: str) -> dict[str, str]:
    """llama-server's environment: the CPU variant to load (empty: none, enough for --help)."""
    env = dict(environ)
    if cpu_variant:
        env.update(backend_environ(cpu_variant))
    return env


@functools.cache
def documented_variables() -> frozenset[str]:
    """The LLAMA_ARG_* names this llama-server reads, from its own --help."""
    quiet = {name: value for name, value in os.environ.items() if not name.startswith("LLAMA_")}  # a bad value
    done = subprocess.run([binary(), "--help"], env=environment(quiet, ""), capture_output=True, text=True,
                          timeout=60)
    names = frozenset(re.findall(r"\(env: (LLAMA_ARG_[A-Z0-9_]+)\)", done.stdout))
    if not names:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"ENGINE=llama-server: `llama-server --help` failed (status {done.returncode}: {last}): "
                        "this installation's llama-server is broken; rebuild the image, or set ENGINE=localllm")
    return names


def check_variable(name: str) -> None:
    """Refuse a LLAMA_ARG_* name llama-server does not read, or one the image sets."""
    if name in OWN_VARIABLES:
        raise UserError(f"{name} is set by the image from its own settings: {OWN_VARIABLES[name]}")
    if name.startswith("LLAMA_ARG_") and name not in documented_variables():
        raise UserError(f"{name} is not a variable of llama-server: check its spelling against "
                        "`llama-server --help` (the names after env:) or docs/en/configuration.md")


def chat_template(chat_format: str) -> str:
    if chat_format not in CHAT_TEMPLATES:
        raise UserError(f"CHAT_FORMAT={chat_format!r} has no equivalent in llama-server (ENGINE=llama-server): "
                        "leave it empty to use the GGUF's own template, or use one of "
                        f"{', '.join(sorted(CHAT_TEMPLATES))}, or set ENGINE=localllm")
    return CHAT_TEMPLATES[chat_format]


def prompt_cache_bytes(model: ModelFacts, n_ctx: int, slots: int) -> int:
    """The prompt cache in RAM (conversations that lost their slot): as large as the slots'
    own KV cache, within llama-server's default cap, so it counts in the memory rule."""
    return min(slots * n_ctx * model.kv_bytes_per_token, PROMPT_CACHE_CAP_MIB << 20)


def automatic_parallel(model: ModelFacts, n_ctx: int, cpus: int) -> tuple[str, str]:
    """One slot per CPU within [MIN_SLOTS, MAX_SLOTS], fewer while the model with the KV
    cache of every slot (N_CTX each) and the prompt cache does not fit in memory."""
    slots = start = min(MAX_SLOTS, max(MIN_SLOTS, cpus))
    while slots > 1 and not fits_in_memory(model, n_ctx, slots, prompt_cache_bytes(model, n_ctx, slots)):
        slots -= 1
    why = f"automatic: {cpus} CPUs, within {MIN_SLOTS}..{MAX_SLOTS}"
    return str(slots), why + (", lowered to fit memory" if slots < start else "")


def command(config, model_path: Path, model: ModelFacts, port: int | str) -> list[str]:
    """llama-server's command line from the effective settings (`config`), on 127.0.0.1:`port`
    behind the front."""
    n_ctx, slots = int(config["N_CTX"]), int(config["PARALLEL"])
    cache_mib = max(1, prompt_cache_bytes(model, n_ctx, slots) >> 20)
    args = [binary(), "--model", str(model_path), "--alias", config["MODEL_ALIAS"],
            "--host", "127.0.0.1", "--port", str(port),
            # N_CTX is per conversation: every slot gets all of it (the KV cache is split evenly)
            "--ctx-size", str(n_ctx * slots), "--parallel", str(slots), "--no-kv-unified",
            "--threads", config["N_THREADS"], "--threads-batch", config["N_THREADS_BATCH"],
            "--cache-ram", str(cache_mib),
            "--fit", "off",  # never shrink what was asked for behind the user's back
            "--threads-http", str(slots + HTTP_THREADS_BEYOND_SLOTS),
            "--offline", "--no-webui"]
    if config["CHAT_FORMAT"]:
        args += ["--no-jinja", "--chat-template", chat_template(config["CHAT_FORMAT"])]
    else:
        args += ["--jinja"]  # the GGUF's own template, with tools
    if server_flag(config.values.get("EMBEDDING", "")):
        args += ["--embeddings"]
    return args


def server_flag(value: str) -> bool:
    """A flag of llama-cpp-python's server (EMBEDDING, INTERRUPT_REQUESTS) read as it reads it
    (pydantic's bool: on, yes, 1, true...), so the same value means the same on both engines;
    settings validated it already."""
    import pydantic
    return bool(value) and pydantic.TypeAdapter(bool).validate_python(value)


TEMPLATE_FAILURE = "chat template parsing error: "


def start_failure(lines: list[str], model_path: Path) -> str | None:
    """One line when llama-server's last lines say why it could not start: a model file it
    cannot load (in the localllm engine's words), or a GGUF chat template its Jinja analysis
    cannot read (it stops at start; a built-in template serves the model)."""
    if any("error loading model" in line or "failed to load model" in line for line in lines):
        return load_failure(str(model_path), lines)
    reasons = [line.split(TEMPLATE_FAILURE, 1)[1].strip() for line in lines if TEMPLATE_FAILURE in line]
    if reasons:
        return (f"llama-server cannot read the chat template of {model_path.name}: {reasons[0]}; "
                f"set CHAT_FORMAT (one of {', '.join(sorted(CHAT_TEMPLATES))}) to serve it with a "
                "built-in template, or ENGINE=localllm")
    return None
