"""Running the server and keeping the container correct: `llm run` returns once the
port is open and leaves the server orphaned (../shared/localllm-contract.md), so this
adopts it as a child subreaper, relays its log, forwards stop signals to the whole
tree, kills what is left at STOP_TIMEOUT and exits non-zero when the server dies.
llama-server (ENGINE=llama-server) is started directly and is its own child. Before
either, the front (localllm_container.front) takes the container's port, and the engine
listens on 127.0.0.1 behind it. It decides no setting: server_env and front_command hand
the effective ones over.
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import json
import os
import signal
import socket
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
from .cpu import backend_environ
from .server.log import START_ERROR_VARIABLE
from .settings import BOOLEANS, ROOT, Config, answered_at_once, passed_at_once

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


def json_output() -> None:
    """LOG_FORMAT=json: from here on every line this process and its children write to
    stdout or stderr reaches the container log as one JSON object (lines that are one
    already, the front's and the engine's own, pass as they are)."""
    relays = []
    for fd in (1, 2):
        target = os.dup(fd)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)

        def relay(read_fd=read_fd, target=target) -> None:
            with os.fdopen(read_fd, "rb") as lines:
                for line in lines:
                    os.write(target, json_line(line))

        relays.append((fd, target, threading.Thread(target=relay, daemon=True, name="json-log")))
        relays[-1][2].start()

    def flush_at_exit() -> None:  # the last lines (an error, "stopped on ...") must not be lost
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, target, thread in relays:
            os.dup2(target, fd)  # closes our end of the pipe; the children are gone by now
        for _, _, thread in relays:
            thread.join(2)

    atexit.register(flush_at_exit)


def json_line(line: bytes) -> bytes:
    """One line as a JSON object; the level from our own `error:`/`warning:` prefixes
    (llama.cpp writes its ordinary lines to stderr, so the stream tells nothing)."""
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    if text.startswith("{") and text.endswith("}"):
        return text.encode() + b"\n"
    level = text.split(":", 1)[0].upper() if text.startswith(("error:", "warning:")) else "INFO"
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "level": level, "logger": "container", "message": text}
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


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
    """Runs the front (on PORT: /health, /metrics, the queue bound, request ids) and then
    the engine behind it: `llm run`, whose server it adopts, or a server that stays in the
    foreground (`direct`) as its child. A stop goes to the front first, which takes no new
    request and lets the answers in flight finish, then to the engine."""

    def __init__(self, front: tuple[list[str], dict[str, str]], command: list[str], env: dict[str, str],
                 stop_timeout: int,
                 start_error: Path, direct: bool = False,
                 explain: Callable[[list[str]], str | None] | None = None):
        """`front`: its command and environment (front_process).
        `start_error`: where the server writes why it could not start (server.log).
        `explain`: one line on why a direct server died, from its last output lines."""
        self.front_command, self.command, self.env, self.stop_timeout = front, command, env, stop_timeout
        self.start_error, self.direct, self.explain = start_error, direct, explain
        self.recent: collections.deque = collections.deque(maxlen=50)
        self.relay: threading.Thread | None = None
        self.env[START_ERROR_VARIABLE] = str(start_error)
        self.stop_signal: int | None = None
        self.front: subprocess.Popen | None = None
        self.terminated: set[int] = set()

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            if self.front is not None:  # at once: no new request is taken from here on
                self.front.send_signal(signal.SIGTERM)
                self.terminated.add(self.front.pid)

    def run(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            click.echo("warning: cannot become a child subreaper; the server will not be adopted", err=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.front = subprocess.Popen(self.front_command[0], env=self.front_command[1])
        if self.direct:
            server = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.relay = relay_lines(server.stdout, self.recent)
            return self.watch({server.pid})
        starter = subprocess.Popen(self.command, env=self.env)
        while (status := starter.poll()) is None and self.stop_signal is None and self.front.poll() is None:
            time.sleep(0.05)
        if self.stop_signal is not None:
            return self.stop()
        if self.front.poll() is not None:  # it could not take PORT, say: no use loading the model
            return self.front_died(self.front.returncode)
        if status != 0:
            reason = self.start_error.read_text().strip() if self.start_error.exists() else ""
            click.echo(f"error: {reason}" if reason else f"error: `llm run` failed with status {status} "
                       "(see the lines above)", err=True)
            signal_tree(signal.SIGKILL)
            return 1
        server = {p.pid for p in descendants()} - {self.front.pid}
        if not server:
            click.echo("error: `llm run` returned but no server process is left to adopt", err=True)
            signal_tree(signal.SIGKILL)
            return 1
        return self.watch(server)

    def watch(self, server: set[int]) -> int:
        """Until a stop signal: exit 1 as soon as a server process or the front dies."""
        while self.stop_signal is None:
            for pid, status in reap():
                if pid in server or pid == self.front.pid:
                    code = os.waitstatus_to_exitcode(status)
                    if pid == self.front.pid:
                        return self.front_died(code)
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

    def front_died(self, code: int) -> int:
        """The port is the front's: without it the container cannot answer, so it ends."""
        click.echo(f"error: the front on PORT (pid {self.front.pid}) exited with status {code} "
                   "(see the lines above)", err=True)
        signal_tree(signal.SIGKILL)
        return 1

    def stop(self) -> int:
        """The front drains (up to STOP_TIMEOUT - 3 s, as uvicorn's graceful shutdown), then
        the whole tree gets the stop; SIGKILL for what is left at the deadline."""
        deadline = time.monotonic() + max(0.5, self.stop_timeout - 1.5)  # leave time to reap and exit
        drained = time.monotonic() + max(0, self.stop_timeout - 3)
        while self.front is not None and self.front.poll() is None and time.monotonic() < drained:
            time.sleep(0.05)
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
    environ = {name: value for name, value in environ.items() if name != "API_KEY"}  # the front checks it
    if config["ENGINE"] == "llama-server":
        return llama_server.environment(environ, config["CPU_LEVEL"])  # its settings are on its command line
    env = dict(environ)
    for name in ("N_CTX", "N_THREADS", "N_THREADS_BATCH", "MODEL_ALIAS", "CHAT_FORMAT"):
        if config[name]:
            env[name] = config[name]
    env["HF_HUB_OFFLINE"] = "1"  # the file is local now; serving must not touch the network
    env.update(backend_environ(config["CPU_LEVEL"]))
    # Streams in flight at a stop may finish until then; the supervisor kills at STOP_TIMEOUT - 1.5 s.
    env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"] = str(max(1, int(config["STOP_TIMEOUT"]) - 3))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))  # the server package
    return env


