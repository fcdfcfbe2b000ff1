"""A server shared by a team, through real server processes: two users, a bare key, a key from
API_KEYS_FILE and an admin. Another owner's job answers like a job that does not exist on every
per-job endpoint; lists and bulk actions stay within the caller's jobs; /audit records who did
what, for admins only, and survives a restart; the CLI works with a named key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.jobs import DUMMY_JOB, fake_job, submit, wait_for
from tests.support.server import ServerProcess

KEYS = {"alice": "KA-alice-key", "bob": "KB-bob-key", "default": "bare-key", "carol": "KC:file"}
ROOT_KEY = "KR-root-key"
MISSING = 987654  # an id no job has
SLEEPER = fake_job(FAKE_SLEEP_S="600")

# Every per-job endpoint: (method, path, query).
PER_JOB: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/job/{id}", {}),
    ("GET", "/job/{id}/logs", {}),
    ("GET", "/job/{id}/logs", {"stream": "stdout", "tail": "5"}),
    ("GET", "/job/{id}/logs", {"follow": "true"}),
    ("GET", "/job/{id}/results", {}),
    ("GET", "/job/{id}/samples", {"task": "demo_mc"}),
    ("GET", "/job/{id}/stop", {}),
    ("POST", "/job/{id}/stop", {}),
    ("GET", "/job/{id}/dequeue", {}),
    ("POST", "/job/{id}/dequeue", {}),
    ("DELETE", "/job/{id}", {}),
]


def team_server(servers: Callable[..., ServerProcess], tmp_path: Path, **env: str) -> ServerProcess:
    key_file = tmp_path / "team-keys"
    key_file.write_text(f"# keys handed out by the operator\n\ncarol:{KEYS['carol']}\n")
    return servers(
        API_KEYS=f"alice:{KEYS['alice']},bob:{KEYS['bob']},{KEYS['default']}",
        API_KEYS_FILE=str(key_file),
        ADMIN_KEYS=f"root:{ROOT_KEY}",
        **env,
    )


def as_(server: ServerProcess, name: str) -> httpx.Client:
    key = ROOT_KEY if name == "root" else KEYS[name]
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def listed(client: httpx.Client, **params: str) -> list[tuple[int, str]]:
    response = client.get("/jobs", params=params)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["total"] == len(data["jobs"])
    return [(job["job_id"], job["owner"]) for job in data["jobs"]]


def assert_like_missing(client: httpx.Client, job_id: int) -> None:
    """Every per-job endpoint answers for `job_id` exactly as for an id no job has."""
    for method, path, params in PER_JOB:
        hidden = client.request(method, path.format(id=job_id), params=params)
        missing = client.request(method, path.format(id=MISSING), params=params)
        where = f"{method} {path} {params}"
        assert hidden.status_code == missing.status_code == 404, (where, hidden.text)
        assert hidden.json() == {"detail": f"Job {job_id} not found."}, where
        assert missing.json() == {"detail": f"Job {MISSING} not found."}, where
        assert hidden.headers["content-type"] == missing.headers["content-type"], where
        assert sorted(hidden.headers.keys()) == sorted(missing.headers.keys()), where


def test_isolation_across_every_endpoint_bulk_actions_and_lists(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = team_server(servers, tmp_path)
    alice, bob, bare, carol, root = (
        as_(server, n) for n in ("alice", "bob", "default", "carol", "root")
    )
    done = submit(alice, {**DUMMY_JOB, "log_samples": True})  # a real lm_eval run
    running = submit(alice, SLEEPER)
    bobs = submit(bob, SLEEPER)
    bares = submit(bare, SLEEPER)
    assert wait_for(alice, done)["status"] == "Completed"
    for client, job_id in ((alice, running), (bob, bobs), (bare, bares)):
        wait_for(client, job_id, {"Running"})

    assert [c.get("/me").json() for c in (alice, bob, bare, carol, root)] == [
        {"name": "alice", "admin": False},
        {"name": "bob", "admin": False},
        {"name": "default", "admin": False},
        {"name": "carol", "admin": False},
        {"name": "root", "admin": True},
    ]

    # Alice's jobs exist and answer her...
    assert alice.get(f"/job/{done}").json()["owner"] == "alice"
    assert alice.get(f"/job/{done}/results").json()["results"]["results"]["demo_mc"]
    assert alice.get(f"/job/{done}/samples", params={"task": "demo_mc"}).status_code == 200
    assert "fake lm_eval started" in alice.get(f"/job/{running}/logs?stream=stdout").text
    # ...and to everyone else they do not exist, finished or running, on every endpoint.
    for other in (bob, bare, carol):
        for job_id in (done, running):
            assert_like_missing(other, job_id)
    assert_like_missing(alice, bobs)
    assert_like_missing(bob, bares)
    # None of those stops or deletes did anything.
    assert alice.get(f"/job/{running}").json()["status"] == "Running"
    assert alice.get(f"/job/{done}").json()["status"] == "Completed"
    assert bob.get(f"/job/{bobs}").json()["status"] == "Running"

    # Lists: one's own jobs; an admin's: everyone's, narrowed by ?owner=.
    assert listed(alice) == [(done, "alice"), (running, "alice")]
    assert listed(bob) == [(bobs, "bob")]
    assert listed(bare) == [(bares, "default")]
    assert listed(carol) == []
    assert listed(bob, owner="alice") == []  # a non-admin can only narrow their own list
    assert listed(alice, owner="alice", status="Running") == [(running, "alice")]
    assert listed(root) == [(done, "alice"), (running, "alice"), (bobs, "bob"), (bares, "default")]
    assert listed(root, owner="bob") == [(bobs, "bob")]
    assert listed(root, owner="nobody") == []
    bad_owner = root.get("/jobs", params={"owner": "no spaces allowed"})
    assert bad_owner.status_code == 422 and "owner" in bad_owner.text
    # An admin sees and reads any job.
    assert root.get(f"/job/{bobs}").json()["owner"] == "bob"
    assert root.get(f"/job/{done}/results").status_code == 200

    # Bulk actions act on the caller's own jobs only.
    stopped = alice.post("/jobs/stop").json()
    assert stopped["job_ids"] == [running]
    assert alice.get(f"/job/{running}").json()["status"] == "Stopped"
    assert bob.get(f"/job/{bobs}").json()["status"] == "Running"
    assert bare.get(f"/job/{bares}").json()["status"] == "Running"
    assert alice.get("/jobs/dequeue").json()["job_ids"] == []
    assert alice.delete("/jobs").json()["job_ids"] == [done, running]
    assert listed(alice) == []
    assert bob.get(f"/job/{bobs}").json()["status"] == "Running"
    assert listed(root) == [(bobs, "bob"), (bares, "default")]
    assert carol.delete("/jobs").json()["job_ids"] == []
    assert listed(root) == [(bobs, "bob"), (bares, "default")]

    # An admin acts on anyone's job, one at a time or all at once.
    assert root.post(f"/job/{bares}/stop").json()["message"] == f"Job {bares} stopped."
    assert bob.get(f"/job/{bobs}").json()["status"] == "Running"
    assert root.delete("/jobs").json()["job_ids"] == [bobs, bares]
    assert listed(root) == []

    # Only what happened is in the trail: the refused attempts above left no entry.
    entries = root.get("/audit", params={"limit": 1000}).json()
    actions = [(e["principal"], e["action"], e["job_ids"]) for e in entries["entries"]]
    assert actions == [
        ("root", "delete_all", [bobs, bares]),
        ("root", "stop", [bares]),
        ("carol", "delete_all", []),
        ("alice", "delete_all", [done, running]),
        ("alice", "stop_all", []),
        ("alice", "stop_all", [running]),
        ("default", "submit", [bares]),
        ("bob", "submit", [bobs]),
        ("alice", "submit", [running]),
        ("alice", "submit", [done]),
    ]
    assert entries["total"] == len(actions)
    assert [e["admin"] for e in entries["entries"]][:2] == [True, True]
    for client in (alice, bob, bare, carol, root):
        client.close()


def test_the_same_idempotency_key_from_two_principals_makes_two_jobs(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = team_server(servers, tmp_path)
    alice, bob, root = as_(server, "alice"), as_(server, "bob"), as_(server, "root")
    body, key = fake_job(), {"Idempotency-Key": "nightly-run-1"}
    alices = submit(alice, body, headers=key)
    bobs = submit(bob, body, headers=key)
    assert alices != bobs
    assert submit(alice, body, headers=key) == alices
    assert submit(bob, body, headers=key) == bobs
    assert alice.get(f"/job/{alices}").json()["owner"] == "alice"
    assert bob.get(f"/job/{bobs}").json()["owner"] == "bob"
    assert alice.get(f"/job/{bobs}").status_code == 404
    submits = root.get("/audit", params={"action": "submit"}).json()
    assert [(e["principal"], e["job_ids"], e["outcome"]) for e in submits["entries"]] == [
        ("bob", [bobs], "Idempotency-Key retry: no new job."),
        ("alice", [alices], "Idempotency-Key retry: no new job."),
        ("bob", [bobs], f"Job {bobs} successfully queued."),
        ("alice", [alices], f"Job {alices} successfully queued."),
    ]
    for client in (alice, bob, root):
        client.close()


def test_audit_is_for_admins_paginated_filtered_and_survives_a_restart(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = team_server(servers, tmp_path)
    alice, bob, root = as_(server, "alice"), as_(server, "bob"), as_(server, "root")
    first = submit(alice, fake_job())
    second = submit(bob, fake_job())
    wait_for(alice, first)
    wait_for(bob, second)
    assert alice.delete(f"/job/{first}").json()["message"] == f"Job {first} deleted."
    refused = bob.get("/audit")
    assert refused.status_code == 403
    assert refused.json()["detail"] == (
        "GET /audit is for admins; the key sent belongs to 'bob', who is not one. "
        "Use a key listed in ADMIN_KEYS."
    )
    assert httpx.get(f"{server.url}/audit").status_code == 401

    page = root.get("/audit", params={"limit": 2}).json()
    assert page["total"] == 3
    assert [(e["principal"], e["action"], e["job_ids"]) for e in page["entries"]] == [
        ("alice", "delete", [first]),
        ("bob", "submit", [second]),
    ]
    newest = page["entries"][0]
    assert newest["outcome"] == f"Job {first} deleted."
    assert newest["at"].endswith(("Z", "+00:00")) and newest["admin"] is False
    assert newest["job_count"] == 1 and newest["target"] is None
    rest = root.get("/audit", params={"limit": 2, "offset": 2}).json()
    assert [(e["principal"], e["action"]) for e in rest["entries"]] == [("alice", "submit")]
    assert root.get("/audit", params={"principal": "alice"}).json()["total"] == 2
    by_job = root.get("/audit", params={"job_id": first}).json()
    assert [e["action"] for e in by_job["entries"]] == ["delete", "submit"]
    for params, field in (
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"action": "DROP TABLE"}, "action"),
        ({"principal": "a b"}, "principal"),
    ):
        bad = root.get("/audit", params=params)
        assert bad.status_code == 422 and field in str(bad.json()["detail"]), params
    before = root.get("/audit").json()
    for client in (alice, bob, root):
        client.close()

    assert server.terminate()
    restarted = team_server(servers, tmp_path)
    with as_(restarted, "root") as root_again:
        assert root_again.get("/audit").json() == before


def test_open_server_caller_is_an_admin_named_default(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers()
    with server.client() as http:
        assert http.get("/me").json() == {"name": "default", "admin": True}
        job_id = submit(http, fake_job())
        wait_for(http, job_id)
        (entry,) = http.get("/audit").json()["entries"]
        assert (entry["principal"], entry["admin"], entry["action"]) == ("default", True, "submit")


def cli(server: ServerProcess, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LM_EVAL_SERVER_URL": server.url, "LM_EVAL_SERVER_TOKEN": key}
    return subprocess.run(
        [sys.executable, "-m", "lm_eval_server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_with_a_named_key(servers: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = team_server(servers, tmp_path)
    with as_(server, "bob") as bob:
        bobs = submit(bob, fake_job())
    fake: Any = fake_job()
    submitted = cli(
        server, KEYS["alice"], "submit", "--model", "dummy", "--tasks", "demo_mc",
        "--include_path", fake["include_path"], "--lm_eval_path", fake["lm_eval_path"], "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout.splitlines()[0])
    assert f"Job {job_id} Completed" in submitted.stdout

    listing = cli(server, KEYS["alice"], "jobs").stdout.splitlines()
    assert listing[0].split() == [
        "ID", "STATUS", "PROGRESS", "MODEL", "TASKS", "STARTED", "DURATION", "OWNER",
    ]  # fmt: skip
    assert [line.split()[0] for line in listing[1:]] == [str(job_id)]
    assert listing[1].split()[-1] == "alice"
    status = cli(server, KEYS["alice"], "status", str(job_id)).stdout
    assert "Completed (exit code 0)" in status and "owner:     alice" in status
    hidden = cli(server, KEYS["alice"], "status", str(bobs))
    assert hidden.returncode == 1 and f"HTTP 404: Job {bobs} not found." in hidden.stderr
    assert cli(server, KEYS["alice"], "whoami").stdout == "alice\n"
    assert cli(server, ROOT_KEY, "whoami").stdout == "root (admin)\n"
    admin_view = cli(server, ROOT_KEY, "jobs", "--owner", "bob", "--json").stdout
    assert [j["job_id"] for j in __import__("json").loads(admin_view)["jobs"]] == [bobs]


def test_every_per_job_route_answers_for_another_owners_job_as_for_none(
    make_client: Callable[..., Any],
) -> None:
    """The rule, over whatever routes the app has: a route with {job_id} in its path answers
    another owner's job exactly as it answers an id that no job has (same status, same body but
    for the id), so a per-job route added later is held to it too."""
    client = make_client(api_keys=["alice:KA", "bob:KB"], admin_keys=["root:KR"])
    alice, bob = {"Authorization": "Bearer KA"}, {"Authorization": "Bearer KB"}
    client.headers["Authorization"] = "Bearer KR"  # the fixture's clean-up stops every job
    finished = submit(client, fake_job(), headers=alice)
    running = submit(client, SLEEPER, headers=alice)
    wait_for(client, finished)
    wait_for(client, running, {"Running"})

    checked = 0
    # The OpenAPI document lists every API route with its parameters.
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if "{job_id}" not in path:
            continue
        for method, operation in operations.items():
            params = operation.get("parameters", [])
            query = {
                p["name"]: "1" if p["schema"].get("type") in ("integer", "number") else "demo_mc"
                for p in params
                if p["in"] == "query" and p.get("required")
            }
            for job_id in (finished, running):
                answers = []
                for target in (job_id, MISSING):
                    url = re.sub(r"\{\w+\}", "x", path.replace("{job_id}", str(target)))
                    response = client.request(method, url, params=query, headers=bob)
                    text = re.sub(rf"\b{target}\b", "ID", response.text)
                    answers.append((response.status_code, response.headers["content-type"], text))
                assert answers[0] == answers[1], (method, path)
                assert answers[0][0] == 404, (method, path, answers[0])
                checked += 1
    # detail, delete, logs, results, samples, stop and dequeue by GET and POST; both jobs
    assert checked >= 2 * 9
    assert client.get(f"/job/{running}", headers=alice).json()["status"] == "Running"
    assert client.get(f"/job/{finished}", headers=alice).json()["status"] == "Completed"
