"""A local HTTP listener that records every request it gets (webhook receivers in tests).

    with WebhookListener(plan=[500, 500]) as hook:   # two 500s, then 200s
        ... callback_url=hook.url("/hooks/ci") ...
        [request] = hook.wait_for(1)
        request.json()["status"]

A plan entry is an HTTP status to answer, or HANG (hold the request open, then answer 200, once
`release()` is called, the listener stops, or `hang_s` have passed). A 3xx answer carries
`Location: <listener>/redirected`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG = "hang"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-signature", ""), expected)


class WebhookListener:
    def __init__(
        self, plan: list[int | str] | None = None, port: int = 0, hang_s: float = 120.0
    ) -> None:
        self.plan = list(plan or [])
        self.hang_s = hang_s
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str = "/hooks/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> WebhookListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout_s: float = 120.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} requests after {timeout_s}s")
            time.sleep(0.05)
        return list(self.requests)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                received = Received(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.monotonic(),
                )
                with listener._lock:
                    listener.requests.append(received)
                    answer = (
                        listener.plan[len(listener.requests) - 1]
                        if len(listener.requests) <= len(listener.plan)
                        else 200
                    )
                    listener.in_flight += 1
                    listener.max_in_flight = max(listener.max_in_flight, listener.in_flight)
                try:
                    if answer == HANG:
                        listener._released.wait(listener.hang_s)
                        answer = 200
                    assert isinstance(answer, int)
                    self.send_response(answer)
                    if 300 <= answer < 400:
                        self.send_header("Location", listener.url("/redirected"))
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the client gave up (a timeout or a killed server)
                finally:
                    with listener._lock:
                        listener.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
