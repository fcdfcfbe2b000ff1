"""Reproduction receipts and reproductions, the job side: record a receipt when a job ends
(and, for a reproduction, its diff against the original), serve them, and build a reproduce's
request from the stored one.

The manager calls `Receipts.job_finished` from `finish` (one call); the work reads the job's
files, so it runs in a worker thread, and the routes wait for it (`settled`) before they show a
receipt or a job's `reproduction`, so a client that sees a job end never finds them missing.
What the receipt says about the job's files comes from `outputs.receipts`; the diff from
`outputs.reproduction`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import logging
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lm_eval_server.admission import fingerprint
from lm_eval_server.errors import InvalidRequest
from lm_eval_server.jobs.launch import launcher_command
from lm_eval_server.jobs.models import JobRecord, JobStatus, utcnow
from lm_eval_server.outputs import receipts as receipt_files
from lm_eval_server.outputs import reproduction
from lm_eval_server.team.redact import Redactor

log = logging.getLogger(__name__)

# How long GET /job/{id} waits for a just-ended reproduction's diff (a large samples file can
# take longer; the job then shows `state: pending` until it is recorded).
DETAIL_WAIT_S = 20.0


@functools.cache
def server_version() -> str:
    """Read once: the distribution lookup scans sys.path (milliseconds on the event loop, per
    finished job), and the code running is the version found at the first call."""
    try:
        return importlib.metadata.version("lm-eval-server")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_fingerprint(record: JobRecord, model_args: Any, lm_eval_version: str | None) -> str:
    """The model fingerprint in a receipt: the response cache's key when the job used the
    cache (exactly the answers it could be served), else the same function over the owner,
    the model, its model_args and the lm-eval version the job ran with."""
    if record.cache_fingerprint is not None:
        return record.cache_fingerprint
    return fingerprint.model_fingerprint(
        record.owner, record.model or "", model_args, lm_eval_version or "unknown"
    )


def pending(of: int) -> dict[str, Any]:
    """A reproduction's `reproduction` until it ends."""
    return {**reproduction.unavailable(of, ""), "state": "pending", "note": None}


def reproduction_fields(of: int | None) -> dict[str, Any]:
    """A new JobRecord's reproduction fields: pending until it ends (none for other jobs)."""
    return {"reproduction_of": of, "reproduction": pending(of) if of is not None else None}


def lm_eval_path_of(argv: Sequence[str], allowed: Sequence[str]) -> str | None:
    """The request's lm_eval_path, recovered from the argv it ran: None for the bundled
    lm-eval (the launcher), else the longest allowed command the argv starts with. A program
    the server no longer allows is refused: a reproduction must run the same lm-eval, never
    quietly the default one."""
    prefix = launcher_command()
    if list(argv[: len(prefix)]) == prefix:
        return None
    matches = [p for p in allowed if (w := shlex.split(p)) and list(argv[: len(w)]) == w]
    if not matches:
        raise InvalidRequest(
            "this job ran an lm-eval command that the server's LM_EVAL_PATHS no longer lists "
            f"(the job's argv starts {shlex.join(argv[:3])}); a reproduction would run another "
            "lm-eval. Ask the operator to list it again, or submit the request anew"
        )
    return max(matches, key=lambda p: len(shlex.split(p)))


def reproduce_body(
    request: dict[str, Any], env_vars: dict[str, Any], lm_eval_path: str | None
) -> dict[str, Any]:
    """The stored request as a new POST /job body: the same options and env_vars (secret
    references stay references, read again at launch), the server's response cache bypassed."""
    body = dict(request)
    if env_vars:
        body["env_vars"] = env_vars
    if lm_eval_path is not None:
        body["lm_eval_path"] = lm_eval_path
    body["response_cache"] = False
    return body


