"""POST /job never skips the task-name check, and what one request can cost has a ceiling.

Through the HTTP API: submissions while the task index builds (they wait, or get 503 with
Retry-After), after its build failed (503 with the reason, in /ready and the log as well), the
per-request caps (422 naming their setting), malformed and hostile bodies (4xx, never 500), and
floods that leave /health answering. Every refusal is checked for its evidence too: no job
was queued. Speed is measured by bench/floods.py, not here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lm_eval_server.admission.validation import MAX_NAMES_LISTED
from tests.support.jobs import DUMMY_JOB, FAKE_LM_EVAL, ROOT, fake_job, submit, wait_for
from tests.support.server import ServerProcess

JSON = {"content-type": "application/json"}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def make(name: str, index_dir: Path, **env: str) -> ServerProcess:
        data = tmp_path / name / "data"
        server = ServerProcess(
            data, index_dir, ALLOWED_PATHS=f"{tmp_path},{ROOT / 'examples'}", **env
        )
        started.append(server.start())
        return server

    yield make
    for server in reversed(started):
        server.stop_jobs_and_terminate()


def index_builders(server_pid: int) -> list[int]:
    """The server's `python -m lm_eval_server.runtime.task_index build` children."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"lm_eval_server.runtime.task_index" in cmdline:
            pids.append(int(entry.name))
    return pids


def total_jobs(http: Any) -> int:
    return int(http.get("/jobs").json()["total"])


def refused(response: httpx.Response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str), detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    return detail


# ------------------------------------------------------------------ while the index builds


