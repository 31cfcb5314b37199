"""Tests for the localllm TEST STAND-IN (tests/localllm_standin/).

They hold the stand-in to ../shared/localllm-contract.md. The stand-in is
installed once per session into a plain venv and run as the real `local-llm`
console script, in subprocesses; no model server is needed: a fake `uvicorn`
placed first on PATH plays the server.
"""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

STANDIN_SRC = Path(__file__).parent / "localllm_standin"
REPO = "TheBloke/Foo-7B-GGUF"
GUESS = "foo-7b.Q4_K_M.gguf"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def local_llm(tmp_path_factory):
    """Path of `local-llm` from a fresh venv holding the installed stand-in."""
    base = tmp_path_factory.mktemp("standin")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["click", "psutil", "huggingface_hub==2.4.0"], check=True)
    # Copy the source so the in-tree build leaves nothing in the work tree;
    # --no-deps keeps pip from building llama-cpp-python.
    src = base / "src"
    shutil.copytree(STANDIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(pip + ["--no-deps", str(src)], check=True)
    exe = venv / "bin" / "local-llm"
    assert exe.is_file()
    return exe


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


@pytest.fixture
def env(tmp_path):
    """Caller environment: private HF_HOME, offline hub, fake-bin first on PATH.

    While the test runs, pytest is a child subreaper, so the fake server that
    `run` orphans is adopted here and, at teardown, killed and reaped instead
    of lingering (or staying a zombie under a PID 1 that does not reap)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    e.pop("LOG_CONFIG", None)
    e["HF_HOME"] = str(tmp_path / "hf")
    e["HF_HUB_OFFLINE"] = "1"
    (tmp_path / "bin").mkdir()
    e["PATH"] = str(tmp_path / "bin") + os.pathsep + e.get("PATH", "")
    e["FAKE_STATE"] = str(tmp_path / "state")
    (tmp_path / "state").mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield e
    finally:
        if (tmp_path / "state" / "start.json").exists():
            pid = started(e)["pid"]
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def cache_model(env, repo=REPO, filename=GUESS, content=b"GGUF fake"):
    """Place a file in the standard hub cache layout; return snapshot path."""
    repo_dir = Path(env["HF_HOME"]) / "hub" / ("models--" + repo.replace("/", "--"))
    blob = "ab" * 32
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "blobs" / blob).write_bytes(content)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    snap = repo_dir / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(Path("..", "..", "blobs", blob))
    return snap / filename


def fake_uvicorn(env, ready=True, lines=2, seconds=30):
    """Write an executable `uvicorn` that records argv, env and pid, prints
    start-up lines (and the ready line if `ready`), then keeps writing a line
    every 0.2 s for `seconds`, noting EPIPE once the pipe has no reader."""
    script = textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys, time
        state = os.environ["FAKE_STATE"]
        with open(os.path.join(state, "start.json"), "w") as f:
            json.dump({{"pid": os.getpid(), "argv": sys.argv[1:]}}, f)
        def say(text):
            try:
                os.write(1, (text + "\\n").encode())
            except BrokenPipeError:
                open(os.path.join(state, "epipe"), "w").close()
        for i in range({lines}):
            say("INFO:     fake start-up line %d" % i)
        if {ready!r}:
            say("INFO:     Uvicorn running on http://x:1 (Press CTRL+C to quit)")
            end = time.time() + {seconds}
            while time.time() < end:
                time.sleep(0.2)
                say("INFO:     still serving")
        else:
            sys.exit(3)
        """)
    path = Path(env["PATH"].split(os.pathsep)[0]) / "uvicorn"
    path.write_text(script)
    path.chmod(0o755)


def started(env):
    return json.loads((Path(env["FAKE_STATE"]) / "start.json").read_text())


