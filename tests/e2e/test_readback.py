"""What a job leaves in its directory is read back as data from that directory, never followed
elsewhere (issue 20, item 2).

A job writes its own directory and output_path. Here jobs, and the test standing in for a job
process that outlived its job, plant symlinks to `jobs.db` and to another job's results,
symlinked directories, FIFOs and oversized files where the server reads results, samples, logs
and the exit record; every route must answer promptly without serving what the links point to.
Real server (TestClient with its lifespan), real job processes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.outputs import results
from tests.support.jobs import DEFAULT_LM_EVAL, FAKE_LM_EVAL, ROOT, fake_job, submit, wait_for

PLANT = f"{sys.executable} {ROOT / 'tests' / 'data' / 'readback_attack' / 'plant.py'}"
SQLITE_MAGIC = "SQLite format 3"


def call(fn: Callable[[], Any], unblock: list[Path], timeout_s: float = 30.0) -> Any:
    """fn() in a thread; fails (after unblocking the FIFOs) if it does not return in time."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        for fifo in unblock:
            with open(fifo, "wb"):
                pass
        worker.join(10)
        pytest.fail(f"the server blocked on a FIFO: {unblock}")
    return out[0]


@pytest.fixture
def api(make_client: Callable[..., Any]) -> Any:
    return make_client(lm_eval_paths=[DEFAULT_LM_EVAL, FAKE_LM_EVAL, PLANT])


def victim(api: Any) -> tuple[dict[str, Any], str, Path]:
    """A completed job with results and samples that hold a secret; (job, secret, results)."""
    secret = "victim-marker-" + secrets.token_hex(8)
    body = fake_job(FAKE_RESULTS="1", FAKE_ECHO_ENV="FAKE_MARKER", FAKE_MARKER=secret)
    job = wait_for(api, submit(api, body))
    assert job["status"] == "Completed", job
    found = api.get(f"/job/{job['job_id']}/results").json()
    assert secret in str(found["results"])  # the owner sees it: the files are real
    return job, secret, Path(found["results_file"])


def db_path(api: Any) -> Path:
    return Path(api.app.state.server.settings.db_path)


def test_links_a_job_plants_are_not_followed_when_it_completes(api: Any) -> None:
    _, secret, victim_results = victim(api)
    jobs_db = db_path(api)
    assert jobs_db.read_bytes().startswith(SQLITE_MAGIC.encode())
    for target in (victim_results, jobs_db):
        body = fake_job(FAKE_PLANT_LINK_TO=str(target), FAKE_PLANT_LOGS="1")
        job_id = submit(api, {**body, "lm_eval_path": PLANT})
        job = wait_for(api, job_id)
        assert job["status"] == "Completed", job
        # Its planted results (a symlink to the file, a symlinked directory of real results)
        # are not its results.
        got = api.get(f"/job/{job_id}/results")
        assert got.status_code == 409, got.text
        assert secret not in got.text and SQLITE_MAGIC not in got.text
        assert api.get(f"/job/{job_id}/samples").status_code == 409
        # Its stdout.log is a symlink to the target now; its cut record one to /dev/zero.
        for stream in ("stdout", "stderr"):
            log = api.get(f"/job/{job_id}/logs", params={"stream": stream})
            assert log.status_code == 200
            assert secret not in log.text and SQLITE_MAGIC not in log.text
            assert "bytes of this log were dropped" not in log.text
        detail = api.get(f"/job/{job_id}")
        assert detail.status_code == 200
        assert secret not in detail.text and SQLITE_MAGIC not in detail.text


def completed_with_results(api: Any) -> tuple[int, Path, Path]:
    """A job of the attacker's that completed with real results: (id, results file, its dir)."""
    job = wait_for(api, submit(api, fake_job(FAKE_RESULTS="1")))
    assert job["status"] == "Completed", job
    path = Path(api.get(f"/job/{job['job_id']}/results").json()["results_file"])
    return job["job_id"], path, path.parent


def swap(path: Path, make: Callable[[Path], None]) -> None:
    """Replace `path` (a file or directory) by what `make` creates there, atomically."""
    aside = path.with_name(path.name + ".aside")
    os.replace(path, aside)
    make(path)


