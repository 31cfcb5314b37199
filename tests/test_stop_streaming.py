"""A stop signal in the middle of a streamed answer: the container must still stop
in its grace period, cleanly (status 0), refuse new connections and leave no
process behind, not even a zombie. An answer that can finish within the grace
period is finished; a longer one is cut when the period is nearly over."""
from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import ALIAS

STOP_TIMEOUT = 10  # the entrypoint's default grace period
# The test model writes about 50 tokens/s here: 24 tokens fit the grace period (7 s) even at a fifth of that
# speed, as on a loaded machine; 5000 take far longer.
SHORT, LONG = 24, 5000
# Token ids the long answer must not end on (EOS and <end_of_turn> in the test model's vocabulary).
NO_END = {"1": -100, "106": -100}


def refuses_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def zombies(pids: list[int]) -> list[int]:
    """Those of `pids` left as zombies. A zombie's environment reads as empty, so
    conftest's marker search cannot see it: the pids are taken while alive."""
    found = []
    for pid in pids:
        try:
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                found.append(pid)
        except OSError:  # gone: reaped
            continue
    return found


@pytest.mark.parametrize("max_tokens", [SHORT, LONG], ids=["answer-finishes", "answer-outlasts-the-grace-period"])
def test_sigterm_during_a_stream_stops_cleanly(start_server, report, max_tokens):
    entrypoint = start_server()
    entrypoint.wait_ready()
    client = openai.OpenAI(base_url=entrypoint.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.completions.create(model=ALIAS, prompt="Write a long story about the sea.",
                                       max_tokens=max_tokens, temperature=0, stream=True,
                                       logit_bias=NO_END if max_tokens == LONG else None)
    first = [next(stream) for _ in range(3)]
    assert all(chunk.choices[0].finish_reason is None for chunk in first)  # still generating
    tree = entrypoint.leftovers()  # the entrypoint, the server and anything else they started

    ending: list[str] = []

    def drain() -> None:
        """Keep reading like a real client; record how the stream ended."""
        try:
            reasons = [chunk.choices[0].finish_reason for chunk in stream]
        except Exception as exc:  # noqa: BLE001 - any way of being cut is recorded as such
            ending.append(f"cut: {type(exc).__name__}")
            return
        ending.append(f"ended, finish_reason {reasons[-1]}" if reasons and reasons[-1]
                      else "cut: closed without a finish reason")

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    entrypoint.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    refused_while_running = None
    while entrypoint.proc.poll() is None and time.monotonic() - signalled < STOP_TIMEOUT:
        if refuses_connections(entrypoint.port):
            refused_while_running = time.monotonic() - signalled
            break
        time.sleep(0.02)

    code = entrypoint.proc.wait(max(0.1, STOP_TIMEOUT - (time.monotonic() - signalled)))
    took = time.monotonic() - signalled
    reader.join(5)
    assert code == 0, entrypoint.output()
    assert refuses_connections(entrypoint.port)
    assert entrypoint.leftovers() == []
    assert zombies(tree) == []
    if max_tokens == SHORT:
        assert ending and ending[0].startswith("ended, finish_reason "), (ending, entrypoint.output())
    else:
        assert ending and ending[0].startswith("cut"), ending
    report(f"stop during a stream of {max_tokens} tokens", f"exit 0 after {took:.1f} s; new connections refused "
           + (f"{refused_while_running:.2f} s after SIGTERM, while the entrypoint ran" if refused_while_running
              is not None else "only after exit") + f"; the stream {ending[0] if ending else 'was still open'}")
