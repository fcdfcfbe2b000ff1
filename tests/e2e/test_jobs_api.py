"""The README's API end to end, with the real lm_eval subprocess (dummy model, local task)."""

from __future__ import annotations

import time
from typing import Any

from tests.support.jobs import (
    DUMMY_JOB,
    EXAMPLES_TASKS,
    fake_job,
    group_members,
    process_alive,
    submit,
    wait_for,
)


def test_dummy_job_completes_with_results_and_logs(make_client: Any) -> None:
    client = make_client()
    response = client.post("/job", json=DUMMY_JOB)
    assert response.json() == {
        "status": "success",
        "message": "Job 1 successfully queued.",
        "job_id": 1,
    }
    # A second job with env_vars, concurrently: LMEVAL_LOG_LEVEL reaches the child.
    debug_id = submit(client, {**DUMMY_JOB, "env_vars": {"LMEVAL_LOG_LEVEL": "DEBUG"}})
    job = wait_for(client, 1)
    assert job["status"] == "Completed", job["error"]
    assert job["exit_code"] == 0
    assert job["inference_progress_pct"] == 100
    assert job["progress"]["phase"] == "writing results"  # its last phase
    phases = {p["phase"]: (p["done"], p["total"]) for p in job["progress"]["phases"]}
    assert phases["loglikelihood"] == (32, 32)  # 8 docs x 4 choices
    assert job["progress"]["done"] == job["progress"]["total"] == 32
    assert job["argument"].split()[1:3] == ["-m", "lm_eval"]
    assert "--tasks demo_mc" in job["argument"]
    table = "".join(job["stdout"])
    assert "|demo_mc|" in table and "acc" in table
    assert any("Running loglikelihood requests" in line for line in job["stderr"])
    assert job["started_at"] <= job["finished_at"] and job["duration_s"] > 0
    assert job["timestamp"] == job["started_at"]

    results = client.get("/job/1/results").json()
    acc = [m for m in results["metrics"] if m["task"] == "demo_mc" and m["metric"] == "acc"]
    assert acc and acc[0]["value"] == results["results"]["results"]["demo_mc"]["acc,none"]
    assert results["results"]["n-samples"]["demo_mc"]["effective"] == 8
    assert "configs" in results["results"] and "versions" in results["results"]

    log = client.get("/job/1/logs", params={"stream": "stdout"})
    assert log.headers["content-type"].startswith("text/plain")
    assert "|demo_mc|" in log.text
    tail = client.get("/job/1/logs", params={"stream": "stderr", "tail": 2}).text
    assert len(tail.splitlines()) == 2

    debug = wait_for(client, debug_id)
    assert debug["status"] == "Completed"
    assert any(" DEBUG " in line for line in debug["stderr"])
    assert not any(" DEBUG " in line for line in job["stderr"])

    listing = client.get("/jobs").json()
    assert [j["job_id"] for j in listing["jobs"]] == [1, debug_id]
    assert client.get("/jobs", params={"include_completed": "False"}).json()["jobs"] == []