def test_submissions_during_the_index_build_wait_or_get_503(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # Server A's build is frozen (SIGSTOP) as soon as it starts, so A stays "building" without
    # costing CPU: a short INDEX_WAIT_S ends in 503 + Retry-After, and nothing is queued.
    frozen = servers("frozen", tmp_path / "frozen-index", INDEX_WAIT_S="1")
    assert frozen.proc is not None
    deadline = time.monotonic() + 30
    while not (builders := index_builders(frozen.proc.pid)):
        assert time.monotonic() < deadline, "no index build started"
        time.sleep(0.05)
    for pid in builders:
        os.kill(pid, signal.SIGSTOP)
    try:
        with frozen.client() as http:
            ready = http.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["checks"]["task_index"] is False
            assert ready.json()["task_index"]["state"] == "building"
            for tasks in ("demo_mc", "no_such_task_anywhere"):
                answer = http.post("/job", json={**DUMMY_JOB, "tasks": tasks})
                refused(answer, 503, "still being built", "INDEX_WAIT_S")
                assert answer.headers["retry-after"].isdigit()
            # A request that is wrong for another reason is refused at once, without waiting.
            refused(http.post("/job", json={**DUMMY_JOB, "tasks_": "x"}), 422, "tasks_")
            refused(http.post("/job", json={**DUMMY_JOB, "model": "dumy"}), 422, "dummy")
            assert total_jobs(http) == 0
    finally:
        # Stopped for good: shutting the server down kills its build (no CPU spent on it).
        frozen.stop_jobs_and_terminate()

    # Server B really builds its index (a fresh INDEX_DIR): a submission sent during the build
    # waits for it, then is validated against it.
    server = servers(
        "building", tmp_path / "fresh-index", INDEX_WAIT_S="600", LM_EVAL_PATHS=FAKE_LM_EVAL
    )
    with server.client() as http:
        http.timeout = httpx.Timeout(600)
        before = http.get("/ready").json()
        assert before["task_index"]["state"] == "building", before
        results: dict[str, httpx.Response] = {}

        def post(name: str, body: dict[str, Any]) -> None:
            with server.client() as own:
                own.timeout = httpx.Timeout(600)
                results[name] = own.post("/job", json=body)

        bodies = {
            "unknown": {**DUMMY_JOB, "tasks": "demo_mcc"},
            "builtin_typo": {**DUMMY_JOB, "tasks": "hellaswg"},
            "valid": fake_job(),
        }
        threads = [threading.Thread(target=post, args=item) for item in bodies.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        after = http.get("/ready")
        assert after.status_code == 200, after.text
        assert after.json()["task_index"]["state"] == "ready"
        refused(results["unknown"], 422, "'demo_mcc'", "demo_mc")
        # Checked against lm-eval's own ~15k names, which only the finished index knows.
        refused(results["builtin_typo"], 422, "'hellaswg'", "hellaswag")
        assert results["valid"].status_code == 200, results["valid"].text
        job_id = results["valid"].json()["job_id"]
        assert wait_for(http, job_id)["status"] == "Completed"
        # After the build, unknown names are refused the same way.
        refused(http.post("/job", json={**DUMMY_JOB, "tasks": "demo_mcc"}), 422, "demo_mc")
        assert [j["job_id"] for j in http.get("/jobs").json()["jobs"]] == [job_id]


def test_a_failed_index_build_shows_in_ready_and_the_log(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / "task_index").write_text("a file where the cache directory should be\n")
    server = servers("failed", index_dir)
    with server.client() as http:
        deadline = time.monotonic() + 120
        while (status := http.get("/ready").json()["task_index"])["state"] != "failed":
            assert status["state"] == "building", status
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["task_index"] is False
        assert "FileExistsError" in status["error"] and "task_index" in status["error"]
        assert status["retry_in_s"] >= 1 and status["attempts"] == 1
        # Submissions are refused with the same reason, never let through unchecked.
        answer = http.post("/job", json=fake_job())
        refused(answer, 503, "could not be built", "FileExistsError", "TASK_INDEX=false")
        assert int(answer.headers["retry-after"]) >= 1
        assert total_jobs(http) == 0
    log = server.log_path.read_text()
    assert "task index build failed (attempt 1)" in log
    assert "FileExistsError" in log and "Traceback" in log  # the build's own output


def test_without_task_index_names_are_not_checked_but_caps_hold(make_client: Any) -> None:
    client = make_client(task_index=False, max_tasks_per_request=3)
    assert client.get("/ready").json()["task_index"] == {"state": "disabled"}
    # TASK_INDEX=false: the operator chose to let lm-eval judge task names.
    job_id = submit(client, {**fake_job(), "tasks": "not_a_task_the_server_knows"})
    assert wait_for(client, job_id)["status"] == "Completed"
    refused(
        client.post("/job", json={**fake_job(), "tasks": "a,b,c,d"}), 422, "MAX_TASKS_PER_REQUEST"
    )
    assert total_jobs(client) == 1


# ------------------------------------------------------------------ caps


def test_caps_give_422_naming_their_setting(make_client: Any, tmp_path: Path) -> None:
    client = make_client(
        max_tasks_per_request=5,
        max_task_patterns=1,
        max_include_entries=50,
        max_body_depth=4,
        max_body_values=200,
    )
    six = [f"t{i}" for i in range(6)]
    for tasks in (",".join(six), six, ["t0,t1,t2", "t3,t4", "t5"]):
        refused(
            client.post("/job", json={**DUMMY_JOB, "tasks": tasks}), 422, "MAX_TASKS_PER_REQUEST"
        )
    refused(
        client.post("/job", json={**DUMMY_JOB, "tasks": "demo_*,arc_*"}), 422, "MAX_TASK_PATTERNS"
    )
    refused(
        client.post("/job", json={**DUMMY_JOB, "model_args": {"a": {"b": {"c": {"d": 1}}}}}),
        422,
        "MAX_BODY_DEPTH",
        "model_args",
    )
    refused(
        client.post("/job", json={**DUMMY_JOB, "metadata": {f"k{i}": i for i in range(150)}}),
        422,
        "MAX_BODY_VALUES",
        "metadata",
    )

    # An include_path with more entries than MAX_INCLUDE_ENTRIES is refused without reading
    # its task YAMLs; one within the cap is scanned and its tasks are known.
    big = tmp_path / "big"
    for i in range(60):
        (big / f"d{i:02d}").mkdir(parents=True)
    (big / "d00" / "mine.yaml").write_text("task: my_big_task\n")
    detail = refused(
        client.post("/job", json={**DUMMY_JOB, "tasks": "my_big_task", "include_path": str(big)}),
        422,
        "MAX_INCLUDE_ENTRIES=50",
        "include_path",
    )
    assert "my_big_task" not in detail
    small = tmp_path / "small"
    for i in range(30):
        (small / f"d{i:02d}").mkdir(parents=True)
    (small / "d07" / "mine.yaml").write_text("task: my_small_task\n")
    body = {**fake_job(), "tasks": "my_small_task", "include_path": str(small)}
    assert client.post("/job", json=body).status_code == 200
    assert total_jobs(client) == 1


def test_many_unknown_task_names_get_a_few_suggestions(client: Any) -> None:
    names = ["demo_mcc", *(f"zz_unknown_task_{i}" for i in range(298)), "demo_mcd"]
    detail = refused(
        client.post("/job", json={**DUMMY_JOB, "tasks": names}),
        422,
        "'demo_mcc' (did you mean: demo_mc?)",
        f"'zz_unknown_task_{MAX_NAMES_LISTED - 2}'",
        f"and {len(names) - MAX_NAMES_LISTED} more",
    )
    # Close matches are looked for among the first few names only; the message lists the first
    # MAX_NAMES_LISTED names and counts the rest.
    assert f"'zz_unknown_task_{MAX_NAMES_LISTED - 1}'" not in detail
    assert "demo_mcd" not in detail
    assert detail.count("did you mean") == 1
    assert total_jobs(client) == 0


def test_unknown_fields_are_named_with_close_matches(client: Any) -> None:
    detail = refused(
        client.post("/job", json={**DUMMY_JOB, "taks": "x", "model_arg": "a=1"}),
        422,
        "'taks' (did you mean tasks",
        "'model_arg' (did you mean model_args",
    )
    assert "JobRequest" in detail
    flood = json.dumps({f"f{i}": 1 for i in range(80_000)}, separators=(",", ":")).encode()
    answer = client.post("/job", content=flood, headers=JSON)
    detail = refused(answer, 422, "'f0'", "'f4'", "maybe more")
    assert "'f5'" not in detail
    assert total_jobs(client) == 0


# ------------------------------------------------------------------ edge bodies


SURROGATE_BODIES = [
    b'{"model": "dummy", "tasks": "demo_mc\\ud800"}',
    b'{"model": "dummy", "tasks": ["demo_mc", "\\udfff"]}',
    b'{"model": "dummy", "tasks": "demo_mc", "model_args": {"a": "\\ud83d"}}',
    b'{"model": "dummy", "tasks": "demo_mc", "env_vars": {"A": "x\\udc00y"}}',
    b'{"model": "dummy", "tasks": "demo_mc", "env_vars": {"\\ud800": "1"}}',
    b'{"model": "dummy", "tasks": "demo_mc", "\\ud800": 1}',
    b'{"model": "dummy", "tasks": "demo_mc", "metadata": {"a": [{"b": "\\uDBFF"}]}}',
    # A surrogate encoded straight into the bytes (CESU-style), not as an escape.
    b'{"model": "dummy", "tasks": "demo_mc", "system_instruction": "\xed\xa0\x80"}',
]

BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "JSON object"),
    (b"null", "JSON object"),
    (b'"demo_mc"', "JSON object"),
    (b"[1, 2]", "JSON object"),
    (b"42", "JSON object"),
    (b"[" * 200_000 + b"]" * 200_000, "JSON object"),
    (b'{"model_args": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "MAX_BODY_DEPTH"),
    (b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", "MAX_BODY_DEPTH"),
    (b'{"limit": 1' + b"0" * 5000 + b"}", "64 bits"),
    (b'{"seed": 99999999999999999999}', "64 bits"),
    (b'{"limit": 1e400}', "not finite"),
    (b'{"limit": -1e999}', "not finite"),
    (b'{"limit": NaN}', "NaN"),
    (b'{"limit": Infinity}', "Infinity"),
    (b'{"limit": -Infinity}', "Infinity"),
    (b'{"model": "dummy", "tasks": "x\\u0000y"}', "NUL"),
    # A repeated key: the last wins, as in json.loads.
    (b'{"model": "dummy", "model": "dumy", "tasks": "demo_mc"}', "Unknown model 'dumy'"),
    (b'{"model": "dummy"} {"model": "hf"}', "not valid JSON"),
    (b'{"model": "dummy",}', "not valid JSON"),
    (b'{"model": "dummy"', "not valid JSON"),
    (b'{"model": "du\xffmmy"}', "UTF-8"),
    (b"{'model': 'dummy'}", "not valid JSON"),
]


def test_edge_bodies_get_4xx(client: Any) -> None:
    for raw in SURROGATE_BODIES:
        refused(client.post("/job", content=raw, headers=JSON), 422, "surrogate")
    for raw, needle in BAD_BODIES:
        answer = client.post("/job", content=raw, headers=JSON)
        assert answer.status_code == 422, (raw[:80], answer.text)
        assert needle in answer.json()["detail"], (raw[:80], answer.text)
    body = json.dumps(DUMMY_JOB).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        answer = client.post("/job", content=body, headers=headers)
        refused(answer, 415, "application/json")
    # Well formed, the same text is fine: an escaped surrogate pair is one character.
    pair = json.dumps({**fake_job(), "system_instruction": "\U0001f600"}).encode()
    assert b"\\ud83d\\ude00" in pair
    ok = client.post("/job", content=pair, headers=JSON)
    assert ok.status_code == 200, ok.text
    assert total_jobs(client) == 1


def test_api_key_is_checked_before_the_body(make_client: Any) -> None:
    client = make_client(api_keys=["k"])
    for raw in (b"[" * 1000, b'{"nope": 1}', b'{"tasks": "\\ud800"}'):
        answer = client.post("/job", content=raw, headers=JSON)
        assert answer.status_code == 401, answer.text
    keyed = {**JSON, "Authorization": "Bearer k"}
    refused(client.post("/job", content=b'{"nope": 1}', headers=keyed), 422, "nope")
    client.headers["Authorization"] = "Bearer k"  # for the fixture's clean-up


# ------------------------------------------------------------------ floods


def flood_bodies(tmp_path: Path) -> dict[str, tuple[bytes, int, str]]:
    include = tmp_path / "flood-include"
    for i in range(10_050):
        (include / f"d{i:05d}").mkdir(parents=True)
    names = ",".join(f"task_{i:06d}" for i in range(120_000))
    return {
        "300 unknown task names": (
            json.dumps({**DUMMY_JOB, "tasks": [f"zz_unknown_{i}" for i in range(300)]}).encode(),
            422,
            "Unknown task",
        ),
        "80k unknown fields": (
            json.dumps({f"f{i}": 1 for i in range(80_000)}, separators=(",", ":")).encode(),
            422,
            "Unknown field",
        ),
        "10k-directory include_path": (
            json.dumps({**DUMMY_JOB, "include_path": str(include)}).encode(),
            422,
            "MAX_INCLUDE_ENTRIES",
        ),
        "1 MB of task names": (
            json.dumps({**DUMMY_JOB, "tasks": names[: 1000 * 1000 - 200]}).encode(),
            422,
            "MAX_TASKS_PER_REQUEST",
        ),
    }


def flood_while_polling_health(
    server: ServerProcess, raw: bytes, times: int = 5, most: int = 40
) -> tuple[list[httpx.Response], int]:
    """POST `raw` at least `times` times from one thread while this one polls /health: the
    answers, and how many /health answers came back while the flood was still being sent.
    The flood goes on (up to `most` posts) until a /health answer has come back during it: on
    a loaded machine five quick refusals can end before one health round trip does, which says
    nothing about the server; a server that holds /health back for all `most` still fails."""
    done = threading.Event()
    answered = threading.Event()
    answers: list[httpx.Response] = []

    def flood() -> None:
        with server.client() as own:
            own.timeout = httpx.Timeout(120)
            while len(answers) < times or (not answered.is_set() and len(answers) < most):
                answers.append(own.post("/job", content=raw, headers=JSON))
        done.set()

    thread = threading.Thread(target=flood)
    thread.start()
    during = 0
    with server.client() as http:
        while not done.is_set():
            health = http.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            if not done.is_set():
                during += 1
                answered.set()
    thread.join()
    return answers, during


def test_floods_are_refused_while_health_answers(
    servers: Callable[..., ServerProcess], tmp_path: Path, index_dir: Path
) -> None:
    server = servers("floods", index_dir)
    for name, (raw, status, needle) in flood_bodies(tmp_path).items():
        answers, during = flood_while_polling_health(server, raw)
        assert during > 0, name
        assert 5 <= len(answers) <= 40, name
        for answer in answers:
            refused(answer, status, needle)
    with server.client() as http:
        assert total_jobs(http) == 0
    assert "Traceback" not in server.log_path.read_text()
