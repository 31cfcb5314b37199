"""Running the server and keeping the container correct: `llm run` returns once the
port is open and leaves the server orphaned (../shared/localllm-contract.md), so this
adopts it as a child subreaper, relays its log, forwards stop signals to the whole
tree, kills what is left at STOP_TIMEOUT and exits non-zero when the server dies.
llama-server (ENGINE=llama-server) is started directly and is its own child; as it
cuts answers in flight when told to stop, the stop waits for them first (`busy`).
It decides no setting: server_env hands the effective ones to the server.
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import click
import psutil

from . import llama_server
from .cpu import installed_cpu_levels
from .server.log import START_ERROR_VARIABLE
from .settings import ROOT, Config

PR_SET_CHILD_SUBREAPER = 36


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


def relay_lines(pipe, recent: collections.deque) -> threading.Thread:
    """Copy a direct child's output to our stdout line by line, keeping the last lines
    (for the reason it could not start)."""
    def relay() -> None:
        for line in iter(pipe.readline, b""):
            os.write(sys.stdout.fileno(), line)
            recent.append(line.decode("utf-8", "replace"))

    thread = threading.Thread(target=relay, daemon=True, name="server-log")
    thread.start()
    return thread


def descendants() -> list:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def signal_tree(sig: int, skip: set[int] | None = None) -> None:
    """Send `sig` to every descendant (not only adopted ones), except pids in `skip`;
    those signalled are added to `skip`, so a graceful stop is asked for once."""
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
    """Runs `llm run`, adopts the server it leaves behind, and stops the tree; or runs
    a server that stays in the foreground (`direct`) as its child."""

    def __init__(self, command: list[str], env: dict[str, str], stop_timeout: int, start_error: Path,
                 direct: bool = False, busy: Callable[[], bool] | None = None,
                 explain: Callable[[list[str]], str | None] | None = None):
        """`start_error`: where the server writes why it could not start (server.log).
        `busy`: whether answers are in flight, for a server that cuts them on SIGTERM:
        the stop then waits for them (up to STOP_TIMEOUT - 3 s) before passing it on.
        `explain`: one line on why a direct server died, from its last output lines."""
        self.command, self.env, self.stop_timeout = command, env, stop_timeout
        self.start_error, self.direct, self.busy, self.explain = start_error, direct, busy, explain
        self.recent: collections.deque = collections.deque(maxlen=50)
        self.relay: threading.Thread | None = None
        self.env[START_ERROR_VARIABLE] = str(start_error)
        self.stop_signal: int | None = None
        self.terminated: set[int] = set()

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            if self.busy is None:
                signal_tree(signal.SIGTERM, self.terminated)

    def run(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            click.echo("warning: cannot become a child subreaper; the server will not be adopted", err=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if self.direct:
            server = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.relay = relay_lines(server.stdout, self.recent)
            return self.watch({server.pid})
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
        return self.watch(server)

    def watch(self, server: set[int]) -> int:
        """Until a stop signal: exit 1 as soon as a server process dies."""
        while self.stop_signal is None:
            for pid, status in reap():
                if pid in server:
                    code = os.waitstatus_to_exitcode(status)
                    if self.relay is not None:
                        self.relay.join(2)  # its last lines, which may say why
                    reason = self.explain(list(self.recent)) if self.explain else None
                    click.echo(f"error: {reason}" if reason else
                               f"error: the model server (pid {pid}) exited with status {code}", err=True)
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
        drained = time.monotonic() + max(0, self.stop_timeout - 3)  # as uvicorn's graceful shutdown
        while self.busy is not None and time.monotonic() < drained and descendants() and self.busy():
            reap()
            time.sleep(0.1)
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
    if config["ENGINE"] == "llama-server":
        # its settings are on its command line, but for the key
        return llama_server.environment(environ, config["CPU_LEVEL"], config.values.get("API_KEY", ""))
    env = dict(environ)
    for name in ("N_CTX", "N_THREADS", "N_THREADS_BATCH", "MODEL_ALIAS", "CHAT_FORMAT"):
        if config[name]:
            env[name] = config[name]
    env["HF_HUB_OFFLINE"] = "1"  # the file is local now; serving must not touch the network
    if config["CPU_LEVEL"] in installed_cpu_levels():
        env["LLAMA_CPP_LIB_PATH"] = str(Path(os.environ["CPU_LEVELS_DIR"]) / config["CPU_LEVEL"])
    # Streams in flight at a stop may finish until then; the supervisor kills at STOP_TIMEOUT - 1.5 s.
    env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"] = str(max(1, int(config["STOP_TIMEOUT"]) - 3))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))  # the server package
    return env
