"""The HTTP metrics tally exposes what prometheus_client's Counter and Histogram would for the
same requests (it replaced them on every request's path), and bounds the methods it names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from lm_eval_server.api.metrics import _LATENCY_BUCKETS, AppMetrics, HttpTally

OBSERVATIONS = [
    ("GET", "/health", 200, 0.0004),
    ("GET", "/health", 200, 0.001),  # exactly on a bound: that bucket (le)
    ("GET", "/health", 200, 0.0011),
    ("POST", "/job", 200, 0.003),
    ("POST", "/job", 422, 0.07),
    ("POST", "/job", 200, 9999.0),  # beyond the last bound: +Inf only
    ("GET", "/jobs", 200, 0.02),
    ("GET", "unmatched", 404, 0.0),
]


def _lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if line and "_created" not in line)


def test_the_tally_exposes_what_prometheus_client_would() -> None:
    reference = CollectorRegistry()
    counter = Counter(
        "lm_eval_server_http_requests",
        "HTTP requests served",
        ["method", "route", "status"],
        registry=reference,
    )
    histogram = Histogram(
        "lm_eval_server_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route"],
        buckets=_LATENCY_BUCKETS,
        registry=reference,
    )
    ours = CollectorRegistry()
    tally = HttpTally(_LATENCY_BUCKETS)
    ours.register(tally)
    for method, route, status, seconds in OBSERVATIONS:
        counter.labels(method, route, str(status)).inc()
        histogram.labels(method, route).observe(seconds)
        tally.observe(method, route, status, seconds)
    assert _lines(ours) == _lines(reference)


def test_made_up_methods_are_counted_as_other() -> None:
    metrics = AppMetrics()
    for index in range(500):
        metrics.http.observe(f"BREW{index}", "unmatched", 400, 0.001)
    text = generate_latest(metrics.registry).decode()
    assert (
        'lm_eval_server_http_requests_total{method="OTHER",route="unmatched",status="400"} 500.0'
        in text
    )
    assert "BREW" not in text
