"""A local stand-in for the Hugging Face Hub, for tests only.

It is not the Hub and implements only what the real ``huggingface_hub`` client
needs for read-only access to model repos when ``HF_ENDPOINT`` points at it:

* ``GET /api/models/{repo_id}[/revision/{rev}]``: ``model_info``; with
  ``?blobs=true`` (``files_metadata=True``) siblings carry size, blobId and lfs.
* ``GET /api/models/{repo_id}/tree/{rev}[/{path}]``: ``list_repo_tree`` and
  ``list_repo_files``; honours ``recursive``, ignores ``expand``, one page only.
* ``HEAD``/``GET /{repo_id}/resolve/{rev}/{filename}``: ``hf_hub_download``;
  answered directly (no redirect, no Xet headers, so the client uses plain
  HTTP), ``Range`` requests get 206.
* ``GET /api/agent-harnesses``: an empty registry. The client fetches it once
  per process when building request headers, unless
  ``HF_HUB_DISABLE_TELEMETRY=1``, and caches it in ``HF_HOME`` for a day.

Every served file is presented as a Git LFS file, so its SHA-256 is available
to clients (``lfs.sha256`` in ``model_info``, ``lfs.oid`` in the tree, ETag on
resolve). ``rev`` is ``main`` or the repo's fixed 40-hex revision, derived from
its file names and hashes.

Errors carry the Hub's ``X-Error-Code`` header, which the client maps to
exceptions: unknown repo -> ``RepoNotFound`` (``RepositoryNotFoundError``),
unknown file or folder -> ``EntryNotFound`` (``RemoteEntryNotFoundError``, an
``EntryNotFoundError``), unknown revision -> ``RevisionNotFound``. When created
with a token, any request without ``Authorization: Bearer <token>`` gets 401
with ``GatedRepo``, which the client raises as ``GatedRepoError`` (a subclass of
``RepositoryNotFoundError``). The error code is needed: the client only treats
a bare 401 as "repo not found" for ``https://`` URLs.

Run as a script to serve until SIGINT/SIGTERM::

    python -m testkit.hub_standin --port 8765 --repo ORG/NAME=FILENAME:LOCALPATH [--repo ...] [--token T]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .hub_repos import Repo, RepoFile

_CHUNK = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

class _HttpError(Exception):
    """An error response in the Hub's format: status, `X-Error-Code` and a JSON body."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: HubStandin


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response sets Content-Length
    server: _Server

    def _handle(self) -> None:
        standin = self.server.standin
        url = urlsplit(self.path)
        standin._record(self.command, url.path)
        try:
            if self.command not in ("GET", "HEAD"):
                self._discard_body()
            if standin._token is not None and self.headers.get("Authorization") != f"Bearer {standin._token}":
                raise _HttpError(401, "GatedRepo", "Access to this stand-in hub requires its token.")
            if self.command not in ("GET", "HEAD"):
                raise _HttpError(405, None, f"{self.command} is not supported by the stand-in hub.")
            self._route([unquote(part) for part in url.path.split("/")[1:]], parse_qs(url.query))
        except _HttpError as error:
            headers = {"Content-Type": "application/json", "X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_body(error.status, headers, json.dumps({"error": error.message}).encode())

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args) -> None:
        """Silent: requests are recorded in `HubStandin.requests` instead."""

    def _discard_body(self) -> None:
        """Skip an unsupported request's body; close afterwards in case it was chunked."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.close_connection = True

    def _route(self, parts: list[str], query: dict[str, list[str]]) -> None:
        def flag(name: str) -> bool:
            return query.get(name, [""])[0].lower() in ("true", "1")

        if parts == ["api", "agent-harnesses"]:
            self._send_json({"standardEnvVars": [], "harnesses": {}})
        elif parts[:2] == ["api", "models"] and len(parts) > 2:
            repo_id, repo, rest = self._split_repo(parts[2:])
            if not rest or (rest[0] == "revision" and len(rest) == 2):
                self._check_revision(repo, rest[1] if rest else "main")
                self._send_json(repo.model_info(repo_id, with_blobs=flag("blobs")))
            elif rest[0] == "tree" and len(rest) >= 2:
                self._check_revision(repo, rest[1])
                entries = repo.tree("/".join(rest[2:]), recursive=flag("recursive"))
                if entries is None:
                    raise _HttpError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.revision})
                self._send_json(entries)
            else:
                raise _HttpError(404, None, "Not found")
        elif "resolve" in parts[1:3]:
            _, repo, rest = self._split_repo(parts)
            if len(rest) < 3 or rest[0] != "resolve":
                raise _HttpError(404, None, "Not found")
            self._check_revision(repo, rest[1])
            f = repo.files.get("/".join(rest[2:]))
            if f is None:
                raise _HttpError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.revision})
            self._send_file(repo, f)
        else:
            raise _HttpError(404, None, "Not found")

    def _split_repo(self, parts: list[str]) -> tuple[str, Repo, list[str]]:
        """Split a known repo id (one or two path segments) from the rest of the path."""
        for length in (2, 1):
            repo_id = "/".join(parts[:length])
            if repo_id in self.server.standin._repos:
                return repo_id, self.server.standin._repos[repo_id], parts[length:]
        raise _HttpError(404, "RepoNotFound", "Repository not found")

    @staticmethod
    def _check_revision(repo: Repo, revision: str) -> None:
        if revision not in ("main", repo.revision):
            raise _HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision!a}")

    def _send_json(self, payload: object) -> None:
        self._send_body(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def _send_body(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self._send_headers(status, {**headers, "Content-Length": str(len(body))})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_headers(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_file(self, repo: Repo, f: RepoFile) -> None:
        """Serve a file with the headers `hf_hub_download` reads, honouring a single byte range."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.sha256}"',
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(f.size),
            "X-Repo-Commit": repo.revision,
        }
        byte_range = self._requested_range(f.size)
        if byte_range is None:
            status, (start, end) = 200, (0, f.size - 1)
        else:
            status, (start, end) = 206, byte_range
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers["Content-Length"] = str(end - start + 1)
        self._send_headers(status, headers)
        if self.command == "HEAD":
            return
        try:
            with f.local_path.open("rb") as source:
                source.seek(start)
                remaining = end - start + 1
                while remaining and (chunk := source.read(min(_CHUNK, remaining))):
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up mid-download; it may resume with a Range

    def _requested_range(self, size: int) -> tuple[int, int] | None:
        """Inclusive (start, end) of a single `bytes=` range, or None to serve the whole file.

        Multiple or malformed ranges are ignored, as HTTP allows; the client copes with a 200 reply to a Range request.
        """
        match = _RANGE.fullmatch(self.headers.get("Range", "").replace(" ", ""))
        if match is None or match.groups() == ("", ""):
            return None
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        else:
            start, end = max(size - int(last), 0), size - 1
        if start > end:
            raise _HttpError(416, None, "Requested range not satisfiable", {"Content-Range": f"bytes */{size}"})
        return start, end


