"""Who may call, decided by the front without a server: API_KEY (front/keys.py), CORS_ORIGINS
(front/cors.py) and the routes it names (front/routes.py)."""
from __future__ import annotations

import json

import pytest

from localllm_container.front import routes
from localllm_container.front.cors import Cors
from localllm_container.front.keys import Keys, refusal


@pytest.mark.parametrize("headers, allowed", [
    ([(b"authorization", b"Bearer sk-one")], True),
    ([(b"authorization", b"bearer  sk-two ")], True),  # the scheme in any case, spaces around the key
    ([(b"x-api-key", b"sk-two")], True),  # Anthropic's clients
    ([(b"authorization", b"Bearer t1.iam-token"), (b"x-api-key", b"sk-one")], True),  # node-api's token beside it
    ([(b"authorization", b"Bearer sk-three")], False),
    ([(b"authorization", b"sk-one")], False),  # no Bearer scheme
    ([(b"authorization", b"Basic sk-one")], False),
    ([(b"x-api-key", b"sk-one,sk-two")], False),  # the setting's form is not a key
    ([(b"x-api-key", b"")], False),
    ([], False),
])
def test_either_header_may_carry_any_of_the_keys(headers, allowed):
    assert Keys("sk-one, sk-two").allow(headers) is allowed


def test_no_key_set_lets_everyone_in_and_the_refusal_says_what_to_send():
    assert not Keys("").required and Keys("").allow([])
    assert "Authorization: Bearer KEY" in refusal([]) and "x-api-key: KEY" in refusal([])
    assert refusal([(b"x-api-key", b"wrong")]) == "the API key given is not one of this server's (API_KEY)"


def test_cors_allows_only_the_origins_named():
    assert Cors("").headers(b"https://evil.example") == [] and Cors("").preflight(b"https://x.org", None) is None
    named = Cors("https://app.example.org, http://localhost:3000")
    assert dict(named.headers(b"http://localhost:3000"))[b"access-control-allow-origin"] == b"http://localhost:3000"
    assert named.headers(b"https://app.example.org.evil") == [] and named.headers(None) == []
    preflight = named.preflight(b"https://app.example.org", b"authorization, x-api-key")
    assert dict(preflight)[b"access-control-allow-headers"] == b"authorization, x-api-key"
    assert b"access-control-allow-origin" not in dict(preflight)  # the app adds headers() to every answer once
    assert dict(Cors("*").headers(b"https://any.org"))[b"access-control-allow-origin"] == b"*"


def test_routes_are_named_exactly():
    assert routes.ROUTES["/v1/chat/completions"].generates and not routes.ROUTES["/v1/models"].generates
    for disguised in ("/v1/completions%3Fx", "//v1/completions", "/v1/../v1/completions", "/v1/completions/",
                      "/V1/completions", "/slots", "/props", "/v1/stream", "/v1/engines/copilot-codex/completions"):
        assert disguised not in routes.ROUTES
    assert routes.ROUTES["/v1/models"].allows("HEAD") and not routes.ROUTES["/v1/completions"].allows("GET")


def test_errors_take_the_shape_of_the_routes_api():
    openai = json.loads(routes.error_body(routes.ROUTES["/v1/chat/completions"], 401, "no key", code="invalid_api_key"))
    assert openai == {"error": {"message": "no key", "type": "authentication_error", "param": None,
                                "code": "invalid_api_key"}}
    anthropic = json.loads(routes.error_body(routes.ROUTES["/v1/messages"], 503, "busy"))
    assert anthropic == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


def test_a_logged_path_cannot_start_a_line_of_its_own():
    assert routes.printable("/v1/x\n2026-12-07 INFO: forged\r\x1b[31m") == \
        "/v1/x\\n2026-12-07 INFO: forged\\r\\x1b[31m"
