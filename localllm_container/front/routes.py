"""The routes the front answers or passes on, named one by one: anything else is a 404
from the front itself, decided on the raw path (so `%3F`, `//` or `..` cannot dress one
route up as another), and the engine gets the route's own name. Also the shape of the
front's own errors, OpenAI's or Anthropic's by route.

Left out on purpose (docs/*/security.md): llama-server's /slots, /props, /lora-adapters,
/metrics, /v1/stream and /v1/streams/lookup, /v1/chat/completions/control, /cors-proxy,
/tools and the router's /models routes, which read or change what other users' requests
and the server are doing; llama-cpp-python's /docs, /openapi.json and its copilot route.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..server import HEALTH_PATH

METRICS_PATH = "/metrics"
BOTH = frozenset({"localllm", "llama-server"})
LLAMA_SERVER = frozenset({"llama-server"})
LOCALLLM = frozenset({"localllm"})
# Connections the front keeps to the engine beside one per slot: for the routes that do not
# wait for a slot (/v1/models, tokenize, ...) and for its /health probes. llama-server gets
# an HTTP thread for each of them and each slot (llama_server.command), so a full queue never
# leaves a probe waiting for a thread.
OTHER_CONNECTIONS, PROBE_CONNECTIONS = 4, 2


@dataclass(frozen=True)
class Route:
    path: str
    method: str  # GET also answers HEAD
    engines: frozenset[str] = BOTH
    generates: bool = False  # waits for a slot, counts toward MAX_QUEUE, measured in /metrics
    anthropic: bool = False  # errors in the shape of Anthropic's API

    def allows(self, method: str) -> bool:
        return method == self.method or (method == "HEAD" and self.method == "GET")


ROUTES = {route.path: route for route in (
    Route(HEALTH_PATH, "GET"),
    Route(METRICS_PATH, "GET"),
    Route("/v1/models", "GET"),
    Route("/v1/completions", "POST", generates=True),
    Route("/v1/chat/completions", "POST", generates=True),
    Route("/v1/embeddings", "POST", generates=True),
    Route("/v1/responses", "POST", LLAMA_SERVER, generates=True),
    Route("/v1/responses/input_tokens", "POST", LLAMA_SERVER),
    Route("/v1/messages", "POST", LLAMA_SERVER, generates=True, anthropic=True),
    Route("/v1/messages/count_tokens", "POST", LLAMA_SERVER, anthropic=True),
    # llama-server's own API
    *(Route(path, "POST", LLAMA_SERVER, generates=True) for path in (
        "/completion", "/completions", "/chat/completions", "/infill", "/embedding", "/embeddings",
        "/rerank", "/reranking", "/v1/rerank", "/v1/reranking")),
    *(Route(path, "POST", LLAMA_SERVER) for path in ("/tokenize", "/detokenize", "/apply-template")),
    # llama-cpp-python's own API
    *(Route(path, "POST", LOCALLLM) for path in ("/extras/tokenize", "/extras/tokenize/count",
                                                 "/extras/detokenize")),
)}
# Errors by status: OpenAI's type, and Anthropic's (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: ("invalid_request_error", "invalid_request_error"),
               401: ("authentication_error", "authentication_error"),
               403: ("permission_error", "permission_error"),
               404: ("invalid_request_error", "not_found_error"),
               405: ("invalid_request_error", "invalid_request_error"),
               408: ("timeout_error", "timeout_error"),
               413: ("invalid_request_error", "request_too_large"),
               503: ("server_busy", "overloaded_error")}


def error_body(route: Route | None, status: int, message: str, param: str | None = None,
               code: str | None = None) -> bytes:
    """An error as the route's own API words it: OpenAI's {"error": {...}} or Anthropic's
    {"type": "error", "error": {...}}."""
    openai, anthropic = ERROR_TYPES.get(status, ("api_error", "api_error"))
    if route is not None and route.anthropic:
        return json.dumps({"type": "error", "error": {"type": anthropic, "message": message}}).encode()
    return json.dumps({"error": {"message": message, "type": openai, "param": param, "code": code}}).encode()


def unknown(method: str, path: str) -> str:
    return (f"Invalid URL ({method} {printable(path)}): not a route of this server "
            "(docs/en/compatibility.md lists them)")


def not_on_engine(route: Route, engine: str) -> str:
    other = next(iter(route.engines))
    return f"ENGINE={engine} does not answer {route.path}; ENGINE={other} does"


def printable(text: str) -> str:
    """Control and non-ASCII characters escaped, so a path cannot write a line of its own
    into the log (uvicorn hands the path over percent-decoded)."""
    return "".join(char if " " <= char < "\x7f" else char.encode("unicode_escape").decode() for char in text)
