"""The response cache's fingerprint: what decides a model's answers, as one hash (pure).

Two jobs share cached answers only when their fingerprints are equal, so everything that can
change an answer goes in: the owner (unless the operator shares caches, RESPONSE_CACHE_SHARED),
the model type, every `model_args` entry but the inert ones below (so `base_url` for API
models, `pretrained`, `revision`, `dtype`, ...), and the lm-eval version. Request-level
inputs (prompt, continuation, generation kwargs) are the cache's keys inside one fingerprint,
as lm-eval's own `hash_args` makes them. docs/resume-and-cache.md lists the inert keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from lm_eval_server.admission.lm_eval_checks import simple_parse_args_string

# model_args entries that change how requests are sent or batched, never what a model answers:
# concurrency, retries, timeouts, batch sizes, and lm-eval's display of its own progress.
# `api_key` is a credential, not an answer: no hash of a secret goes into a file name or a
# receipt (outputs/receipts.py shows the fingerprint), and a rotated key keeps its cache.
INERT_MODEL_ARGS: frozenset[str] = frozenset(
    {
        "api_key",
        "num_concurrent",
        "max_retries",
        "timeout",
        "batch_size",
        "max_batch_size",
        "verify_certificate",
    }
)
# Bumped when the encoding below changes, so that old caches are never read under a new one.
FINGERPRINT_FORMAT = 1


def parsed_model_args(model_args: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """model_args as lm-eval holds them: a `k=v,...` string through its own parser."""
    if model_args is None:
        return {}
    if isinstance(model_args, str):
        return simple_parse_args_string(model_args)
    return dict(model_args)


def identity(
    owner: str | None,
    model: str,
    model_args: Mapping[str, Any] | str | None,
    lm_eval_version: str,
) -> dict[str, Any]:
    """What the fingerprint hashes (for logs and tests)."""
    args = parsed_model_args(model_args)
    return {
        "format": FINGERPRINT_FORMAT,
        "owner": owner,
        "model": model,
        "model_args": {k: v for k, v in args.items() if k not in INERT_MODEL_ARGS},
        "lm_eval": lm_eval_version,
    }


def model_fingerprint(
    owner: str | None,
    model: str,
    model_args: Mapping[str, Any] | str | None,
    lm_eval_version: str,
) -> str:
    """A hex SHA-256 of the model's identity. `owner` None: caches shared between owners."""
    text = json.dumps(
        identity(owner, model, model_args, lm_eval_version),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        # Values lm-eval's parser makes are str/int/float/bool/None; anything else (a config
        # file's nested value) by its repr, which still tells different values apart.
        default=repr,
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()
