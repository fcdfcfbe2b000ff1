"""The HTTP boundary against real server processes: Host checks (DNS rebinding), cross-site
requests, redirects, idempotency keys, slow clients, log followers, sample names, and stop or
delete racing the scheduler.

Real uvicorn processes throughout: TestClient fakes the Host header, which is the thing tested.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.jobs import DUMMY_JOB, fake_job, submit, wait_for
from tests.support.server import ServerProcess

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
EVIL = "rebind.attacker.example"


def authed(server: ServerProcess, key: str = ALICE, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}", **headers}
    )


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names `text` (a job's directory is on the supervisor's
    and the job's command lines)."""
    found = []
    needle = os.fsencode(text)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def job_count(http: httpx.Client) -> int:
    return int(http.get("/jobs").json()["total"])


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("guarded") / "data"
    server = ServerProcess(
        data_dir,
        index_dir,
        API_KEYS=f"{ALICE},{BOB}",
        ALLOWED_HOSTS="eval.example.com,*.corp.example",
        MAX_LOG_FOLLOWERS="2",
        LOG_FOLLOW_IDLE_S="2",
        BODY_READ_TIMEOUT_S="1",
    ).start()
    yield server
    server.stop_jobs_and_terminate()


@pytest.fixture
def running_job(guarded: ServerProcess) -> Iterator[int]:
    with authed(guarded) as http:
        job_id = submit(http, fake_job(FAKE_SLEEP_S="120"))
        wait_for(http, job_id, {"Running"})
        yield job_id
        http.post(f"/job/{job_id}/stop")


# ------------------------------------------------------------------ Host (DNS rebinding)

ROUTES = [
    ("GET", "/"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/static/app.js"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/jobs"),
    ("GET", "/jobs/"),
    ("GET", "/job/{id}"),
    ("GET", "/job/{id}/logs"),
    ("GET", "/job/{id}/results"),
    ("GET", "/job/{id}/samples?task=x"),
    ("GET", "/job/{id}/samples"),
    ("GET", "/compare?jobs={id},{id}"),
    ("GET", "/job/{id}/stop"),
    ("POST", "/job/{id}/stop"),
    ("GET", "/jobs/stop"),
    ("GET", "/jobs/dequeue"),
    ("DELETE", "/job/{id}"),
    ("DELETE", "/jobs"),
    ("POST", "/job"),
    ("GET", "/no/such/route"),
]


def test_a_foreign_host_is_refused_on_every_route(guarded: ServerProcess, running_job: int) -> None:
    port = guarded.port
    with authed(guarded) as http:
        before = job_count(http)
        for host in (
            EVIL,
            f"{EVIL}:{port}",
            "eval.example.com.attacker.example",
            "corp.example",  # *.corp.example names subdomains only
            f"localhost@{EVIL}",
            f"{EVIL}/localhost",
            "127.0.0.1.nip.io",  # a public name that resolves to loopback
            "127.0.0.1:0",
        ):
            for method, path in ROUTES:
                response = http.request(
                    method,
                    path.format(id=running_job),
                    headers={"Host": host},
                    json=DUMMY_JOB if method == "POST" else None,
                    follow_redirects=False,
                )
                assert response.status_code == 400, (host, method, path, response.text)
                assert "ALLOWED_HOSTS" in response.json()["detail"]
                assert "Location" not in response.headers
        # Evidence: nothing was queued, stopped or deleted.
        assert job_count(http) == before
        assert http.get(f"/job/{running_job}").json()["status"] == "Running"


def test_the_names_the_server_answers_to(guarded: ServerProcess) -> None:
    port = guarded.port
    with authed(guarded) as http:
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "LOCALHOST",
            f"[::1]:{port}",
            "eval.example.com",
            "eval.example.com:443",
            "a.corp.example",
            "deep.a.corp.example:8000",
        ):
            response = http.get("/jobs", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)


