"""The job side of receipts (jobs/receipts.py, the store's receipt columns): recording at the
end of a job, masking, a reproduction's diff, and a reproduce's request."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.admission import fingerprint
from lm_eval_server.errors import InvalidRequest
from lm_eval_server.jobs import receipts
from lm_eval_server.jobs.launch import launcher_command
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.jobs.store import SCHEMA_VERSION, MemoryJobStore, SqliteJobStore
from lm_eval_server.runtime import jobdir, launcher
from lm_eval_server.team.redact import Redactor

SECRET = "sk-live-0123456789abcdef0123"


def record(job_id: int, work: Path, **kw: Any) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        request={"model": "local-completions", "tasks": "t", "model_args": f"api_key={SECRET}"},
        argv=[*launcher_command(), "--model_args", f"api_key={SECRET}", "--tasks", "t"],
        argument="lm_eval --model_args api_key=*** --tasks t",
        env_vars={"OPENAI_API_KEY": {"secret": "openai"}, "HF_TOKEN": "hf_plain_value_123456"},
        work_dir=str(work),
        output_path=str(work / "results"),
        **kw,
    )


def test_reproduce_body_is_the_stored_request_without_the_cache() -> None:
    body = receipts.reproduce_body(
        {"model": "dummy", "tasks": ["t"], "timeout_s": 10.0},
        {"OPENAI_API_KEY": {"secret": "openai"}},
        None,
    )
    assert body == {
        "model": "dummy",
        "tasks": ["t"],
        "timeout_s": 10.0,
        "env_vars": {"OPENAI_API_KEY": {"secret": "openai"}},
        "response_cache": False,
    }
    assert "env_vars" not in receipts.reproduce_body({"model": "dummy"}, {}, None)


def test_the_lm_eval_path_is_recovered_from_the_argv() -> None:
    assert receipts.lm_eval_path_of([*launcher_command(), "--tasks", "t"], ["x"]) is None
    allowed = [f"{sys.executable} -m lm_eval", f"{sys.executable} -m lm_eval run"]
    argv = [*shlex.split(allowed[1]), "--tasks", "t"]
    assert receipts.lm_eval_path_of(argv, allowed) == allowed[1]
    # A program the server no longer allows: refused, never replaced by the default lm-eval.
    with pytest.raises(InvalidRequest, match="no longer lists"):
        receipts.lm_eval_path_of(["/other/lm_eval", "--tasks"], allowed)


def test_the_store_keeps_receipts_and_reproductions(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = SqliteJobStore(db)
    first = record(store.next_id(), tmp_path)
    store.insert(first)
    second = record(store.next_id(), tmp_path, **receipts.reproduction_fields(first.job_id))
    store.insert(second)
    store.save_receipt(first.job_id, '{"job_id": 1}')
    store.save_reproduction(second.job_id, {"of": 1, "state": "done"})
    assert store.launch_inputs(first.job_id) == (first.request, first.env_vars)
    store.close()
    again = SqliteJobStore(db)
    loaded = {r.job_id: r for r in again.load_all()}
    assert loaded[second.job_id].reproduction_of == first.job_id
    assert loaded[second.job_id].reproduction == {"of": 1, "state": "done"}
    assert loaded[first.job_id].reproduction is None
    assert again.get_receipt(first.job_id) == '{"job_id": 1}'
    assert again.get_receipt(second.job_id) is None
    again.delete([first.job_id])
    assert again.get_receipt(first.job_id) is None and again.launch_inputs(first.job_id) is None
    again.close()


def test_a_version_7_database_gains_the_receipt_columns(tmp_path: Path) -> None:
    import sqlite3

    from lm_eval_server.jobs.store import MIGRATIONS

    db = tmp_path / "jobs.db"
    conn = sqlite3.connect(db)
    for version, migration in enumerate(MIGRATIONS[:7], start=1):
        conn.executescript(migration)
        conn.execute(f"PRAGMA user_version={version}")
    conn.commit()
    conn.close()
    store = SqliteJobStore(db)
    assert len(MIGRATIONS) == SCHEMA_VERSION
    store.insert(record(1, tmp_path))
    store.save_receipt(1, "{}")
    assert store.get_receipt(1) == "{}"
    store.close()


def test_the_memory_store_keeps_them_until_the_job_goes(tmp_path: Path) -> None:
    store = MemoryJobStore()
    r = record(1, tmp_path)
    store.insert(r)
    r.release_launch_inputs()  # the record's copy goes; the store's stays
    assert store.launch_inputs(1) == (
        {"model": "local-completions", "tasks": "t", "model_args": f"api_key={SECRET}"},
        {"OPENAI_API_KEY": {"secret": "openai"}, "HF_TOKEN": "hf_plain_value_123456"},
    )
    store.save_receipt(1, "{}")
    store.save_receipt(2, "{}")  # no such job
    assert store.get_receipt(1) == "{}" and store.get_receipt(2) is None
    store.delete([1])
    assert store.get_receipt(1) is None and store.launch_inputs(1) is None


def write_results(work: Path, answers: list[str]) -> Path:
    out = work / "results" / "stub"
    out.mkdir(parents=True)
    date = "2026-01-01T00-00-00.1"
    results_file = out / f"results_{date}.json"
    results_file.write_text(
        json.dumps(
            {
                "results": {"t": {"acc,none": 1.0}},
                "config": {"model_args": f"api_key={SECRET}", "random_seed": 0},
                "task_hashes": {"t": "th"},
            }
        )
    )
    lines = [
        {"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "filtered_resps": [a]}
        for i, a in enumerate(answers)
    ]
    (out / f"samples_t_{date}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return results_file


def test_receipts_are_recorded_masked_and_a_reproduction_is_diffed(tmp_path: Path) -> None:
    store = MemoryJobStore()
    redactor = Redactor()
    redactor.add_secrets([SECRET])
    jobs: dict[int, JobRecord] = {}
    recorder = receipts.Receipts(store, redactor, jobs.get)
    a_dir, b_dir = tmp_path / "1", tmp_path / "2"
    a = record(1, a_dir, status=JobStatus.completed)
    a.results_file = str(write_results(a_dir, ["x", "y", "z"]))
    b = record(2, b_dir, status=JobStatus.completed, **receipts.reproduction_fields(1))
    b.results_file = str(write_results(b_dir, ["x", "Y", "z"]))
    for r in (a, b):
        jobs[r.job_id] = r
        store.insert(r)
    assert b.reproduction is not None and b.reproduction["state"] == "pending"

    async def run() -> tuple[Any, Any]:
        recorder.job_finished(a)
        recorder.job_finished(b)
        await recorder.settled(2)
        return await recorder.receipt(a), await recorder.receipt(b)

    first, second = asyncio.run(run())
    text = json.dumps([first, second, b.reproduction])
    assert SECRET not in text and "hf_plain_value_123456" not in text
    assert first["argv"][-4:] == ["--model_args", "api_key=***", "--tasks", "t"]
    assert first["model"]["model_args"] == "api_key=***"
    assert first["env_names"] == ["HF_TOKEN", "OPENAI_API_KEY"]  # names only, from the request
    assert first["tasks"]["t"]["task_hash"] == "th" and first["seeds"]["random_seed"] == 0
    # No cache file for these records: the fingerprint is computed as the cache's would be,
    # and the api_key in model_args (a credential) is not part of it.
    assert first["model"]["fingerprint"] == fingerprint.model_fingerprint(
        a.owner, a.model or "", "", first["versions"]["lm_eval"] or "unknown"
    )
    assert second["reproduction_of"] == 1
    assert b.reproduction["state"] == "done"
    assert (b.reproduction["identical"], b.reproduction["differing"]) == (2, 1)
    assert b.reproduction["examples"][0]["doc_id"] == 1


def test_a_reproduction_whose_original_is_gone_says_so(tmp_path: Path) -> None:
    store = MemoryJobStore()
    b = record(2, tmp_path, status=JobStatus.failed, **receipts.reproduction_fields(1))
    store.insert(b)
    recorder = receipts.Receipts(store, Redactor(), {}.get)

    async def run() -> None:
        recorder.job_finished(b)
        await recorder.drain()

    asyncio.run(run())
    assert b.reproduction is not None and b.reproduction["state"] == "unavailable"
    assert b.reproduction["note"] == "job 1 was deleted; nothing to compare"


def test_the_launcher_writes_facts_only_in_a_job_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/somewhere/else")
    launcher.write_job_facts()
    assert not (tmp_path / jobdir.JOB_FACTS).exists()
    monkeypatch.setenv("HOME", str(tmp_path / jobdir.HOME))
    monkeypatch.setenv("SOME_SECRET_VALUE_NAME", "value-never-written")
    launcher.write_job_facts()
    facts = json.loads((tmp_path / jobdir.JOB_FACTS).read_text())
    assert "SOME_SECRET_VALUE_NAME" in facts["env_names"]
    assert "value-never-written" not in (tmp_path / jobdir.JOB_FACTS).read_text()
    assert facts["env_names"] == sorted(os.environ)
    assert set(facts["versions"]) == {"python", *launcher.RECEIPT_PACKAGES}
    import importlib.metadata

    assert facts["versions"]["lm_eval"] == importlib.metadata.version("lm_eval")


def test_a_failing_receipt_still_settles_a_reproduction(tmp_path: Path) -> None:
    class BrokenStore(MemoryJobStore):
        def launch_inputs(self, job_id: int) -> Any:
            raise OSError("disk gone")

    store = BrokenStore()
    a = record(1, tmp_path / "1", status=JobStatus.completed)
    b = record(2, tmp_path / "2", status=JobStatus.completed, **receipts.reproduction_fields(1))
    jobs = {1: a, 2: b}
    for r in (a, b):
        store.insert(r)
    recorder = receipts.Receipts(store, Redactor(), jobs.get)

    async def run() -> Any:
        recorder.job_finished(b)
        return await recorder.receipt(b)

    assert asyncio.run(run()) is None  # no receipt: GET /receipt answers 404
    assert b.reproduction is not None and b.reproduction["state"] == "unavailable"
    assert "has no results file" in b.reproduction["note"]
