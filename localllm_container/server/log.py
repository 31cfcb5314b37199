"""The server's log and start-up failures. `llm run` reads the server's stdout until
the ready line and then never again, so the handler moves the server's output to the
supervisor's log pipe at that line. When the model cannot load, the reason (in
llama.cpp's words, which llama-cpp-python hides) goes to a file the entrypoint prints.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import sys

READY_LINE = "Uvicorn running on"
# The file the server writes why it could not start to; set by the entrypoint.
START_ERROR_VARIABLE = "LOCALLLM_START_ERROR_FILE"


_handed_off = False
# The id of the request being answered (the front's X-Request-Id), set by the guard.
REQUEST_ID: contextvars.ContextVar = contextvars.ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    """Gives each line written while a request is answered its id (`request` in the format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.request = f" request_id={record.request_id}" if record.request_id else ""
        return True


class JsonLineFormatter(logging.Formatter):
    """LOG_FORMAT=json: one object a line, the same fields from the front and the engine."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if getattr(record, "request_id", ""):
            line["request_id"] = record.request_id
        line.update(getattr(record, "fields", {}))  # the front's access lines: status, path, duration...
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class HandoffStreamHandler(logging.StreamHandler):
    """Writes to stdout, the pipe `llm run` reads, up to and including the ready
    line; then points the server's stdout and stderr at the supervisor's log pipe,
    because nobody reads `llm run`'s pipe afterwards."""

    def __init__(self, target: str):
        super().__init__(sys.stdout)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        global _handed_off
        super().emit(record)
        if not _handed_off and READY_LINE in record.getMessage():
            self.flush()
            fd = os.open(self.target, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            _handed_off = True


def uvicorn_log_config(target: str, log_format: str) -> dict:
    """uvicorn's logging: start-up lines reach `llm run`, later lines reach the
    supervisor, each with the id of the request it was written for; the `guard`
    filter applies patches.install. No access lines: the front writes them."""
    handler = {"()": f"{__name__}.HandoffStreamHandler", "target": target, "filters": ["request_id"]}
    text = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(asctime)s %(levelprefix)s %(message)s%(request)s",
            "use_colors": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"guard": {"()": f"{__package__}.patches.install"},
                    "request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"default": {"()": f"{__name__}.JsonLineFormatter"} if log_format == "json" else text},
        "handlers": {"default": {**handler, "formatter": "default"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"level": "WARNING"},
        },
    }


def load_failure(path: str, llama_lines: list[str]) -> str:
    """One line on a model file llama.cpp could not load, in its words: the same on both engines."""
    lines = [" ".join(line.split()) for line in llama_lines if line.strip()]
    marker = "error loading model: "
    reasons = [line.split(marker, 1)[1] for line in lines if marker in line]
    reason = reasons[0] if reasons else (" ".join(lines) or "no reason given")
    return f"llama.cpp cannot load the model file {path}: {reason}"


def start_failure(exc: Exception, llama_errors: list[str]) -> str:
    """One line on why the server could not start, in llama.cpp's words where it said any."""
    lines = "".join(llama_errors).splitlines()
    said = " ".join(" ".join(line.split()) for line in lines if line.strip())
    if "Failed to load model" in str(exc):
        return load_failure(os.environ.get("MODEL", "?"), lines)
    return f"the model server cannot start: {type(exc).__name__}: {exc}" + (f" (llama.cpp: {said})" if said else "")


def report_start_failure(reason: str) -> None:
    """Hand the one-line reason to the entrypoint and end quietly: a traceback would only bury it."""
    target = os.environ.get(START_ERROR_VARIABLE)
    if not target:
        return  # not started by the entrypoint: the caller raises as usual
    with open(target, "w", encoding="utf-8") as out:
        out.write(reason + "\n")
    os._exit(1)
