"""GET /jobs serves summaries serialised once per change of their job (views.summary_json)."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime

from lm_eval_server.api import views
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.outputs.progress import STARTING_PROGRESS
from lm_eval_server.team.redact import Redactor

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(job_id: int = 1, **changes: object) -> JobRecord:
    job = JobRecord(
        job_id=job_id,
        request={"model": "dummy", "tasks": "demo_mc"},
        argv=["lm_eval"],
        argument="lm_eval --model dummy --tasks demo_mc",
        env_vars={},
        work_dir="/nonexistent",
        output_path="/nonexistent/results",
        created_at=T0,
    )
    for name, value in changes.items():
        setattr(job, name, value)
    return job


def fresh(job: JobRecord, redactor: Redactor) -> dict[str, object]:
    return json.loads(views.summary(job, redactor).model_dump_json())


def test_a_queued_jobs_summary_is_serialised_once_until_it_changes() -> None:
    redactor = Redactor()
    job = record()
    first = views.summary_json(job, redactor)
    assert views.summary_json(job, redactor) is first  # served from the cache
    job.status = JobStatus.stopped
    job.finished_at = T0
    changed = views.summary_json(job, redactor)
    assert changed is not first
    assert json.loads(changed)["status"] == "Stopped" == fresh(job, redactor)["status"]


def test_every_field_assigned_drops_the_cache_whatever_its_name() -> None:
    """The rule is generic: fields added to JobRecord later invalidate it too."""
    redactor = Redactor()
    for spec in fields(JobRecord):
        if spec.name in ("summary_json", "summary_redaction"):
            continue
        job = record()
        views.summary_json(job, redactor)
        assert job.summary_json is not None
        setattr(job, spec.name, object())
        assert job.summary_json is None, spec.name


def test_assigning_the_same_object_keeps_the_cache() -> None:
    redactor = Redactor()
    job = record(progress=STARTING_PROGRESS)
    cached = views.summary_json(job, redactor)
    job.progress = job.progress  # the watcher's tick when nothing moved
    assert views.summary_json(job, redactor) is cached


def test_a_running_jobs_summary_follows_the_clock() -> None:
    redactor = Redactor()
    job = record(status=JobStatus.running, started_at=T0)
    views.summary_json(job, redactor)
    assert job.summary_json is None  # duration_s changes without any assignment


def test_the_list_is_the_fresh_serialisation_of_each_job() -> None:
    redactor = Redactor()
    jobs = [record(i) for i in range(1, 6)]
    jobs[1].status = JobStatus.running
    jobs[1].started_at = T0
    jobs[2].status = JobStatus.completed
    jobs[2].started_at = T0
    jobs[2].finished_at = T0
    views.job_list_json(jobs, 5, redactor)  # fills the cache
    jobs[0].error = "changed after caching"
    listed = json.loads(views.job_list_json(jobs, 5, redactor))
    assert listed["total"] == 5
    expected = [fresh(j, redactor) for j in jobs]
    # duration_s of the running job moves with the clock between the two serialisations.
    for entry in (listed["jobs"][1], expected[1]):
        entry.pop("duration_s")
    assert listed["jobs"] == expected
    assert listed["jobs"][0]["error"] == "changed after caching"


def test_a_secret_learned_later_masks_cached_summaries() -> None:
    redactor = Redactor()
    job = record(argument="lm_eval --model_args pretrained=sekrit-value-1234")
    assert b"sekrit-value-1234" in views.summary_json(job, redactor)
    redactor.add_secrets(["sekrit-value-1234"])
    redactor.prepare()
    assert b"sekrit-value-1234" not in views.job_list_json([job], 1, redactor)
