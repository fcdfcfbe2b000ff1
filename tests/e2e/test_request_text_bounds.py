"""Issue 20's reproductions, through a real server: the text of a request is parsed with bounds
and never on the event loop for long.

- One `POST /job` whose `model_args` was 900 KB of `a=1,a=1,...` held the event loop for 34 s
  (lm-eval's parser logged a warning per repeated key, 225,000 writes to stderr). Now it is
  refused at once, and so is the same text in every key=value option; requests within the bounds
  that still take a while to parse are parsed in a worker thread.
- A task YAML nested 5,000 deep answered 500. Now every bomb is a 422 with a message (depth,
  billion laughs, merge-key doubling, very many keys, numbers), also in a `config` file.

The acceptance criterion: while each flood is sent, a `/health` probe loop stays under 50 ms at
the 99th percentile (measured here, as the issue asks; bench/floods.py measures the rest).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from tests.e2e.test_tasks_api import DATA, files, task_yaml
from tests.support.jobs import DUMMY_JOB, ROOT
from tests.support.server import ServerProcess

JSON = {"content-type": "application/json"}
PROBE = ROOT / "tests" / "support" / "health_probe.py"
ALICE = {"Authorization": "Bearer KA"}
BOB = {"Authorization": "Bearer KB"}
# The bound, no tighter.
HEALTH_P99_S = 0.050
KEY_VALUE_FIELDS = ("model_args", "gen_kwargs", "metadata", "wandb_args", "hf_hub_log_args")
REPRODUCTION = ",".join(["a=1"] * 225_000)  # 900 KB, under MAX_BODY_BYTES (1 MiB)


@pytest.fixture
def server(tmp_path: Path, index_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path / "data",
        index_dir,
        ALLOWED_PATHS=f"{tmp_path},{ROOT / 'examples'}",
        API_KEYS="alice:KA,bob:KB",
    ).start()
    yield proc
    proc.stop_jobs_and_terminate()


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def while_polling_health(
    server: ServerProcess, send: Callable[[httpx.Client], None], seconds: float
) -> list[float]:
    """The latencies of /health, polled for `seconds` by tests/support/health_probe.py (a
    process of its own) while a thread here runs `send` again and again (twice at least)."""
    probe = subprocess.Popen(
        [sys.executable, str(PROBE), server.url, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdout is not None
    assert probe.stdout.readline().strip() == "ready"
    failed: list[BaseException] = []

    def flood() -> None:
        try:
            with server.client() as own:
                own.timeout = httpx.Timeout(120)
                rounds = 0
                while rounds < 2 or probe.poll() is None:
                    send(own)
                    rounds += 1
        except BaseException as exc:  # reported below, in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=flood)
    thread.start()
    out, _ = probe.communicate(timeout=seconds + 120)
    thread.join()
    if failed:
        raise failed[0]
    latencies = json.loads(out)
    assert isinstance(latencies, list), latencies  # {"error": status}: /health failed
    assert len(latencies) >= 50, f"/health answered only {len(latencies)} times in {seconds} s"
    return [float(x) for x in latencies]


def assert_health_stays_fast(
    server: ServerProcess, send: Callable[[httpx.Client], None], seconds: float = 3.0
) -> None:
    """/health's p99 under HEALTH_P99_S while `send` floods. Measured up to three times: the
    suite shares its CPUs with other work, and a scheduling hiccup makes one run's tail slow,
    while an event loop held by a request makes every run slow (the issue's request held it
    for 34 s on each try)."""
    tails = []
    for _ in range(3):
        latencies = while_polling_health(server, send, seconds)
        tails.append(round(p99(latencies), 4))
        if tails[-1] < HEALTH_P99_S:
            return
    raise AssertionError(f"/health p99 over {HEALTH_P99_S} s in every run: {tails}")


def refused(answer: httpx.Response, *needles: str) -> str:
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    for needle in needles:
        assert needle in detail, (needle, detail)
    return str(detail)


def post_job(body: dict[str, Any], *needles: str) -> Callable[[httpx.Client], None]:
    raw = json.dumps(body).encode()

    def send(http: httpx.Client) -> None:
        refused(http.post("/job", content=raw, headers={**JSON, **ALICE}), *needles)

    return send


def no_jobs_and_no_traceback(server: ServerProcess) -> None:
    with server.client() as http:
        assert http.get("/jobs", headers=ALICE).json()["total"] == 0
    assert "Traceback" not in server.log_path.read_text()


# ------------------------------------------------------------------ POST /job


def test_the_900_kb_model_args_is_refused_while_health_answers(server: ServerProcess) -> None:
    body = {**DUMMY_JOB, "model_args": REPRODUCTION}
    assert len(json.dumps(body)) > 900_000
    send = post_job(body, "model_args: ", "bytes of text", "at most 65536", "config file")
    assert_health_stays_fast(server, send)
    no_jobs_and_no_traceback(server)
    # The server's log no longer gets a line per repeated key.
    assert "Overwriting key" not in server.log_path.read_text()


@pytest.mark.parametrize("field", KEY_VALUE_FIELDS[1:])
def test_every_key_value_field_is_bounded_the_same_way(server: ServerProcess, field: str) -> None:
    send = post_job({**DUMMY_JOB, field: REPRODUCTION}, f"{field}: ", "at most 65536")
    assert_health_stays_fast(server, send)
    no_jobs_and_no_traceback(server)


# Within the size bounds, each of these still makes lm-eval's parser (or the checks) work, or
# used to escape as a 500 (RecursionError, MemoryError). "dumy" is refused after the parse.
LITERAL = "(" + ",".join(["()"] * 340) + ")"  # 1 KB: a tuple of tuples, slow to parse
PARSED_OFF_THE_LOOP: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "256 repeated keys": (
        {"model_args": ",".join(["a=1"] * 256)},
        ("Unknown model 'dumy'",),
    ),
    "257 entries": (
        {"model_args": ",".join(f"k{i}=1" for i in range(257))},
        ("model_args: more than 256 key=value entries",),
    ),
    "110 KB of tuple literals in two options": (
        {
            "model_args": ",".join(f"k{i}={LITERAL}" for i in range(55)),
            "gen_kwargs": ",".join(f"k{i}={LITERAL}" for i in range(55)),
        },
        ("Unknown model 'dumy'",),
    ),
    "a value of 5 KB": (
        {"gen_kwargs": "until=" + "x" * 5000},
        ("the value of 'until' has 5000 characters", "at most 1024", "JSON object"),
    ),
    "a long key": ({"metadata": {"k" * 300: 1}}, ("a key has at most 256",)),
    # Both escaped lm-eval's parser as a RecursionError (a 500); now too long to be parsed.
    "----...1": ({"model_args": "a=" + "-" * 4000 + "1"}, ("model_args: the value of 'a'",)),
    "1+1+...+1": ({"gen_kwargs": "a=" + "1+" * 4000 + "1"}, ("at most 1024",)),
    # Within the length, the same shape is what lm-eval makes of it (a string: not a literal).
    "----...1 of 1 KB": ({"model_args": "a=" + "-" * 1000 + "1"}, ("Unknown model 'dumy'",)),
    "JSON text 60,000 deep": (
        {"model_args": '{"a": ' + "[" * 60_000},
        ("model_args: the value of '{...}' nests", "levels deep"),
    ),
    "samples 60,000 deep": ({"samples": "[" * 60_000}, ("nests too deeply",)),
    "brackets 17 deep": (
        {"wandb_args": "a=" + "[" * 17 + "]" * 17},
        ("more than 16 levels deep",),
    ),
}


def test_requests_within_the_bounds_are_parsed_off_the_loop(server: ServerProcess) -> None:
    bodies = [
        (json.dumps({**DUMMY_JOB, "model": "dumy", **extra}).encode(), needles)
        for extra, needles in PARSED_OFF_THE_LOOP.values()
    ]

    def send(http: httpx.Client) -> None:
        for raw, needles in bodies:
            refused(http.post("/job", content=raw, headers={**JSON, **ALICE}), *needles)

    assert_health_stays_fast(server, send)
    no_jobs_and_no_traceback(server)


def test_what_startup_built_is_out_of_the_collectors_way(make_settings: Any) -> None:
    # A full collection stops every thread: without gc.freeze() it walked startup's ~85,000
    # objects (60-80 ms here) every few requests of a flood that builds objects.
    before = gc.get_freeze_count()
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() > max(before, 10_000)
    assert gc.get_freeze_count() == 0  # collectable again once the app stops


def test_a_config_file_bomb_is_a_422(server: ServerProcess, tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: dummy\nmetadata: " + "[" * 5000 + "]" * 5000 + "\n")
    laughs = tmp_path / "laughs.yaml"
    text = "model: dummy\nl0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 12):
        text += f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    laughs.write_text(text)
    huge = tmp_path / "huge.yaml"
    huge.write_text("model: dummy\n" + "# padding\n" * 30_000)
    cases = [
        (nested, "nests more than 32 levels deep"),
        (laughs, "more than 20000 values"),
        (huge, "the server reads at most 262144"),
    ]

    def send(http: httpx.Client) -> None:
        for path, needle in cases:
            body = {**DUMMY_JOB, "config": str(path)}
            refused(http.post("/job", json=body, headers=ALICE), f"config file {path}", needle)

    assert_health_stays_fast(server, send)
    no_jobs_and_no_traceback(server)


# ------------------------------------------------------------------ POST /tasks


def in_metadata(text: str) -> str:
    return task_yaml(metadata="\n  " + text.replace("\n", "\n  "))


def merge_doubling(levels: int = 40) -> str:
    text = "m0: &m0 {k0: 1, k1: 2}\n"
    for i in range(1, levels):
        text += f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], z{i}: 1}}\n"
    return text


YAML_BOMBS: dict[str, tuple[str, str]] = {
    "5,000 deep": (task_yaml(metadata="[" * 5000 + "]" * 5000), "nests more than 32 levels"),
    "5,000 deep mappings": (task_yaml(metadata="{a: " * 5000 + "1" + "}" * 5000), "levels deep"),
    "billion laughs": (
        in_metadata(
            "l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
            + "".join(
                f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 12)
            )
        ),
        "more than 20000 values",
    ),
    "merge-key doubling": (in_metadata(merge_doubling()), "more than 20000 values"),
    "very many keys": (
        in_metadata("".join(f"k{i}: 1\n" for i in range(12_000))),
        "more than 20000 values",
    ),
    "a 5,000-digit number": (task_yaml(num_fewshot="1" + "0" * 5000), "a number of 5001"),
    "a template 3,000 deep": (
        task_yaml(doc_to_text='"{{ ' + "(" * 3000 + "question" + ")" * 3000 + ' }}"'),
        "the template nests brackets or blocks more than 64",
    ),
}


def test_yaml_bombs_are_422_while_health_answers_and_another_owner_uploads(
    server: ServerProcess,
) -> None:
    bombs = []
    for text, needle in YAML_BOMBS.values():
        assert len(text.encode()) < 256 * 1024  # under MAX_YAML_BYTES
        # Encoded once: the flood's own client work stays out of the measurement.
        request = httpx.Request("POST", "/tasks", files=files(text, ("say.jsonl", DATA)))
        bombs.append((request.read(), request.headers["content-type"], needle))

    def send(http: httpx.Client) -> None:
        for body, content_type, needle in bombs:
            headers = {**ALICE, "content-type": content_type}
            answer = http.post("/tasks", content=body, headers=headers)
            assert answer.status_code == 422, answer.text  # never a 500
            assert answer.json()["detail"].startswith("say.yaml: ") or "template" in needle
            assert needle in answer.json()["detail"], (needle, answer.text)

    # Bob's ordinary upload goes through lm-eval's check (seconds) while Alice's bombs land.
    bob: list[httpx.Response] = []

    def bob_uploads() -> None:
        with server.client() as own:
            own.timeout = httpx.Timeout(300)
            sent = files(task_yaml(), ("say.jsonl", DATA))
            bob.append(own.post("/tasks", files=sent, headers=BOB))

    other = threading.Thread(target=bob_uploads)
    other.start()
    assert_health_stays_fast(server, send)
    other.join(timeout=300)
    assert bob and bob[0].status_code == 201, bob[0].text if bob else "no answer"
    with server.client() as http:
        mine = http.get("/tasks", params={"source": "upload"}, headers=ALICE).json()
    assert mine["tasks"] == []  # none of Alice's bombs was stored
    assert "Traceback" not in server.log_path.read_text()
