"""Domain errors: what went wrong, in words a person can act on, and the HTTP status it means.

Raised anywhere below the routes; `app.py` maps every `DomainError` to `{"detail": message}` in
one handler, so no route translates errors itself.
"""

from __future__ import annotations

from typing import ClassVar

RETRY_AFTER_S = 5


class DomainError(Exception):
    status_code: ClassVar[int] = 400

    @property
    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(DomainError, ValueError):
    """The request cannot run as given; the message says why and what to change."""

    status_code = 422


class IdempotencyConflict(DomainError, ValueError):
    status_code = 422


class JobNotFound(DomainError, LookupError):
    status_code = 404

    def __init__(self, job_id: int) -> None:
        super().__init__(f"Job {job_id} not found.")
        self.job_id = job_id


class FileNotAvailable(DomainError, LookupError):
    """A job exists but the file asked for does not (samples of a task it did not log)."""

    status_code = 404


class JobNotCompleted(DomainError):
    status_code = 409


class JobNotResumable(DomainError):
    """POST /job/{id}/resume on a job that is queued, running or completed."""

    status_code = 409


class _RetryLater(DomainError):
    retry_after_s: ClassVar[int] = RETRY_AFTER_S

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFull(_RetryLater):
    status_code = 429


class QuotaExceeded(_RetryLater):
    """One principal's limit (MAX_QUEUED_PER_KEY) is reached; other principals are unaffected."""

    status_code = 429


class ShuttingDown(_RetryLater):
    status_code = 503