def test_files_swapped_after_completion_are_refused(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a process that outlived its job (possible without the OS sandbox) could do."""
    _, secret, victim_results = victim(api)
    victim_samples = next(victim_results.parent.glob("samples_*.jsonl"))
    jobs_db = db_path(api)

    job_id, results_file, model_dir = completed_with_results(api)
    samples_file = next(model_dir.glob("samples_*.jsonl"))
    assert api.get(f"/job/{job_id}/samples").json()["tasks"] == ["fake_task"]

    def refused(*needles: str) -> None:
        got = call(lambda: api.get(f"/job/{job_id}/results"), [])
        assert got.status_code in (404, 409), got.text
        for needle in needles:
            assert needle not in got.text

    # The results file, a symlink to jobs.db or to another job's results (valid JSON).
    for target in (jobs_db, victim_results):
        swap(results_file, lambda p, t=target: p.symlink_to(t))
        refused(secret, SQLITE_MAGIC)
        results_file.unlink()
        os.replace(results_file.with_name(results_file.name + ".aside"), results_file)
    assert api.get(f"/job/{job_id}/results").status_code == 200

    # Its directory, a symlink to a directory holding a file of the recorded name.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    shutil.copy(victim_results, decoy / results_file.name)
    shutil.copy(victim_samples, decoy / samples_file.name)
    swap(model_dir, lambda p: p.symlink_to(decoy, target_is_directory=True))
    refused(secret)
    assert api.get(f"/job/{job_id}/samples").json()["tasks"] == []
    got = api.get(f"/job/{job_id}/samples", params={"task": "fake_task", "format": "jsonl"})
    assert got.status_code == 404 and secret not in got.text
    model_dir.unlink()
    os.replace(model_dir.with_name(model_dir.name + ".aside"), model_dir)

    # A FIFO: the read does not wait for a writer.
    swap(results_file, lambda p: os.mkfifo(p))
    refused()
    results_file.unlink()
    os.replace(results_file.with_name(results_file.name + ".aside"), results_file)

    # The samples file, a symlink to another job's samples.
    swap(samples_file, lambda p: p.symlink_to(victim_samples))
    assert api.get(f"/job/{job_id}/samples").json()["tasks"] == []
    for params in ({"format": "jsonl"}, {"format": "json"}):
        got = api.get(f"/job/{job_id}/samples", params={"task": "fake_task", **params})
        assert got.status_code == 404 and secret not in got.text
    samples_file.unlink()
    os.replace(samples_file.with_name(samples_file.name + ".aside"), samples_file)

    # Bigger than the server reads.
    monkeypatch.setattr(results, "MAX_RESULTS_BYTES", 16)
    got = api.get(f"/job/{job_id}/results")
    assert got.status_code == 404 and "larger than 16 bytes" in got.json()["detail"]


def test_logs_swapped_for_links_and_fifos_are_empty(api: Any) -> None:
    _, secret, _ = victim(api)
    job = wait_for(api, submit(api, fake_job(FAKE_STDERR_BYTES="5000")))
    job_id = job["job_id"]
    work_dir = Path(api.app.state.server.settings.jobs_dir) / str(job_id)
    assert (work_dir / "stderr.log").stat().st_size == 5000
    victim_dir = Path(api.app.state.server.settings.jobs_dir) / str(job_id - 1)
    fifos: list[Path] = []
    swap(work_dir / "stdout.log", lambda p: p.symlink_to(db_path(api)))
    swap(work_dir / "stderr.log", lambda p: p.symlink_to(victim_dir / "stdout.log"))
    os.mkfifo(work_dir / "stderr.log.1")
    fifos.append(work_dir / "stderr.log.1")
    (work_dir / "stdout.log.cut").symlink_to("/dev/zero")
    os.mkfifo(work_dir / "stderr.log.cut")
    fifos.append(work_dir / "stderr.log.cut")
    for params in ({}, {"tail": 10}):
        for stream in ("stdout", "stderr"):
            got = call(
                lambda s=stream, p=params: api.get(
                    f"/job/{job_id}/logs", params={"stream": s, **p}
                ),
                fifos,
            )
            assert got.status_code == 200
            assert got.text == "", got.text[:200]
    detail = call(lambda: api.get(f"/job/{job_id}"), fifos)
    assert detail.status_code == 200
    assert SQLITE_MAGIC not in detail.text and secret not in detail.text
