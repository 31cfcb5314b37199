"""What the settings need to know about the model, read from the GGUF header: its
size, trained context, KV cache per token, chat template. Sizes the context to the
memory there is and chooses the chat format. Reads the file's header only; finding
the file is cache's concern.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from . import resources
from .errors import UserError


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


def memory_needed(model: ModelFacts, n_ctx: int, slots: int = 1, prompt_cache: int = 0) -> int:
    """Model file (mapped) + KV cache (N_CTX tokens for each slot) + the engine's prompt
    cache in RAM (bytes) + compute buffers, whose largest part is the logits of a
    512-token batch (float32 per vocabulary entry; 512 MiB for Gemma's 262k tokens)
    + 128 MiB for the rest."""
    return (model.size + slots * n_ctx * model.kv_bytes_per_token + prompt_cache
            + 512 * model.vocabulary * 4 + (128 << 20))


def fits_in_memory(model: ModelFacts, n_ctx: int, slots: int = 1, prompt_cache: int = 0) -> bool:
    return memory_needed(model, n_ctx, slots, prompt_cache) <= resources.memory_limit()[0]


def automatic_context(model: ModelFacts) -> tuple[str, str]:
    """The trained context capped at CONTEXT_CAP, halved until it fits (not below 512),
    in whole CONTEXT_STEPs. It is the context of one conversation, on either engine."""
    n_ctx = start = max(CONTEXT_STEP, min(model.trained_context, CONTEXT_CAP) // CONTEXT_STEP * CONTEXT_STEP)
    while n_ctx > 512 and not fits_in_memory(model, n_ctx):
        n_ctx = max(512, n_ctx // 2 // CONTEXT_STEP * CONTEXT_STEP)
    why = f"automatic: trained {model.trained_context}, capped at {CONTEXT_CAP}"
    if n_ctx < start:
        why += ", halved to fit memory"
    return str(n_ctx), why


def check_memory(model: ModelFacts, n_ctx: int, slots: int = 1, prompt_cache: int = 0) -> None:
    """Refuse to start what cannot fit; warn when it is tight."""
    limit, where = resources.memory_limit()
    needed = memory_needed(model, n_ctx, slots, prompt_cache)
    gib = lambda n: f"{n / (1 << 30):.1f} GiB"  # noqa: E731
    context = f"context {n_ctx} tokens" + (f" x {slots} slots" if slots > 1 else "")
    detail = (f"model {gib(model.size)} + {context} {gib(slots * n_ctx * model.kv_bytes_per_token)} "
              + (f"+ prompt cache {gib(prompt_cache)} " if prompt_cache else "")
              + f"+ reserve = {gib(needed)}, {where} {gib(limit)}")
    if needed > limit:
        raise UserError(f"the model does not fit in memory ({detail}): choose a smaller MODEL_QUANT "
                        "or a smaller N_CTX" + (" or PARALLEL" if slots > 1 else "")
                        + ", or give the container more memory")
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
