#!/usr/bin/env python3
"""Container entrypoint around Google's localllm (`llm run` / `llm pull`).

`llm run` starts llama-cpp-python's server and returns as soon as the port is
open, leaving the server orphaned with its output going into a pipe nobody
reads (see docs/ and the localllm contract). This program stays in the
foreground instead: it reads model.env, validates every setting before
anything heavy starts, picks CPU-appropriate defaults, chooses the GGUF file,
runs `llm run`, adopts the server, forwards stop signals to the whole process
tree and exits non-zero when the server dies, so the platform restarts it.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

from inside_server import START_ERROR_VARIABLE, uvicorn_log_config

HERE = Path(__file__).resolve().parent
MODEL_ENV_DEFAULT = HERE / "model.env"
# The health path: llama-cpp-python's server only listens once the model is loaded,
# and this route needs no API key and, unlike /v1/models, does not wait for the
# model lock, so a long generation cannot make a busy node look dead.
HEALTH_PATH = "/openapi.json"
PR_SET_CHILD_SUBREAPER = 36


class UserError(Exception):
    """A configuration mistake: reported as one line with exit status 2."""


# --------------------------------------------------------------- settings ---

@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # "" means: no default (required) or automatic, see `auto`
    help: str
    auto: bool = False  # empty value is filled in automatically at serve time
    required: bool = False


# The image's own settings. Anything else in model.env must be a setting of
# llama-cpp-python's server (read by the server from the environment) or a
# Hugging Face hub variable (HF_*).
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
    Setting("CPU_LEVEL", "", "llama.cpp build to load (avx2, avx512, avx512_vnni); empty = best for this CPU",
            auto=True),
)}
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# llama-cpp-python server settings whose own defaults are wrong for a shared node.
SERVER_DEFAULTS = {
    # true lets each new request cut off the answer being streamed to someone else
    "INTERRUPT_REQUESTS": "false",
    # true computes logits for every prompt token: prompt processing 2.3x slower
    # (docs/en/performance.md); only `logprobs` requests need it
    "LOGITS_ALL": "false",
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
    the pass-through ones (server settings, HF_*) that go to the server as-is."""
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
    fields = server_settings()
    for name in file_values:
        if name not in SETTINGS and name not in fields and not name.startswith("HF_"):
            raise UserError(f"{name} in {env_file.name} is not a setting of this image, of llama-cpp-python's "
                            "server or of the Hugging Face hub (HF_*): check its spelling")
    extra = sorted((set(from_file) | (set(fields) & set(from_env)) | set(SERVER_DEFAULTS)) - set(SETTINGS))
    for name in extra:
        take(name, SERVER_DEFAULTS.get(name))
    config = Config(values, sources, extra)
    validate(config, fields)
    return config


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _positive_int(config: Config, name: str, allow_empty: bool = False, upper: int | None = None) -> None:
    value = config[name]
    if allow_empty and value == "":
        return
    valid = f"a whole number from 1 to {upper}" if upper else "a whole number of at least 1"
    if allow_empty:
        valid += ", or empty for automatic"
    if not value.isdigit() or not 1 <= int(value) <= (upper or math.inf):
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
    levels = installed_cpu_levels()
    if config["CPU_LEVEL"] and config["CPU_LEVEL"] not in levels:
        raise UserError(f"CPU_LEVEL={config['CPU_LEVEL']!r} is not valid: expected empty (automatic) or one of "
                        f"{', '.join(levels) or 'none (this installation has only the default build)'}")
    if config["VERIFY_MODEL_SHA256"].lower() not in BOOLEANS:
        raise UserError(f"VERIFY_MODEL_SHA256={config['VERIFY_MODEL_SHA256']!r} is not valid: expected true or false")
    if config["CHAT_FORMAT"]:
        formats = chat_formats()
        if config["CHAT_FORMAT"] not in formats:
            raise UserError(f"CHAT_FORMAT={config['CHAT_FORMAT']!r} is not valid: expected empty "
                            f"(use the GGUF's template) or one of {', '.join(sorted(formats))}")
    for name in config.extra:
        if name in server_fields:
            check_server_setting(name, config[name], server_fields[name])


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


def available_cpus(root: Path = Path("/")) -> tuple[int, str]:
    """CPUs this container may really use: affinity mask and cgroup quota (v2 or v1).
    A fractional quota (`--cpus 2.5`, `3500m`) is floored: a thread more than the CPU
    time spins waiting for the others, and llama.cpp's threads wait for each other."""
    limits = {"affinity": float(len(os.sched_getaffinity(0)))}
    cpu_max = root / "sys/fs/cgroup/cpu.max"
    v1_quota, v1_period = root / "sys/fs/cgroup/cpu/cpu.cfs_quota_us", root / "sys/fs/cgroup/cpu/cpu.cfs_period_us"
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            limits["cgroup cpu.max"] = int(quota) / int(period)
    except (OSError, ValueError):
        try:
            quota = int(v1_quota.read_text())
            if quota > 0:
                limits["cgroup cfs quota"] = quota / int(v1_period.read_text())
        except (OSError, ValueError):
            pass
    count = max(1, math.floor(min(limits.values())))
    return count, ", ".join(f"{k} {v:g}" + (" (floored)" if v != int(v) else "") for k, v in limits.items())


