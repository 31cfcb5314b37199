"""The front's log: one access line per request with its id, as text or, with
LOG_FORMAT=json, one JSON object a line for log collectors (Cloud Logging, Loki)."""
from __future__ import annotations

import logging
import re
import sys
import uuid

from ..server.log import JsonLineFormatter

REQUEST_ID_HEADER = "x-request-id"
# How the engine gets it: llama-cpp-python's server refuses an x-request-id that is not a UUID.
ENGINE_REQUEST_ID_HEADER = "x-localllm-request-id"
# What an incoming id may be (longer or other characters: a new one is made, and the
# caller's is not written to the log, where it could forge lines).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
LOGGER = logging.getLogger("localllm.front")


def request_id(given: str | None) -> str:
    """The caller's X-Request-Id when it is a plain token, else a new one."""
    return given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def setup(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s:     %(message)s"))
    for name, level in ((LOGGER.name, logging.INFO), ("uvicorn.error", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def access(client: str, method: str, path: str, status: int, seconds: float, rid: str) -> None:
    """The request's line: the same fields in both formats."""
    LOGGER.info(f'{client} - "{method} {path}" {status} {seconds:.3f} s request_id={rid}',
                extra={"fields": {"request_id": rid, "client": client, "method": method, "path": path,
                                  "status": status, "duration_s": round(seconds, 3)}})