def call(exe, *args, env, timeout=60):
    return subprocess.run([str(exe), *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def environ_of(pid):
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def gone(pid):
    """True once `pid` has exited (a zombie left for a non-reaping init counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_for(predicate, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- filename guess and pull -------------------------------------------------

@pytest.mark.parametrize("repo", [REPO, "TheBloke/Foo-7B-gguf"])
def test_pull_guesses_filename_and_uses_hub_download(local_llm, env, repo):
    path = cache_model(env, repo=repo)
    r = call(local_llm, "pull", repo, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Pulling {GUESS} from {repo}\nPulled to {path}\n"


def test_pull_with_filename(local_llm, env):
    path = cache_model(env, filename="other.Q8_0.gguf")
    r = call(local_llm, "pull", REPO, "--filename", "other.Q8_0.gguf", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"Pulling other.Q8_0.gguf from {REPO}", f"Pulled to {path}"]


@pytest.mark.parametrize("args", [["pull", "TheBloke/Foo-7B"], ["run", "TheBloke/Foo-7B", "8000"],
                                  ["pull", "Foo-GGUF-7B"]])
def test_no_gguf_suffix_cannot_guess(local_llm, env, args):
    fake_uvicorn(env)
    r = call(local_llm, *args, env=env)
    assert r.returncode == 1
    assert r.stdout == f"Unable to determine filename to use for {args[1]}.\n"
    assert not (Path(env["FAKE_STATE"]) / "start.json").exists()


def test_pull_offline_missing_is_traceback(local_llm, env):
    r = call(local_llm, "pull", REPO, env=env)
    assert r.returncode == 1
    assert r.stdout == f"Pulling {GUESS} from {REPO}\n"
    assert "Traceback" in r.stderr and "LocalEntryNotFoundError" in r.stderr


# --- run -------------------------------------------------------------------

def test_run_resolves_cached_file_and_starts_uvicorn(local_llm, env):
    path = cache_model(env)
    fake_uvicorn(env, seconds=1)
    env["LOG_CONFIG"] = "/etc/log.yaml"
    r = call(local_llm, "run", REPO, "8123", "--host", "127.0.0.1", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Running {path} at 127.0.0.1:8123\n"
    assert started(env)["argv"] == ["--factory", "llama_cpp.server.app:create_app", "--host",
                                    "127.0.0.1", "--port", "8123", "--log-config=/etc/log.yaml"]


def test_run_defaults_host_and_log_config_option(local_llm, env):
    path = cache_model(env, filename="x.gguf")
    fake_uvicorn(env, seconds=1)
    r = call(local_llm, "run", REPO, "9000", "--filename", "x.gguf", "--log-config", "/l.json", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Running {path} at 0.0.0.0:9000\n"
    assert started(env)["argv"][3:] == ["0.0.0.0", "--port", "9000", "--log-config=/l.json"]


def test_run_offline_missing_repo_fails(local_llm, env):
    fake_uvicorn(env)
    r = call(local_llm, "run", REPO, "8000", env=env)
    assert r.returncode == 1
    assert "LocalEntryNotFoundError" in r.stderr
    assert not (Path(env["FAKE_STATE"]) / "start.json").exists()


def test_run_without_uvicorn_on_path_fails(local_llm, env):
    cache_model(env)
    env["PATH"] = env["PATH"].split(os.pathsep)[0]  # only the empty fake bin
    r = call(local_llm, "run", REPO, "8000", env=env)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "FileNotFoundError" in r.stderr and "uvicorn" in r.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_run_returns_and_leaves_server_orphaned(local_llm, env, verbose):
    path = cache_model(env)
    fake_uvicorn(env, seconds=30)
    env["N_CTX"] = "512"
    args = ["run", REPO, "8000", "--host", "127.0.0.1"] + (["--verbose"] if verbose else [])
    t0 = time.time()
    proc = subprocess.Popen([str(local_llm), *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.time() - t0
    pid = started(env)["pid"]

    assert proc.returncode == 0, err
    assert elapsed < 15
    expected = f"Running {path} at 127.0.0.1:8000\n"
    if verbose:
        assert out == ("INFO:     fake start-up line 0\nINFO:     fake start-up line 1\n"
                       "INFO:     Uvicorn running on http://x:1 (Press CTRL+C to quit)\n" + expected)
    else:
        assert out == expected

    # The server outlives `run`, no longer its child, with the contract's env.
    assert not gone(pid)
    child_env = environ_of(pid)
    assert child_env["RUN_BY_LOCALLLM"] == "1"
    assert child_env["MODEL"] == str(path)
    assert child_env["VERBOSE"] == "False"
    assert child_env["N_CTX"] == "512"  # copy of the caller's environment
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != proc.pid and ppid == os.getpid()  # adopted by our subreaper
    # Started in run's own session and process group (no new session).
    assert os.getsid(pid) == os.getsid(0) and os.getpgid(pid) == os.getpgid(0)
    # Its stdout is still the pipe `run` read, now without a reader: EPIPE.
    assert wait_for(lambda: (Path(env["FAKE_STATE"]) / "epipe").exists())
    assert not gone(pid)

    # ps lists it, kill SIGKILLs it.
    r = call(local_llm, "ps", env=env)
    assert r.returncode == 0, r.stderr
    assert any(line.split("\t")[0] == str(pid) for line in r.stdout.splitlines())
    r = call(local_llm, "kill", REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: gone(pid))


@pytest.mark.parametrize("verbose", [False, True])
def test_run_child_exits_before_ready(local_llm, env, verbose):
    cache_model(env)
    fake_uvicorn(env, ready=False)
    r = call(local_llm, "run", REPO, "8000", *(["--verbose"] if verbose else []), env=env)
    assert r.returncode == 1
    last = "Error starting LLM, run with --verbose for more\n"
    if verbose:
        assert r.stdout == "INFO:     fake start-up line 0\nINFO:     fake start-up line 1\n" + last
    else:
        assert r.stdout == last


# --- list, kill, rm ----------------------------------------------------------

def test_list_shows_gguf_files(local_llm, env):
    path = cache_model(env)
    (path.parent / "README.md").write_text("x")
    r = call(local_llm, "list", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(path)]


def test_kill_leaves_other_models_alone(local_llm, env):
    cache_model(env)
    fake_uvicorn(env, seconds=30)
    r = call(local_llm, "run", REPO, "8000", env=env)
    assert r.returncode == 0, r.stderr
    pid = started(env)["pid"]
    r = call(local_llm, "kill", "TheBloke/Bar-GGUF", env=env)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    assert not gone(pid)


def test_rm_deletes_repo_folder(local_llm, env):
    path = cache_model(env)
    repo_dir = path.parents[2]
    r = call(local_llm, "rm", REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert not repo_dir.exists()


def test_rm_with_filename_is_broken_like_upstream(local_llm, env):
    path = cache_model(env)
    r = call(local_llm, "rm", REPO, "--filename", GUESS, env=env)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "NameError" in r.stderr
    assert path.exists()
