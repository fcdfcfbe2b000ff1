"""The completions stub (tests/support/completions_server.py) plus loglikelihood support.

lm-eval's ``local-completions`` needs a tokenizer for loglikelihood requests (it computes
context lengths in tokens). Offline, the only tokenizer it can use is a *remote* one: the
server answers ``GET /tokenizer_info`` and ``POST /tokenize`` / ``/detokenize`` (vLLM's
endpoints). This stub tokenizes bytes (token id = byte value, lossless for UTF-8) and answers
``echo`` + ``logprobs`` completions with a fixed logprob per token, so a multiple-choice task
runs through the API path with real request counts. Its scores mean nothing; use it where
the request flow matters (progress, counts), not the numbers.

    with running_logprob_stub(delay_s=0.02) as stub:
        model_args = logprob_model_args(stub.base_url)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

from tests.support.completions_server import (
    COMPLETIONS_PATH,
    CompletionsStubServer,
    _Handler,
    running_stub_server,
)

TOKEN_LOGPROB = -1.0


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def detokenize(tokens: list[int]) -> str:
    return bytes(t % 256 for t in tokens).decode(errors="replace")


class _LogprobHandler(_Handler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/tokenizer_info":
            info = {"eos_token": "</s>", "bos_token": None, "pad_token": None}
            self._send_json(HTTPStatus.OK, info)
            return
        super().do_GET()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/tokenize", "/detokenize", COMPLETIONS_PATH):
            super().do_POST()
            return
        length = int(self.headers.get("Content-Length", "0"))
        payload: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
        if path == "/tokenize":
            self._send_json(HTTPStatus.OK, {"tokens": tokenize(str(payload.get("prompt", "")))})
        elif path == "/detokenize":
            self._send_json(HTTPStatus.OK, {"prompt": detokenize(payload.get("tokens", []))})
        elif payload.get("echo"):
            self._echo_logprobs(payload)
        else:
            self._completions(payload)

    def _echo_logprobs(self, payload: dict[str, Any]) -> None:
        prompt = payload.get("prompt", "")
        prompts = prompt if isinstance(prompt, list) and not _is_tokens(prompt) else [prompt]
        self._sleep()
        n = self.server.count(len(prompts))
        choices = []
        for i, p in enumerate(prompts):
            tokens = p if _is_tokens(p) else tokenize(str(p))
            # echo returns the prompt's tokens plus the one generated (max_tokens=1).
            ids = [*tokens, 0]
            choices.append(
                {
                    "index": i,
                    "text": detokenize(tokens),
                    "logprobs": {
                        "tokens": [str(t) for t in ids],
                        "token_logprobs": [TOKEN_LOGPROB] * len(ids),
                        "top_logprobs": [{str(t): TOKEN_LOGPROB} for t in ids],
                    },
                    "finish_reason": "length",
                }
            )
        self._send_json(
            HTTPStatus.OK,
            {
                "id": f"cmpl-stub-{n}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": payload.get("model") or "stub",
                "choices": choices,
            },
        )


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) for t in value)


@contextmanager
def running_logprob_stub(delay_s: float = 0.0) -> Iterator[CompletionsStubServer]:
    with running_stub_server(delay_s=delay_s) as server:
        server.RequestHandlerClass = _LogprobHandler
        yield server


def logprob_model_args(base_url: str) -> str:
    """``--model_args`` for ``local-completions`` with the stub as remote tokenizer.

    ``num_concurrent=1`` keeps lm-eval on its synchronous path: one ``Requesting API`` step per
    request, so the bar totals are request counts.
    """
    args = {
        "model": "stub",
        "base_url": base_url,
        "tokenizer_backend": "remote",
        "tokenized_requests": "False",
        "num_concurrent": "1",
        "max_retries": "1",
    }
    return ",".join(f"{k}={v}" for k, v in args.items())