class HubStandin:
    """Serve local files as Hugging Face Hub model repos over HTTP, for tests.

    `repos` maps a repo id to {filename in the repo: local file whose bytes are served}; several names may share one
    local file. With `token`, requests must send `Authorization: Bearer <token>`. Use as a context manager, or call
    `start()` and `stop()`; point the client at it with `HF_ENDPOINT=<url>`.
    """

    def __init__(
        self,
        repos: dict[str, dict[str, pathlib.Path]],
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self._repos = {repo_id: Repo.load(files) for repo_id, files in repos.items()}
        self._token = token
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._requests: list[tuple[str, str]] = []
        self._requests_lock = threading.Lock()

    @property
    def url(self) -> str:
        """Base URL to use as `HF_ENDPOINT`, e.g. "http://127.0.0.1:PORT"."""
        if self._server is None:
            raise RuntimeError("HubStandin is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of the (method, path) of every request received so far, query strings left out."""
        with self._requests_lock:
            return list(self._requests)

    def _record(self, method: str, path: str) -> None:
        with self._requests_lock:
            self._requests.append((method, path))

    def start(self) -> HubStandin:
        if self._server is None:
            self._server = _Server(self._address, _Handler)
            self._server.standin = self
            self._thread = threading.Thread(
                # A short poll interval so that stop() returns promptly.
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _parse_repo_option(value: str) -> tuple[str, str, pathlib.Path]:
    """Parse ORG/NAME=FILENAME:LOCALPATH."""
    repo_id, sep, rest = value.partition("=")
    filename, sep2, local_path = rest.partition(":")
    if not (sep and sep2 and repo_id and filename and local_path):
        raise argparse.ArgumentTypeError(f"expected ORG/NAME=FILENAME:LOCALPATH, got {value!r}")
    return repo_id, filename, pathlib.Path(local_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve local files as Hugging Face Hub model repos (tests only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--repo",
        type=_parse_repo_option,
        action="append",
        required=True,
        metavar="ORG/NAME=FILENAME:LOCALPATH",
        help="a file to serve; repeat for more files or repos",
    )
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every request")
    args = parser.parse_args(argv)

    repos: dict[str, dict[str, pathlib.Path]] = {}
    for repo_id, filename, local_path in args.repo:
        repos.setdefault(repo_id, {})[filename] = local_path

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    with HubStandin(repos, token=args.token, host=args.host, port=args.port) as standin:
        print(standin.url, flush=True)
        stopping.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
