"""CORS, answered by the front for both engines: no web page of another origin may read
an answer unless CORS_ORIGINS names that origin (or is `*`). The engines' own CORS
headers (both allow any origin) never reach the client.
"""
from __future__ import annotations

ALLOWED_METHODS = b"GET, POST, OPTIONS"
EXPOSED_HEADERS = b"x-request-id, retry-after"
MAX_AGE = b"600"  # seconds a browser may keep a preflight's answer


def split_origins(setting: str) -> list[str]:
    return [origin.strip() for origin in setting.split(",") if origin.strip()]


class Cors:
    def __init__(self, setting: str):
        origins = split_origins(setting)
        self.any = origins == ["*"]
        self.origins = {origin.encode() for origin in origins}

    def allows(self, origin: bytes | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """What an answer to a request from `origin` carries."""
        if not self.allows(origin):
            return []
        return [(b"access-control-allow-origin", b"*" if self.any else origin), (b"vary", b"origin"),
                (b"access-control-expose-headers", EXPOSED_HEADERS)]

    def preflight(self, origin: bytes | None, asked_headers: bytes | None) -> list[tuple[bytes, bytes]] | None:
        """What a preflight's 204 carries beyond `headers`, or None when the origin may not call."""
        if not self.allows(origin):
            return None
        return [(b"access-control-allow-methods", ALLOWED_METHODS),
                (b"access-control-allow-headers", asked_headers or b"authorization, content-type"),
                (b"access-control-max-age", MAX_AGE)]
