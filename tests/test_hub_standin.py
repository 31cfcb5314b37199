"""Tests for the hub stand-in, driven by the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_TOKEN-related settings into module constants at
import time, so each client call runs in a fresh subprocess that inherits the environment set up here.
"""

import hashlib
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testkit.environment import ROOT
from testkit.hub_standin import HubStandin

REPO = "test-org/tiny-GGUF"
OTHER = "test-org/other-model"
SHARED = ("tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf")  # two names served from one local file

# Runs one client call and prints {"result": ...} or {"raised": [exception class and its bases]}.
_CLIENT = r"""
import json, sys
import huggingface_hub as hf

def model_info(kwargs):
    info = hf.model_info(files_metadata=True, **kwargs)
    siblings = {
        s.rfilename: {"size": s.size, "blob_id": s.blob_id, "sha256": s.lfs.sha256, "pointer_size": s.lfs.pointer_size}
        for s in info.siblings
    }
    return {"sha": info.sha, "siblings": siblings}

def list_repo_tree(kwargs):
    return [
        {"path": e.path, "kind": type(e).__name__, "sha256": e.lfs.sha256 if getattr(e, "lfs", None) else None}
        for e in hf.list_repo_tree(recursive=True, **kwargs)
    ]

OPS = {
    "list_repo_files": lambda kwargs: hf.list_repo_files(**kwargs),
    "list_repo_tree": list_repo_tree,
    "model_info": model_info,
    "hf_hub_download": lambda kwargs: hf.hf_hub_download(**kwargs),
}
op, kwargs = sys.argv[1], json.loads(sys.argv[2])
try:
    print(json.dumps({"result": OPS[op](kwargs)}))
except Exception as error:
    print(json.dumps({"raised": [cls.__name__ for cls in type(error).__mro__]}))
"""


def _run_client(op, **kwargs):
    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT, op, json.dumps(kwargs)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def call(op, **kwargs):
    """Result of a client call that must succeed."""
    outcome = _run_client(op, **kwargs)
    assert "result" in outcome, f"{op}({kwargs}) raised {outcome['raised'][0]}"
    return outcome["result"]


def raised(op, **kwargs):
    """Names of the exception class (and its bases) raised by a client call that must fail."""
    outcome = _run_client(op, **kwargs)
    assert "raised" in outcome, f"{op}({kwargs}) unexpectedly returned {outcome['result']!r}"
    return outcome["raised"]


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "q4": src / "q4.gguf",
        "q8": src / "q8.gguf",
        "readme": src / "README.md",
    }
    files["q4"].write_bytes(b"GGUF" + bytes(range(256)) * 2000)
    files["q8"].write_bytes(b"GGUF" + b"eight bits " * 30000)
    files["readme"].write_text("# other model\n")
    return files


@pytest.fixture
def repos(sources):
    return {
        REPO: {SHARED[0]: sources["q4"], SHARED[1]: sources["q4"], "tiny-Q8_0.gguf": sources["q8"]},
        OTHER: {"README.md": sources["readme"], "sub/config.gguf": sources["q8"]},
    }


@pytest.fixture
def hub(repos):
    with HubStandin(repos) as standin:
        yield standin


@pytest.fixture
def client_env(monkeypatch, tmp_path):
    """A fresh HF_HOME, online, with no token from the environment; returns HF_HOME."""
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_OIDC_RESOURCE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    # Otherwise the client also fetches /api/agent-harnesses, which would clutter the request logs checked below.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return home


