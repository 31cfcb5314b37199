"""API_KEY, checked by the front for both engines before a request's body is read:
`Authorization: Bearer KEY` (OpenAI's clients, curl) or `x-api-key: KEY` (Anthropic's
clients; beside node-api's own Authorization header on DataSphere). API_KEY may hold
several keys separated by commas, so one can be replaced without stopping the others.
Compared in constant time: a caller learns nothing from how long a refusal takes.
"""
from __future__ import annotations

import hashlib
import hmac

HEADERS = (b"authorization", b"x-api-key")


def split_keys(setting: str) -> list[str]:
    """API_KEY's keys ("" for none); settings.validate refuses an empty one or a space."""
    return [key.strip() for key in setting.split(",")] if setting.strip() else []


class Keys:
    def __init__(self, setting: str):
        # Digests, so every comparison is of 32 bytes whatever the keys' lengths.
        self.digests = [digest(key.encode()) for key in split_keys(setting)]

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def allow(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """True when no key is set, or one of the request's key headers holds a key."""
        if not self.digests:
            return True
        given = [offered(name, value) for name, value in headers if name.lower() in HEADERS]
        found = False
        for candidate in given:
            for key in self.digests:  # every key, every time
                found |= hmac.compare_digest(digest(candidate), key)
        return found


def offered(name: bytes, value: bytes) -> bytes:
    """The key in one header: Authorization's after its Bearer scheme, x-api-key's whole."""
    value = value.strip()
    if name.lower() == b"authorization":
        scheme, _, token = value.partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else b""
    return value


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def refusal(headers: list[tuple[bytes, bytes]]) -> str:
    """What the 401 says: the key is missing, or not one of the server's."""
    if any(name.lower() in HEADERS for name, _ in headers):
        return "the API key given is not one of this server's (API_KEY)"
    return ("this server needs an API key: send it as Authorization: Bearer KEY (api_key= in OpenAI's clients) "
            "or as x-api-key: KEY (Anthropic's clients)")
