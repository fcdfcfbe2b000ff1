"""Secrets by reference, end to end through real server processes: a job provably receives a
secret of SECRETS_DIR (it prints the value's SHA-256) while the value appears in no response,
not in jobs.db (nor its WAL), nor in any served log, result or sample; ALLOWED_SECRETS and
path-escaping names are refused alike; credential-named model_args are masked where shown while
the model server receives them (real lm_eval against the stub completions server)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import completions_server
from tests.support.jobs import TERMINAL, fake_job, stub_job, submit, wait_for
from tests.support.server import ServerProcess

ALICE, BOB, ROOT_KEY = "alice-key-0123456789", "bob-key-0123456789", "root-key-0123456789"
KEYS = {"API_KEYS": f"alice:{ALICE},bob:{BOB}", "ADMIN_KEYS": f"root:{ROOT_KEY}"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def connect() -> Iterator[Callable[[ServerProcess, str], httpx.Client]]:
    """HTTP clients for a server with a key, closed at the end."""
    clients: list[httpx.Client] = []

    def make(server: ServerProcess, key: str) -> httpx.Client:
        client = httpx.Client(base_url=server.url, timeout=60, headers=auth(key))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.get("/jobs/stop")
        client.close()


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    return directory


def put_secret(directory: Path, name: str) -> str:
    value = f"sk-live-{secrets.token_hex(16)}"
    (directory / name).write_text(value + "\n")  # as `echo value > file` writes it
    return value


def leaks(value: str, text: str | bytes) -> bool:
    data = text if isinstance(text, bytes) else text.encode()
    half = len(value) // 2
    # The value, or a recognisable half of it (a split the redaction missed).
    return any(part.encode() in data for part in (value, value[:half], value[half:]))


class Follower(threading.Thread):
    """Reads /logs?follow=true while the job runs."""

    def __init__(self, url: str, headers: dict[str, str], chunks: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.chunks = url, headers, chunks

    def run(self) -> None:
        with httpx.stream("GET", self.url, headers=self.headers, timeout=120) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                self.chunks.append(chunk)


def served_everywhere(client: httpx.Client, job_id: int, task: str) -> dict[str, bytes]:
    """Every response that can show something of the job."""
    out = {
        "job": client.get(f"/job/{job_id}").content,
        "jobs": client.get("/jobs").content,
        "results": client.get(f"/job/{job_id}/results").content,
        "samples": client.get(f"/job/{job_id}/samples", params={"task": task}).content,
        "samples-json": client.get(
            f"/job/{job_id}/samples", params={"task": task, "format": "json"}
        ).content,
        "dashboard": client.get("/").content,
        "metrics": client.get("/metrics").content,
    }
    for stream in ("stdout", "stderr"):
        out[f"logs-{stream}"] = client.get(f"/job/{job_id}/logs", params={"stream": stream}).content
        out[f"tail-{stream}"] = client.get(
            f"/job/{job_id}/logs", params={"stream": stream, "tail": 5}
        ).content
    return out


def store_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.glob("jobs.db*") if p.is_file())


def test_a_job_receives_a_secret_that_nothing_served_or_stored_shows(
    servers: Callable[..., ServerProcess], secrets_dir: Path, connect: Any
) -> None:
    value = put_secret(secrets_dir, "openai")
    server = servers(
        SECRETS_DIR=str(secrets_dir),
        ALLOWED_SECRETS="openai:alice",
        MAX_CONCURRENCY="1",
        **KEYS,
    )
    alice = connect(server, ALICE)
    body = fake_job(
        FAKE_HASH_ENV="OPENAI_API_KEY",
        FAKE_ECHO_ENV="OPENAI_API_KEY",
        FAKE_ECHO_PAUSE_S="1.5",
        FAKE_RESULTS="1",
    )
    body["env_vars"]["OPENAI_API_KEY"] = {"secret": "openai"}
    body["log_samples"] = True
    job_id = submit(alice, body)
    chunks: list[bytes] = []
    follower = Follower(
        f"{server.url}/job/{job_id}/logs?stream=stderr&follow=true", auth(ALICE), chunks
    )
    follower.start()
    job = wait_for(alice, job_id, timeout_s=120)
    follower.join(timeout=60)
    assert job["status"] == "Completed", job

    # The job received exactly the file's value (one trailing newline stripped).
    digest = hashlib.sha256(value.encode()).hexdigest()
    assert f"sha256(OPENAI_API_KEY)={digest}\n" in job["stdout"]
    # ... and printed it, which the server shows masked, whole or split across reads.
    assert "OPENAI_API_KEY=*** json=\"***\" repr='***'\n" in job["stdout"]
    followed = b"".join(chunks)
    assert b"split: *** end\n" in followed, followed
    logs = alice.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text
    assert "split: *** end\n" in logs
    results = alice.get(f"/job/{job_id}/results").json()
    assert results["results"]["results"]["fake_task"]["echo"] == "***"
    samples = alice.get(f"/job/{job_id}/samples", params={"task": "fake_task"})
    assert samples.status_code == 200
    assert json.loads(samples.text)["resps"] == [["answer ***"]]
    page = alice.get(f"/job/{job_id}/samples", params={"task": "fake_task", "format": "json"})
    assert page.json()["samples"][0]["raw_responses"] == [["answer ***"]]

    served = served_everywhere(alice, job_id, "fake_task")
    served["follow"] = followed
    admin = connect(server, ROOT_KEY)
    served["admin-job"] = admin.get(f"/job/{job_id}").content
    served["admin-jobs"] = admin.get("/jobs").content
    assert {name: leaks(value, data) for name, data in served.items()} == dict.fromkeys(
        served, False
    )
    # The store keeps the reference, never the value (the database and its WAL, as bytes).
    stored = store_bytes(server.data_dir)
    assert not leaks(value, stored)
    assert b'"OPENAI_API_KEY": {"secret": "openai"}' in stored
    # Not even the local executor's files hold it: no job-env.json, and the job's own
    # directory has only what the job itself wrote (its logs and results, 0700 directories).
    work_dir = server.data_dir / "jobs" / str(job_id)
    assert not (work_dir / "job-env.json").exists()

    # A later job of bob's (not allowed) and a missing secret answer alike, naming nothing.
    bob = connect(server, BOB)
    details = []
    for name in ("openai", "no-such-secret"):
        response = bob.post("/job", json={**fake_job(), "env_vars": {"HF_TOKEN": {"secret": name}}})
        assert response.status_code == 422, response.text
        details.append(response.json()["detail"].replace(name, "<name>"))
    assert details[0] == details[1]
    assert "does not exist or which 'bob' may not use (SECRETS_DIR, ALLOWED_SECRETS)" in details[0]
    assert not leaks(value, "".join(details))


def test_secret_names_are_confined_and_checked(
    servers: Callable[..., ServerProcess], secrets_dir: Path, tmp_path: Path, connect: Any
) -> None:
    outside = tmp_path / "outside-secret"
    outside.write_text("outside-value-0123456789")
    os.symlink(outside, secrets_dir / "escape")
    put_secret(secrets_dir, "hf")
    server = servers(SECRETS_DIR=str(secrets_dir), **KEYS)  # no ALLOWED_SECRETS: all may use all
    alice = connect(server, ALICE)

    def refused(env_vars: dict[str, Any]) -> str:
        response = alice.post("/job", json={**fake_job(), "env_vars": env_vars})
        assert response.status_code == 422, response.text
        detail = json.dumps(response.json()["detail"])
        assert "outside-value" not in detail
        return detail

    for name in ("../outside-secret", "/etc/passwd", "escape", "..", "a/b", ".hf", "-hf"):
        detail = refused({"HF_TOKEN": {"secret": name}})
        assert "HF_TOKEN" in detail and (
            "not a secret name" in detail or "does not exist" in detail
        )
    # The variable's name still goes through the env allowlist.
    assert "LD_PRELOAD is not allowed" in refused({"LD_PRELOAD": {"secret": "hf"}})
    detail = refused({"HF_TOKEN": {"secret": "hf", "extra": 1}})
    assert '"HF_TOKEN", "SecretRef", "extra"' in detail and "Extra inputs" in detail
    assert submit(alice, {**fake_job(), "env_vars": {"HF_TOKEN": {"secret": "hf"}}})


def test_a_secret_goes_only_where_it_means_a_credential(
    servers: Callable[..., ServerProcess], secrets_dir: Path, connect: Any
) -> None:
    """Issue 20's probe: a secret bound to LMEVAL_HASHMM (a variable lm-eval parses) came back
    in the job's error and logs lower-cased, past the redaction. Now a secret goes into a
    credential variable, or a name the operator lists for it (SECRET_ENV_VARS), or nowhere."""
    hf = put_secret(secrets_dir, "hf")
    wandb = put_secret(secrets_dir, "wandb")
    # FAKE_* is allowed by ALLOWED_ENV_VARS (tests/support/server.py), the stand-in for an
    # operator's own credential variable.
    server = servers(SECRETS_DIR=str(secrets_dir), SECRET_ENV_VARS="wandb:FAKE_WANDB_KEY", **KEYS)
    alice = connect(server, ALICE)

    def refused(body: dict[str, Any]) -> str:
        response = alice.post("/job", json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and not leaks(hf, detail) and not leaks(wandb, detail)
        return detail

    def with_env(**env_vars: Any) -> dict[str, Any]:
        return {**fake_job(), "env_vars": env_vars}

    for name in ("LMEVAL_HASHMM", "LMEVAL_LOG_LEVEL", "HF_HUB_OFFLINE", "FAKE_OTHER"):
        detail = refused(with_env(**{name: {"secret": "hf"}}))
        assert detail.startswith(f"env_vars: {name} cannot take secret 'hf'. A secret goes only"), (
            detail
        )
        assert "OPENAI_API_KEY, ANTHROPIC_API_KEY" in detail and "HF_TOKEN" in detail
        assert "SECRET_ENV_VARS=<secret>:<NAME>" in detail
    # The operator's name is for the secret it was listed with, and the message says so.
    detail = refused(with_env(FAKE_WANDB_KEY={"secret": "hf"}))
    assert "FAKE_WANDB_KEY cannot take secret 'hf'" in detail and "also into" not in detail
    detail = refused(with_env(FAKE_OTHER={"secret": "wandb"}))
    assert "secret 'wandb' also into FAKE_WANDB_KEY (SECRET_ENV_VARS)" in detail
    # Nowhere but env_vars: lm-eval's models read their keys from the environment.
    detail = refused({**fake_job(), "model_args": {"pretrained": "x", "api_key": {"secret": "hf"}}})
    assert detail.startswith('model_args.api_key: {"secret": ...} is a secret reference'), detail
    assert '"env_vars": {"OPENAI_API_KEY": {"secret": "<name>"}}' in detail
    header = {"header": {"Authorization": {"secret": "hf"}}}
    assert refused({**fake_job(), "model_args": header}).startswith(
        "model_args.header.Authorization: "
    )
    assert alice.get("/jobs").json()["total"] == 0

    # Where the rule allows it, the job receives the value; plain values are unchanged.
    allowed = with_env(
        FAKE_WANDB_KEY={"secret": "wandb"},
        HF_TOKEN={"secret": "hf"},
        LMEVAL_HASHMM="1",
        OPENAI_API_KEY="sk-plain-value-0123456789",
        FAKE_HASH_ENV="FAKE_WANDB_KEY",
    )
    job = wait_for(alice, submit(alice, allowed))
    assert job["status"] == "Completed", job
    digest = hashlib.sha256(wandb.encode()).hexdigest()
    assert f"sha256(FAKE_WANDB_KEY)={digest}\n" in job["stdout"]

    # A name a library parses cannot even be listed: the server does not start.
    with pytest.raises(RuntimeError) as failed:
        servers(SECRETS_DIR=str(secrets_dir), SECRET_ENV_VARS="hf:LMEVAL_HASHMM")
    assert "SECRET_ENV_VARS: LMEVAL_HASHMM" in str(failed.value)
    assert "a secret never goes there" in str(failed.value)


def test_a_secret_gone_before_launch_fails_the_job_without_running_it(
    servers: Callable[..., ServerProcess], secrets_dir: Path, connect: Any
) -> None:
    put_secret(secrets_dir, "temp")
    server = servers(SECRETS_DIR=str(secrets_dir), MAX_CONCURRENCY="1", **KEYS)
    alice = connect(server, ALICE)
    blocker = submit(alice, fake_job(FAKE_SLEEP_S="30"))
    wait_for(alice, blocker, {"Running"})
    job_id = submit(
        alice,
        {
            **fake_job(FAKE_HASH_ENV="HF_TOKEN"),
            "env_vars": {"HF_TOKEN": {"secret": "temp"}, "FAKE_HASH_ENV": "HF_TOKEN"},
        },
    )
    (secrets_dir / "temp").unlink()
    alice.post(f"/job/{blocker}/stop")
    job = wait_for(alice, job_id)
    assert job["status"] == "Failed"
    assert job["error"] == (
        "secret 'temp' is not in SECRETS_DIR; the job was not started (env_vars: HF_TOKEN "
        "refers to it). Restore the secret in SECRETS_DIR and submit the job again"
    )
    assert job["started_at"] is None and job["stdout"] == [] and job["exit_code"] is None


@contextmanager
def recording_stub() -> Iterator[tuple[completions_server.CompletionsStubServer, list[str]]]:
    """The stub completions server, recording the Authorization header of every request."""
    seen: list[str] = []
    original = completions_server._Handler.do_POST

    def do_post(handler: Any) -> None:
        seen.append(handler.headers.get("Authorization", ""))
        original(handler)

    completions_server._Handler.do_POST = do_post  # type: ignore[method-assign]
    try:
        with completions_server.running_stub_server() as stub:
            yield stub, seen
    finally:
        completions_server._Handler.do_POST = original  # type: ignore[method-assign]


def test_real_lm_eval_sends_the_secret_and_model_args_credentials_are_masked(
    servers: Callable[..., ServerProcess], secrets_dir: Path, connect: Any
) -> None:
    value = put_secret(secrets_dir, "openai")
    header_token = f"hdr-{secrets.token_hex(12)}"
    with recording_stub() as (stub, seen):
        server = servers(SECRETS_DIR=str(secrets_dir), **KEYS)
        alice = connect(server, ALICE)
        # local-completions sends OPENAI_API_KEY as `Authorization: Bearer <key>`.
        body = stub_job(stub.base_url, "arith_gen_tiny", limit=3, log_samples=True)
        body["env_vars"] = {"OPENAI_API_KEY": {"secret": "openai"}}
        first = submit(alice, body)
        # A credential in model_args itself: `header` replaces lm-eval's Authorization header,
        # `api_key` is taken and ignored by local-completions (lm-eval logs and stores both).
        args: dict[str, Any] = dict(kv.split("=", 1) for kv in body["model_args"].split(","))
        args |= {"api_key": "plain-api-key-0123456789", "header": {"Authorization": header_token}}
        second = submit(alice, {**body, "env_vars": {}, "model_args": args})
        jobs = [wait_for(alice, j, TERMINAL, timeout_s=300) for j in (first, second)]
    assert [j["status"] for j in jobs] == ["Completed", "Completed"], jobs
    # The model server received the real values: the secret from one job, the model_args
    # header from the other (the two jobs run at once, so their requests interleave).
    assert Counter(seen) == {f"Bearer {value}": 3, header_token: 3}, seen

    job = alice.get(f"/job/{second}").json()
    assert '"api_key": "***"' in job["argument"] and '"Authorization": "***"' in job["argument"]
    config = alice.get(f"/job/{second}/results").json()["results"]["config"]
    assert config["model_args"]["api_key"] == "***"
    assert config["model_args"]["header"] == {"Authorization": "***"}
    served = b""
    for job_id in (first, second):
        served += b"".join(served_everywhere(alice, job_id, "arith_gen_tiny").values())
    for needle in (value, "plain-api-key-0123456789", header_token):
        assert not leaks(needle, served), needle
    assert not leaks(value, store_bytes(server.data_dir))


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")
def test_the_dashboard_shows_the_secret_masked(
    servers: Callable[..., ServerProcess], secrets_dir: Path, connect: Any
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.test_dashboard import CHROMIUM_ARGS

    value = put_secret(secrets_dir, "openai")
    server = servers(SECRETS_DIR=str(secrets_dir), **KEYS)
    alice = connect(server, ALICE)
    body = fake_job(FAKE_ECHO_ENV="OPENAI_API_KEY", FAKE_RESULTS="1")
    body["env_vars"]["OPENAI_API_KEY"] = {"secret": "openai"}
    body["model_args"] = f"api_key={value},pretrained=x"  # the caller pasted it, too
    job_id = submit(alice, body)
    assert wait_for(alice, job_id)["status"] == "Completed"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.get_by_test_id("key-input").fill(ALICE)
            page.get_by_test_id("key-save").click()
            page.goto(f"{server.url}/#/job/{job_id}")
            expect(page.get_by_test_id("job-status")).to_have_text("Completed")
            expect(page.get_by_test_id("job-argument")).to_contain_text("api_key=***,pretrained=x")
            expect(page.get_by_test_id("log")).to_contain_text("split: *** end")
            page.get_by_test_id("log-tab-stdout").click()
            expect(page.get_by_test_id("log")).to_contain_text("OPENAI_API_KEY=*** json=")
            html = page.content()
        finally:
            browser.close()
    assert not leaks(value, html)
