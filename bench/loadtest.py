#!/usr/bin/env python3
"""Load test for the OpenAI-compatible server: does every user get a whole answer?

N concurrent clients each send a bounded number of requests, mixing streamed and
plain answers from /v1/chat/completions and /v1/completions; client k starts
k x --stagger seconds after the first, so new requests arrive while earlier
answers are streaming, as on a shared node. A streamed answer counts as complete
only when a chunk carries a finish_reason and `data: [DONE]` follows; a plain
one when it has a finish_reason. Everything stops at --deadline.

    python -m bench.loadtest --url http://127.0.0.1:8000 --clients 8 --requests 3 [--json out.json]

Run it from the repository root (it reads streams with the package's own reader, so it
needs httpx and click). Exit status 0 only when every planned request completed in full.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

try:
    import httpx2 as httpx  # the HTTP client the openai package is built on
except ImportError:
    import httpx

from localllm_container.check import DONE, stream_event

# (endpoint, stream) in turn; client k starts at entry k, so each kind is in play at once.
KINDS = [("chat", True), ("completions", False), ("completions", True), ("chat", False)]
PROMPT = "Tell a short story about a lighthouse keeper and a storm."


@dataclass
class Outcome:
    client: int
    endpoint: str
    stream: bool
    result: str = "failed"  # completed | failed | truncated
    error: str = ""
    latency: float | None = None  # seconds from sending to the end of the answer
    ttft: float | None = None  # streams: seconds to the first chunk with text
    tokens: int = 0  # usage.completion_tokens, or chunks with text when streamed


def request_body(endpoint: str, stream: bool, max_tokens: int) -> dict:
    body = {"max_tokens": max_tokens, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return body


def chunk_text(choice: dict) -> str:
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


async def read_stream(response, outcome: Outcome, started: float) -> None:
    """Follow the server-sent events; the server offers no usage in streams
    (it ignores stream_options), so each chunk with text counts as one token."""
    finish, done = None, False
    async for line in response.aiter_lines():
        chunk = stream_event(line)
        if chunk is None:
            continue
        if chunk == DONE:
            done = True
            continue
        if "error" in chunk:
            outcome.error = f"error in stream: {chunk['error']}"
            return
        for choice in chunk.get("choices", []):
            if chunk_text(choice):
                outcome.tokens += 1
                outcome.ttft = outcome.ttft or time.monotonic() - started
            finish = choice.get("finish_reason") or finish
    outcome.result = "completed" if finish and done else "truncated"
    if outcome.result == "truncated":
        outcome.error = f"stream ended with finish_reason={finish}, [DONE] {'seen' if done else 'missing'}"


async def one_request(http, outcome: Outcome, max_tokens: int, deadline: float) -> None:
    path = "/v1/chat/completions" if outcome.endpoint == "chat" else "/v1/completions"
    started = time.monotonic()
    body = request_body(outcome.endpoint, outcome.stream, max_tokens)
    try:
        async with asyncio.timeout_at(deadline), http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome.error = f"HTTP {response.status_code}: {text[:200]}"
            elif outcome.stream:
                await read_stream(response, outcome, started)
            else:
                answer = json.loads(await response.aread())
                outcome.tokens = answer.get("usage", {}).get("completion_tokens", 0)
                outcome.result = "completed" if answer["choices"][0].get("finish_reason") else "truncated"
    except (httpx.HTTPError, ValueError, KeyError, IndexError, AttributeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    except TimeoutError:
        outcome.error = "deadline passed"
    outcome.latency = time.monotonic() - started


async def client(number: int, args, deadline: float, outcomes: list[Outcome]) -> None:
    await asyncio.sleep(number * args.stagger)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.deadline,
                                 trust_env=False) as http:
        for i in range(args.requests):
            if time.monotonic() >= deadline:
                return
            outcome = Outcome(number, *KINDS[(number + i) % len(KINDS)])
            outcomes.append(outcome)
            await one_request(http, outcome, args.max_tokens, deadline)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    values = sorted(values)
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else None


def summarise(outcomes: list[Outcome], args, wall: float) -> dict:
    done = [o for o in outcomes if o.result == "completed"]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    tokens = sum(o.tokens for o in outcomes)
    return {
        "url": args.url, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "stagger_s": args.stagger,
        "planned": args.clients * args.requests, "sent": len(outcomes), "completed": len(done),
        "failed": sum(o.result == "failed" for o in outcomes),
        "truncated": sum(o.result == "truncated" for o in outcomes),
        "latency_p50_s": percentile([o.latency for o in done], 50),
        "latency_p95_s": percentile([o.latency for o in done], 95),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0, "wall_s": wall,
        "errors": [f"client {o.client} {o.endpoint} stream={o.stream}: {o.error}" for o in outcomes if o.error],
    }


async def run(args) -> dict:
    outcomes: list[Outcome] = []
    started = time.monotonic()
    deadline = started + args.deadline  # on the event loop's clock, which is time.monotonic
    await asyncio.gather(*(client(k, args, deadline, outcomes) for k in range(args.clients)))
    summary = summarise(outcomes, args, time.monotonic() - started)
    summary["requests"] = [asdict(o) for o in outcomes]
    return summary


def table(summary: dict) -> str:
    def sec(name: str) -> str:
        return "-" if summary[name] is None else f"{summary[name]:.2f}"
    rows = [
        ("clients x requests", f"{summary['clients']} x {summary['requests_per_client']} "
                               f"(max_tokens {summary['max_tokens']}, stagger {summary['stagger_s']} s)"),
        ("sent", f"{summary['sent']} of {summary['planned']}"), ("completed in full", summary["completed"]),
        ("failed", summary["failed"]), ("truncated", summary["truncated"]),
        ("latency p50 / p95, s", f"{sec('latency_p50_s')} / {sec('latency_p95_s')}"),
        ("time to first token p50 / p95, s", f"{sec('ttft_p50_s')} / {sec('ttft_p95_s')}"),
        ("completion tokens/s (all clients)", f"{summary['tokens_per_s']:.1f} "
                                              f"({summary['completion_tokens']} in {summary['wall_s']:.1f} s)"),
    ]
    lines = [f"{name:<36}{value}" for name, value in rows]
    return "\n".join(lines + [f"  {error}" for error in summary["errors"]])


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--stagger", type=float, default=0.5, help="seconds between client starts")
    parser.add_argument("--deadline", type=float, default=300, help="seconds for the whole run")
    parser.add_argument("--api-key", default="", help="sent as a Bearer token when the server has API_KEY")
    parser.add_argument("--json", help="also write the summary and every request's outcome here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    print(table(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
    return 0 if summary["completed"] == summary["planned"] else 1


if __name__ == "__main__":
    sys.exit(main())
