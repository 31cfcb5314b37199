"""`check`: call a deployed server as a client would (list the models, stream one chat
answer) and say in one line what is wrong. It runs on a laptop with click alone, so
it imports only click and the standard library, and nothing else of this package.
"""
from __future__ import annotations

import json
import re
import time

import click


CHECK_PROMPT = "Say hello in one short sentence."
CHECK_HINTS = {
    401: "the token or key is missing or refused (DataSphere: --iam-token or YC_IAM_TOKEN, "
         "a fresh `yc iam create-token`; a server with API_KEY: --api-key or API_KEY)",
    403: "the token is valid but may not call this node (check --folder-id and the account's access to the project)",
    404: "no such path, node or alias (give the base URL without /v1; check --node-id or --alias)",
    503: "not ready: the model is still loading or the node is starting; try again in a minute",
}


class CheckFailed(Exception):
    """A step of `check` failed: reported as one line with exit status 1."""


def check_open(url: str, headers: dict[str, str], timeout: float, body: dict | None = None):
    """Send one request; HTTP and network failures become one CheckFailed line."""
    import http.client
    import urllib.error
    import urllib.request
    step = f"{'POST' if body else 'GET'} {url}"
    request = urllib.request.Request(url, json.dumps(body).encode() if body else None, headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read(200).decode("utf-8", "replace").split())
        hint = CHECK_HINTS.get(exc.code, "unexpected answer")
        raise CheckFailed(f"{step}: HTTP {exc.code} {exc.reason}: {hint}" + (f" [{detail}]" if detail else "")) from None
    except urllib.error.URLError as exc:
        raise CheckFailed(f"{step}: {check_reason(exc.reason, timeout)}") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a server that is not HTTP
        raise CheckFailed(f"{step}: {check_reason(exc, timeout)}") from None


def check_reason(reason, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s (--timeout): the server is busy or still starting"
    if isinstance(reason, ConnectionRefusedError):
        return ("connection refused: nothing listens there (is the server running? "
                "its port opens only once the model is loaded)")
    import http.client
    if isinstance(reason, http.client.HTTPException):
        return f"not an HTTP answer: {reason!r}"
    return f"cannot connect: {reason}"


DONE = "[DONE]"  # the data of the event that ends an OpenAI stream


def stream_event(line: str | bytes) -> dict | str | None:
    """One line of an OpenAI server-sent event stream: its chunk, DONE at the end, or None
    for what carries no data (blank separators, ": ping" comments). ValueError when the
    data is not JSON. The one reader of these streams; the tests and benchmarks use it too."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == DONE else json.loads(data)


def read_stream(reply, step: str, timeout: float) -> tuple[list[float], str, bool]:
    """Read an OpenAI server-sent event stream: (arrival time of each text piece, text, [DONE] seen)."""
    import http.client
    times, text, line = [], [], b""
    try:
        for line in reply:
            chunk = stream_event(line)
            if chunk is None:
                continue
            if chunk == DONE:
                return times, "".join(text), True
            if "error" in chunk:
                raise CheckFailed(f"{step}: the stream carried an error: {chunk['error']}")
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                times.append(time.monotonic())
                text.append(piece)
    except (OSError, http.client.HTTPException) as exc:
        raise CheckFailed(f"{step}: the stream broke off: {check_reason(exc, timeout)}") from None
    except ValueError:
        shown = line.decode("utf-8", "replace").strip()[:120]
        raise CheckFailed(f"{step}: not an OpenAI event stream: {shown!r}") from None
    return times, "".join(text), False


def run_check(base: str, headers: dict[str, str], timeout: float) -> None:
    """List the models, stream one chat answer, print what a user would want to know."""
    url = base + "/v1/models"
    started = time.monotonic()
    with check_open(url, headers, timeout) as reply:
        try:
            models = [m["id"] for m in json.load(reply)["data"]]
        except OSError as exc:
            raise CheckFailed(f"GET {url}: {check_reason(exc, timeout)}") from None
        except (ValueError, KeyError, TypeError):
            raise CheckFailed(f"GET {url}: HTTP {reply.status} but not an OpenAI model list") from None
    if not models:
        raise CheckFailed(f"GET {url}: HTTP {reply.status} but no model is listed")
    click.echo(f"models: HTTP {reply.status} in {time.monotonic() - started:.2f} s, model {models[0]!r}")
    url = base + "/v1/chat/completions"
    body = {"model": models[0], "messages": [{"role": "user", "content": CHECK_PROMPT}],
            "max_tokens": 32, "stream": True}
    sent = time.monotonic()
    with check_open(url, headers, timeout, body) as reply:
        times, text, done = read_stream(reply, f"POST {url}", timeout)
    total = time.monotonic() - sent
    if not done:
        raise CheckFailed(f"POST {url}: the stream ended without its closing data: [DONE]")
    if not text.strip():
        raise CheckFailed(f"POST {url}: HTTP {reply.status} but the answer is empty "
                          "(a wrong CHAT_FORMAT for this model is the usual cause)")
    speed = (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None
    click.echo(f"chat: HTTP {reply.status}, first token after {times[0] - sent:.2f} s, {len(times)} tokens"
               + (f" at {speed:.1f} tokens/s" if speed else "") + f", total {total:.2f} s")
    click.echo(f"answer: {' '.join(text.split())[:200]}")
    click.echo(f"ok: {base} serves {models[0]!r}")


def request_headers(node_id, alias, folder_id, iam_token, api_key) -> dict[str, str]:
    """The headers node-api (DataSphere) and the server's API_KEY want; a wrong mix of
    options is a click usage error."""
    if node_id and alias:
        raise click.UsageError("give --node-id or --alias, not both")
    if (node_id or alias) and not folder_id:
        raise click.UsageError("--node-id and --alias need --folder-id (node-api requires x-folder-id)")
    api_key = api_key.split(",")[0].strip() if api_key else api_key  # API_KEY may hold several
    headers = {"Content-Type": "application/json", "User-Agent": "localllm-check"}
    if node_id:
        headers["x-node-id"] = node_id
    if alias:
        headers["x-node-alias"] = alias if alias.startswith("datasphere.user.") else f"datasphere.user.{alias}"
    if folder_id:
        headers["x-folder-id"] = folder_id
    if iam_token or api_key:  # node-api reads Authorization: the key goes beside it
        headers["Authorization"] = f"Bearer {iam_token or api_key}"
    if iam_token and api_key:
        headers["x-api-key"] = api_key
    return headers


def base_url(url: str) -> str:
    """The server's base URL, whether given with /v1 or without."""
    return re.sub(r"/v1/?$", "", url.rstrip("/"))
