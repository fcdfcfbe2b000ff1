"""Webhooks, the pure part: where a job's callback_url may point, what a delivery says, how it
is signed, and when the next attempt is due. The sending lives in `webhook_sender`.

A receiver verifies a delivery by recomputing the HMAC-SHA256 of the exact body bytes with the
shared secret; the body carries its delivery id and timestamp, so the signature covers them and
a receiver can refuse replays (see docs: Webhooks).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable
from typing import Any

from lm_eval_server.admission.lm_eval_cli import MAX_CALLBACK_URL_CHARS
from lm_eval_server.admission.urls import normalise_url, request_url
from lm_eval_server.outputs import results

SIGNATURE_HEADER = "X-Signature"
ID_HEADER = "X-Webhook-Id"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
ATTEMPT_HEADER = "X-Webhook-Attempt"
USER_AGENT = "lm-eval-server-webhook"
# A results file bigger than this is not read for a webhook (its metrics are sent as null).
MAX_RESULTS_BYTES = 64 * 1024 * 1024
# What a delivery remembers of a failed attempt.
MAX_ERROR_CHARS = 500


class CallbackRefused(ValueError):
    """A callback_url this server will not call; the message names the setting."""


def callback_target(url: str, prefixes: list[str]) -> str:
    """The URL the webhook will be POSTed to, if `url` starts with one of `prefixes` (already
    normalised, as Settings keeps them) at a path segment boundary once normalised."""
    if not prefixes:
        raise CallbackRefused(
            "callback_url: this server sends no webhooks; the operator enables them with "
            "WEBHOOK_URL_PREFIXES (and WEBHOOK_SECRET)"
        )
    if len(url) > MAX_CALLBACK_URL_CHARS:
        raise CallbackRefused(f"callback_url: longer than {MAX_CALLBACK_URL_CHARS} characters")
    try:
        target = request_url(url, "callback_url")
        normal = normalise_url(url, "callback_url")
    except ValueError as exc:
        raise CallbackRefused(str(exc)) from None
    if not any(normal.startswith(prefix) for prefix in prefixes):
        raise CallbackRefused(
            f"callback_url {url!r} is not under the server's WEBHOOK_URL_PREFIXES "
            f"({', '.join(prefixes)})"
        )
    return target


def metrics_from_results(
    data: bytes | None, redact: Callable[[Any], Any] | None = None
) -> list[dict[str, Any]] | None:
    """The flattened metrics of a results file's bytes, or None when there is no readable
    results file. With the server's `redact` (Redactor.json), exactly the rows GET
    /job/{id}/results serves: the results are redacted first, then flattened, as there."""
    if data is None:
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    if redact is not None:
        parsed = redact(parsed)
    return [_finite(row) for row in results.flatten_metrics(parsed)]


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN or infinity; lm-eval writes them for some stderrs.
    return {
        k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
    }


def build_payload(
    delivery_id: str,
    job_id: int,
    status: str,
    exit_code: int | None,
    metrics: list[dict[str, Any]] | None,
    timestamp: int,
    *,
    owner: str,
    callback_url: str,
    verdict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a webhook says, in one place (anything that must be redacted is redacted
    here). The signed body names whose job it is and the URL it was sent to: every receiver
    shares one WEBHOOK_SECRET, so without them a body signed for one receiver (or one owner's
    job) could be replayed to another and pass its signature check. `verdict`: the job's gate
    verdict, sent only for a job with a gate, so other bodies stay as they were."""
    payload: dict[str, Any] = {
        "delivery_id": delivery_id,
        "job_id": job_id,
        "owner": owner,
        "callback_url": callback_url,
        "status": status,
        "exit_code": exit_code,
        "metrics": metrics,
    }
    if verdict is not None:
        payload["verdict"] = verdict
    payload["timestamp"] = timestamp
    return payload


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def signature(body: bytes, secret: bytes) -> str:
    """The X-Signature value: `sha256=` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def headers(
    body: bytes, secret: bytes, delivery_id: str, timestamp: int, attempt: int
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: signature(body, secret),
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        ATTEMPT_HEADER: str(attempt),
    }


def retry_delay_s(attempts: int, base_s: float, max_s: float) -> float:
    """The wait after the `attempts`-th failed attempt: base, 2 x base, 4 x base, ... up to
    max_s."""
    return min(max_s, base_s * 2.0 ** min(attempts - 1, 64))


def attempt_error(status: int | None, exc: BaseException | None, timeout_s: float) -> str | None:
    """What went wrong with an attempt, or None when the receiver answered 2xx."""
    if exc is not None:
        if isinstance(exc, TimeoutError):
            return f"no answer within {timeout_s:g} s (WEBHOOK_TIMEOUT_S)"
        text = str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS]
    assert status is not None
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}: redirects are not followed; point callback_url at the final URL"
    return f"HTTP {status}"
