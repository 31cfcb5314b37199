"""The environment a test or benchmark starts the entrypoint with: the caller's own,
without any setting that would change what is tested or measured. The names come
from the settings table itself (the image's settings, llama-cpp-python's server
settings, HF_*), so a new setting cannot leak in unnoticed.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from localllm_container.settings import ROOT, SETTINGS, server_settings

# Not a setting, but it chooses the model.env file.
CHOOSING = {"MODEL_ENV_FILE"}


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without settings, with the venv's `llm` first on PATH
    and the hub's telemetry off; then `extra`."""
    names = set(SETTINGS) | set(server_settings()) | CHOOSING
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(("HF_", "LLAMA_ARG_"))}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env.update(extra)
    return env


def write_model_env(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENTRYPOINT = ROOT / "entrypoint.py"
