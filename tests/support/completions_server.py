"""Deterministic OpenAI-compatible completions stub for tests.

The stub answers prompts of the ``arith_gen`` task (tests/data/tasks/arith_gen.yaml), which
look like ``"Question 17: What is 3 + 4?\\nAnswer:"``. It returns the correct sum for some
question ids and ``sum + 1`` for the others, by a fixed rule (:func:`is_answered_correctly`),
so an lm_eval run over the 200 ``arith_gen`` docs scores exactly 135/200 on exact_match.

Usage in-process::

    with running_completions_server(delay_s=0.0) as url:
        model_args = model_args_for(url)
        ...  # lm_eval --model local-completions --model_args "$model_args" ...

    # When the request counter is needed, use the server object itself:
    with running_stub_server() as server:
        ...
        assert server.request_count == 200

Usage as a separate process (serves until killed, prints its base URL as the first stdout
line)::

    python -m tests.support.completions_server --port 0 --delay-s 0.05
    python tests/support/completions_server.py --port 0

The stub also answers ``GET /stats`` with ``{"requests": N, "prompts": M}`` so tests that
run it as a subprocess can read the counters too, and ``GET /health`` with ``{"ok": true}``.

Only stdlib is used so the file can be run by path with any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"

# Out of every CYCLE consecutive question ids, CORRECT_PER_CYCLE get the right answer.
# 200 docs = 5 full cycles, so 5 * 27 = 135 correct. Multiplying the id by a number coprime
# to CYCLE scatters the wrong answers instead of bunching them at the end of each cycle,
# so any prefix of the task (e.g. --limit, or the 20-doc tiny variant) gets a mixed score.
CYCLE = 40
CORRECT_PER_CYCLE = 27
_SCATTER = 17

# The last match wins, so few-shot prompts (examples first, real question last) still work.
_QUESTION_RE = re.compile(r"Question (\d+): What is (-?\d+) \+ (-?\d+)\?")


# A model named like `wrong_0-65_100-115` (lm-eval's model_args model=...) answers exactly the
# question ids in [0, 65) and [100, 115) wrong and every other right, whatever the server's
# correct_per_cycle: several "checkpoints" with chosen wrong answers share one stub, and every
# count of a comparison between them (discordant pairs included) is known exactly.
_WRONG_MODEL_RE = re.compile(r"wrong((?:_\d{1,6}-\d{1,6})*)")


def wrong_ids_for_model(model: Any) -> frozenset[int] | None:
    """The question ids a `wrong_A-B_C-D...` model answers wrong; None for any other name."""
    if not isinstance(model, str) or not (found := _WRONG_MODEL_RE.fullmatch(model)):
        return None
    ids: set[int] = set()
    for span in found[1].split("_")[1:]:
        start, end = (int(x) for x in span.split("-"))
        ids.update(range(start, end))
    return frozenset(ids)


def wrong_model(*spans: tuple[int, int]) -> str:
    """The model name whose wrong answers are exactly the ids in these [start, end) spans."""
    return "wrong" + "".join(f"_{a}-{b}" for a, b in spans)


def is_answered_correctly(question_id: int, correct_per_cycle: int = CORRECT_PER_CYCLE) -> bool:
    """Whether the stub answers question ``question_id`` correctly.

    A stub with a higher ``correct_per_cycle`` answers a superset of the questions a lower one
    does (``correct_per_cycle * 5`` of the 200 docs), which gives two "checkpoints" with a
    known difference to compare.
    """
    return (question_id * _SCATTER) % CYCLE < correct_per_cycle


def answer_for(prompt: str, correct_per_cycle: int = CORRECT_PER_CYCLE, model: Any = None) -> str:
    """The completion text the stub generates for ``prompt``, before stop sequences.

    Prompts without a question id but with ``a + b`` get the correct sum; anything else gets
    an empty answer (a deterministic miss rather than an HTTP error, like a real model). A
    ``wrong_...`` model (:func:`wrong_ids_for_model`) misses exactly its ids.
    """
    matches = _QUESTION_RE.findall(prompt)
    if not matches:
        loose = re.findall(r"(-?\d+) \+ (-?\d+)", prompt)
        if not loose:
            return "\n"
        a, b = loose[-1]
        return f"{int(a) + int(b)}\n"
    qid, a, b = (int(x) for x in matches[-1])
    total = a + b
    wrong = wrong_ids_for_model(model)
    right = qid not in wrong if wrong is not None else is_answered_correctly(qid, correct_per_cycle)
    return f"{total if right else total + 1}\n"


def apply_stop(text: str, stop: Any) -> str:
    """Truncate at the first stop sequence, as OpenAI-compatible servers do.

    lm_eval's local-completions backend does not truncate at ``until`` itself; it relies on
    the server honouring ``stop``, so the stub must do it to produce clean answers.
    """
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        return text
    cut = len(text)
    for seq in stop:
        if isinstance(seq, str) and seq:
            pos = text.find(seq)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


class CompletionsStubServer(ThreadingHTTPServer):
    """The stub HTTP server.

    Attributes readable by tests (updated under ``lock``; plain int reads are fine):
        request_count: number of POST requests answered on either completions endpoint.
        prompt_count: number of prompts answered (a batched request counts each prompt).
        delay_s: seconds each POST sleeps before answering; may be changed while running.
        gate: while cleared, every POST waits for it to be set again (up to 10 minutes) before
            answering: a test holds a job in its inference for as long as it needs.
    """

    daemon_threads = True
    # Rebinding a just-used port is only relevant for the fixed --port CLI case.
    allow_reuse_address = True

    def __init__(
        self, port: int = 0, delay_s: float = 0.0, correct_per_cycle: int = CORRECT_PER_CYCLE
    ) -> None:
        super().__init__((HOST, port), _Handler)
        self.delay_s = delay_s
        self.correct_per_cycle = correct_per_cycle
        self.request_count = 0
        self.prompt_count = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-request (a job being stopped) is not a stub failure.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def base_url(self) -> str:
        """The URL to pass as lm-eval's ``base_url`` for ``local-completions``."""
        return f"http://{HOST}:{self.port}{COMPLETIONS_PATH}"

    @property
    def chat_base_url(self) -> str:
        """The URL to pass as ``base_url`` for ``local-chat-completions``."""
        return f"http://{HOST}:{self.port}{CHAT_COMPLETIONS_PATH}"

    def count(self, prompts: int) -> int:
        with self.lock:
            self.request_count += 1
            self.prompt_count += prompts
            return self.request_count


