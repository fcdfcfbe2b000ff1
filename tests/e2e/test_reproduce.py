"""Reproduction receipts and reproduce, end to end: a real server process, real lm_eval jobs
against the stub completions server (whose answers are known: tests/support/
completions_server.py), a secret from SECRETS_DIR, two owners, and Chromium on the job page.

SCREENSHOTS_DIR=imgs uv run pytest tests/e2e/test_reproduce.py regenerates imgs/reproduce.png.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import test_dashboard as dashboard
from tests.e2e.test_dashboard import API_KEY, CHROMIUM
from tests.support.completions_server import is_answered_correctly, running_stub_server
from tests.support.jobs import stub_job, submit, wait_for
from tests.support.server import ServerProcess

ALICE = API_KEY  # the dashboard fixtures log in with this key
BOB = "bob-key-0123456789abcdef"
LIMIT = 40
PLAIN_TOKEN = "hf_plainCredentialValue0123456789"
browser = dashboard.browser
page = dashboard.page


def leaks(value: str, data: bytes) -> bool:
    half = len(value) // 2
    return any(part.encode() in data for part in (value, value[:half], value[half:]))


@pytest.fixture(scope="module")
def secret_value(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("reproduce-secrets")
    directory.chmod(0o700)
    value = f"sk-live-{secrets.token_hex(16)}"
    (directory / "openai").write_text(value + "\n")
    return directory, value


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, index_dir: Path, secret_value: tuple[Path, str]
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("reproduce-server") / "data"
    server = ServerProcess(
        data_dir,
        index_dir,
        API_KEYS=f"alice:{ALICE},bob:{BOB}",
        SECRETS_DIR=str(secret_value[0]),
        ALLOWED_SECRETS="openai:alice",
        MAX_CONCURRENCY="2",
    ).start()
    yield server
    server.stop_jobs_and_terminate()


def client(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def completed(http: httpx.Client, job_id: int) -> dict[str, Any]:
    job = wait_for(http, job_id, timeout_s=240)
    assert job["status"] == "Completed", job["error"]
    return job


@pytest.fixture(scope="module")
def runs(server: ServerProcess) -> Iterator[dict[str, Any]]:
    """An original job (with a secret reference), a reproduction of it against the same stub,
    and one after the stub changed its answers; plus, meanwhile, a job held running and a job
    queued behind it (MAX_CONCURRENCY=2)."""
    with (
        client(server, ALICE) as alice,
        running_stub_server(correct_per_cycle=27) as stub,
        running_stub_server() as held,
    ):
        body = stub_job(stub.base_url, "arith_gen", log_samples=True, limit=LIMIT)
        # A secret by reference, and a credential given by value: neither value may show.
        body["env_vars"] = {"OPENAI_API_KEY": {"secret": "openai"}, "HF_TOKEN": PLAIN_TOKEN}
        original = submit(alice, body)
        completed(alice, original)

        held.gate.clear()  # every request waits: the job stays Running
        running = submit(alice, stub_job(held.base_url, "arith_gen_tiny"))
        wait_for(alice, running, {"Running"})
        same = alice.post(f"/job/{original}/reproduce")
        assert same.status_code == 200, same.text
        same_id = same.json()["job_id"]
        queued = submit(alice, stub_job(held.base_url, "arith_gen_tiny"))
        busy = {
            "running": alice.post(f"/job/{running}/reproduce"),
            "queued": alice.post(f"/job/{queued}/reproduce"),
            "queued_receipt": alice.get(f"/job/{queued}/receipt"),
            "queued_status": alice.get(f"/job/{queued}").json()["status"],
        }
        completed(alice, same_id)
        alice.post(f"/job/{running}/stop")
        alice.post(f"/job/{queued}/stop")
        held.gate.set()

        stub.correct_per_cycle = 35  # the "model" now answers more questions right
        changed = alice.post(f"/job/{original}/reproduce").json()["job_id"]
        completed(alice, changed)
        yield {
            "original": original,
            "same": same_id,
            "changed": changed,
            "running": running,
            "busy": busy,
        }


def test_the_receipt_records_what_the_job_ran_with_and_no_secret(
    server: ServerProcess, runs: dict[str, Any], secret_value: tuple[Path, str]
) -> None:
    job_id = runs["original"]
    with client(server, ALICE) as alice:
        response = alice.get(f"/job/{job_id}/receipt")
        assert response.status_code == 200, response.text
        receipt = response.json()
        job = alice.get(f"/job/{job_id}").json()
        results = alice.get(f"/job/{job_id}/results").json()["results"]
        samples = [
            json.loads(line)
            for line in alice.get(
                f"/job/{job_id}/samples", params={"task": "arith_gen"}
            ).text.splitlines()
        ]
    assert not leaks(secret_value[1], response.content)
    assert not leaks(PLAIN_TOKEN, response.content)

    assert receipt["job_id"] == job_id and receipt["status"] == "Completed"
    assert receipt["server_version"] == importlib.metadata.version("lm-eval-server")
    argv = receipt["argv"]
    assert argv[argv.index("--tasks") + 1] == "arith_gen"
    assert argv[argv.index("--limit") + 1] == str(LIMIT)
    assert "--log_samples" in argv and argv[argv.index("--model") + 1] == "local-completions"
    assert receipt["command"] == job["argument"]
    # The job's own environment, names only: its secret is named, its HOME is there.
    assert receipt["env_names_source"] == "job"
    assert {"OPENAI_API_KEY", "HF_TOKEN", "HOME", "HF_DATASETS_OFFLINE"} <= set(
        receipt["env_names"]
    )
    assert receipt["env_names"] == sorted(receipt["env_names"])
    # The job ran with this test's venv: the same versions as its metadata says.
    expected = {}
    for name in ("lm_eval", "torch", "transformers", "datasets"):
        try:
            expected[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected[name] = None
    assert {k: receipt["versions"][k] for k in expected} == expected
    assert receipt["versions_source"] == "job"
    assert receipt["versions"]["lm_eval"] == results["lm_eval_version"]

    task = receipt["tasks"]["arith_gen"]
    assert task["task_hash"] == results["task_hashes"]["arith_gen"]
    assert task["version"] == results["versions"]["arith_gen"]
    assert task["documents"] == LIMIT
    digest = hashlib.sha256("\n".join(sorted({s["doc_hash"] for s in samples})).encode())
    assert task["doc_hash_digest"] == digest.hexdigest()
    config = results["config"]
    assert receipt["seeds"] == {
        "random_seed": config["random_seed"],
        "numpy_seed": config["numpy_seed"],
        "torch_seed": config["torch_seed"],
        "fewshot_seed": config["fewshot_seed"],
    }
    assert receipt["model"]["name"] == "local-completions"
    assert "base_url=" in receipt["model"]["model_args"]
    # The response cache's key for this job's answers (docs/resume-and-cache.md).
    assert re.fullmatch(r"[0-9a-f]{64}", receipt["model"]["fingerprint"])
    assert receipt["reproduction_of"] is None

    # The stored receipt holds no value of the secret either (the database, as bytes).
    stored = b"".join(p.read_bytes() for p in server.data_dir.glob("jobs.db*") if p.is_file())
    assert b'"OPENAI_API_KEY"' in stored
    assert not leaks(secret_value[1], stored)
    with sqlite3.connect(f"file:{server.data_dir / 'jobs.db'}?mode=ro", uri=True) as db:
        [(column,)] = db.execute("SELECT receipt FROM jobs WHERE job_id=?", (job_id,))
    assert json.loads(column)["job_id"] == job_id
    assert not leaks(secret_value[1], column.encode()) and not leaks(PLAIN_TOKEN, column.encode())


def test_a_reproduction_of_a_deterministic_job_is_identical(
    server: ServerProcess, runs: dict[str, Any]
) -> None:
    with client(server, ALICE) as alice:
        job = alice.get(f"/job/{runs['same']}").json()
        receipt = alice.get(f"/job/{runs['same']}/receipt").json()
    rep = job["reproduction"]
    assert rep["of"] == runs["original"] and rep["state"] == "done"
    assert (rep["identical"], rep["differing"]) == (LIMIT, 0)
    assert (rep["only_original"], rep["only_reproduction"]) == (0, 0)
    assert rep["examples"] == []
    [delta] = rep["metric_deltas"]
    right = sum(is_answered_correctly(q, 27) for q in range(LIMIT)) / LIMIT
    assert delta == {
        "task": "arith_gen",
        "metric": "exact_match",
        "filter": "none",
        "original": right,
        "reproduction": right,
        "delta": 0.0,
        "samples_differing": 0,
    }
    assert receipt["reproduction_of"] == runs["original"]
    # The same request ran: the same argv but for the job's own output directory.
    with client(server, ALICE) as alice:
        first = alice.get(f"/job/{runs['original']}/receipt").json()
    assert _without_output(receipt["argv"]) == _without_output(first["argv"])
    # The reproduction ran without the response cache, yet names the same model.
    assert receipt["model"]["fingerprint"] == first["model"]["fingerprint"]


def _without_output(argv: list[str]) -> list[str]:
    i = argv.index("--output_path")
    return argv[:i] + argv[i + 2 :]


def test_a_reproduction_with_other_answers_reports_each_difference(
    server: ServerProcess, runs: dict[str, Any]
) -> None:
    with client(server, ALICE) as alice:
        rep = alice.get(f"/job/{runs['changed']}").json()["reproduction"]
    flipped = [
        q for q in range(LIMIT) if is_answered_correctly(q, 27) != is_answered_correctly(q, 35)
    ]
    assert flipped  # the stub's two settings differ on these documents
    assert (rep["identical"], rep["differing"]) == (LIMIT - len(flipped), len(flipped))
    assert len(rep["examples"]) == min(5, len(flipped))
    for example in rep["examples"]:
        assert example["doc_id"] in flipped and example["task"] == "arith_gen"
        # Wrong before (sum + 1), right now.
        before, after = example["original"]["responses"][0], example["reproduction"]["responses"][0]
        assert int(before) == int(after) + 1
        assert example["original"]["metrics"] == {"exact_match": 0.0}
        assert example["reproduction"]["metrics"] == {"exact_match": 1.0}
    [delta] = rep["metric_deltas"]
    assert delta["samples_differing"] == len(flipped)
    assert delta["delta"] == pytest.approx(len(flipped) / LIMIT, abs=1e-12)


def test_reproduce_refuses_unfinished_and_other_owners_jobs(
    server: ServerProcess, runs: dict[str, Any]
) -> None:
    busy = runs["busy"]
    assert busy["running"].status_code == 409, busy["running"].text
    assert "Running" in busy["running"].json()["detail"]
    assert busy["queued_status"] == "Queued"
    assert busy["queued"].status_code == 409 and "Queued" in busy["queued"].json()["detail"]
    assert busy["queued_receipt"].status_code == 409
    with client(server, BOB) as bob:
        for path in (f"/job/{runs['original']}/receipt", f"/job/{runs['original']}/reproduce"):
            method = bob.post if path.endswith("reproduce") else bob.get
            response = method(path)
            assert response.status_code == 404, response.text
            assert response.json()["detail"] == f"Job {runs['original']} not found."
        assert bob.post("/job/999999/reproduce").status_code == 404
        # response_cache is a strict boolean (false: bypass the server's response cache).
        refused = bob.post("/job", json={"model": "dummy", "tasks": "x", "response_cache": "no"})
        assert refused.status_code == 422 and "response_cache" in refused.text
        # bob's refused attempt queued nothing.
        assert bob.get("/jobs").json()["total"] == 0
    # A stopped job has a receipt too (every finished job).
    with client(server, ALICE) as alice:
        stopped = alice.get(f"/job/{runs['running']}/receipt").json()
    assert stopped["status"] == "Stopped" and stopped["tasks"] == {}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_the_job_page_shows_the_reproduction_diff(
    page: Any, server: ServerProcess, runs: dict[str, Any], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    changed = runs["changed"]
    page.goto(f"{server.url}/#/job/{changed}")
    section = page.get_by_test_id("reproduction-section")
    expect(section).to_be_visible()
    expect(page.get_by_test_id("reproduction-of")).to_have_text(f"job {runs['original']}")
    expect(page.get_by_test_id("reproduction-verdict")).to_have_text("differs")
    flipped = sum(
        is_answered_correctly(q, 27) != is_answered_correctly(q, 35) for q in range(LIMIT)
    )
    expect(page.get_by_test_id("reproduction-counts")).to_have_text(
        f"{LIMIT - flipped} identical · {flipped} differing"
    )
    expect(page.get_by_test_id("reproduction-example")).to_have_count(min(5, flipped))
    expect(page.get_by_test_id("reproduction-delta")).to_have_count(1)
    expect(page.get_by_test_id("reproduction-bar").locator("rect")).to_have_count(3)
    out = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    section.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "reproduce.png"))

    # The identical one says so; the original offers Reproduce and has no diff.
    page.goto(f"{server.url}/#/job/{runs['same']}")
    expect(page.get_by_test_id("reproduction-verdict")).to_have_text("identical")
    page.goto(f"{server.url}/#/job/{runs['original']}")
    expect(page.get_by_test_id("reproduce-button")).to_be_visible()
    expect(page.get_by_test_id("reproduction-section")).to_be_hidden()
    page.get_by_test_id("reproduce-button").click()
    # The new job's page: a reproduction of the original, pending until it ends.
    expect(page.get_by_test_id("reproduction-of")).to_have_text(f"job {runs['original']}")
    expect(page).to_have_url(re.compile(r"#/job/(\d+)$"))
    assert int(page.url.rsplit("/", 1)[1]) > changed


def test_a_warm_job_records_its_own_versions_too(make_client: Any) -> None:
    """A job forked from a warm worker runs the launcher as well: its receipt has the job's
    own facts, not a fallback."""
    import time

    from lm_eval_server.runtime.executors import warm_protocol
    from tests.support.jobs import DUMMY_JOB

    client = make_client(warm_workers=1)
    deadline = time.monotonic() + 300
    while client.get("/ready").json()["warm_workers"]["ready"] < 1:
        assert time.monotonic() < deadline, "no warm worker ready"
        time.sleep(0.1)
    job_id = submit(client, {**DUMMY_JOB, "limit": 2})
    assert wait_for(client, job_id, timeout_s=240)["status"] == "Completed"
    stderr = client.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text
    assert warm_protocol.MARKER_PREFIX + warm_protocol.FORKED_MARKER in stderr
    receipt = client.get(f"/job/{job_id}/receipt").json()
    assert receipt["versions_source"] == "job" and receipt["env_names_source"] == "job"
    assert receipt["versions"]["lm_eval"] == importlib.metadata.version("lm_eval")
    assert "HOME" in receipt["env_names"]
