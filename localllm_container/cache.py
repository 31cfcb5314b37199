"""The model's files on disk: the hub cache, the build's record of the chosen files,
pulling them with `llm pull` and checking them (GGUF magic, size, SHA-256) before
llama.cpp sees them. The only module that talks to the hub.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import click

from .errors import UserError
from .files import choose_files
from .settings import Config


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