def resolve_runtime(config: Config, model: "ModelFacts | None" = None) -> None:
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
    config.values["CPU_LEVEL"], config.sources["CPU_LEVEL"] = choose_cpu_level(config["CPU_LEVEL"])
    if model is None:
        for name in ("N_CTX", "CHAT_FORMAT"):
            if not config[name]:
                config.sources[name] = "automatic: decided at start from the model file"
        return
    if not config["N_CTX"]:
        config.values["N_CTX"], config.sources["N_CTX"] = automatic_context(model)
    check_memory(model, int(config["N_CTX"]))
    if not config["CHAT_FORMAT"]:
        config.values["CHAT_FORMAT"], config.sources["CHAT_FORMAT"] = automatic_chat_format(model, config["MODEL"])


# ------------------------------------------------------------- CPU level ---

# What each folder's libggml-cpu.so was compiled for (scripts/cpu-levels.sh), best first.
AVX2 = {"avx", "avx2", "fma", "f16c", "bmi2"}
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
CPU_LEVELS = {"avx512_vnni": AVX512 | {"avx512vbmi", "avx512_vnni"}, "avx512": AVX512, "avx2": AVX2}
# CPUID bits: (leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit)
CPUID_BITS = {"fma": (1, 0, 2, 12), "avx": (1, 0, 2, 28), "f16c": (1, 0, 2, 29), "avx2": (7, 0, 1, 5),
              "bmi2": (7, 0, 1, 8), "avx512f": (7, 0, 1, 16), "avx512dq": (7, 0, 1, 17),
              "avx512cd": (7, 0, 1, 28), "avx512bw": (7, 0, 1, 30), "avx512vl": (7, 0, 1, 31),
              "avx512vbmi": (7, 0, 2, 1), "avx512_vnni": (7, 0, 2, 11)}


def installed_cpu_levels() -> list[str]:
    """Level folders the image holds (CPU_LEVELS_DIR); none outside the image."""
    root = Path(os.environ.get("CPU_LEVELS_DIR", "/nonexistent"))
    return sorted(p.name for p in root.glob("*") if (p / "libllama.so").exists())


def cpu_features() -> set[str]:
    """x86 features from the CPUID instruction itself, with XGETBV for the OS's
    support of the AVX and AVX-512 registers. /proc/cpuinfo is not enough: under
    qemu-user it describes the host, not the emulated CPU."""
    import mmap
    # cpuid(leaf, subleaf, uint32 out[4]) and xgetbv(index) -> uint64, x86-64 System V
    cpuid_code = bytes.fromhex("5389f889f14989d00fa241890041895804418948084189500c5bc3")
    xgetbv_code = bytes.fromhex("89f90f01d048c1e2204809d0c3")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(cpuid_code + xgetbv_code)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))(base)
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + len(cpuid_code))

    def regs(leaf, subleaf):
        out = (ctypes.c_uint32 * 4)()
        cpuid(leaf, subleaf, ctypes.byref(out))
        return list(out)

    max_leaf = regs(0, 0)[0]
    found = {name for name, (leaf, sub, reg, bit) in CPUID_BITS.items()
             if leaf <= max_leaf and regs(leaf, sub)[reg] >> bit & 1}
    osxsave = regs(1, 0)[2] >> 27 & 1
    xcr0 = xgetbv(0) if osxsave else 0
    if xcr0 & 0x6 != 0x6:  # the OS does not save the AVX registers
        found -= AVX512 | {"avx", "avx2", "fma", "f16c"}
    if xcr0 & 0xE0 != 0xE0:  # nor the AVX-512 ones
        found -= AVX512 - AVX2 | {"avx512vbmi", "avx512_vnni"}
    del cpuid, xgetbv
    return found


