"""Resume and reuse end to end: the server's response cache, POST /job/{id}/resume and automatic
retries, with real `lm_eval` jobs against local completions servers that count the requests
they answer (tests/support/completions_server.py). One server process for the module; each
scenario has its own completions server, so its counts are its own, and independent scenarios
run at the same time."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lm_eval_server.admission.fingerprint import model_fingerprint
from tests.support.completions_server import (
    CompletionsStubServer,
    model_args_for,
    running_stub_server,
)
from tests.support.jobs import TEST_TASKS, wait_for
from tests.support.server import ServerProcess

KEYS = {"alice": "resume-alice-key-0001", "bob": "resume-bob-key-00002"}
DOCS = 20  # arith_gen_tiny: one generate_until request per doc
TASK = "arith_gen_tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("resume") / "data"
    process = ServerProcess(
        data_dir,
        index_dir,
        API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()),
        MAX_CONCURRENCY="4",
        MAX_ATTEMPTS="3",
        RETRY_BACKOFF_MAX_S="1",
    ).start()
    yield process
    process.stop_jobs_and_terminate()


def http(server: ServerProcess, owner: str = "alice") -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEYS[owner]}"}
    )


def job_body(stub: CompletionsStubServer, model: str = "stub", **extra: Any) -> dict[str, Any]:
    return {
        "model": "local-completions",
        "model_args": model_args_for(stub.base_url, model=model),
        "tasks": TASK,
        "include_path": str(TEST_TASKS),
        "log_samples": True,
        **extra,
    }


def submit(client: httpx.Client, body: dict[str, Any]) -> int:
    response = client.post("/job", json=body)
    assert response.status_code == 200, response.text
    return int(response.json()["job_id"])


def finished(client: httpx.Client, job_id: int) -> dict[str, Any]:
    job = wait_for(client, job_id, timeout_s=240)
    return job


def completed(client: httpx.Client, job_id: int) -> dict[str, Any]:
    job = finished(client, job_id)
    assert job["status"] == "Completed", job["error"]
    return job


def metrics(client: httpx.Client, job_id: int) -> list[dict[str, Any]]:
    return client.get(f"/job/{job_id}/results").json()["metrics"]


def answers(client: httpx.Client, job_id: int) -> dict[int, Any]:
    """Each document's model answers and scores, from the job's samples."""
    page = client.get(f"/job/{job_id}/samples", params={"task": TASK, "limit": 100}).json()
    assert page["total"] == DOCS, page
    return {
        s["doc_id"]: (s["raw_responses"], s["responses"], s["metrics"]) for s in page["samples"]
    }


def wait_until(condition: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(server: ServerProcess) -> Iterator[tuple[int, CompletionsStubServer]]:
    """An uninterrupted first run (alice), whose answers later runs are held to."""
    with running_stub_server() as stub, http(server) as client:
        job_id = submit(client, job_body(stub))
        job = completed(client, job_id)
        assert stub.request_count == DOCS
        assert job["cache"] == {"hits": 0, "misses": DOCS}
        assert job["attempt"] == 1 and job["max_attempts"] == 1
        yield job_id, stub


def test_a_repeat_sends_nothing_and_changing_model_base_url_or_owner_sends_everything(
    server: ServerProcess, reference: tuple[int, CompletionsStubServer]
) -> None:
    first, stub = reference
    with http(server) as alice, http(server, "bob") as bob:
        before = stub.request_count
        repeat = submit(alice, job_body(stub))
        job = completed(alice, repeat)
        assert stub.request_count == before, "a repeat reached the model server"
        assert job["cache"] == {"hits": DOCS, "misses": 0}
        assert metrics(alice, repeat) == metrics(alice, first)
        assert answers(alice, repeat) == answers(alice, first)

        with running_stub_server() as other_url:
            other_model = submit(alice, job_body(stub, model="stub-2"))
            other_owner = submit(bob, job_body(stub))
            other_base = submit(alice, job_body(other_url))
            jobs = [
                completed(alice, other_model),
                completed(bob, other_owner),
                completed(alice, other_base),
            ]
            assert other_url.request_count == DOCS
        # Both jobs against the first server sent every request again.
        assert stub.request_count == before + 2 * DOCS
        assert [j["cache"] for j in jobs] == [{"hits": 0, "misses": DOCS}] * 3
        assert metrics(bob, other_owner) == metrics(alice, first)


def cache_files(data_dir: Path, fingerprint: str) -> list[Path]:
    return sorted(data_dir.rglob(f"{fingerprint}.sqlite*"))


def test_a_corrupt_cache_file_is_set_aside_and_the_job_runs_without_it(
    server: ServerProcess,
) -> None:
    with running_stub_server() as stub, http(server) as client:
        body = job_body(stub)
        completed(client, submit(client, body))
        fingerprint = model_fingerprint(
            "alice", "local-completions", body["model_args"], importlib.metadata.version("lm_eval")
        )
        files = [p for p in cache_files(server.data_dir, fingerprint) if p.suffix == ".sqlite"]
        assert len(files) == 1, files  # named by the fingerprint, one file
        files[0].write_bytes(b"this is not a SQLite database" * 100)
        job_id = submit(client, body)
        job = completed(client, job_id)
        assert stub.request_count == 2 * DOCS
        assert job["cache"] is None  # ran without the cache
        stderr = client.get(f"/job/{job_id}/logs").text
        assert "cannot be read" in stderr and "running without it" in stderr
        assert list(files[0].parent.glob(f"{fingerprint}.sqlite.corrupt-*"))
        # The next run starts a fresh cache, and the one after is answered from it.
        completed(client, submit(client, body))
        repeat = completed(client, submit(client, body))
        assert repeat["cache"] == {"hits": DOCS, "misses": 0}
        assert stub.request_count == 3 * DOCS


def test_sampled_generations_and_response_cache_false_reach_the_model_every_time(
    server: ServerProcess,
) -> None:
    with (
        running_stub_server() as sampled,
        running_stub_server() as uncached,
        http(server) as client,
    ):
        bodies = [job_body(sampled, gen_kwargs="temperature=0.7")] * 2
        bodies += [job_body(uncached, response_cache=False)] * 2
        jobs = [completed(client, job_id) for job_id in [submit(client, b) for b in bodies]]
        assert [j["cache"] for j in jobs[:2]] == [{"hits": 0, "misses": DOCS}] * 2
        assert [j["cache"] for j in jobs[2:]] == [None, None]
        assert (sampled.request_count, uncached.request_count) == (2 * DOCS, 2 * DOCS)
        refused = client.post("/job", json=job_body(uncached, response_cache="no"))
        assert refused.status_code == 422


def test_a_job_stopped_halfway_and_resumed_sends_only_what_was_not_answered(
    server: ServerProcess, reference: tuple[int, CompletionsStubServer]
) -> None:
    first, _ = reference
    with running_stub_server(delay_s=0.2) as stub, http(server) as client:
        job_id = submit(client, job_body(stub))
        wait_until(lambda: stub.request_count >= DOCS // 2)
        assert client.post(f"/job/{job_id}/stop").status_code == 200
        assert client.get(f"/job/{job_id}").json()["status"] == "Stopped"
        # The stub counts a request once its delay is over, even when the client went away
        # meanwhile: let the request in flight at the stop be counted first.
        time.sleep(4 * stub.delay_s)
        answered = stub.request_count
        assert answered < DOCS
        # Completed, queued and running jobs cannot be resumed.
        assert client.post(f"/job/{first}/resume").status_code == 409
        resumed = client.post(f"/job/{job_id}/resume")
        assert resumed.status_code == 200, resumed.text
        assert client.post(f"/job/{job_id}/resume").status_code == 409  # queued or running
        job = completed(client, job_id)
        assert job["attempt"] == 2
        hits, misses = job["cache"]["hits"], job["cache"]["misses"]
        assert hits + misses == DOCS
        # At most the one request in flight when the stop came was answered and not stored.
        assert answered - 1 <= hits <= answered
        assert stub.request_count == answered + misses
        assert metrics(client, job_id) == metrics(client, first)
        assert answers(client, job_id) == answers(client, first)
        first_log = client.get(f"/job/{job_id}/logs", params={"attempt": 1}).text
        assert "Requesting API" in first_log
        assert "answered from the response cache" not in first_log
        assert "answered from the response cache" in client.get(f"/job/{job_id}/logs").text
        assert client.get(f"/job/{job_id}/logs", params={"attempt": 3}).status_code == 404
        assert client.post("/job/999999/resume").status_code == 404
    with http(server, "bob") as bob:
        assert bob.post(f"/job/{job_id}/resume").status_code == 404  # not bob's job


def test_a_job_killed_halfway_retries_by_itself_and_completes(
    server: ServerProcess, reference: tuple[int, CompletionsStubServer]
) -> None:
    first, _ = reference
    with running_stub_server(delay_s=0.2) as stub, http(server) as client:
        job_id = submit(client, job_body(stub, max_attempts=2))
        wait_until(lambda: stub.request_count >= DOCS // 2)
        work_dir = server.data_dir / "jobs" / str(job_id)
        pid = int((work_dir / "child.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        time.sleep(4 * stub.delay_s)  # as above: the request in flight is counted
        answered = stub.request_count
        job = completed(client, job_id)
        assert job["attempt"] == 2 and job["max_attempts"] == 2
        assert job["cache"]["hits"] >= answered - 1
        assert job["cache"]["hits"] + job["cache"]["misses"] == DOCS
        assert metrics(client, job_id) == metrics(client, first)
        assert answers(client, job_id) == answers(client, first)
        assert (work_dir / "attempt-1" / "exit.json").is_file()
        exit_record = json.loads((work_dir / "attempt-1" / "exit.json").read_text())
        assert exit_record["exit_code"] != 0
        refused = client.post("/job", json=job_body(stub, max_attempts=4))
        assert refused.status_code == 422 and "MAX_ATTEMPTS" in refused.text


def cache_counters(client: httpx.Client) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("lm_eval_server_response_cache_")
    }


def test_metrics_count_hits_and_misses(
    server: ServerProcess, reference: tuple[int, CompletionsStubServer]
) -> None:
    _, stub = reference
    with http(server) as client:
        before = cache_counters(client)
        completed(client, submit(client, job_body(stub)))  # a repeat: all hits
        after = cache_counters(client)
    hits, misses = (
        "lm_eval_server_response_cache_hits_total",
        "lm_eval_server_response_cache_misses_total",
    )
    assert after[hits] - before[hits] == DOCS
    assert after[misses] == before[misses] >= DOCS  # the reference run's, at least


def cached_rows(path: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT count(*) FROM responses").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


# ---------------------------------------------------------------- the tiny hf model

HF_TASK = "arith_gen"
HF_DOCS = 60  # limit: each doc one generate_until request of at most 8 tokens


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (install the hf extra: uv sync --extra hf)",
)
def test_hf_tiny_model_stopped_halfway_and_resumed_equals_an_uninterrupted_run(
    server: ServerProcess,
) -> None:
    from tests.support.tiny_model import build_model

    model_dir = server.signals / "tiny-gpt2"  # an ALLOWED_PATHS directory the sandbox shows
    model_dir.mkdir(parents=True, exist_ok=True)
    build_model(model_dir)
    body = {
        "model": "hf",
        "model_args": f"pretrained={model_dir},dtype=float32",
        "device": "cpu",
        "tasks": HF_TASK,
        "include_path": str(TEST_TASKS),
        "limit": HF_DOCS,
        "log_samples": True,
    }
    fingerprint = model_fingerprint(
        "bob", "hf", body["model_args"], importlib.metadata.version("lm_eval")
    )
    with http(server, "bob") as client:
        # The uninterrupted run computes everything itself, at the same time.
        uninterrupted = submit(client, {**body, "response_cache": False})
        job_id = submit(client, body)

        def rows() -> int:
            files = [p for p in cache_files(server.data_dir, fingerprint) if p.suffix == ".sqlite"]
            return cached_rows(files[0]) if files else 0

        wait_until(lambda: rows() >= HF_DOCS // 4, timeout_s=300)
        assert client.post(f"/job/{job_id}/stop").status_code == 200
        stopped = client.get(f"/job/{job_id}").json()
        assert stopped["status"] == "Stopped"
        stored = rows()
        assert 0 < stored < HF_DOCS, "the job was not stopped halfway"
        assert client.post(f"/job/{job_id}/resume").status_code == 200
        job = completed(client, job_id)
        reference = completed(client, uninterrupted)
        assert reference["cache"] is None
        assert job["attempt"] == 2
        assert job["cache"] == {"hits": stored, "misses": HF_DOCS - stored}
        assert metrics(client, job_id) == metrics(client, uninterrupted)

        def hf_answers(jid: int) -> dict[int, Any]:
            page = client.get(
                f"/job/{jid}/samples", params={"task": HF_TASK, "limit": HF_DOCS}
            ).json()
            assert page["total"] == HF_DOCS
            return {s["doc_id"]: (s["raw_responses"], s["metrics"]) for s in page["samples"]}

        assert hf_answers(job_id) == hf_answers(uninterrupted)


def test_jobs_forked_from_warm_workers_use_the_cache_too(tmp_path: Path, index_dir: Path) -> None:
    from lm_eval_server.runtime.executors.warm_protocol import FORKED_MARKER

    warm = ServerProcess(tmp_path / "data", index_dir, WARM_WORKERS="1").start()
    try:
        with running_stub_server() as stub, httpx.Client(base_url=warm.url, timeout=60) as client:
            ids = []
            for _ in range(2):
                # A job only runs warm when a worker is ready for it (else cold, as designed).
                wait_until(lambda: client.get("/ready").json()["warm_workers"]["ready"] >= 1)
                job_id = submit(client, job_body(stub))
                ids.append(job_id)
                completed(client, job_id)
            jobs = [client.get(f"/job/{i}").json() for i in ids]
            assert [j["cache"] for j in jobs] == [
                {"hits": 0, "misses": DOCS},
                {"hits": DOCS, "misses": 0},
            ]
            assert stub.request_count == DOCS
            for job_id in ids:
                assert FORKED_MARKER in client.get(f"/job/{job_id}/logs").text
    finally:
        warm.stop_jobs_and_terminate()


def test_owners_share_answers_only_when_the_operator_allows_it(
    tmp_path: Path, index_dir: Path
) -> None:
    shared = ServerProcess(
        tmp_path / "data",
        index_dir,
        API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()),
        RESPONSE_CACHE_SHARED="true",
    ).start()
    try:
        with running_stub_server() as stub, http(shared) as alice, http(shared, "bob") as bob:
            first = completed(alice, submit(alice, job_body(stub)))
            second = completed(bob, submit(bob, job_body(stub)))
            assert first["cache"] == {"hits": 0, "misses": DOCS}
            assert second["cache"] == {"hits": DOCS, "misses": 0}
            assert stub.request_count == DOCS
        # One file, in the shared directory every owner's sandbox mounts.
        assert len(list((shared.data_dir / "shared-responses").glob("*.sqlite"))) == 1
    finally:
        shared.stop_jobs_and_terminate()


def test_a_job_lost_in_a_server_restart_is_retried_by_the_next_server(
    tmp_path: Path, index_dir: Path, reference: tuple[int, CompletionsStubServer], server: Any
) -> None:
    from tests.support.jobs import group_members

    first_id, _ = reference
    with http(server) as client:
        expected = metrics(client, first_id)
    data_dir = tmp_path / "data"
    with running_stub_server(delay_s=0.2) as stub:
        doomed = ServerProcess(data_dir, index_dir).start()
        with httpx.Client(base_url=doomed.url, timeout=60) as client:
            job_id = submit(client, job_body(stub, max_attempts=2))
            wait_until(lambda: stub.request_count >= DOCS // 2)
        doomed.kill()
        # The machine goes with it: the job's whole process group, before any exit record.
        db = sqlite3.connect(data_dir / "jobs.db")
        pid = int(db.execute("SELECT pid FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0])
        db.close()
        os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: not group_members(pid))
        time.sleep(4 * stub.delay_s)  # the request in flight is counted
        answered = stub.request_count
        restarted = ServerProcess(data_dir, index_dir).start()
        try:
            with httpx.Client(base_url=restarted.url, timeout=60) as client:
                job = completed(client, job_id)
                assert job["attempt"] == 2
                assert job["cache"]["hits"] >= answered - 1
                assert stub.request_count == answered + job["cache"]["misses"]
                assert metrics(client, job_id) == expected
        finally:
            restarted.stop_jobs_and_terminate()