class Receipts:
    def __init__(
        self,
        store: Any,
        redactor: Redactor,
        lookup: Callable[[int], JobRecord | None],
    ) -> None:
        """`store`: the job store (save_receipt, get_receipt, save_reproduction,
        launch_inputs); `lookup`: the manager's job by id (None once deleted)."""
        self._store = store
        self._redactor = redactor
        self._lookup = lookup
        self._work: dict[int, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ recording
    def job_finished(self, record: JobRecord) -> None:
        """Record the receipt (and a reproduction's diff) in the background."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test driving finish by hand): nothing to schedule on
        task = loop.create_task(self._record(record), name=f"receipt-{record.job_id}")
        self._work[record.job_id] = task
        task.add_done_callback(lambda _t, i=record.job_id: self._done(i, _t))

    def _done(self, job_id: int, task: asyncio.Task[None]) -> None:
        if self._work.get(job_id) is task:
            del self._work[job_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("job %d: receipt not recorded", job_id, exc_info=task.exception())

    async def _record(self, record: JobRecord) -> None:
        # Each part on its own: a receipt that cannot be recorded must not leave a
        # reproduction pending for ever, nor a failed diff cost the receipt.
        try:
            receipt = await asyncio.to_thread(self._build, record, self._base(record))
            await asyncio.to_thread(self._store.save_receipt, record.job_id, json.dumps(receipt))
        except Exception:
            log.exception("job %d: receipt not recorded", record.job_id)
        of = record.reproduction_of
        if of is None:
            return
        try:
            report = await asyncio.to_thread(self._diff, record)
        except Exception as exc:
            log.exception("job %d: reproduction diff failed", record.job_id)
            report = reproduction.unavailable(of, f"the diff failed ({type(exc).__name__})")
        record.reproduction = report
        await asyncio.to_thread(self._store.save_reproduction, record.job_id, report)

    def _base(self, record: JobRecord) -> dict[str, Any]:
        return {
            "job_id": record.job_id,
            "status": record.status.value,
            "server_version": server_version(),
            "recorded_at": utcnow().isoformat(),
            "argv": list(record.argv),
            "command": record.argument,
            "reproduction_of": record.reproduction_of,
            "model": {"name": record.model, "model_args": None, "fingerprint": None},
        }

    def _build(self, record: JobRecord, base: dict[str, Any]) -> dict[str, Any]:
        inputs = self._store.launch_inputs(record.job_id)
        request, env_vars = inputs if inputs is not None else ({}, {})
        receipt = receipt_files.build_receipt(
            work_dir=Path(record.work_dir),
            output_path=Path(record.output_path),
            results_file=Path(record.results_file) if record.results_file else None,
            base=base,
            # Names only: the values (and secret references) are never read into the receipt.
            request_env_names=list(env_vars),
        )
        receipt["model"]["model_args"] = request.get("model_args")
        receipt["model"]["fingerprint"] = model_fingerprint(
            record, request.get("model_args"), receipt["versions"]["lm_eval"]
        )
        # Masked when recorded, and again when served (a secret learned since then).
        return self._redactor.json(receipt)  # type: ignore[no-any-return]

    def _diff(self, record: JobRecord) -> dict[str, Any]:
        of = record.reproduction_of
        assert of is not None
        original = self._lookup(of)
        if original is None:
            return reproduction.unavailable(of, f"job {of} was deleted; nothing to compare")
        if record.status is not JobStatus.completed:
            return reproduction.unavailable(
                of, f"this reproduction ended {record.status.value}; nothing to compare"
            )
        report = reproduction.reproduction_report(
            of,
            _run_files(original),
            _run_files(record),
        )
        return self._redactor.json(report)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ reading
    async def settled(self, job_id: int, timeout_s: float | None = None) -> None:
        """Returns once the job's receipt (and diff) are recorded, if they are being recorded,
        or after `timeout_s` (a reproduction's `state` then still says pending)."""
        task = self._work.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)

    async def reproduction_ready(self, record: JobRecord, timeout_s: float) -> None:
        """For a reproduction that has just ended, wait (a bounded time) for its diff; other
        jobs do not wait for their receipt here."""
        if record.reproduction_of is not None:
            await self.settled(record.job_id, timeout_s)

    async def receipt(self, record: JobRecord) -> dict[str, Any] | None:
        await self.settled(record.job_id)
        text = await asyncio.to_thread(self._store.get_receipt, record.job_id)
        if text is None:
            return None
        return self._redactor.json(json.loads(text))  # type: ignore[no-any-return]

    async def reproduce_body(
        self, record: JobRecord, allowed_paths: Sequence[str]
    ) -> dict[str, Any] | None:
        """The body of a new job that repeats `record`'s request, or None when the store no
        longer has it."""
        inputs = await asyncio.to_thread(self._store.launch_inputs, record.job_id)
        if inputs is None:
            return None
        request, env_vars = inputs
        return reproduce_body(request, env_vars, lm_eval_path_of(record.argv, allowed_paths))

    async def drain(self) -> None:
        if self._work:
            await asyncio.gather(*self._work.values(), return_exceptions=True)


def _run_files(record: JobRecord) -> reproduction.RunFiles:
    results_file = Path(record.results_file) if record.results_file else None
    return reproduction.RunFiles(Path(record.output_path), results_file)
