"""Idempotency-Key: a retry returns the first job only for the same caller and the same body.

The store indexes a hash of (caller, key), so two callers never see each other's keys, and
keeps a hash of the canonical body, so a key reused for another request is refused instead of
silently answering with a job that runs something else.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

ANONYMOUS = "anonymous"  # every caller of a server without API_KEYS


@functools.lru_cache(maxsize=4096)
def caller_id(api_key: bytes) -> str:
    """A stable name for the holder of `api_key`. jobs.db stores this, never the key: a slow,
    salted hash keeps a leaked database from being a cheap way to test guesses of a key."""
    return hashlib.pbkdf2_hmac("sha256", api_key, b"lm-eval-server/caller", 20_000).hex()[:32]


def body_digest(raw: bytes) -> str:
    """SHA-256 of the body as canonical JSON (sorted keys, no whitespace), so a retry that
    re-serialises the same object matches; the raw bytes when they are not JSON."""
    try:
        canonical = json.dumps(
            json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()
    except (ValueError, RecursionError):
        canonical = raw
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class IdempotencyClaim:
    key: str  # as the client sent it, for messages
    scope: str  # what the store indexes: hash of (caller, key)
    body_sha256: str


def claim(key: str, caller: str, raw_body: bytes) -> IdempotencyClaim:
    scope = hashlib.sha256(f"{caller}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()
    return IdempotencyClaim(key=key, scope=scope, body_sha256=body_digest(raw_body))
