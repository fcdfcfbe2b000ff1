"""WebhookSender: delivers each ended job's webhook, retrying with backoff, from a persisted
record of the delivery.

The delivery row is written while the job's end is being recorded (the manager's `on_finish`),
before any request can see the job as ended; a job whose end was recorded but whose row was not
(the server stopped in between) is found at startup. Pending rows resume at startup, so a
restart loses no delivery; an attempt cut short by a restart is made again (at least once:
receivers deduplicate on the delivery id).

A fixed number of workers (WEBHOOK_CONCURRENCY) take due deliveries from one heap: however
many deliveries wait, and however slowly receivers answer, the server holds that many requests
and no more, and nothing here blocks the event loop or the job state machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import IO, Any

import httpx

from lm_eval_server.config import Settings
from lm_eval_server.jobs.models import (
    DeliveryState,
    JobRecord,
    JobStatus,
    WebhookDelivery,
    WebhookInfo,
    utcnow,
)
from lm_eval_server.jobs.store import DeliveryStore
from lm_eval_server.runtime import jobdir
from lm_eval_server.team.redact import Redactor
from lm_eval_server.webhooks import rules as webhooks

log = logging.getLogger(__name__)


def _read_metrics(
    results: IO[bytes] | None, redactor: Redactor | None
) -> list[dict[str, Any]] | None:
    if results is None:
        return None
    with results:
        data = results.read(webhooks.MAX_RESULTS_BYTES + 1)
    if len(data) > webhooks.MAX_RESULTS_BYTES:
        log.warning("results file over %d bytes: webhook sent without metrics", len(data) - 1)
        return None
    return webhooks.metrics_from_results(data, redactor.json if redactor is not None else None)


class WebhookSender:
    def __init__(
        self,
        settings: Settings,
        store: DeliveryStore,
        redactor: Redactor | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """`redactor`: what the server masks in the results it serves, masked in webhooks
        too."""
        self._settings = settings
        self._store = store
        self._redactor = redactor
        self._clock = clock
        secret = settings.webhook_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else b""
        self._pending: dict[int, WebhookDelivery] = {}
        self._due: list[tuple[float, int]] = []  # (loop time, job id), earliest first
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Resumes what a previous server process left pending. Call before the manager
        starts: jobs that ended while the server was down are reported through `job_ended`."""
        settings = self._settings
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            # No proxy variables and no ~/.netrc: a webhook goes where its URL says, and
            # carries no credentials of the server's.
            trust_env=False,
            timeout=settings.webhook_timeout_s,
            limits=httpx.Limits(
                max_connections=settings.webhook_concurrency,
                max_keepalive_connections=settings.webhook_concurrency,
            ),
        )
        for record in self._store.ended_without_delivery():
            self.job_ended(record)
        for delivery in self._store.pending_deliveries():
            if delivery.job_id not in self._pending:
                self._pending[delivery.job_id] = delivery
                if delivery.metrics_json is None:
                    self._prepare(delivery)
                else:
                    self._schedule(delivery)
        for number in range(settings.webhook_concurrency):
            self._spawn(self._work(), f"webhook-worker-{number}")

    async def close(self) -> None:
        """Stops delivering; what is still pending stays pending in the store."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ events and queries
    def job_ended(self, record: JobRecord) -> None:
        """The manager's on_finish callback: on the event loop, as the job's end is recorded."""
        url = record.request.get("callback_url")
        if not url or record.job_id in self._pending:
            return
        delivery = WebhookDelivery(
            job_id=record.job_id,
            delivery_id=uuid.uuid4().hex,
            url=url,
            status=record.status.value,
            exit_code=record.exit_code,
            results_file=record.results_file,
            created_at=self._clock(),
            owner=record.owner,
            verdict_json=json.dumps(record.verdict) if record.verdict is not None else None,
        )
        try:
            self._store.save_delivery(delivery)
        except Exception:
            # Not the job's failure; the next startup finds the job without its row.
            log.exception("job %d: could not record its webhook", record.job_id)
            return
        self._pending[record.job_id] = delivery
        self._prepare(delivery)

    def info(self, record: JobRecord) -> WebhookInfo | None:
        url = record.request.get("callback_url")
        if not url:
            return None
        delivery = self._pending.get(record.job_id) or self._store.get_delivery(record.job_id)
        if delivery is None:
            ended = record.status.is_terminal()
            state = DeliveryState.pending if ended else DeliveryState.waiting
            return WebhookInfo(url=url, state=state, attempts=0)
        return WebhookInfo(
            url=delivery.url,
            state=delivery.state,
            attempts=delivery.attempts,
            last_status=delivery.last_status,
            last_error=delivery.last_error,
            next_attempt_at=delivery.next_attempt_at,
            delivered_at=delivery.delivered_at,
            delivery_id=delivery.delivery_id,
        )

    # ------------------------------------------------------------------ preparing
    def _prepare(self, delivery: WebhookDelivery) -> None:
        """Reads the job's metrics once, then makes the delivery due. The file is opened
        here, on the event loop, before retention or a delete can remove it: an open file
        stays readable after it is unlinked."""
        if self._closed:
            return  # stored as pending: prepared at the next start
        results = None
        if delivery.status == JobStatus.completed.value and delivery.results_file:
            try:
                # The job wrote it: a symlink or FIFO in its place is not followed or waited
                # on (this runs on the event loop).
                results = os.fdopen(jobdir.open_file(delivery.results_file), "rb")
            except OSError:
                results = None
        self._spawn(self._read_then_schedule(delivery, results), f"webhook-{delivery.job_id}")

    async def _read_then_schedule(
        self, delivery: WebhookDelivery, results: IO[bytes] | None
    ) -> None:
        try:
            metrics = await asyncio.to_thread(_read_metrics, results, self._redactor)
        except Exception:
            # Sent without metrics rather than never sent.
            log.exception("job %d: results unreadable for its webhook", delivery.job_id)
            metrics = None
        delivery.metrics_json = json.dumps(metrics, allow_nan=False)
        self._save(delivery)
        self._schedule(delivery)

    # ------------------------------------------------------------------ the queue
    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        if self._closed:
            coroutine.close()
            return
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self, delivery: WebhookDelivery) -> None:
        delay_s = 0.0
        if delivery.next_attempt_at is not None:
            delay_s = max(0.0, (delivery.next_attempt_at - self._clock()).total_seconds())
        due = asyncio.get_running_loop().time() + delay_s
        heapq.heappush(self._due, (due, delivery.job_id))
        self._wake.set()

    async def _next_due(self) -> int:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self._due and self._due[0][0] <= now:
                return heapq.heappop(self._due)[1]
            timeout_s = self._due[0][0] - now if self._due else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout_s)

    async def _work(self) -> None:
        while True:
            job_id = await self._next_due()
            delivery = self._pending.get(job_id)
            if delivery is None or delivery.state is not DeliveryState.pending:
                continue
            try:
                await self._attempt(delivery)
            except Exception as exc:
                # A bug must not cost a worker (the others would carry on, fewer each time).
                log.exception("job %d: webhook attempt crashed", job_id)
                delivery.last_error = f"not sent: {type(exc).__name__}: {exc}"[
                    : webhooks.MAX_ERROR_CHARS
                ]
                self._end(delivery, DeliveryState.failed)

    # ------------------------------------------------------------------ one attempt
    async def _attempt(self, delivery: WebhookDelivery) -> None:
        settings = self._settings
        try:
            # The allowlist of now, not of the submission: an operator can revoke a prefix.
            webhooks.callback_target(delivery.url, settings.webhook_url_prefixes)
        except webhooks.CallbackRefused as exc:
            delivery.last_error = f"not sent: {exc}"
            self._end(delivery, DeliveryState.failed)
            return
        attempt = delivery.attempts + 1
        timestamp = int(self._clock().timestamp())
        payload = webhooks.build_payload(
            delivery.delivery_id,
            delivery.job_id,
            delivery.status,
            delivery.exit_code,
            json.loads(delivery.metrics_json or "null"),
            timestamp,
            owner=delivery.owner,
            callback_url=delivery.url,
            verdict=json.loads(delivery.verdict_json) if delivery.verdict_json else None,
        )
        body = webhooks.encode(payload)
        headers = webhooks.headers(body, self._secret, delivery.delivery_id, timestamp, attempt)
        status, error = await self._post(delivery.url, body, headers)
        delivery.attempts = attempt
        delivery.last_status = status
        delivery.last_error = webhooks.attempt_error(status, error, settings.webhook_timeout_s)
        if delivery.last_error is None:
            delivery.delivered_at = self._clock()
            self._end(delivery, DeliveryState.delivered)
        elif attempt >= settings.webhook_max_attempts:
            self._end(delivery, DeliveryState.failed)
        else:
            wait_s = webhooks.retry_delay_s(
                attempt, settings.webhook_retry_base_s, settings.webhook_retry_max_s
            )
            delivery.next_attempt_at = self._clock() + timedelta(seconds=wait_s)
            log.info(
                "job %d: webhook attempt %d failed (%s); next in %g s",
                delivery.job_id,
                attempt,
                delivery.last_error,
                wait_s,
            )
            self._save(delivery)
            self._schedule(delivery)

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, BaseException | None]:
        assert self._client is not None
        try:
            # The whole attempt, not each read: a receiver that trickles bytes is cut off too.
            async with asyncio.timeout(self._settings.webhook_timeout_s):
                async with self._client.stream("POST", url, content=body, headers=headers) as r:
                    return r.status_code, None  # the body is not read: only the status counts
        except httpx.TimeoutException:
            return None, TimeoutError()
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            return None, exc
        except Exception as exc:
            log.exception("webhook to %s: unexpected error", url)
            return None, exc

    def _end(self, delivery: WebhookDelivery, state: DeliveryState) -> None:
        delivery.state = state
        delivery.next_attempt_at = None
        self._pending.pop(delivery.job_id, None)
        self._save(delivery)
        if state is DeliveryState.failed:
            log.warning(
                "job %d: webhook to %s failed after %d attempt(s): %s",
                delivery.job_id,
                delivery.url,
                delivery.attempts,
                delivery.last_error,
            )
        else:
            log.info("job %d: webhook delivered (attempt %d)", delivery.job_id, delivery.attempts)

    def _save(self, delivery: WebhookDelivery) -> None:
        try:
            self._store.save_delivery(delivery)
        except Exception:
            log.exception("job %d: could not record its webhook's state", delivery.job_id)
