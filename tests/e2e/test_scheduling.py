"""Quotas, the fair queue and GPU slots end to end: real server processes, real job processes
(tests/support/fake_lm_eval.py, held running with FAKE_WAIT_FILE until the test lets them go,
and printing the CUDA_VISIBLE_DEVICES it was given), everything through the HTTP API."""

from __future__ import annotations

import ast
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.jobs import fake_job, submit, wait_for
from tests.support.server import ServerProcess

KEYS = "alice:alice-key-0123456789,bob:bob-key-0123456789"
DEVICE_VARS = "CUDA_VISIBLE_DEVICES,CUDA_DEVICE_ORDER"


def as_user(server: ServerProcess, name: str) -> httpx.Client:
    client = server.client()
    client.headers["Authorization"] = f"Bearer {name}-key-0123456789"
    return client


def held(release: Path, num_gpus: int | None = None, **env: str) -> dict[str, Any]:
    """A job that runs until `release` exists, printing its device variables."""
    body = fake_job(FAKE_WAIT_FILE=str(release), FAKE_PRINT_ENV=DEVICE_VARS, **env)
    if num_gpus is not None:
        body["resources"] = {"num_gpus": num_gpus}
    return body


def quick(num_gpus: int | None = None) -> dict[str, Any]:
    body = fake_job(FAKE_PRINT_ENV=DEVICE_VARS)
    if num_gpus is not None:
        body["resources"] = {"num_gpus": num_gpus}
    return body