@pytest.fixture
def hf_home(client_env, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return client_env


def test_list_repo_files(hf_home):
    assert sorted(call("list_repo_files", repo_id=REPO)) == sorted([*SHARED, "tiny-Q8_0.gguf"])
    assert sorted(call("list_repo_files", repo_id=OTHER)) == ["README.md", "sub/config.gguf"]


def test_list_repo_tree_reports_folders_and_sha256(hf_home, sources):
    entries = {entry["path"]: entry for entry in call("list_repo_tree", repo_id=OTHER)}
    assert entries["sub"]["kind"] == "RepoFolder"
    assert entries["sub/config.gguf"]["sha256"] == sha256_of(sources["q8"])
    assert entries["README.md"]["sha256"] == sha256_of(sources["readme"])


def test_model_info_reports_sha256_per_file(hf_home, hub, sources):
    info = call("model_info", repo_id=REPO)
    siblings = info["siblings"]
    assert set(siblings) == {*SHARED, "tiny-Q8_0.gguf"}
    for name in SHARED:
        assert siblings[name]["sha256"] == sha256_of(sources["q4"])
        assert siblings[name]["size"] == sources["q4"].stat().st_size
    assert siblings["tiny-Q8_0.gguf"]["sha256"] == sha256_of(sources["q8"])
    assert siblings[SHARED[0]]["blob_id"] == siblings[SHARED[1]]["blob_id"] != siblings["tiny-Q8_0.gguf"]["blob_id"]
    assert re.fullmatch("[0-9a-f]{40}", info["sha"])

    assert call("model_info", repo_id=REPO, revision=info["sha"])["sha"] == info["sha"]
    assert ("GET", f"/api/models/{REPO}") in hub.requests
    assert ("GET", f"/api/models/{REPO}/revision/{info['sha']}") in hub.requests


def test_download_produces_standard_cache_layout(hf_home, sources):
    revision = call("model_info", repo_id=REPO)["sha"]
    path = Path(call("hf_hub_download", repo_id=REPO, filename="tiny-Q8_0.gguf"))

    storage = hf_home / "hub" / "models--test-org--tiny-GGUF"
    assert (storage / "refs" / "main").read_text() == revision
    assert path == storage / "snapshots" / revision / "tiny-Q8_0.gguf"
    assert path.is_symlink()
    assert path.resolve() == (storage / "blobs" / sha256_of(sources["q8"])).resolve()
    assert path.read_bytes() == sources["q8"].read_bytes()


def test_download_of_second_name_reuses_blob(hf_home, hub, sources):
    first = Path(call("hf_hub_download", repo_id=REPO, filename=SHARED[0]))
    second = Path(call("hf_hub_download", repo_id=REPO, filename=SHARED[1]))

    assert first != second
    assert first.resolve() == second.resolve()
    assert second.read_bytes() == sources["q4"].read_bytes()
    blobs = hf_home / "hub" / "models--test-org--tiny-GGUF" / "blobs"
    assert [blob.name for blob in blobs.iterdir()] == [sha256_of(sources["q4"])]
    # The second name only needed its metadata: the bytes were already in the cache.
    assert ("HEAD", f"/{REPO}/resolve/main/{SHARED[1]}") in hub.requests
    assert ("GET", f"/{REPO}/resolve/main/{SHARED[1]}") not in hub.requests


def test_download_at_commit_revision_and_from_subfolder(hf_home, sources):
    revision = call("model_info", repo_id=OTHER)["sha"]
    path = Path(call("hf_hub_download", repo_id=OTHER, filename="sub/config.gguf", revision=revision))
    assert path == hf_home / "hub" / "models--test-org--other-model" / "snapshots" / revision / "sub" / "config.gguf"
    assert path.read_bytes() == sources["q8"].read_bytes()


def test_unknown_repo_raises_repository_not_found(hf_home):
    assert "RepositoryNotFoundError" in raised("hf_hub_download", repo_id="test-org/missing", filename="x.gguf")
    assert "RepositoryNotFoundError" in raised("model_info", repo_id="test-org/missing")
    assert "RepositoryNotFoundError" in raised("list_repo_files", repo_id="test-org/missing")


def test_unknown_file_raises_entry_not_found(hf_home):
    assert "EntryNotFoundError" in raised("hf_hub_download", repo_id=REPO, filename="tiny-Q2_K.gguf")


def test_unknown_revision_raises_revision_not_found(hf_home):
    assert "RevisionNotFoundError" in raised("hf_hub_download", repo_id=REPO, filename=SHARED[0], revision="v9")


def test_token_is_required_when_configured(client_env, repos, sources, monkeypatch):
    with HubStandin(repos, token="s3cret") as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        for failure in (
            raised("model_info", repo_id=REPO),
            raised("hf_hub_download", repo_id=REPO, filename="tiny-Q8_0.gguf"),
        ):
            assert failure[:2] == ["GatedRepoError", "RepositoryNotFoundError"]

        monkeypatch.setenv("HF_TOKEN", "wrong")
        assert "GatedRepoError" in raised("list_repo_files", repo_id=REPO)

        monkeypatch.setenv("HF_TOKEN", "s3cret")
        path = call("hf_hub_download", repo_id=REPO, filename="tiny-Q8_0.gguf")
        assert Path(path).read_bytes() == sources["q8"].read_bytes()


def _fetch(url, method="GET", headers=None):
    """(status, headers, body) of a plain HTTP request, errors included."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_resolve_headers_and_byte_ranges(hub, sources):
    data = sources["q8"].read_bytes()
    url = f"{hub.url}/{REPO}/resolve/main/tiny-Q8_0.gguf"

    status, headers, body = _fetch(url, method="HEAD")
    assert status == 200 and body == b""
    assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{sha256_of(sources["q8"])}"'
    assert headers["Content-Length"] == headers["X-Linked-Size"] == str(len(data))
    assert len(headers["X-Repo-Commit"]) == 40
    assert not [name for name in headers if name.lower().startswith("x-xet")]

    status, headers, body = _fetch(url, headers={"Range": "bytes=100-"})
    assert (status, body) == (206, data[100:])
    assert headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"

    assert _fetch(url, headers={"Range": "bytes=10-19"})[2] == data[10:20]
    assert _fetch(url, headers={"Range": "bytes=-5"})[2] == data[-5:]
    status, headers, _ = _fetch(url, headers={"Range": f"bytes={len(data)}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")


def test_requests_are_recorded(hub):
    assert hub.requests == []
    _fetch(f"{hub.url}/api/models/{REPO}?blobs=true")
    _fetch(f"{hub.url}/api/whoami-v2", method="POST")
    assert hub.requests == [("GET", f"/api/models/{REPO}"), ("POST", "/api/whoami-v2")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_script_serves_until_signalled(sources, signum):
    with subprocess.Popen(
        [sys.executable, "-m", "testkit.hub_standin", "--port", "0",
         "--repo", f"{REPO}=tiny-Q8_0.gguf:{sources['q8']}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            url = proc.stdout.readline().strip()
            status, _, body = _fetch(f"{url}/api/models/{REPO}?blobs=true")
            assert status == 200
            assert json.loads(body)["siblings"][0]["lfs"]["sha256"] == sha256_of(sources["q8"])
            proc.send_signal(signum)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