def test_the_bound_host_is_allowed_unless_it_means_every_interface(servers: Any) -> None:
    # HOST_HINT is how the CLI tells the app the address it binds (uvicorn's --host here is
    # 127.0.0.1, which tests can reach).
    named = servers(HOST_HINT="evalbox.internal")
    with httpx.Client(base_url=named.url, timeout=30) as http:
        assert http.get("/jobs", headers={"Host": "evalbox.internal:8000"}).status_code == 200
        assert http.get("/jobs", headers={"Host": "other.internal"}).status_code == 400
    named.terminate()
    wildcard = servers(HOST_HINT="0.0.0.0")
    with httpx.Client(base_url=wildcard.url, timeout=30) as http:
        assert http.get("/jobs", headers={"Host": "0.0.0.0:8000"}).status_code == 400
        assert http.get("/jobs", headers={"Host": "evalbox.internal"}).status_code == 400
        assert http.get("/jobs").status_code == 200  # 127.0.0.1
    assert "Set ALLOWED_HOSTS" in wildcard.log_path.read_text()


def test_allowed_hosts_is_validated_at_startup(tmp_path: Path, index_dir: Path) -> None:
    server = ServerProcess(tmp_path / "data", index_dir, ALLOWED_HOSTS="ok.example,bad host/x")
    with pytest.raises(RuntimeError, match="server exited"):
        server.start()
    assert "bad host/x" in server.log_path.read_text()


