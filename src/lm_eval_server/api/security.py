"""The HTTP boundary: authentication, the Host and cross-site checks, and bounds on bodies."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lm_eval_server.admission.idempotency import ANONYMOUS, caller_id
from lm_eval_server.api import hosts
from lm_eval_server.team.principals import OPEN_SERVER, Principal

log = logging.getLogger(__name__)


class _DocumentedBearer(HTTPBearer):
    """Declares the bearer scheme in /openapi.json (the docs' Authorize button); the header
    itself is read once, by ApiKeyMiddleware, before routing."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None


_bearer = _DocumentedBearer(auto_error=False, description="One of the server's API_KEYS.")

# Where ApiKeyMiddleware leaves its answer, in the request's scope["state"] (request.state).
_PRINCIPAL = "principal"
_API_KEY = "api_key"


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, read as FastAPI's HTTPBearer reads it
    (scheme case-insensitive, the token stripped); None for anything else."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if not scheme or not token or scheme.lower() != "bearer":
        return None
    return token


def match_key(keys: dict[bytes, Principal], supplied: bytes) -> bytes | None:
    """The key `supplied` is, or None. Compared against every key, so the time taken does
    not say which key came close."""
    matched: bytes | None = None
    for key in keys:
        if hmac.compare_digest(supplied, key):
            matched = key
    return matched


class ApiKeyMiddleware:
    """Resolves the caller's API key to a principal once per request, before routing (pure
    ASGI: no Request object, no dependency). The secured routes' `require_api_key` refuses a
    request it left without a principal; open routes (/health, the dashboard) ignore it."""

    def __init__(self, app: ASGIApp, keys: Callable[[], dict[bytes, Principal]]) -> None:
        self.app = app
        self.keys = keys  # read per request: the server's table (ServerState.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = scope.setdefault("state", {})
            keys = self.keys()
            if not keys:
                state[_PRINCIPAL] = OPEN_SERVER
            else:
                raw = next((v for k, v in scope["headers"] if k == b"authorization"), None)
                token = bearer_token(raw.decode("latin-1") if raw is not None else None)
                matched = match_key(keys, token.encode() if token is not None else b"")
                if matched is not None:
                    state[_API_KEY] = matched
                    state[_PRINCIPAL] = keys[matched]
        await self.app(scope, receive, send)


async def require_api_key(
    request: Request, _: Annotated[None, Depends(_bearer)] = None
) -> Principal:
    """The caller's principal (ApiKeyMiddleware found it); 401 without a valid key. FastAPI
    caches a dependency per request, so a route that also asks for `Caller` gets this same
    check's answer."""
    principal = principal_in(request.scope)
    if principal is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


Caller = Annotated[Principal, Depends(require_api_key)]


def principal_in(scope: Scope) -> Principal | None:
    """What `require_api_key` answers, read without FastAPI: None where it would refuse."""
    principal: Principal | None = scope.get("state", {}).get(_PRINCIPAL)
    return principal


async def require_admin(request: Request, caller: Caller) -> Principal:
    """The caller, when an admin (ADMIN_KEYS, or anyone on a server without keys); else 403."""
    if not caller.admin:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"{request.method} {request.url.path} is for admins; the key sent belongs "
            f"to {caller.name!r}, who is not one. Use a key listed in ADMIN_KEYS.",
        )
    return caller


Admin = Annotated[Principal, Depends(require_admin)]


def caller_of(request: Request) -> str:
    """Who sent the request, as idempotency keys are scoped: the API key used, or nobody."""
    key: bytes | None = request.scope.get("state", {}).get(_API_KEY)
    return caller_id(key) if key is not None else ANONYMOUS