def front_process(config: Config, backend_port: int, environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The front's command line and environment from the effective settings."""
    command = [sys.executable, "-m", "localllm_container.front", "--port", config["PORT"],
               "--backend", f"http://127.0.0.1:{backend_port}", "--engine", config["ENGINE"],
               "--alias", config["MODEL_ALIAS"], "--slots", str(answered_at_once(config)),
               "--passed-at-once", str(passed_at_once(config)),
               "--max-queue", config["MAX_QUEUE"], "--log-format", config["LOG_FORMAT"],
               # answers in flight at a stop may finish until then; the supervisor kills at STOP_TIMEOUT - 1.5 s
               "--graceful", str(max(1, int(config["STOP_TIMEOUT"]) - 3)),
               # the localllm engine's streams carry no token counts unless asked (llama-server's end with them)
               "--add-usage" if config["ENGINE"] == "localllm" else "--no-add-usage",
               "--client-timeout", config["CLIENT_TIMEOUT"], "--max-connections", config["MAX_CONNECTIONS"],
               "--cors-origins", config["CORS_ORIGINS"],
               "--metrics-need-key" if BOOLEANS[config["METRICS_NEED_KEY"].lower()] else "--metrics-open"]
    env = {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")])),
           "API_KEY": config["API_KEY"]}  # in the environment: `ps` shows a command line to anyone
    return command, env


def free_local_port() -> int:
    """A port on 127.0.0.1 for the engine behind the front (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
