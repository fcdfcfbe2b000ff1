"""What a finished job left behind, for the routes: its results, samples and logs.

Reading a results file (megabytes of JSON) or scanning a results directory happens in a worker
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from lm_eval_server import jobdir, results
from lm_eval_server.errors import FileNotAvailable, JobNotCompleted
from lm_eval_server.manager import JobManager
from lm_eval_server.models import JobRecord, JobStatus
from lm_eval_server.principals import Principal


class JobFiles:
    def __init__(self, manager: JobManager) -> None:
        self._manager = manager

    def log_path(self, job_id: int, stream: str, viewer: Principal | None) -> Path:
        record = self._manager.get(job_id, viewer)
        return Path(jobdir.log_path(record.work_dir, stream))

    async def results(self, job_id: int, viewer: Principal | None) -> tuple[dict[str, Any], Path]:
        """The results JSON as served: known secret values and credential-named keys masked
        (lm-eval copies model_args, api_key=... included, into its `config`)."""
        record = self._manager.get(job_id, viewer)
        path = self._results_file(record)
        redactor = self._manager.redactor
        try:
            data = await asyncio.to_thread(lambda: redactor.json(_read_json(path)))
        except FileNotFoundError:
            raise self._no_results(record) from None
        return data, path

    async def samples_path(self, job_id: int, task: str, viewer: Principal | None) -> Path:
        path = self._results_file(self._manager.get(job_id, viewer))
        files = await asyncio.to_thread(results.samples_files, path)
        found = files.get(task)
        if found is None:
            have = ", ".join(files) if files else "none (run the job with log_samples=true)"
            raise FileNotAvailable(
                f"Job {job_id} has no samples for task {task[:200]!r}; tasks with samples: {have}"
            )
        return found

    def _results_file(self, record: JobRecord) -> Path:
        if record.status is not JobStatus.completed:
            raise JobNotCompleted(
                f"Job {record.job_id} is {record.status.value}; results exist only for "
                "Completed jobs"
                + (" (see its error and logs)" if record.status is JobStatus.failed else "")
            )
        if not record.results_file:
            raise self._no_results(record)
        return Path(record.results_file)

    @staticmethod
    def _no_results(record: JobRecord) -> JobNotCompleted:
        return JobNotCompleted(
            f"Job {record.job_id} completed but lm-eval wrote no results file under "
            f"{record.output_path} (e.g. --predict_only, or the file was removed)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise FileNotFoundError(path)
    return data
