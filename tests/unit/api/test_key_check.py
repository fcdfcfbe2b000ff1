"""The API key check as pure ASGI (ApiKeyMiddleware) reads the header as FastAPI's HTTPBearer
does, so moving it out of the dependency changed no answer."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.security import HTTPBearer
from starlette.requests import Request

from lm_eval_server.api.security import ApiKeyMiddleware, bearer_token, match_key
from lm_eval_server.team.principals import OPEN_SERVER, Principal

HEADERS = [
    None,
    "",
    "Bearer abc",
    "bearer abc",
    "BEARER abc",
    "Bearer  abc  ",
    "Bearer",
    "Bearer ",
    "Basic abc",
    "abc",
    " Bearer abc",
    "Bearer a b c",
    "Token abc",
]


def _request(value: str | None) -> Request:
    headers = [] if value is None else [(b"authorization", value.encode("latin-1"))]
    return Request({"type": "http", "headers": headers, "method": "GET", "path": "/"})


@pytest.mark.parametrize("value", HEADERS)
def test_bearer_token_reads_the_header_as_httpbearer_does(value: str | None) -> None:
    found = asyncio.run(HTTPBearer(auto_error=False)(_request(value)))
    assert bearer_token(value) == (found.credentials if found is not None else None)


def test_match_key_finds_only_the_exact_key() -> None:
    keys = {b"alpha-key": Principal("alice"), b"beta-key": Principal("bob")}
    assert match_key(keys, b"beta-key") == b"beta-key"
    assert match_key(keys, b"beta-ke") is None
    assert match_key(keys, b"") is None


def _run(keys: dict[bytes, Principal], headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    seen: dict[str, object] = {}

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.update(scope["state"])

    middleware = ApiKeyMiddleware(app, keys=lambda: keys)
    scope = {"type": "http", "method": "GET", "path": "/jobs", "headers": headers}
    asyncio.run(middleware(scope, None, None))  # type: ignore[arg-type]
    return seen


def test_the_middleware_leaves_the_principal_of_a_valid_key_only() -> None:
    alice = Principal("alice")
    keys = {b"alpha-key": alice}
    assert _run(keys, [(b"authorization", b"Bearer alpha-key")]) == {
        "principal": alice,
        "api_key": b"alpha-key",
    }
    assert _run(keys, [(b"authorization", b"Bearer wrong")]) == {}
    assert _run(keys, []) == {}
    # A server without keys: everyone is the open server's principal.
    assert _run({}, []) == {"principal": OPEN_SERVER}


def test_the_host_guard_remembers_allowed_hosts_only_and_a_bounded_number() -> None:
    from lm_eval_server.api import hosts, security

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})

    guard = security.HttpGuardMiddleware(app, hosts.parse_rules(["localhost", "*.example.com"]))
    statuses: list[int] = []

    async def send(message):  # type: ignore[no-untyped-def]
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    def get(host: str) -> int:
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"host", host.encode())],
        }
        asyncio.run(guard(scope, None, send))  # type: ignore[arg-type]
        return statuses[-1]

    assert get("localhost:8000") == 200
    assert get("evil.test") == 400
    assert get("evil.test") == 400  # refused again, and never remembered
    assert "evil.test" not in guard._allowed and "localhost:8000" in guard._allowed
    for i in range(security.HOST_MEMO_SIZE + 50):
        assert get(f"h{i}.example.com") == 200
    assert len(guard._allowed) == security.HOST_MEMO_SIZE
    assert get(f"h{security.HOST_MEMO_SIZE + 10}.example.com") == 200  # allowed, not remembered