def test_redirects_never_carry_the_host(servers: Any) -> None:
    server = servers(ALLOWED_HOSTS="*")  # the Host check off: only the rewrite protects
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for host in (EVIL, f"{EVIL}:{server.port}", f"127.0.0.1:{server.port}"):
            for path in ("/jobs/", "/job/1/", "/jobs/stop/", "/health/", "//jobs/", "/docs/"):
                response = http.get(path, headers={"Host": host}, follow_redirects=False)
                location = response.headers.get("location")
                if location is None:
                    continue
                assert response.status_code in (301, 302, 307, 308)
                assert EVIL not in location and "127.0.0.1" not in location, location
                assert location.startswith("/") and not location.startswith(("//", "/\\"))
        # The rewrite keeps redirects working: /jobs/ lands on /jobs.
        redirect = http.get("/jobs/", follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["location"] == "/jobs"
        assert http.get("/jobs/", follow_redirects=True).json()["total"] == 0


# ------------------------------------------------------------------ cross-site requests

CROSS_SITE_MARKS = [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another origin on the same site, e.g. another port
    {"Origin": f"http://{EVIL}"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},  # same machine, another port: another origin
    {"Referer": f"http://{EVIL}/page.html"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
]


def marks(port: int) -> list[dict[str, str]]:
    return [{k: v.format(port=port) for k, v in m.items()} for m in CROSS_SITE_MARKS]


def test_cross_site_submissions_create_no_job(guarded: ServerProcess) -> None:
    with authed(guarded) as http:
        before = job_count(http)
        for headers in marks(guarded.port):
            response = http.post("/job", json=fake_job(), headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert "Cross-site request refused" in response.json()["detail"]
        assert job_count(http) == before


def test_cross_site_stop_and_delete_leave_the_job_running(
    guarded: ServerProcess, running_job: int
) -> None:
    with authed(guarded) as http:
        for headers in marks(guarded.port):
            for method, path in (
                ("GET", f"/job/{running_job}/stop"),
                ("GET", f"/job/{running_job}/dequeue"),
                ("GET", "/jobs/stop"),
                ("GET", "/jobs/dequeue/"),
                ("POST", f"/job/{running_job}/stop"),
                ("DELETE", f"/job/{running_job}"),
                ("DELETE", "/jobs"),
            ):
                response = http.request(method, path, headers=headers, follow_redirects=False)
                assert response.status_code == 403, (headers, method, path, response.text)
        assert http.get(f"/job/{running_job}").json()["status"] == "Running"
        # Reads stay open to any page (without CORS it cannot read the answer anyway).
        assert http.get("/jobs", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_same_origin_browsers_curl_and_typed_urls_still_work(guarded: ServerProcess) -> None:
    port = guarded.port
    with authed(guarded) as http:
        # The dashboard: a same-origin fetch with the Origin a browser sends on POST.
        dashboard = {"Sec-Fetch-Site": "same-origin", "Origin": f"http://127.0.0.1:{port}"}
        first = submit(http, fake_job(FAKE_SLEEP_S="60"), headers=dashboard)
        # Behind a name in ALLOWED_HOSTS, with the Origin of that name.
        proxied = {"Host": "eval.example.com", "Origin": "https://eval.example.com"}
        second = submit(http, fake_job(FAKE_SLEEP_S="60"), headers=proxied)
        # A stop URL typed into the address bar (the README's GET stop URLs).
        typed = http.get(f"/job/{first}/stop", headers={"Sec-Fetch-Site": "none"})
        assert typed.status_code == 200
        # curl: no browser headers at all.
        assert http.delete(f"/job/{second}").status_code == 200
        assert http.get(f"/job/{first}").json()["status"] == "Stopped"
        assert http.get(f"/job/{second}").status_code == 404


# ------------------------------------------------------------------ Idempotency-Key


def test_idempotency_key_is_bound_to_caller_and_body(servers: Any) -> None:
    env = {"API_KEYS": f"{ALICE},{BOB}"}
    server = servers(**env)
    body = fake_job(FAKE_SLEEP_S="30")
    # The same object, serialised differently: keys reordered, other whitespace.
    same_body = json.dumps(dict(reversed(list(body.items()))), indent=2)
    other_body = fake_job(FAKE_SLEEP_S="31")
    key = {"Idempotency-Key": "nightly-42"}
    with authed(server, ALICE) as alice, authed(server, BOB) as bob:
        first = submit(alice, body, headers=key)
        retry = alice.post(
            "/job", content=same_body, headers={**key, "Content-Type": "application/json"}
        )
        assert retry.status_code == 200 and retry.json()["job_id"] == first
        conflict = alice.post("/job", json=other_body, headers=key)
        assert conflict.status_code == 422
        detail = conflict.json()["detail"]
        assert "nightly-42" in detail and "different request body" in detail
        # Another caller's key of the same name is theirs alone.
        bobs = submit(bob, body, headers=key)
        assert bobs != first
        assert submit(bob, body, headers=key) == bobs
        assert job_count(alice) == 2
    server.terminate()
    server = servers(**env)  # the binding survives a restart
    with authed(server, ALICE) as alice, authed(server, BOB) as bob:
        assert submit(alice, body, headers=key) == first
        assert alice.post("/job", json=other_body, headers=key).status_code == 422
        assert submit(bob, body, headers=key) == bobs
        assert job_count(alice) == 2


def test_idempotency_key_without_api_keys_binds_the_body(servers: Any) -> None:
    server = servers()
    with server.client() as http:
        key = {"Idempotency-Key": "k"}
        first = submit(http, fake_job(), headers=key)
        assert submit(http, fake_job(), headers=key) == first
        assert http.post("/job", json=fake_job(FAKE_EXIT="1"), headers=key).status_code == 422
        assert job_count(http) == 1


# ------------------------------------------------------------------ slow clients, followers


def raw_request(port: int, head: str, chunks: list[bytes], pause_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server answered and closed while we trickled
            time.sleep(pause_s)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            data += part
        return data


def test_a_body_sent_too_slowly_gets_408_and_queues_nothing(guarded: ServerProcess) -> None:
    body = json.dumps(fake_job()).encode()
    head = (
        f"POST /job HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\n"
        f"Authorization: Bearer {ALICE}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with authed(guarded) as http:
        before = job_count(http)
        # Stalls after a few bytes; then one byte every 0.3 s: the limit is on the whole body.
        for chunks, pause_s in (([body[:5]], 3.0), ([bytes([b]) for b in body[:12]], 0.3)):
            started = time.monotonic()
            answer = raw_request(guarded.port, head, chunks, pause_s)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"BODY_READ_TIMEOUT_S" in answer
            assert time.monotonic() - started < 20
        assert job_count(http) == before
        # A whole body, sent at once, is unaffected.
        assert http.post("/job", json=fake_job()).status_code == 200


def follow(server: ServerProcess, job_id: int, out: list[bytes], opened: threading.Event) -> None:
    params = {"stream": "stderr", "follow": "true"}
    with authed(server) as http, http.stream("GET", f"/job/{job_id}/logs", params=params) as r:
        out.append(str(r.status_code).encode())
        opened.set()
        for chunk in r.iter_bytes():
            out.append(chunk)


def test_followers_are_capped_and_idle_streams_end(guarded: ServerProcess) -> None:
    with authed(guarded) as http:
        job_id = submit(http, fake_job(FAKE_SLEEP_S="60"))  # one line, then silence
        wait_for(http, job_id, {"Running"})
        streams: list[list[bytes]] = [[], []]
        threads = []
        for out in streams:
            opened = threading.Event()
            thread = threading.Thread(target=follow, args=(guarded, job_id, out, opened))
            thread.start()
            assert opened.wait(30)
            threads.append(thread)
        third = http.get(f"/job/{job_id}/logs", params={"follow": "true"})
        assert third.status_code == 429
        assert "MAX_LOG_FOLLOWERS" in third.json()["detail"]
        assert third.headers["Retry-After"]
        # Without follow, reading is never capped.
        assert http.get(f"/job/{job_id}/logs").status_code == 200
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "an idle follow stream did not end"
        for out in streams:
            text = b"".join(out[1:]).decode()
            assert out[0] == b"200"
            assert "LOG_FOLLOW_IDLE_S" in text.splitlines()[-1]
        # The job is still running: the streams ended, not the job, and their slots are free.
        assert http.get(f"/job/{job_id}").json()["status"] == "Running"
        opened = threading.Event()
        again: list[bytes] = []
        thread = threading.Thread(target=follow, args=(guarded, job_id, again, opened))
        thread.start()
        assert opened.wait(30) and again[0] == b"200"
        http.post(f"/job/{job_id}/stop")
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_a_follower_that_goes_away_frees_its_slot(guarded: ServerProcess) -> None:
    with authed(guarded) as http:
        job_id = submit(http, fake_job(FAKE_SLEEP_S="60"))
        wait_for(http, job_id, {"Running"})
        params = {"follow": "true"}
        for _ in range(6):  # three times the cap: each closed stream must give its slot back
            with (
                authed(guarded) as other,
                other.stream("GET", f"/job/{job_id}/logs", params=params) as response,
            ):
                assert response.status_code == 200
                next(response.iter_bytes())
            deadline = time.monotonic() + 10
            while True:  # the server notices the disconnect on its own
                probe = http.get(f"/job/{job_id}/logs", params={**params, "tail": 0})
                if probe.status_code == 200 or time.monotonic() > deadline:
                    break
        assert probe.status_code == 200
        http.post(f"/job/{job_id}/stop")


def test_a_follow_stream_ends_after_its_total_limit(servers: Any) -> None:
    server = servers(LOG_FOLLOW_MAX_S="1.5")
    with server.client() as http:
        job_id = submit(http, fake_job(FAKE_SLEEP_S="60"))
        wait_for(http, job_id, {"Running"})
        started = time.monotonic()
        text = http.get(f"/job/{job_id}/logs", params={"follow": "true"}).text
        assert time.monotonic() - started < 30
        assert "LOG_FOLLOW_MAX_S" in text.splitlines()[-1]
        assert http.get(f"/job/{job_id}").json()["status"] == "Running"


# ------------------------------------------------------------------ samples by name only


def test_samples_are_found_by_task_name_never_by_path(
    servers: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = servers()
    secret = tmp_path_factory.mktemp("outside") / "secret.jsonl"
    secret.write_text('{"secret": "do-not-serve"}\n')
    with server.client() as http:
        job_id = submit(http, {**DUMMY_JOB, "limit": 2, "log_samples": True})
        assert wait_for(http, job_id, timeout_s=240)["status"] == "Completed"
        results_dir = Path(http.get(f"/job/{job_id}/results").json()["results_file"]).parent
        ok = http.get(f"/job/{job_id}/samples", params={"task": "demo_mc"})
        assert ok.status_code == 200 and len(ok.text.splitlines()) == 2
        # Files an attacker would aim at: beside the results, one level up, and a symlink
        # planted in the results directory that leads out of it.
        date = next(results_dir.glob("results_*.json")).stem.removeprefix("results_")
        (results_dir.parent / f"samples_up_{date}.jsonl").write_text(secret.read_text())
        (results_dir / f"samples_link_{date}.jsonl").symlink_to(secret)
        for task in (
            "../x",
            "../up",
            "../../../../../../etc/passwd",
            str(secret),
            str(secret.with_suffix("")),
            "link",
            "demo_mc\0",
            "demo_mc/../demo_mc",
            "*",
            "demo_*",
            "demo_m?",
            "[d]emo_mc",
            "**/demo_mc",
            "..",
            "/",
        ):
            response = http.get(f"/job/{job_id}/samples", params={"task": task})
            assert 400 <= response.status_code < 500, (task, response.status_code)
            assert "do-not-serve" not in response.text
        missing = http.get(f"/job/{job_id}/samples", params={"task": "nope"})
        assert missing.status_code == 404 and "demo_mc" in missing.json()["detail"]


# ------------------------------------------------------------------ stop/delete vs scheduler


def test_stop_and_delete_racing_the_scheduler(servers: Any) -> None:
    server = servers(MAX_CONCURRENCY="2")
    rng = random.Random(12)
    answers: list[tuple[str, int, int, str]] = []
    lock = threading.Lock()

    def pair(http: httpx.Client, sleep_s: str, action: str, delay_s: float) -> int:
        job_id = submit(http, fake_job(FAKE_SLEEP_S=sleep_s))
        time.sleep(delay_s)
        if action == "stop":
            response = http.post(f"/job/{job_id}/stop")
        elif action == "get-stop":
            response = http.get(f"/job/{job_id}/stop")
        else:
            response = http.delete(f"/job/{job_id}")
        with lock:
            answers.append((action, job_id, response.status_code, response.text))
        return job_id

    actions = ["stop", "get-stop", "delete"]
    plan = [
        (rng.choice(["0", "0.05", "0.3", "30"]), rng.choice(actions), rng.choice([0, 0, 0.01]))
        for _ in range(90)
    ]
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(6)]
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(pair, clients[i % 6], *step) for i, step in enumerate(plan)]
            # stop-all in the middle of it all, as a dashboard user would.
            time.sleep(0.5)
            assert clients[0].post("/jobs/stop").status_code == 200
            job_ids = [f.result() for f in futures]
    finally:
        for client in clients:
            client.close()
    bad = [a for a in answers if a[2] != 200]
    assert bad == [], bad[:5]
    with server.client() as http:
        for action, job_id, _, _ in answers:
            response = http.get(f"/job/{job_id}")
            if action == "delete":
                assert response.status_code == 404, response.text
            else:
                assert response.json()["status"] in ("Stopped", "Completed"), response.text
        assert http.get("/jobs", params={"status": "Queued,Running"}).json()["total"] == 0
    assert len(job_ids) == len(plan)
    deadline = time.monotonic() + 10  # SIGKILLed processes take a moment to be reaped
    while processes_mentioning(str(server.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(server.data_dir)) == []