def listen_host(host_hint: str, argv: list[str], env: dict[str, str]) -> str:
    """The address the server listens on, as far as the app can tell: the CLI's hint, else
    uvicorn's --host option or UVICORN_HOST, else uvicorn's default."""
    if host_hint:
        return host_hint
    for index, arg in enumerate(argv):
        if arg == "--host" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return env.get("UVICORN_HOST", "127.0.0.1")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_response(status_code: int, detail: str) -> Callable[[Send], Awaitable[None]]:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def respond(send: Send) -> None:
        await send({"type": "http.response.start", "status": status_code, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return respond


class BodyLimitMiddleware:
    """413 for a request body above `max_bytes`, declared or streamed; 408 for one that has
    not arrived within `timeout_s` of the request (a slow client holds a connection and a
    request task for as long as it trickles bytes). `routes` gives a (method, path) its own
    cap and the setting that names it (file uploads)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float = 30.0,
        routes: dict[tuple[str, str], tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.routes = routes or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.routes.get(
            (scope["method"], scope.get("path", "").rstrip("/") or "/"),
            (self.max_bytes, "MAX_BODY_BYTES"),
        )
        has_body = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                has_body = True
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    await _json_response(413, self._message(max_bytes, setting))(send)
                    return
            elif name == b"transfer-encoding":
                has_body = True
        if not has_body:
            # Neither Content-Length nor Transfer-Encoding: HTTP/1.1 says there is no body
            # (uvicorn hands over an empty one at once), so nothing to bound or time.
            await self.app(scope, receive, send)
            return
        received = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                # The body is in: what follows is the wait for a disconnect, which a streamed
                # response listens for as long as it streams.
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                # An HTTPException, so FastAPI's body reader passes it on as is.
                raise HTTPException(
                    status.HTTP_408_REQUEST_TIMEOUT,
                    f"The request body did not arrive within {self.timeout_s:g} s "
                    "(BODY_READ_TIMEOUT_S)",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > max_bytes:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE, self._message(max_bytes, setting)
                    )
            else:
                complete = True
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    def _message(max_bytes: int, setting: str) -> str:
        return f"Request body is larger than the server's limit of {max_bytes} bytes ({setting})"


HOST_MEMO_SIZE = 256


class HttpGuardMiddleware:
    """Outermost guard for requests a browser was tricked into sending.

    - The Host header must be one ALLOWED_HOSTS lists: a page on an attacker's domain that
      re-resolves to this server (DNS rebinding) still sends the attacker's name.
    - A state-changing request (any method but GET/HEAD/OPTIONS, and the README's GET stop
      URLs) is refused when the browser says another site sent it.
    - A redirect's Location carries a path only, never the Host the client sent.
    """

    def __init__(self, app: ASGIApp, rules: list[hosts.HostRule] | None) -> None:
        self.app = app
        self.rules = rules
        self._allowed: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers", [])
        host_values = [v for k, v in raw_headers if k == b"host"]
        host = host_values[0].decode("latin-1") if len(host_values) == 1 else None
        if not self._host_allowed(host):
            shown = "no Host header" if host is None else f"Host {host[:100]!r}"
            if len(host_values) > 1:
                shown = "several Host headers"
            detail = (
                f"This server does not answer to {shown}. The operator lists the names "
                "clients use to reach it in ALLOWED_HOSTS (a check against DNS rebinding)."
            )
            await _json_response(400, detail)(send)
            return
        if hosts.is_state_changing(scope["method"], scope.get("path", "")):
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in raw_headers
                if k in (b"origin", b"sec-fetch-site", b"referer")
            }
            reason = hosts.cross_site_reason(headers, host or "")
            if reason is not None:
                detail = (
                    f"Cross-site request refused ({reason}): a page on another site may not "
                    "submit, stop or delete jobs. Use the dashboard served by this server, "
                    "the CLI, or an HTTP client such as curl."
                )
                await _json_response(403, detail)(send)
                return

        async def send_relative(message: Message) -> None:
            if message["type"] == "http.response.start" and any(
                k.lower() == b"location" for k, _ in message.get("headers", ())
            ):
                message["headers"] = [
                    (k, hosts.relative_location(v.decode("latin-1")).encode("latin-1"))
                    if k.lower() == b"location"
                    else (k, v)
                    for k, v in message["headers"]
                ]
            await send(message)

        await self.app(scope, receive, send_relative)

    def _host_allowed(self, host: str | None) -> bool:
        """hosts.host_allowed, remembered per Host value: clients send a handful of them.
        Refusals are not remembered, so a flood of made-up names cannot fill the memo."""
        if host is None:
            return hosts.host_allowed(None, self.rules)
        if host in self._allowed:
            return True
        if not hosts.host_allowed(host, self.rules):
            return False
        if len(self._allowed) < HOST_MEMO_SIZE:
            self._allowed.add(host)
        return True
