"""The model's files: pulled and recorded at build time, and a damaged or replaced file caught at
start, with one line, before llama.cpp loads it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, clean_environ, run_entrypoint, write_model_env

MODEL_SIZE = 253_113_024  # ../shared/test-model.md


def home_with_blob(pulled_home: Path, tmp_path: Path, content) -> Path:
    """A copy of the pulled cache whose model blob is replaced by content(original)."""
    home = tmp_path / "hf"
    shutil.copytree(pulled_home, home, symlinks=True,
                    ignore=lambda folder, names: names if Path(folder).name == "blobs" else [])
    (blob,) = (pulled_home / f"hub/models--{REPO.replace('/', '--')}/blobs").iterdir()
    with (home / blob.relative_to(pulled_home)).open("wb") as out:
        content(blob.open("rb"), out)
    return home


def truncated(original, out):
    out.write(original.read(1 << 20))


def not_gguf(original, out):
    out.truncate(MODEL_SIZE)  # right size, zeros


def same_size_other_content(original, out):
    out.write(original.read(1 << 20))  # a valid GGUF header ...
    out.truncate(MODEL_SIZE)  # ... and zeros after it


def serve(home: Path, tmp_path: Path, **settings: str):
    env_file = write_model_env(tmp_path / "model.env", MODEL=REPO, CHAT_FORMAT="gemma")
    return run_entrypoint("serve", timeout=60, env=clean_environ(
        HF_HOME=str(home), HF_HUB_OFFLINE="1", MODEL_ENV_FILE=str(env_file), PORT="1", **settings))


@pytest.mark.parametrize("damage, message", [
    (truncated, f"has 1048576 bytes, the hub recorded {MODEL_SIZE}: it is truncated or replaced"),
    (not_gguf, "is not a GGUF v2/v3 file (starts with b'\\x00\\x00\\x00\\x00', version 0)"),
])
def test_damaged_file_stops_the_start_with_one_line(pulled_home, tmp_path, damage, message):
    done = serve(home_with_blob(pulled_home, tmp_path, damage), tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: model file ") and message in line
    assert "Serving" not in done.stdout  # stopped before llm run


def test_replaced_content_is_caught_when_asked_to_verify(pulled_home, tmp_path):
    home = home_with_blob(pulled_home, tmp_path, same_size_other_content)
    done = serve(home, tmp_path, VERIFY_MODEL_SHA256="true")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    recorded = json.loads((home / "localllm-model.json").read_text())["files"]["gemma-3-270m-Q4_K_M.gguf"]
    assert f"the hub recorded {recorded['sha256']}: rebuild the image" in line


def test_pull_records_the_hubs_size_and_sha256(pulled_home, hub):
    recorded = json.loads((pulled_home / "localllm-model.json").read_text())
    listing = hub.requests  # the pull asked the hub for the files' metadata
    assert any("/api/models/" in path for _, path in listing)
    (name, facts), = recorded["files"].items()
    assert name == "gemma-3-270m-Q4_K_M.gguf" and facts["size"] == MODEL_SIZE
    (blob,) = (pulled_home / f"hub/models--{REPO.replace('/', '--')}/blobs").iterdir()
    assert facts["sha256"] == blob.name  # the hub cache names LFS blobs by their SHA-256


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
