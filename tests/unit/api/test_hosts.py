"""The pure rules behind the Host check, the cross-site refusal and the Location rewrite."""

from __future__ import annotations

import pytest

from lm_eval_server.api.hosts import (
    cross_site_reason,
    default_entries,
    host_allowed,
    is_state_changing,
    parse_rules,
    relative_location,
    split_host,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8000", ("localhost", 8000)),
        ("localhost.", ("localhost", None)),
        ("[::1]:80", ("::1", 80)),
        ("[0:0::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("10.0.0.5:8443", ("10.0.0.5", 8443)),
        ("a@localhost", None),
        ("localhost/x", None),
        ("local host", None),
        ("", None),
        ("host:", None),
        ("host:0", None),
        ("host:65536", None),
        ("host:8x", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[not-v6]", None),
    ],
)
def test_split_host(value: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host(value) == expected


def test_rules_defaults_ports_and_subdomains() -> None:
    wildcard = parse_rules(default_entries("0.0.0.0"))
    assert host_allowed("localhost:1234", wildcard)
    assert host_allowed("[::1]", wildcard)
    assert not host_allowed("0.0.0.0:8000", wildcard)
    assert not host_allowed(None, wildcard)
    bound = parse_rules([*default_entries("10.0.0.5"), "eval.example.com:443", "*.corp.example"])
    assert host_allowed("10.0.0.5:8000", bound)
    assert host_allowed("eval.example.com:443", bound)
    assert not host_allowed("eval.example.com:8000", bound)
    assert not host_allowed("eval.example.com", bound)
    assert host_allowed("a.b.corp.example", bound)
    assert not host_allowed("corp.example", bound)
    assert not host_allowed("evilcorp.example", bound)
    assert parse_rules(["localhost", "*"]) is None
    assert host_allowed("anything", None)
    with pytest.raises(ValueError, match="'bad/host'"):
        parse_rules(["bad/host"])


def test_state_changing_requests() -> None:
    assert not is_state_changing("GET", "/jobs")
    assert not is_state_changing("HEAD", "/job/1")
    assert not is_state_changing("GET", "/job/1/logs")
    for method in ("POST", "PUT", "PATCH", "DELETE", "TRACE", "PURGE"):
        assert is_state_changing(method, "/anything")
    for path in ("/job/1/stop", "/job/x/dequeue/", "/jobs/stop", "/prefix/jobs/dequeue"):
        assert is_state_changing("GET", path)


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({}, False),
        ({"sec-fetch-site": "same-origin"}, False),
        ({"sec-fetch-site": "none"}, False),
        ({"sec-fetch-site": "same-site"}, True),
        ({"sec-fetch-site": "cross-site"}, True),
        ({"origin": "http://h:8000"}, False),
        ({"origin": "https://h:8000"}, False),
        ({"origin": "http://h:8001"}, True),
        ({"origin": "http://h"}, True),
        ({"origin": "http://evil:8000"}, True),
        ({"origin": "null"}, True),
        ({"origin": "file://"}, True),
        ({"sec-fetch-site": "same-origin", "origin": "http://evil"}, True),
        ({"referer": "http://h:8000/"}, False),
        ({"referer": "http://evil/page"}, True),
        ({"sec-fetch-site": "same-origin", "referer": "http://evil/"}, False),
    ],
)
def test_cross_site_marks(headers: dict[str, str], refused: bool) -> None:
    assert (cross_site_reason(headers, "h:8000") is not None) is refused


def test_default_ports_compare_equal() -> None:
    assert cross_site_reason({"origin": "https://eval.example.com"}, "eval.example.com") is None
    assert cross_site_reason({"origin": "http://[::1]:8000"}, "[::1]:8000") is None


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://evil.example/jobs", "/jobs"),
        ("http://evil.example/jobs?a=1&b=2", "/jobs?a=1&b=2"),
        ("http://evil.example//other.example/x", "/other.example/x"),
        ("http://evil.example/\\other.example", "/other.example"),
        ("//other.example/x", "/x"),
        ("/jobs", "/jobs"),
        ("http://evil.example", "/"),
    ],
)
def test_relative_location(location: str, expected: str) -> None:
    assert relative_location(location) == expected