class _Handler(BaseHTTPRequestHandler):
    server: CompletionsStubServer
    # HTTP/1.1 keeps aiohttp's pooled connections alive when num_concurrent > 1.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's
    # delayed ACK stalls each response by ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request access logs would flood pytest output and the CLI's stderr.
        pass

    def _send_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(HTTPStatus.OK, {"ok": True})
        elif path == "/stats":
            with self.server.lock:
                stats = {"requests": self.server.request_count, "prompts": self.server.prompt_count}
            self._send_json(HTTPStatus.OK, stats)
        elif path == "/v1/models":
            self._send_json(
                HTTPStatus.OK, {"object": "list", "data": [{"id": "stub", "object": "model"}]}
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route for GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in (COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH):
            self._error(HTTPStatus.NOT_FOUND, f"no route for POST {path}")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            payload = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, json.JSONDecodeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}")
            return
        if not isinstance(payload, dict):
            self._error(HTTPStatus.BAD_REQUEST, "JSON body must be an object")
            return
        if payload.get("echo") or payload.get("logprobs"):
            # Loglikelihood requests need real token logprobs; failing loudly beats
            # returning made-up numbers that a test could mistake for a real score.
            self._error(HTTPStatus.BAD_REQUEST, "stub does not support echo/logprobs")
            return
        if path == COMPLETIONS_PATH:
            self._completions(payload)
        else:
            self._chat_completions(payload)

    def _sleep(self) -> None:
        self.server.gate.wait(timeout=600)
        if self.server.delay_s > 0:
            time.sleep(self.server.delay_s)

    def _completions(self, payload: dict[str, Any]) -> None:
        prompt = payload.get("prompt", "")
        # lm_eval sends a bare string when batch_size == 1 and a list otherwise.
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not all(isinstance(p, str) for p in prompts):
            self._error(HTTPStatus.BAD_REQUEST, "prompt must be a string or list of strings")
            return
        self._sleep()
        n = self.server.count(len(prompts))
        stop = payload.get("stop")
        choices = [
            {
                "index": i,
                "text": apply_stop(
                    answer_for(p, self.server.correct_per_cycle, payload.get("model")), stop
                ),
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i, p in enumerate(prompts)
        ]
        self._send_json(
            HTTPStatus.OK,
            {
                "id": f"cmpl-stub-{n}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": payload.get("model") or "stub",
                "choices": choices,
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )

    def _chat_completions(self, payload: dict[str, Any]) -> None:
        messages = payload.get("messages")
        if not isinstance(messages, list):
            self._error(HTTPStatus.BAD_REQUEST, "messages must be a list")
            return
        # Joining all message contents keeps few-shot-as-multiturn chats answerable, since
        # the last question in the conversation is the one answered.
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        text = "\n".join(c for c in contents if isinstance(c, str))
        self._sleep()
        n = self.server.count(1)
        content = apply_stop(
            answer_for(text, self.server.correct_per_cycle, payload.get("model")),
            payload.get("stop"),
        )
        self._send_json(
            HTTPStatus.OK,
            {
                "id": f"chatcmpl-stub-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": payload.get("model") or "stub",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )


@contextmanager
def running_stub_server(
    delay_s: float = 0.0, port: int = 0, correct_per_cycle: int = CORRECT_PER_CYCLE
) -> Iterator[CompletionsStubServer]:
    """Run the stub in a background thread; yields the server (for counters and URLs)."""
    server = CompletionsStubServer(port=port, delay_s=delay_s, correct_per_cycle=correct_per_cycle)
    # A short poll interval keeps shutdown() fast (the default 0.5 s adds up across tests).
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="completions-stub",
        daemon=True,
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        # Closing the listening socket explicitly avoids a ResourceWarning, which the
        # project's pytest config (filterwarnings=error) would turn into a failure.
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def running_completions_server(delay_s: float = 0.0) -> Iterator[str]:
    """Run the stub on a free port; yields the ``base_url`` for lm-eval's local-completions."""
    with running_stub_server(delay_s=delay_s) as server:
        yield server.base_url


def model_args_for(base_url: str, *, model: str = "stub", num_concurrent: int = 1) -> str:
    """``--model_args`` for ``--model local-completions`` that work fully offline.

    - ``model=stub``: lm_eval names the output directory after ``model=`` (else a random id),
      so results land in ``<output_path>/stub/results_<timestamp>.json``.
    - ``tokenizer_backend=None``: the default ``auto`` probes the server for a remote
      tokenizer and then falls back to downloading a HuggingFace tokenizer; ``None`` skips both.
    - ``tokenized_requests=False``: send prompts as strings (forced anyway without a tokenizer).
    - ``num_concurrent=1``: lm_eval's synchronous path, one request per batch in order, which
      drives the ``Requesting API`` tqdm bar one step per doc.
    - ``max_retries=1``: fail on the first HTTP error instead of backing off for seconds.
    - ``eos_string=</s>``: without a tokenizer lm_eval cannot infer an EOS string and logs a
      warning; any explicit value silences it (it is just appended to ``stop``).

    Do not put ``batch_size`` here: pass ``--batch_size`` to the CLI instead, because lm_eval
    also forwards its own batch_size to the model constructor.
    """
    args = {
        "model": model,
        "base_url": base_url,
        "tokenizer_backend": "None",
        "tokenized_requests": "False",
        "num_concurrent": str(num_concurrent),
        "max_retries": "1",
        "eos_string": "</s>",
    }
    return ",".join(f"{k}={v}" for k, v in args.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-s", type=float, default=0.0, help="sleep per request")
    parser.add_argument(
        "--correct-per-cycle",
        type=int,
        default=CORRECT_PER_CYCLE,
        help=f"questions answered right out of every {CYCLE} (default {CORRECT_PER_CYCLE})",
    )
    args = parser.parse_args(argv)
    server = CompletionsStubServer(
        port=args.port, delay_s=args.delay_s, correct_per_cycle=args.correct_per_cycle
    )
    # The parent process reads this first line to learn the port, so flush immediately.
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
