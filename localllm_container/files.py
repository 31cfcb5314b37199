"""Which GGUF file(s) of a repo to serve: MODEL_FILE, or the one MODEL_QUANT names,
with every part of a split model. Works on a list of names; where the list comes
from (the hub, the cache) is cache's concern.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError
from .settings import Config


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
