"""`entrypoint.py serve` (or any server command) as a process of a test or benchmark:
started in its own session, every process it starts marked through the environment
so that none is left behind, its output lines collected with their arrival times.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from localllm_container.check import DONE, stream_event

from .environment import ENTRYPOINT

READY_DEADLINE = 120  # seconds; the test model loads in about 2 s
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
MARKER = "LOCALLLM_TEST_MARKER"


class ServerProcess:
    """A server on 127.0.0.1:`port`; `lines` is its output (stdout and stderr), `times`
    the monotonic arrival time of each line."""

    def __init__(self, command: list[str], env: dict[str, str], port: int, name: str = "server"):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.marker = uuid.uuid4().hex
        self.lines: list[str] = []
        self.times: list[float] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, env={**env, MARKER: self.marker}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._collect, daemon=True).start()

    @classmethod
    def entrypoint(cls, env: dict[str, str], port: int, prefix: tuple[str, ...] = (), name: str = "entrypoint"):
        """`entrypoint.py serve`, under `prefix` (such as qemu or taskset) when given."""
        return cls([*prefix, sys.executable, str(ENTRYPOINT), "serve"], env, port, name)

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, deadline: float = READY_DEADLINE, headers: dict[str, str] | None = None) -> float:
        """Seconds from the start to the first answer from /v1/models (`headers`: its API key)."""
        while time.monotonic() < self.started + deadline:
            assert self.proc.poll() is None, f"{self.name} exited early:\n{self.output()}"
            try:
                with OPENER.open(urllib.request.Request(self.url + "/v1/models", headers=headers or {}), timeout=2):
                    return time.monotonic() - self.started
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {deadline} s:\n{self.output()}")

    def wait_for_line(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} within {timeout} s:\n{self.output()}")

    @property
    def engine_url(self) -> str:
        """The engine behind the front (the serve line names its port on 127.0.0.1): where a test
        reads what the front does not pass on, such as llama-server's /slots."""
        line = self.wait_for_line("the engine on 127.0.0.1:")
        return "http://127.0.0.1:" + line.rsplit("127.0.0.1:", 1)[1].split()[0]

    def line_after(self, text: str) -> float | None:
        """Seconds from the start to the first output line containing `text`."""
        return next((t - self.started for t, line in zip(self.times, self.lines) if text in line), None)

    def leftovers(self) -> list[int]:
        """Processes started by this server (they inherit the marker) still alive."""
        return processes_with_env(f"{MARKER}={self.marker}")

    def close(self, timeout: float = 30) -> None:
        """SIGTERM (the entrypoint stops its tree), then SIGKILL whatever is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.leftovers():
            os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def post(self, path: str, body: dict, timeout: float):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return OPENER.open(request, timeout=timeout)

    def call(self, path: str, body: dict, timeout: float = 300) -> dict:
        with self.post(path, body, timeout) as reply:
            return json.load(reply)

    def stream(self, body: dict, timeout: float = 300) -> tuple[float, list[tuple[float, bool]], str | None]:
        """A streamed completion: (time sent, [(arrival, has text)] per chunk, finish_reason)."""
        sent, chunks, finish = time.monotonic(), [], None
        with self.post("/v1/completions", {**body, "stream": True}, timeout) as reply:
            for line in reply:
                if time.monotonic() > sent + timeout:
                    raise TimeoutError(f"{self.name}: no end of the answer within {timeout} s")
                chunk = stream_event(line)
                if chunk is None or chunk == DONE:
                    continue
                choice = chunk["choices"][0]
                chunks.append((time.monotonic(), bool(choice.get("text"))))
                finish = choice.get("finish_reason") or finish
        return sent, chunks, finish


def processes_with_env(entry: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds `entry`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                if "\nState:\tZ" not in (proc / "status").read_text():
                    found.append(int(proc.name))
        except OSError:
            continue
    return found