def printed_devices(client: httpx.Client, job_id: int, timeout_s: float = 60) -> str | None:
    """The CUDA_VISIBLE_DEVICES the job's process printed (repr'd; None when unset)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stdout = client.get(f"/job/{job_id}").json()["stdout"]
        for line in stdout:
            if line.startswith("env CUDA_VISIBLE_DEVICES="):
                value: str | None = ast.literal_eval(line.split("=", 1)[1])  # repr'd by the fake
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} printed no devices: {stdout}")
        time.sleep(0.1)


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------- the fair queue


def test_with_one_slot_bobs_job_runs_second_not_eleventh(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers(MAX_CONCURRENCY="1", API_KEYS=KEYS, SHUTDOWN_STOPS_JOBS="true")
    release = server.signals / "release-first"
    with as_user(server, "alice") as alice, as_user(server, "bob") as bob:
        first = submit(alice, fake_job(FAKE_WAIT_FILE=str(release)))
        wait_for(alice, first, {"Running"})
        alice_ids = [first, *(submit(alice, fake_job()) for _ in range(9))]
        bob_id = submit(bob, fake_job())
        queued = alice.get("/jobs", params={"status": "Queued"}).json()["jobs"]
        assert [j["job_id"] for j in queued] == alice_ids[1:]
        assert bob.get(f"/job/{bob_id}").json()["status"] == "Queued"
        release.touch()
        for job_id in alice_ids:
            assert wait_for(alice, job_id)["status"] == "Completed"
        assert wait_for(bob, bob_id)["status"] == "Completed"
        # The order every job started in (one slot: each after the previous finished).
        everyone = sorted(
            [alice.get(f"/job/{i}").json() for i in alice_ids] + [bob.get(f"/job/{bob_id}").json()],
            key=lambda j: j["started_at"],
        )
        assert [(j["job_id"], j["owner"]) for j in everyone] == [
            (first, "alice"),
            (bob_id, "bob"),
            *((i, "alice") for i in alice_ids[1:]),
        ]
        for before, after in itertools.pairwise(everyone):
            assert after["started_at"] >= before["finished_at"]


# ---------------------------------------------------------------- quotas


def test_quotas_per_key_refuse_and_hold_one_owner_only(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers(
        MAX_CONCURRENCY="2",
        MAX_QUEUED_PER_KEY="2",
        MAX_RUNNING_PER_KEY="1",
        API_KEYS=KEYS,
        SHUTDOWN_STOPS_JOBS="true",
    )
    release_a, release_b = server.signals / "release-a", server.signals / "release-b"
    with as_user(server, "alice") as alice, as_user(server, "bob") as bob:
        a1 = submit(alice, fake_job(FAKE_WAIT_FILE=str(release_a)))
        wait_for(alice, a1, {"Running"})
        retry_body = fake_job(FAKE_EXIT="0")
        a2 = submit(alice, retry_body, headers={"Idempotency-Key": "a2"})
        a3 = submit(alice, fake_job())
        # MAX_QUEUED_PER_KEY: alice's third queued job is refused, with Retry-After.
        refused = alice.post("/job", json=fake_job())
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) > 0
        detail = refused.json()["detail"]
        assert "MAX_QUEUED_PER_KEY=2" in detail and "alice already has 2 queued" in detail
        # The retry of a job already queued is that job, not a new one.
        again = alice.post("/job", json=retry_body, headers={"Idempotency-Key": "a2"})
        assert (again.status_code, again.json()["job_id"]) == (200, a2)
        # Bob is not affected: his job takes the free slot at once, while alice's
        # (MAX_RUNNING_PER_KEY=1) stay queued although that slot was free.
        b1 = submit(bob, fake_job(FAKE_WAIT_FILE=str(release_b)))
        assert wait_for(bob, b1, {"Running"})["status"] == "Running"
        assert [alice.get(f"/job/{i}").json()["status"] for i in (a1, a2, a3)] == [
            "Running",
            "Queued",
            "Queued",
        ]
        b2 = submit(bob, fake_job())
        b3 = submit(bob, fake_job())
        assert bob.post("/job", json=fake_job()).status_code == 429
        release_a.touch()
        for job_id in (a1, a2, a3):
            assert wait_for(alice, job_id)["status"] == "Completed"
        jobs = [alice.get(f"/job/{i}").json() for i in (a1, a2, a3)]
        # alice never ran two at once, though a slot was free all along.
        for before, after in itertools.pairwise(jobs):
            assert after["started_at"] >= before["finished_at"]
        assert [bob.get(f"/job/{i}").json()["status"] for i in (b1, b2, b3)] == [
            "Running",
            "Queued",
            "Queued",
        ]
        # Her queue emptied: she may submit again.
        assert alice.post("/job", json=fake_job()).status_code == 200
        release_b.touch()
        for job_id in (b1, b2, b3):
            assert wait_for(bob, job_id)["status"] == "Completed"


# ---------------------------------------------------------------- GPU slots


def test_gpu_slots_give_each_job_exactly_its_devices(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers(
        GPUS="0,1",
        MAX_CONCURRENCY="4",
        SHUTDOWN_STOPS_JOBS="true",
        ALLOWED_ENV_VARS="FAKE_*,CUDA_VISIBLE_DEVICES",
    )
    f1, f2, f3 = (server.signals / f"release-{i}" for i in (1, 2, 3))
    with server.client() as client:
        j1 = submit(client, held(f1, 1))
        j2 = submit(client, held(f2, 1))
        running = [wait_for(client, i, {"Running"}) for i in (j1, j2)]
        # Side by side, on different devices, each seeing exactly its own.
        assert sorted(j["gpus"] for j in running) == [["0"], ["1"]]
        for job in running:
            assert printed_devices(client, job["job_id"]) == ",".join(job["gpus"])
        first_device = running[0]["gpus"]
        j3 = submit(client, held(f3, 1))
        j4 = submit(client, quick(2))
        # Needs no GPU: runs while the GPU jobs wait, and sees no device at all.
        j5 = submit(client, quick(0))
        j6 = submit(client, quick())
        for job_id in (j5, j6):
            done = wait_for(client, job_id)
            assert (done["status"], done["gpus"]) == ("Completed", [])
            assert printed_devices(client, job_id) == ""
        assert [client.get(f"/job/{i}").json()["status"] for i in (j3, j4)] == ["Queued"] * 2
        assert client.get(f"/job/{j3}").json()["gpus"] is None
        assert (
            metric(client, "lm_eval_server_gpus"),
            metric(client, "lm_eval_server_gpus_in_use"),
        ) == (
            2.0,
            2.0,
        )

        f1.touch()
        assert wait_for(client, j1)["status"] == "Completed"
        third = wait_for(client, j3, {"Running"})
        assert third["gpus"] == first_device  # the device j1 freed
        assert printed_devices(client, j3) == ",".join(first_device)
        f2.touch()
        assert wait_for(client, j2)["status"] == "Completed"
        # One device is free, the 2-GPU job needs both: it waits for j3.
        assert client.get(f"/job/{j4}").json()["status"] == "Queued"
        assert metric(client, "lm_eval_server_gpus_in_use") == 1.0
        f3.touch()
        both = wait_for(client, j4)
        assert (both["status"], both["gpus"]) == ("Completed", ["0", "1"])
        assert printed_devices(client, j4) == "0,1"
        assert both["started_at"] >= client.get(f"/job/{j3}").json()["finished_at"]
        assert metric(client, "lm_eval_server_gpus_in_use") == 0.0

        # What cannot hold is refused at submission, naming what to change.
        for resources, words in (
            ({"num_gpus": 3}, ["num_gpus", "GPUS=0,1", "at most 2"]),
            ({"num_gpus": 1.5}, ["num_gpus", "whole number"]),
        ):
            response = client.post("/job", json={**quick(), "resources": resources})
            assert response.status_code == 422, response.text
            assert all(w in response.json()["detail"] for w in words), response.text
        body = {**quick(1), "env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}}
        response = client.post("/job", json=body)
        assert response.status_code == 422
        assert "CUDA_VISIBLE_DEVICES is set by the server" in response.json()["detail"]
        assert client.get("/jobs").json()["total"] == 6


def test_a_job_keeps_its_device_across_a_server_crash(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    env = {"GPUS": "0,1", "MAX_CONCURRENCY": "4", "SHUTDOWN_STOPS_JOBS": "true"}
    first = servers(**env)
    release, release2 = first.signals / "release", first.signals / "release2"
    with first.client() as client:
        kept = submit(client, held(release, 1))
        assert wait_for(client, kept, {"Running"})["gpus"] == ["0"]
    first.kill()  # SIGKILL: the job runs on, holding device 0
    second = servers(**env)
    with second.client() as client:
        job = client.get(f"/job/{kept}").json()
        assert (job["status"], job["gpus"]) == ("Running", ["0"])
        other = submit(client, held(release2, 1))
        assert wait_for(client, other, {"Running"})["gpus"] == ["1"]
        waiting = submit(client, quick(1))
        time.sleep(0.5)
        assert client.get(f"/job/{waiting}").json()["status"] == "Queued"
        release.touch()
        assert wait_for(client, kept)["status"] == "Completed"
        assert wait_for(client, waiting)["gpus"] == ["0"]
        assert printed_devices(client, waiting) == "0"
        release2.touch()
        assert wait_for(client, other)["status"] == "Completed"