def supported_cpu_features() -> set[str]:
    """The CPU's features, once it is known to be one the image runs on: x86-64 (the
    CPUID code above is x86 machine code) with AVX2 (every llama.cpp build here needs
    it). Called before anything imports llama_cpp, which would die with SIGILL instead."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        raise SystemExit(f"error: this image runs on x86-64 (linux/amd64) only; this machine is {machine}: "
                         "build and run it with --platform linux/amd64 (emulated, and slow, on Apple Silicon; "
                         "an x86-64 machine or VM is faster)")
    features = cpu_features()
    missing = sorted(AVX2 - features)
    if missing:
        raise SystemExit(f"error: this CPU lacks {', '.join(missing)}: the image needs an x86-64 CPU with AVX2 "
                         "(Intel Haswell or AMD Zen and newer)")
    return features


def choose_cpu_level(wanted: str) -> tuple[str, str]:
    """The best installed level whose instructions this CPU has, or CPU_LEVEL."""
    features = supported_cpu_features()
    levels = installed_cpu_levels()
    if wanted:
        lacking = sorted(CPU_LEVELS.get(wanted, set()) - features)
        if lacking:
            raise UserError(f"CPU_LEVEL={wanted} needs {', '.join(lacking)}, which this CPU lacks: "
                            "leave CPU_LEVEL empty to choose automatically")
        return wanted, "set"
    if not levels:
        return "avx2", "automatic: the only build installed (llama-cpp-python's own libraries)"
    best = next(level for level in CPU_LEVELS if level in levels and CPU_LEVELS[level] <= features)
    return best, f"automatic: the best build for this CPU (of {', '.join(levels)})"


# ---------------------------------------------------------- model facts ---

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


class ArrayLength(int):
    """A long GGUF array (such as the vocabulary) read only for its length."""


def read_gguf_metadata(path: Path) -> dict:
    """The key-value header of a GGUF file (not the tensors). Arrays are kept only
    when short (the vocabulary is skipped), so this takes a fraction of a second."""
    import struct

    def unpack(fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string():
        return f.read(unpack("<Q")).decode("utf-8", "replace")

    def value(kind):
        if kind == GGUF_STRING:
            return string()
        if kind == GGUF_ARRAY:
            item, count = unpack("<I"), unpack("<Q")
            if item in GGUF_SCALARS and count > 64:
                f.seek(count * struct.calcsize(GGUF_SCALARS[item]), 1)
                return ArrayLength(count)
            items = [value(item) for _ in range(count)]
            return items if count <= 64 else ArrayLength(count)
        return unpack(GGUF_SCALARS[kind])

    with path.open("rb") as f:
        f.read(8)  # magic and version, checked by check_model_file
        unpack("<Q")  # tensor count
        return {string(): value(unpack("<I")) for _ in range(unpack("<Q"))}


@dataclass
class ModelFacts:
    """What the settings need to know about the model: from the GGUF header."""
    path: Path
    size: int  # bytes, all parts of a split model
    architecture: str
    name: str
    trained_context: int
    kv_bytes_per_token: int  # f16 K and V over all layers
    has_chat_template: bool
    vocabulary: int


def model_facts(paths: list[Path]) -> ModelFacts:
    """Facts of a model from its file (the first part's header holds them)."""
    first, size = paths[0], sum(p.stat().st_size for p in paths)
    meta = read_gguf_metadata(first)
    arch = meta.get("general.architecture", "")

    def number(key, default=0):
        found = meta.get(f"{arch}.{key}", default)
        return max(found) if isinstance(found, list) else (found or default)

    n_embd, n_head = number("embedding_length"), number("attention.head_count", 1)
    n_head_kv = number("attention.head_count_kv", n_head)
    key_len = number("attention.key_length", n_embd // max(n_head, 1))
    value_len = number("attention.value_length", key_len)
    kv = number("block_count") * n_head_kv * (key_len + value_len) * 2
    return ModelFacts(first, size, arch, meta.get("general.name", ""), number("context_length", 2048), kv,
                      bool(meta.get("tokenizer.chat_template")), vocabulary_size(meta))


def vocabulary_size(meta: dict) -> int:
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return len(tokens) if isinstance(tokens, list) else int(tokens)


CONTEXT_CAP = 8192  # long enough for chat and RAG prompts; more only when asked (N_CTX)
# llama.cpp pads the context to a multiple of this, and llama-cpp-python 0.3.36 then
# fails (a 500) on prompts between the size asked for and the padded one.
CONTEXT_STEP = 256


def memory_limit() -> tuple[int, str]:
    """Bytes this container may use: the cgroup limit (v2, v1), else available RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text), f"cgroup limit {path}"
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    return available, "available RAM"


def memory_needed(model: ModelFacts, n_ctx: int) -> int:
    """Model file (mapped) + KV cache + compute buffers, whose largest part is the
    logits of a 512-token batch (float32 per vocabulary entry; 512 MiB for Gemma's
    262k tokens) + 128 MiB for the rest."""
    return model.size + n_ctx * model.kv_bytes_per_token + 512 * model.vocabulary * 4 + (128 << 20)


def automatic_context(model: ModelFacts) -> tuple[str, str]:
    """The trained context capped at CONTEXT_CAP, halved until it fits (not below 512),
    in whole CONTEXT_STEPs."""
    limit, _ = memory_limit()
    n_ctx = start = max(CONTEXT_STEP, min(model.trained_context, CONTEXT_CAP) // CONTEXT_STEP * CONTEXT_STEP)
    while n_ctx > 512 and memory_needed(model, n_ctx) > limit:
        n_ctx = max(512, n_ctx // 2 // CONTEXT_STEP * CONTEXT_STEP)
    why = f"automatic: trained {model.trained_context}, capped at {CONTEXT_CAP}"
    if n_ctx < start:
        why += ", halved to fit memory"
    return str(n_ctx), why


def check_memory(model: ModelFacts, n_ctx: int) -> None:
    """Refuse to start what cannot fit; warn when it is tight."""
    limit, where = memory_limit()
    needed = memory_needed(model, n_ctx)
    gib = lambda n: f"{n / (1 << 30):.1f} GiB"  # noqa: E731
    detail = (f"model {gib(model.size)} + context {n_ctx} tokens {gib(n_ctx * model.kv_bytes_per_token)} "
              f"+ reserve = {gib(needed)}, {where} {gib(limit)}")
    if needed > limit:
        raise UserError(f"the model does not fit in memory ({detail}): choose a smaller MODEL_QUANT "
                        "or a smaller N_CTX, or give the container more memory")
    if needed > 0.85 * limit:
        click.echo(f"warning: memory is tight ({detail})", err=True)


def automatic_chat_format(model: ModelFacts, repo: str) -> tuple[str, str]:
    """The GGUF's own template when it has one; else llama-cpp-python's format for
    the architecture or name (a wrong format gives empty or rambling answers)."""
    if model.has_chat_template:
        return "", "automatic: the GGUF's chat template"
    name = f"{repo} {model.name}".lower()
    rules = [("saiga" in name, "saiga"), (model.architecture.startswith("gemma"), "gemma"),
             (model.architecture.startswith("qwen"), "chatml"),
             ("llama-3" in name or "llama3" in name, "llama-3"),
             ("mistral" in name or model.architecture == "mistral", "mistral-instruct"),
             (model.architecture == "llama", "llama-2")]
    chosen = next((fmt for matched, fmt in rules if matched), "")
    if not chosen:
        click.echo(f"warning: {repo} has no chat template and no known chat format for architecture "
                   f"{model.architecture!r}: set CHAT_FORMAT", err=True)
        return "", "automatic: none found (the server falls back to llama-2)"
    return chosen, f"automatic: no chat template in the GGUF; {model.architecture} {model.name!r}"


# ------------------------------------------------------------ file choice ---

SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
QUANT_TOKEN = re.compile(r"(?i)(?:i?q\d[a-z0-9_]*|bf16|f16|f32)")


def quant_of(filename: str) -> str | None:
    """The quantisation named in a GGUF file name (`...Q4_K_M.gguf` -> `Q4_K_M`)."""
    stem = SPLIT.sub("", Path(filename).name)
    stem = re.sub(r"(?i)\.gguf$", "", stem)
    for token in reversed(re.split(r"[-.]", stem)):
        if QUANT_TOKEN.fullmatch(token):
            return token.upper()
    return None


def split_parts(filename: str) -> list[str]:
    """All parts of a split model (`-00001-of-00003.gguf`), or just the file."""
    match = SPLIT.search(filename)
    if not match:
        return [filename]
    total = match.group(2)
    head = filename[:match.start()]
    return [f"{head}-{i:05d}-of-{total}.gguf" for i in range(1, int(total) + 1)]


def choose_files(config: Config, repo_files: list[str], where: str = "the repo") -> list[str]:
    """The GGUF file(s) to serve: MODEL_FILE, or the one matching MODEL_QUANT.
    `where` names the listing in messages (the repo on the hub, or the image's cache)."""
    model, wanted = config["MODEL"], config["MODEL_FILE"]
    ggufs = sorted(f for f in repo_files if f.lower().endswith(".gguf"))
    if wanted:
        parts = split_parts(wanted)
        missing = [p for p in parts if p not in repo_files]
        if missing:
            raise UserError(f"MODEL_FILE={wanted!r} is not in {model}: "
                            f"expected one of {', '.join(ggufs) or '(no .gguf files)'}")
        return parts
    quant = config["MODEL_QUANT"].upper()
    by_quant: dict[str, list[str]] = {}
    for f in ggufs:
        q = quant_of(f)
        if q:
            by_quant.setdefault(q, []).append(f)
    matches = [q for q in by_quant if q == quant] or [q for q in by_quant if q.startswith(quant + "_")]
    available = ", ".join(sorted(by_quant)) or "none (no .gguf files with a quantisation in their name)"
    if not matches:
        raise UserError(f"MODEL_QUANT={config['MODEL_QUANT']!r} matches no .gguf file in {model}: "
                        f"{where} has {available} (or set MODEL_FILE)")
    files = by_quant[matches[0]] if len(matches) == 1 else []
    first_parts = [f for f in files if not SPLIT.search(f) or SPLIT.search(f).group(1) == "00001"]
    if len(matches) > 1 or len(first_parts) != 1:
        candidates = ", ".join(files or sorted(f for q in matches for f in by_quant[q]))
        raise UserError(f"MODEL_QUANT={config['MODEL_QUANT']!r} matches several files in {model} "
                        f"({candidates}): the repo has {available}; set MODEL_FILE to choose one")
    parts = split_parts(first_parts[0])
    missing = [p for p in parts if p not in repo_files]
    if missing:
        raise UserError(f"MODEL_QUANT={config['MODEL_QUANT']!r}: split model in {model} lacks {', '.join(missing)}")
    return parts


# ------------------------------------------------------------- the cache ---

def hub_cache() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def record_path() -> Path:
    """Where the build records the resolved file(s), beside the hub cache."""
    from huggingface_hub import constants
    return Path(constants.HF_HOME) / "localllm-model.json"


def repo_cache_dir(model: str) -> Path:
    return hub_cache() / ("models--" + model.replace("/", "--"))


def cached_files(model: str) -> list[str]:
    """Files of MODEL present in the local hub cache (any snapshot)."""
    found = set()
    for snapshot in repo_cache_dir(model).glob("snapshots/*"):
        found.update(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    return sorted(found)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def recorded_files(config: Config) -> dict[str, dict] | None:
    """The build's choice with each file's size and SHA-256, when the settings are
    the ones the image was built with."""
    try:
        record = json.loads(record_path().read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    return files if isinstance(files, dict) and record.get("settings") == record_key(config) else None


def record_key(config: Config) -> dict[str, str]:
    """The settings that decide which file is served (quant names ignore case)."""
    return {"MODEL": config["MODEL"], "MODEL_FILE": config["MODEL_FILE"], "MODEL_QUANT": config["MODEL_QUANT"].upper()}


def list_repo(model: str) -> dict[str, dict]:
    """The repo's files on the hub with their size and SHA-256 (the LFS object id),
    turning hub errors into one line."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        siblings = HfApi().model_info(model, files_metadata=True).siblings or []
        return {s.rfilename: {"size": s.size, "sha256": s.lfs.sha256 if s.lfs else None} for s in siblings}
    except GatedRepoError:
        raise UserError(f"MODEL={model} is gated: accept its terms on the hub and pass HF_TOKEN "
                        "(a build secret, see docs)") from None
    except RepositoryNotFoundError:
        raise UserError(f"MODEL={model} was not found at {constants.ENDPOINT} "
                        "(check the repo id; private repos need HF_TOKEN)") from None
    except Exception as exc:  # HTTP errors, and the HTTP client's own connection errors
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"MODEL={model}: cannot list the repo at {constants.ENDPOINT} "
                        f"(HF_ENDPOINT): {reason}") from None


def llm(*args: str) -> list[str]:
    """localllm's command line (`llm` is the image's alias of `local-llm`)."""
    if not shutil.which("llm"):
        raise SystemExit("error: localllm's `llm` command is not on PATH (the image installs it in /opt/venv/bin)")
    return ["llm", *args]


def pull_files(config: Config) -> dict[str, dict]:
    """Choose the file(s) from the hub listing, pull each with `llm pull` and check
    it against the hub's size and SHA-256. Returns {file: {size, sha256}}."""
    model = config["MODEL"]
    listing = list_repo(model)
    pulled = {}
    for name in choose_files(config, list(listing)):
        done = subprocess.run(llm("pull", model, "--filename", name), check=False)
        if done.returncode != 0:
            raise SystemExit(f"error: `llm pull {model} --filename {name}` failed "
                             f"with status {done.returncode}")
        expected = listing[name]
        check_model_file(model, name, expected, verify_sha256=bool(expected["sha256"]))
        pulled[name] = expected
    return pulled


def cached_path(model: str, name: str) -> Path | None:
    """The file in the hub cache, found the way `llm run` finds it."""
    for snapshot in sorted(repo_cache_dir(model).glob("snapshots/*")):
        if (snapshot / name).is_file():
            return snapshot / name
    return None


def sha256_of(path: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_file(model: str, name: str, expected: dict, verify_sha256: bool) -> Path:
    """Catch a missing, truncated or replaced model file before llama.cpp aborts on it."""
    path = cached_path(model, name)
    if path is None:
        raise SystemExit(f"error: model file {name} of {model} is missing from the cache ({repo_cache_dir(model)})")
    with path.open("rb") as f:
        magic, version = f.read(4), int.from_bytes(f.read(4), "little")
    if magic != b"GGUF" or version not in (2, 3):
        raise SystemExit(f"error: model file {path} is not a GGUF v2/v3 file "
                         f"(starts with {magic!r}, version {version}): rebuild the image to pull it again")
    size = path.stat().st_size
    if expected.get("size") is not None and size != expected["size"]:
        raise SystemExit(f"error: model file {path} has {size} bytes, the hub recorded {expected['size']}: "
                         "it is truncated or replaced; rebuild the image to pull it again")
    if verify_sha256:
        if not expected.get("sha256"):
            raise SystemExit(f"error: VERIFY_MODEL_SHA256=true but no SHA-256 is recorded for {name}")
        actual = sha256_of(path)
        if actual != expected["sha256"]:
            raise SystemExit(f"error: model file {path} has SHA-256 {actual}, the hub recorded "
                             f"{expected['sha256']}: rebuild the image to pull it again")
    return path


def files_to_serve(config: Config) -> dict[str, dict]:
    """Find the model's file(s) without the network, or pull them if allowed.
    Returns {file: what is known of it (size, sha256)}, the file to serve first."""
    model = config["MODEL"]
    files = recorded_files(config)
    cached = cached_files(model)
    if files and all(f in cached for f in files):
        return files
    if cached:
        try:
            return {name: {} for name in choose_files(config, cached, where="this image's model cache")}
        except UserError:
            if offline():
                raise
    if offline():
        raise UserError(f"MODEL={model} is not in this image's model cache and "
                        f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}: "
                        "rebuild the image with this MODEL (or run with HF_HUB_OFFLINE=0 to download it at start)")
    click.echo(f"{model} ({config['MODEL_FILE'] or config['MODEL_QUANT']}) is not in the image's "
               "model cache: downloading it now (an image built with PULL_MODEL=1 holds it)")
    return pull_files(config)


# ------------------------------------------------------- the server's log ---

def scratch_dir() -> Path:
    """A private folder for the one file we write (uvicorn's log config): the usual
    temporary folder, else /dev/shm, which Docker and Kubernetes keep writable
    when the root filesystem is read-only."""
    try:
        return Path(tempfile.mkdtemp(prefix="localllm-"))
    except OSError:  # FileNotFoundError: no usable temporary directory
        return Path(tempfile.mkdtemp(prefix="localllm-", dir="/dev/shm"))


def start_log_relay() -> str:
    """A pipe whose read end is copied to our stdout; the server opens the write
    end through /proc, which works whatever our stdout is (pipe, file, socket)."""
    read_fd, write_fd = os.pipe()

    def relay() -> None:
        while chunk := os.read(read_fd, 65536):
            os.write(sys.stdout.fileno(), chunk)

    threading.Thread(target=relay, daemon=True, name="server-log").start()
    return f"/proc/{os.getpid()}/fd/{write_fd}"


# ------------------------------------------------------------ supervision ---

def descendants() -> list:
    import psutil
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def signal_tree(sig: int, skip: set[int] | None = None) -> None:
    """Send `sig` to every descendant (not only adopted ones), except pids in `skip`;
    those signalled are added to `skip`, so a graceful stop is asked for once."""
    import psutil
    for proc in descendants():
        if skip is not None and proc.pid in skip:
            continue
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass
        if skip is not None:
            skip.add(proc.pid)


def reap() -> list[tuple[int, int]]:
    """Collect every exited child (we are a subreaper): [(pid, status)]."""
    exited = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited
        if pid == 0:
            return exited
        exited.append((pid, status))


class Supervisor:
    """Runs `llm run`, adopts the server it leaves behind, and stops the tree."""

    def __init__(self, command: list[str], env: dict[str, str], stop_timeout: int, start_error: Path):
        """`start_error`: where the server writes why it could not start (inside_server)."""
        self.command, self.env, self.stop_timeout = command, env, stop_timeout
        self.start_error = start_error
        self.env[START_ERROR_VARIABLE] = str(start_error)
        self.stop_signal: int | None = None
        self.terminated: set[int] = set()

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            signal_tree(signal.SIGTERM, self.terminated)

    def run(self) -> int:
        import psutil  # noqa: F401  before the handlers: one importing it mid-import would find it half-built
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            click.echo("warning: cannot become a child subreaper; the server will not be adopted", err=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        starter = subprocess.Popen(self.command, env=self.env)
        while (status := starter.poll()) is None and self.stop_signal is None:
            time.sleep(0.05)
        if self.stop_signal is not None:
            return self.stop()
        if status != 0:
            reason = self.start_error.read_text().strip() if self.start_error.exists() else ""
            click.echo(f"error: {reason}" if reason else f"error: `llm run` failed with status {status} "
                       "(see the lines above)", err=True)
            signal_tree(signal.SIGKILL)
            return 1
        server = {p.pid for p in descendants()}
        if not server:
            click.echo("error: `llm run` returned but no server process is left to adopt", err=True)
            return 1
        while self.stop_signal is None:
            for pid, status in reap():
                if pid in server:
                    code = os.waitstatus_to_exitcode(status)
                    click.echo(f"error: the model server (pid {pid}) exited with status {code}", err=True)
                    signal_tree(signal.SIGKILL)
                    return 1
            if not descendants():  # not adopted (no subreaper) and gone
                click.echo("error: the model server is gone", err=True)
                return 1
            time.sleep(0.2)
        return self.stop()

    def stop(self) -> int:
        """Forward the stop to the whole tree, SIGKILL what is left at the deadline."""
        deadline = time.monotonic() + max(0.5, self.stop_timeout - 1.5)  # leave time to reap and exit
        while descendants() and time.monotonic() < deadline:
            signal_tree(signal.SIGTERM, self.terminated)  # a child may have started meanwhile
            reap()
            time.sleep(0.1)
        if descendants():
            click.echo(f"warning: server still running {self.stop_timeout - 1.5:g} s after the stop signal; "
                       "killing it", err=True)
            signal_tree(signal.SIGKILL)
            time.sleep(0.2)
        reap()
        click.echo(f"stopped on {signal.Signals(self.stop_signal).name}")
        return 0


def stop_before_serving(signum, _frame) -> None:
    """A stop while settings are read or a slim image downloads: nothing to hand over."""
    click.echo(f"stopped on {signal.Signals(signum).name} before serving")
    signal_tree(signal.SIGTERM)
    sys.exit(0)


def server_env(config: Config, environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: the effective settings on top of ours (pydantic reads them)."""
    env = dict(environ)
    for name in ("N_CTX", "N_THREADS", "N_THREADS_BATCH", "MODEL_ALIAS", "CHAT_FORMAT"):
        if config[name]:
            env[name] = config[name]
    env["HF_HUB_OFFLINE"] = "1"  # the file is local now; serving must not touch the network
    if config["CPU_LEVEL"] in installed_cpu_levels():
        env["LLAMA_CPP_LIB_PATH"] = str(Path(os.environ["CPU_LEVELS_DIR"]) / config["CPU_LEVEL"])
    # Streams in flight at a stop may finish until then; the supervisor kills at STOP_TIMEOUT - 1.5 s.
    env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"] = str(max(1, int(config["STOP_TIMEOUT"]) - 3))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), environ.get("PYTHONPATH")]))  # inside_server
    return env


# ------------------------------------------------------------------- CLI ---

def model_env_path() -> Path:
    return Path(os.environ.get("MODEL_ENV_FILE", "").strip() or MODEL_ENV_DEFAULT)


def load() -> Config:
    """Check the machine, load the settings and export the pass-through ones, so that
    the hub client (imported later) and localllm's children see model.env's HF_* and
    server lines, and none of them sees an empty value."""
    supported_cpu_features()  # first: reading the settings imports llama_cpp
    fields = server_settings()
    for name, value in list(os.environ.items()):
        if not value.strip() and (name in SETTINGS or name in fields or name.startswith("HF_")):
            del os.environ[name]  # empty means not given, for the hub client and the server too
    env_file = model_env_path()
    cfg = load_config(dict(os.environ), env_file)
    for name in cfg.extra:
        os.environ.setdefault(name, cfg[name])
    return cfg


@click.group(invoke_without_command=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Serve a GGUF model from the Hugging Face hub with localllm on port 8000."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@cli.command()
def config() -> None:
    """Print the effective settings and where each came from."""
    cfg = load()
    paths = [cached_path(cfg["MODEL"], name) for name in recorded_files(cfg) or {}]
    resolve_runtime(cfg, model_facts(paths) if paths and all(paths) else None)
    for name in SETTINGS:
        click.echo(f"{name}={cfg[name]}  # {cfg.sources[name]}")
    for name in cfg.extra:
        click.echo(f"{name}={cfg[name]}  # {cfg.sources[name]}, passed on")


@cli.command()
def pull() -> None:
    """Download the model file(s) into the hub cache and record the choice (build time)."""
    cfg = load()
    files = pull_files(cfg)
    record = {"settings": record_key(cfg), "files": files}  # files: {name: {size, sha256}}
    record_path().parent.mkdir(parents=True, exist_ok=True)
    record_path().write_text(json.dumps(record, indent=2) + "\n")
    click.echo(f"Recorded {cfg['MODEL']} -> {', '.join(files)} in {record_path()}")


@cli.command()
def serve() -> None:
    """Run the model server on PORT and stay in the foreground (the default command)."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # as PID 1 we would ignore them otherwise
        signal.signal(sig, stop_before_serving)
    cfg = load()
    files = files_to_serve(cfg)
    verify = BOOLEANS[cfg["VERIFY_MODEL_SHA256"].lower()]
    paths = [check_model_file(cfg["MODEL"], name, expected, verify) for name, expected in files.items()]
    resolve_runtime(cfg, model_facts(paths))
    first = next(iter(files))
    log_target = start_log_relay()
    scratch = scratch_dir()
    log_config = scratch / "uvicorn-log.json"
    log_config.write_text(json.dumps(uvicorn_log_config(log_target)))
    command = llm("run", cfg["MODEL"], cfg["PORT"], "--host", "0.0.0.0", "--filename", first,
                  "--verbose", "--log-config", str(log_config))
    click.echo(f"Serving {cfg['MODEL']} ({first}) as {cfg['MODEL_ALIAS']!r} on port {cfg['PORT']} "
               f"with {cfg['N_THREADS']} threads, context {cfg['N_CTX']}, {cfg['CPU_LEVEL']} build")
    env = server_env(cfg, dict(os.environ))
    sys.stdout.flush()
    sys.exit(Supervisor(command, env, int(cfg["STOP_TIMEOUT"]), scratch / "start-error.txt").run())


@cli.command()
def health() -> None:
    """Exit 0 when the server answers HEALTH_PATH (the image's HEALTHCHECK). Light:
    reads PORT only, so a check every few seconds costs next to nothing."""
    import urllib.request
    port = (given(os.environ).get("PORT") or given(parse_env_file(model_env_path())).get("PORT")
            or SETTINGS["PORT"].default)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PATH}", timeout=4) as reply:
            click.echo(f"healthy: HTTP {reply.status}")
    except OSError as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)


# ----------------------------------------------------------------- check ---

CHECK_PROMPT = "Say hello in one short sentence."
CHECK_HINTS = {
    401: "the token or key is missing or refused (DataSphere: --iam-token or YC_IAM_TOKEN, "
         "a fresh `yc iam create-token`; a server with API_KEY: --api-key)",
    403: "the token is valid but may not call this node (check --folder-id and the account's access to the project)",
    404: "no such path, node or alias (give the base URL without /v1; check --node-id or --alias)",
    503: "not ready: the model is still loading or the node is starting; try again in a minute",
}


class CheckFailed(Exception):
    """A step of `check` failed: reported as one line with exit status 1."""


def check_open(url: str, headers: dict[str, str], timeout: float, body: dict | None = None):
    """Send one request; HTTP and network failures become one CheckFailed line."""
    import http.client
    import urllib.error
    import urllib.request
    step = f"{'POST' if body else 'GET'} {url}"
    request = urllib.request.Request(url, json.dumps(body).encode() if body else None, headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read(200).decode("utf-8", "replace").split())
        hint = CHECK_HINTS.get(exc.code, "unexpected answer")
        raise CheckFailed(f"{step}: HTTP {exc.code} {exc.reason}: {hint}" + (f" [{detail}]" if detail else "")) from None
    except urllib.error.URLError as exc:
        raise CheckFailed(f"{step}: {check_reason(exc.reason, timeout)}") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a server that is not HTTP
        raise CheckFailed(f"{step}: {check_reason(exc, timeout)}") from None


def check_reason(reason, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s (--timeout): the server is busy or still starting"
    if isinstance(reason, ConnectionRefusedError):
        return ("connection refused: nothing listens there (is the server running? "
                "its port opens only once the model is loaded)")
    import http.client
    if isinstance(reason, http.client.HTTPException):
        return f"not an HTTP answer: {reason!r}"
    return f"cannot connect: {reason}"


def read_stream(reply, step: str, timeout: float) -> tuple[list[float], str, bool]:
    """Read an OpenAI server-sent event stream: (arrival time of each text piece, text, [DONE] seen)."""
    import http.client
    times, text, line = [], [], ""
    try:
        for raw in reply:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue  # blank separators and ": ping" comments
            data = line[5:].strip()
            if data == "[DONE]":
                return times, "".join(text), True
            chunk = json.loads(data)
            if "error" in chunk:
                raise CheckFailed(f"{step}: the stream carried an error: {chunk['error']}")
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                times.append(time.monotonic())
                text.append(piece)
    except (OSError, http.client.HTTPException) as exc:
        raise CheckFailed(f"{step}: the stream broke off: {check_reason(exc, timeout)}") from None
    except ValueError:
        raise CheckFailed(f"{step}: not an OpenAI event stream: {line[:120]!r}") from None
    return times, "".join(text), False


def run_check(base: str, headers: dict[str, str], timeout: float) -> None:
    """List the models, stream one chat answer, print what a user would want to know."""
    url = base + "/v1/models"
    started = time.monotonic()
    with check_open(url, headers, timeout) as reply:
        try:
            models = [m["id"] for m in json.load(reply)["data"]]
        except OSError as exc:
            raise CheckFailed(f"GET {url}: {check_reason(exc, timeout)}") from None
        except (ValueError, KeyError, TypeError):
            raise CheckFailed(f"GET {url}: HTTP {reply.status} but not an OpenAI model list") from None
    if not models:
        raise CheckFailed(f"GET {url}: HTTP {reply.status} but no model is listed")
    click.echo(f"models: HTTP {reply.status} in {time.monotonic() - started:.2f} s, model {models[0]!r}")
    url = base + "/v1/chat/completions"
    body = {"model": models[0], "messages": [{"role": "user", "content": CHECK_PROMPT}],
            "max_tokens": 32, "stream": True}
    sent = time.monotonic()
    with check_open(url, headers, timeout, body) as reply:
        times, text, done = read_stream(reply, f"POST {url}", timeout)
    total = time.monotonic() - sent
    if not done:
        raise CheckFailed(f"POST {url}: the stream ended without its closing data: [DONE]")
    if not text.strip():
        raise CheckFailed(f"POST {url}: HTTP {reply.status} but the answer is empty "
                          "(a wrong CHAT_FORMAT for this model is the usual cause)")
    speed = (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None
    click.echo(f"chat: HTTP {reply.status}, first token after {times[0] - sent:.2f} s, {len(times)} tokens"
               + (f" at {speed:.1f} tokens/s" if speed else "") + f", total {total:.2f} s")
    click.echo(f"answer: {' '.join(text.split())[:200]}")
    click.echo(f"ok: {base} serves {models[0]!r}")


@cli.command()
@click.argument("url")
@click.option("--node-id", help="DataSphere node id: sends x-node-id (call through node-api).")
@click.option("--alias", help="DataSphere alias name: sends x-node-alias: datasphere.user.ALIAS.")
@click.option("--folder-id", help="DataSphere folder id: sends x-folder-id.")
@click.option("--iam-token", envvar="YC_IAM_TOKEN", help="IAM token: sends Authorization: Bearer TOKEN [env YC_IAM_TOKEN].")
@click.option("--api-key", help="the server's API_KEY: sends Authorization: Bearer KEY.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120, show_default=True,
              help="Seconds to wait for the connection and for each part of an answer.")
def check(url, node_id, alias, folder_id, iam_token, api_key, timeout) -> None:
    """Call a running server at URL as a client would: list the models and stream one
    chat answer; exit 0 only when both worked. Uses only click and the standard library,
    so it runs on a laptop too: python entrypoint.py check http://localhost:8000"""
    if node_id and alias:
        raise click.UsageError("give --node-id or --alias, not both")
    if (node_id or alias) and not folder_id:
        raise click.UsageError("--node-id and --alias need --folder-id (node-api requires x-folder-id)")
    if iam_token and api_key:
        raise click.UsageError("give --iam-token (or YC_IAM_TOKEN) or --api-key, not both: "
                               "each is sent as Authorization: Bearer")
    headers = {"Content-Type": "application/json", "User-Agent": "localllm-check"}
    if node_id:
        headers["x-node-id"] = node_id
    if alias:
        headers["x-node-alias"] = alias if alias.startswith("datasphere.user.") else f"datasphere.user.{alias}"
    if folder_id:
        headers["x-folder-id"] = folder_id
    if iam_token or api_key:
        headers["Authorization"] = f"Bearer {iam_token or api_key}"
    try:
        run_check(re.sub(r"/v1/?$", "", url.rstrip("/")), headers, timeout)
    except CheckFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
