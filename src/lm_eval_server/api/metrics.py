"""Prometheus metrics for one app instance (its own registry: no module-level state)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lm_eval_server.jobs.models import JobRecord, JobStatus

if TYPE_CHECKING:
    from lm_eval_server.jobs.manager import JobManager

_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 3600)


class _JobCollector(Collector):
    def __init__(self, manager: JobManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        by_status = GaugeMetricFamily(
            "lm_eval_server_jobs", "Jobs known to the server, by status", labels=["status"]
        )
        for status, count in self._manager.counts().items():
            by_status.add_metric([status.value], count)
        yield by_status
        yield GaugeMetricFamily(
            "lm_eval_server_queue_depth", "Jobs waiting for a slot", value=self._manager.queue_depth
        )
        yield GaugeMetricFamily(
            "lm_eval_server_running_jobs", "Jobs running now", value=self._manager.running_count
        )
        yield GaugeMetricFamily(
            "lm_eval_server_gpus",
            "GPU devices the server hands out to local jobs (GPUS)",
            value=self._manager.gpus_total,
        )
        yield GaugeMetricFamily(
            "lm_eval_server_gpus_in_use",
            "GPU devices held by running jobs",
            value=self._manager.gpus_in_use,
        )
        yield from _cache_counters(self._manager)


def _cache_counters(manager: JobManager) -> Iterator[CounterMetricFamily]:
    # Counted by the manager as each attempt ends (docs/resume-and-cache.md).
    counts = manager.cache_counts
    yield CounterMetricFamily(
        "lm_eval_server_response_cache_hits",
        "Model requests answered from the server's response cache",
        value=counts["hits"],
    )
    yield CounterMetricFamily(
        "lm_eval_server_response_cache_misses",
        "Model requests computed by the model (not in the response cache)",
        value=counts["misses"],
    )


class AppMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.job_duration = Histogram(
            "lm_eval_server_job_duration_seconds",
            "Wall time of finished jobs, from start to end",
            ["status"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.dispatch_latency = Histogram(
            "lm_eval_server_dispatch_latency_seconds",
            "Time from submission to process start",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http = HttpTally(_LATENCY_BUCKETS)
        self.registry.register(self.http)

    def watch(self, manager: JobManager) -> None:
        self.registry.register(_JobCollector(manager))
        manager.on_finish.append(self._job_finished)

    def _job_finished(self, record: JobRecord) -> None:
        if record.started_at is None or record.finished_at is None:
            return
        self.job_duration.labels(record.status.value).observe(
            (record.finished_at - record.started_at).total_seconds()
        )
        if record.status is not JobStatus.queued:
            self.dispatch_latency.observe(
                max(0.0, (record.started_at - record.created_at).total_seconds())
            )


# Methods a request is counted under by name; any other token counts as OTHER, so that made-up
# methods cannot grow the tally (and the /metrics answer) without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class HttpTally(Collector):
    """HTTP requests counted and timed in plain dicts, made into Prometheus families only when
    /metrics is read. prometheus_client's counter and histogram take a lock and check their
    labels at every observation: on a trivial route that was most of what the app adds to
    the framework (the same families, names and labels as before)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        self._requests: dict[tuple[str, str, str], int] = {}
        # Per (method, route): a count per bucket (the last is +Inf), then the sum.
        self._latency: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in HTTP_METHODS:
            method = "OTHER"
        key = (method, route, str(status))
        self._requests[key] = self._requests.get(key, 0) + 1
        slots = self._latency.get((method, route))
        if slots is None:
            slots = self._latency[(method, route)] = [0.0] * (len(self._bounds) + 2)
        slots[bisect.bisect_left(self._bounds, seconds)] += 1
        slots[-1] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "lm_eval_server_http_requests",
            "HTTP requests served",
            labels=["method", "route", "status"],
        )
        for labels, count in list(self._requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        latency = HistogramMetricFamily(
            "lm_eval_server_http_request_duration_seconds",
            "HTTP request latency",
            labels=["method", "route"],
        )
        edges = [*(floatToGoString(b) for b in self._bounds), "+Inf"]
        for labels, slots in list(self._latency.items()):
            counts = slots[:-1]
            cumulative, total = [], 0.0
            for edge, count in zip(edges, counts, strict=True):
                total += count
                cumulative.append((edge, total))
            latency.add_metric(list(labels), cumulative, sum_value=slots[-1])
        yield latency
