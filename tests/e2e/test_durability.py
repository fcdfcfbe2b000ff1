"""Restarts and crashes lose nothing: real server processes, killed and restarted."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support.completions_server import model_args_for, running_stub_server
from tests.support.jobs import TEST_TASKS, fake_job, group_members, process_alive, submit, wait_for


def pid_of(data_dir: Path, job_id: int) -> int:
    db = sqlite3.connect(data_dir / "jobs.db")
    try:
        return int(db.execute("SELECT pid FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0])
    finally:
        db.close()


def test_kill_9_mid_job_then_restart_completes_with_results_and_logs(servers: Any) -> None:
    with running_stub_server(delay_s=0.25) as stub:
        server = servers()
        body = {
            "model": "local-completions",
            "model_args": model_args_for(stub.base_url),
            "tasks": "arith_gen_tiny",
            "include_path": str(TEST_TASKS),
        }
        with server.client() as http:
            job_id = submit(http, body)
            deadline = time.monotonic() + 120
            while stub.request_count < 2:  # inference has begun
                assert time.monotonic() < deadline
                time.sleep(0.05)
        pid = pid_of(server.data_dir, job_id)
        server.kill()
        assert process_alive(pid), "the job died with the server"
        requests_during_outage = stub.request_count
        time.sleep(0.6)
        assert stub.request_count > requests_during_outage  # still evaluating, unattended
        # Held in its inference until the restarted server has seen it: however slow the
        # restart, the job cannot finish first.
        stub.gate.clear()
        restarted = servers()
        with restarted.client() as http:
            running = http.get(f"/job/{job_id}").json()
            assert running["status"] == "Running"
            stub.gate.set()
            job = wait_for(http, job_id, timeout_s=120)
            assert job["status"] == "Completed", job["error"]
            assert job["exit_code"] == 0 and job["inference_progress_pct"] == 100
            results = http.get(f"/job/{job_id}/results").json()
            assert results["metrics"][0]["value"] == 13 / 20
            stderr = http.get(f"/job/{job_id}/logs").text
            # The whole log: lines from before the crash and after the restart.
            assert "Selected Tasks" in stderr and "Requesting API" in stderr
            assert "Saving results aggregated" in stderr


def test_queued_jobs_run_in_order_after_restart_and_ids_keep_increasing(servers: Any) -> None:
    server = servers(MAX_CONCURRENCY="1")
    with server.client() as http:
        first = submit(http, fake_job(FAKE_SLEEP_S="60"))
        queued = [submit(http, fake_job()) for _ in range(3)]
        deleted = submit(http, fake_job())
        assert http.delete(f"/job/{deleted}").status_code == 200
        wait_for(http, first, {"Running"})
    assert server.terminate()  # graceful: the running job is left to be re-adopted
    first_pid = pid_of(server.data_dir, first)
    assert process_alive(first_pid)
    restarted = servers(MAX_CONCURRENCY="1")
    with restarted.client() as http:
        assert http.get(f"/job/{first}").json()["status"] == "Running"  # re-adopted
        assert [http.get(f"/job/{j}").json()["status"] for j in queued] == ["Queued"] * 3
        assert http.get(f"/job/{first}/stop").json()["message"] == f"Job {first} stopped."
        assert not process_alive(first_pid)
        jobs = [wait_for(http, j) for j in [first, *queued]]
        assert [j["status"] for j in jobs] == ["Stopped"] + ["Completed"] * 3
        for earlier, later in itertools.pairwise(jobs):
            assert later["started_at"] >= earlier["finished_at"]
        assert submit(http, fake_job()) == deleted + 1


def test_job_that_ended_while_server_was_down_gets_its_true_exit_code(servers: Any) -> None:
    server = servers()
    with server.client() as http:
        ended = submit(http, fake_job(FAKE_SLEEP_S="1", FAKE_EXIT="3"))
        vanished = submit(http, fake_job(FAKE_SLEEP_S="60"))
        wait_for(http, ended, {"Running"})
        wait_for(http, vanished, {"Running"})
    server.kill()
    vanished_pid = pid_of(server.data_dir, vanished)
    os.killpg(vanished_pid, signal.SIGKILL)  # supervisor and job die: no exit code recorded
    deadline = time.monotonic() + 30
    while group_members(pid_of(server.data_dir, ended)) or group_members(vanished_pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    restarted = servers()
    with restarted.client() as http:
        job = http.get(f"/job/{ended}").json()
        assert job["status"] == "Failed" and job["exit_code"] == 3
        assert "fake lm_eval done" in http.get(f"/job/{ended}/logs?stream=stdout").text
        gone = http.get(f"/job/{vanished}").json()
        assert gone["status"] == "Failed" and gone["exit_code"] is None
        assert "left no exit code" in gone["error"]


def test_shutdown_stops_jobs_when_asked(servers: Any) -> None:
    server = servers(SHUTDOWN_STOPS_JOBS="true")
    with server.client() as http:
        job_id = submit(http, fake_job(FAKE_SLEEP_S="60"))
        wait_for(http, job_id, {"Running"})
    pid = pid_of(server.data_dir, job_id)
    assert server.terminate()
    assert not process_alive(pid) and group_members(pid) == []
    with servers().client() as http:
        assert http.get(f"/job/{job_id}").json()["status"] == "Stopped"


def test_retention_prunes_old_and_excess_finished_jobs(servers: Any) -> None:
    server = servers(MAX_FINISHED_JOBS="2", MAX_CONCURRENCY="1")
    with server.client() as http:
        ids = [submit(http, fake_job()) for _ in range(3)]
        wait_for(http, ids[2])  # one slot: the others finished before it
        remaining = [j["job_id"] for j in http.get("/jobs").json()["jobs"]]
        assert remaining == ids[1:]
    assert not (server.data_dir / "jobs" / str(ids[0])).exists()
    assert (server.data_dir / "jobs" / str(ids[2])).exists()
    server.terminate()
    # Age job 2 by ten days; a server started with a one-day retention removes it.
    db = sqlite3.connect(server.data_dir / "jobs.db")
    old = (datetime.now(UTC) - timedelta(days=10)).isoformat()
    db.execute("UPDATE jobs SET finished_at=? WHERE job_id=?", (old, ids[1]))
    db.commit()
    db.close()
    with servers(JOB_RETENTION_DAYS="1").client() as http:
        assert [j["job_id"] for j in http.get("/jobs").json()["jobs"]] == [ids[2]]


def test_idempotency_key_dedupes_concurrent_retries(servers: Any) -> None:
    server = servers()
    answers: list[int] = []

    def post() -> None:
        with server.client() as http:
            answers.append(
                submit(http, fake_job(FAKE_SLEEP_S="1"), headers={"Idempotency-Key": "run-42"})
            )

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8 and len(set(answers)) == 1
    with server.client() as http:
        assert http.get("/jobs").json()["total"] == 1
        other = submit(http, fake_job(), headers={"Idempotency-Key": "run-43"})
        assert other != answers[0]
    server.terminate()
    with servers().client() as http:  # the key survives a restart
        # The same body: a key reused with another body is a 422 (tests/e2e/test_http_guard.py).
        again = submit(http, fake_job(FAKE_SLEEP_S="1"), headers={"Idempotency-Key": "run-42"})
        assert again == answers[0]


def test_submissions_get_503_while_shutting_down(client: Any) -> None:
    client.portal.call(client.app.state.server.manager.shutdown)
    response = client.post("/job", json=fake_job())
    assert response.status_code == 503
    assert "shutting down" in response.json()["detail"]
    assert client.get("/ready").status_code == 503
