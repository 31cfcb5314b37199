"""A stand-in for DataSphere's node-api, which cannot be reached from here.

It behaves the way docs/*/datasphere.md describes node-api to callers: a request
without x-node-id (or x-node-alias), x-folder-id and `Authorization: Bearer ...`
gets 401; otherwise the path is passed through unchanged to the node (here: the
local test server) and the answer, streamed or not, comes back as it is sent.
`status` makes it answer every authorised request with that status instead,
as node-api does with 503 while a node starts.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}


class NodeApiStandin:
    def __init__(self, target: str, status: int | None = None):
        self.target, self.status = target.rstrip("/"), status
        self.requests: list[dict[str, str]] = []  # the headers of each request, lower-case names
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> NodeApiStandin:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.handle_any()

            do_POST = do_GET

            def handle_any(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                standin.requests.append(headers)
                body = self.rfile.read(int(headers.get("content-length") or 0))
                authorised = ((headers.get("x-node-id") or headers.get("x-node-alias")) and headers.get("x-folder-id")
                              and headers.get("authorization", "").startswith("Bearer "))
                if not authorised:
                    return self.answer(401, "Unauthorized")
                if standin.status:
                    return self.answer(standin.status, "node is not available")
                forwarded = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
                request = urllib.request.Request(standin.target + self.path, body or None, forwarded,
                                                 method=self.command)
                try:
                    upstream = urllib.request.urlopen(request, timeout=120)
                except urllib.error.HTTPError as exc:
                    upstream = exc
                with upstream:
                    self.send_response(upstream.status)
                    self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
                    self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                    while chunk := upstream.read1(65536):
                        self.wfile.write(chunk)

            def answer(self, status: int, message: str) -> None:
                data = json.dumps({"message": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