def test_stop_running_job_leaves_no_process(client: Any) -> None:
    job_id = submit(client, fake_job(FAKE_SLEEP_S="300", FAKE_CHILD="1", FAKE_IGNORE_TERM="1"))
    lm_id = submit(client, DUMMY_JOB)  # a real lm_eval, stopped during its start-up
    running = wait_for(client, job_id, {"Running"})
    wait_for(client, lm_id, {"Running"})
    deadline = time.monotonic() + 10
    while "sleeping" not in "".join(client.get(f"/job/{job_id}").json()["stderr"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    record_pid = client.app.state.manager.get(job_id).pid
    assert record_pid and len(group_members(record_pid)) >= 3  # supervisor, fake, its child
    lm_pid = client.app.state.manager.get(lm_id).pid
    # lm_eval first: with cached bytecode it can finish within the fake job's stop grace.
    assert client.post(f"/job/{lm_id}/stop").status_code == 200
    response = client.get(f"/job/{job_id}/stop")
    assert response.status_code == 200 and response.json()["message"] == f"Job {job_id} stopped."
    for jid, pid in ((job_id, record_pid), (lm_id, lm_pid)):
        job = client.get(f"/job/{jid}").json()
        assert job["status"] == "Stopped"
        assert group_members(pid) == []
        assert not process_alive(pid)
    again = client.get(f"/job/{job_id}/stop").json()
    assert again["message"] == f"Job {job_id} already Stopped; nothing to stop."
    assert running["status"] == "Running"


def test_queue_with_one_slot_starts_next_job_when_first_ends(make_client: Any) -> None:
    client = make_client(max_concurrency=1)
    first = submit(client, fake_job(FAKE_SLEEP_S="1.5"))
    second = submit(client, fake_job())
    third = submit(client, fake_job(FAKE_SLEEP_S="30"))
    assert client.get(f"/job/{second}").json()["status"] == "Queued"
    stop = client.get(f"/job/{third}/dequeue").json()
    assert stop["message"] == f"Job {third} dequeued."
    done_first = wait_for(client, first)
    done_second = wait_for(client, second)
    assert done_first["status"] == done_second["status"] == "Completed"
    assert done_second["started_at"] >= done_first["finished_at"]
    assert client.get(f"/job/{third}").json()["status"] == "Stopped"
    assert client.get(f"/job/{third}").json()["started_at"] is None


def test_stop_all_and_delete_all(client: Any) -> None:
    ids = [submit(client, fake_job(FAKE_SLEEP_S="60")) for _ in range(2)]
    wait_for(client, ids[0], {"Running"})
    stopped = client.get("/jobs/stop").json()
    assert sorted(stopped["job_ids"]) == ids
    assert {client.get(f"/job/{i}").json()["status"] for i in ids} == {"Stopped"}
    work_dir = client.app.state.manager.get(ids[0]).work_dir
    deleted = client.delete("/jobs").json()
    assert sorted(deleted["job_ids"]) == ids
    assert client.get("/jobs").json() == {"jobs": [], "total": 0}
    assert client.get(f"/job/{ids[0]}").status_code == 404
    from pathlib import Path

    assert not Path(work_dir).exists()


def test_delete_running_job_stops_it_first(client: Any) -> None:
    job_id = submit(client, fake_job(FAKE_SLEEP_S="60"))
    wait_for(client, job_id, {"Running"})
    pid = client.app.state.manager.get(job_id).pid
    response = client.delete(f"/job/{job_id}")
    assert response.status_code == 200
    assert response.json()["message"] == f"Job {job_id} deleted."
    assert not process_alive(pid)
    assert client.get(f"/job/{job_id}").status_code == 404
    # ids keep increasing after a delete
    assert submit(client, fake_job()) == job_id + 1


def test_unknown_ids_are_404(client: Any) -> None:
    for method, path in (
        ("get", "/job/99"),
        ("get", "/job/99/stop"),
        ("post", "/job/99/stop"),
        ("get", "/job/99/dequeue"),
        ("delete", "/job/99"),
        ("get", "/job/99/results"),
        ("get", "/job/99/logs"),
    ):
        response = getattr(client, method)(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Job 99 not found."}


def test_failing_job_carries_its_error(client: Any) -> None:
    broken = {**DUMMY_JOB, "tasks": "demo_missing_data", "include_path": str(EXAMPLES_TASKS)}
    response = client.post("/job", json=broken)
    # The task does not exist: refused before queueing, with close matches.
    assert response.status_code == 422
    assert "demo_missing_data" in response.json()["detail"]
    job_id = submit(client, fake_job(FAKE_EXIT="3"))
    job = wait_for(client, job_id)
    assert job["status"] == "Failed" and job["exit_code"] == 3
    assert job["error"].startswith("exit code 3")
    conflict = client.get(f"/job/{job_id}/results")
    assert conflict.status_code == 409
    assert "Failed" in conflict.json()["detail"]


def test_bad_input_gets_4xx_with_a_message(client: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({**DUMMY_JOB, "no_such_field": 1}, "no_such_field"),
        ({**DUMMY_JOB, "model": "dumy"}, "dummy"),
        ({**DUMMY_JOB, "tasks": "demo_mcc"}, "demo_mc"),
        ({**DUMMY_JOB, "cache_requests": "sometimes"}, "cache_requests"),
        ({**DUMMY_JOB, "seed": "a,b"}, "seed"),
        ({**DUMMY_JOB, "limit": "lots"}, "limit"),
        ({"model": "dummy"}, "tasks is required"),
        ({**DUMMY_JOB, "env_vars": {"A": 1}}, "env_vars"),
        ({**DUMMY_JOB, "gen_kwargs": "not a kv"}, "gen_kwargs"),
    ]
    for body, expected in cases:
        response = client.post("/job", json=body)
        assert response.status_code == 422, (body, response.text)
        assert expected in str(response.json()["detail"]), (expected, response.text)
    assert (
        client.post(
            "/job", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.get("/jobs", params={"status": "Sleeping"}).status_code == 422
    assert client.get("/jobs").json()["total"] == 0  # nothing was queued


def test_list_filters_pagination_and_order(make_client: Any) -> None:
    client = make_client(max_concurrency=1)
    ids = [submit(client, fake_job(FAKE_SLEEP_S="30")) for _ in range(4)]
    wait_for(client, ids[0], {"Running"})
    running = client.get("/jobs", params={"status": "Running"}).json()
    assert [j["job_id"] for j in running["jobs"]] == [ids[0]]
    active = client.get("/jobs", params={"status": "Running,Queued"}).json()
    assert active["total"] == 4
    page = client.get("/jobs", params={"limit": 2, "offset": 1}).json()
    assert [j["job_id"] for j in page["jobs"]] == ids[1:3] and page["total"] == 4
    legacy = client.get("/jobs", params={"include_finished": "false"}).json()
    assert legacy["total"] == 4
    client.get("/jobs/stop")
    assert client.get("/jobs", params={"include_completed": "False"}).json()["total"] == 0


def test_health_ready_metrics_and_docs(client: Any) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    job_id = submit(client, fake_job())
    wait_for(client, job_id)
    metrics = client.get("/metrics").text
    assert 'lm_eval_server_jobs{status="Completed"} 1.0' in metrics
    assert "lm_eval_server_dispatch_latency_seconds_count 1.0" in metrics
    assert 'lm_eval_server_http_requests_total{method="POST",route="/job",status="200"}' in metrics
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["JobRequest"]["properties"]
    for field in ("model", "tasks", "model_args", "log_samples", "env_vars", "lm_eval_path"):
        assert field in props
    assert client.get("/docs").status_code == 200


def test_memory_store_keeps_nothing_on_disk(make_client: Any, tmp_path: Any) -> None:
    client = make_client(store="memory")
    job_id = submit(client, fake_job())
    assert wait_for(client, job_id)["status"] == "Completed"
    assert client.get("/jobs").json()["total"] == 1
    assert not (tmp_path / "data" / "jobs.db").exists()
