"""Authentication and the request-size limit."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="One of the server's API_KEYS.")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    supplied = credentials.credentials.encode() if credentials is not None else b""
    # Compare against every key so the time taken does not say which key came close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key)
    if not matched:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


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


class BodyLimitMiddleware:
    """413 for a request body above `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException, so FastAPI's body reader passes it on as a 413.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return (
            f"Request body is larger than the server's limit of {self.max_bytes} bytes "
            "(MAX_BODY_BYTES)"
        )

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": self._message()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
