"""What a finished job left behind, for the routes: its results, samples and logs.

Reading a results file (megabytes of JSON) or scanning a results directory happens in a worker
thread, never on the event loop. The job wrote these files itself: each is reached from the
job's results root (its output directory, recorded at submission) without following a symlink,
only regular files are read, and a results file past `results.MAX_RESULTS_BYTES` is refused
(see results.py and joblogs.py).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lm_eval_server.errors import FileNotAvailable, JobNotCompleted
from lm_eval_server.jobs import attempts
from lm_eval_server.jobs.comparisons import ComparisonCache, compare_records
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.outputs import results, samples
from lm_eval_server.runtime import jobdir
from lm_eval_server.team.principals import Principal

# Indexes of samples files kept between page requests (each ~20 bytes per line).
SAMPLE_INDEXES_KEPT = 8
_IndexKey = tuple[str, int, int, int]  # path, inode, size, mtime: a rewritten file is new


class JobFiles:
    def __init__(self, manager: JobManager) -> None:
        self._manager = manager
        self._indexes: OrderedDict[_IndexKey, samples.SampleIndex] = OrderedDict()
        self._building: dict[_IndexKey, asyncio.Future[samples.SampleIndex]] = {}
        self._comparisons = ComparisonCache()

    def log_path(
        self, job_id: int, stream: str, viewer: Principal | None, attempt: int | None = None
    ) -> Path:
        """The log of the current attempt, or of an earlier one (kept in attempt-N/)."""
        record = self._manager.get(job_id, viewer)
        if attempt is None or attempt == record.attempt:
            return Path(jobdir.log_path(record.work_dir, stream))
        directory = None
        if attempt < record.attempt:
            directory = attempts.archived_dir(Path(record.work_dir), attempt)
        if directory is None:
            raise FileNotAvailable(
                f"job {job_id} has no logs of attempt {attempt}; it is at attempt "
                f"{record.attempt} (attempts 1 to {record.attempt} have logs)"
            )
        return Path(jobdir.log_path(directory, stream))

    async def results(self, job_id: int, viewer: Principal | None) -> tuple[dict[str, Any], Path]:
        """The results JSON as served: known secret values and credential-named keys masked
        (lm-eval copies model_args, api_key=... included, into its `config`)."""
        record = self._manager.get(job_id, viewer)
        path = self._results_file(record)
        root = _results_root(record)
        redactor = self._manager.redactor
        try:
            data = await asyncio.to_thread(lambda: redactor.json(results.read_results(path, root)))
        except jobdir.FileTooLarge:
            raise FileNotAvailable(
                f"Job {job_id}'s results file is larger than {results.MAX_RESULTS_BYTES} bytes; "
                "the server does not serve it"
            ) from None
        except (OSError, ValueError):  # gone, a symlink or FIFO in its place, not JSON
            raise self._no_results(record) from None
        return data, path

    async def samples_path(self, job_id: int, task: str, viewer: Principal | None) -> Path:
        record = self._manager.get(job_id, viewer)
        path = self._results_file(record)
        files = await asyncio.to_thread(results.samples_files, path, _results_root(record))
        found = files.get(task)
        if found is None:
            have = ", ".join(files) if files else "none (run the job with log_samples=true)"
            raise FileNotAvailable(
                f"Job {job_id} has no samples for task {task[:200]!r}; tasks with samples: {have}"
            )
        return found

    async def samples_tasks(self, job_id: int, viewer: Principal | None) -> list[str]:
        record = self._manager.get(job_id, viewer)
        path = self._results_file(record)
        return list(await asyncio.to_thread(results.samples_files, path, _results_root(record)))

    async def samples_page(
        self,
        job_id: int,
        task: str,
        viewer: Principal | None,
        *,
        offset: int,
        limit: int,
        incorrect: bool,
        filter_name: str | None,
    ) -> dict[str, Any]:
        """One page of a task's samples as the API shows them (see samples.py)."""
        path = await self.samples_path(job_id, task, viewer)
        # Known secret values masked, as in the raw file (rule 1 alone: a dataset's own fields
        # named like credentials, such as ARC's answerKey, stay readable).
        redact = self._manager.redactor.json_values_only
        try:
            index = await self._index(path)
            total, lines = index.page(filter_name, incorrect, offset, limit)
            page = await asyncio.to_thread(
                samples.read_page, path, index, lines, samples.MAX_PAGE_BYTES, redact
            )
        except jobdir.FileTooLarge as exc:
            raise FileNotAvailable(f"Job {job_id}'s samples for {task!r}: {exc}") from None
        except OSError:  # gone, or a symlink or FIFO in its place
            raise FileNotAvailable(
                f"Job {job_id} has no readable samples file for task {task[:200]!r}"
            ) from None
        end = offset + len(page)
        return {
            "job_id": job_id,
            "task": task,
            "filters": list(index.filters),
            "total": total,
            "offset": offset,
            "limit": limit,
            "next_offset": end if end < total else None,
            "samples": page,
        }

    async def compare(
        self, job_ids: list[int], viewer: Principal | None, alpha: float
    ) -> dict[str, Any]:
        """compare.compare over Completed jobs `viewer` may see, paired where they logged
        samples (see compare.py)."""
        records = [self._manager.get(job_id, viewer) for job_id in job_ids]
        for record in records:
            self._results_file(record)  # Completed, with a results file: else 409
        return await compare_records(records, self._manager.redactor, alpha, self._comparisons)

    async def _index(self, path: Path) -> samples.SampleIndex:
        stat = await asyncio.to_thread(os.lstat, path)
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if (found := self._indexes.get(key)) is not None:
            self._indexes.move_to_end(key)
            return found
        # Concurrent first views of one file share a single build, which a client that goes
        # away does not cancel (the task stays referenced in _building until it ends).
        building = self._building.get(key)
        if building is None:
            building = asyncio.ensure_future(self._build(key, path))
            self._building[key] = building
        return await asyncio.shield(building)

    async def _build(self, key: _IndexKey, path: Path) -> samples.SampleIndex:
        try:
            index = await asyncio.to_thread(samples.build_index, path)
        finally:
            self._building.pop(key, None)
        self._indexes[key] = index
        while len(self._indexes) > SAMPLE_INDEXES_KEPT:
            self._indexes.popitem(last=False)
        return index

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


def _results_root(record: JobRecord) -> Path:
    return results.results_root(Path(record.output_path))
