"""POST /job answers the same whether it takes the direct path (no FastAPI dependency solving,
api/jobs.py `direct`) or FastAPI's handler: a request with an Idempotency-Key always goes
FastAPI's way, so each body is sent both ways and the answers compared."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fastapi.routing
import pytest

from tests.support.jobs import EXAMPLES_TASKS, fake_job

KEY = "alice-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths FastAPI solved dependencies for (its handler ran)."""
    seen: list[str] = []
    original = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["request"].url.path)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    yield seen


def _post(client: Any, body: Any, *, key: str | None, raw: bytes | None = None, **headers: str):
    sent = {"content-type": "application/json", **HEADERS, **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    content = raw if raw is not None else json.dumps(body).encode()
    return client.post("/job", content=content, headers=sent)


def _same_refusal(client: Any, solved: list[str], body: Any, raw: bytes | None = None) -> int:
    """Sends the body both ways; asserts the same status and detail; returns the status."""
    direct = _post(client, body, key=None, raw=raw)
    fastapi_way = _post(client, body, key=f"k-{len(solved)}", raw=raw)
    assert direct.status_code == fastapi_way.status_code, (direct.text, fastapi_way.text)
    assert direct.json() == fastapi_way.json(), body
    assert direct.headers.get("content-type") == fastapi_way.headers.get("content-type")
    return direct.status_code


def test_direct_and_fastapi_paths_answer_alike(make_client: Any, solved: list[str]) -> None:
    client = make_client(admin_keys=[f"alice:{KEY}"], max_concurrency=1)
    client.headers.update(HEADERS)  # the fixture's teardown stops this test's jobs with it
    sleeper = fake_job(FAKE_SLEEP_S="60")
    body = {"model": "dummy", "tasks": "demo_mc", "include_path": str(EXAMPLES_TASKS), "limit": 2}

    first = _post(client, sleeper, key=None)
    assert first.status_code == 200, first.text
    solved.clear()
    direct = _post(client, body, key=None)
    assert solved == [], "a plain valid submission should not need FastAPI's dependencies"
    fastapi_way = _post(client, body, key="same-body")
    assert solved == ["/job"]
    assert direct.status_code == fastapi_way.status_code == 200
    assert direct.headers["content-type"] == fastapi_way.headers["content-type"]
    a, b = direct.json(), fastapi_way.json()
    assert list(a) == list(b) == ["status", "message", "job_id"]
    assert b["job_id"] == a["job_id"] + 1
    assert a["message"] == f"Job {a['job_id']} successfully queued."

    # Both jobs were stored alike: the same command but for the job's directory.
    one, two = (client.get(f"/job/{x['job_id']}", headers=HEADERS).json() for x in (a, b))
    for field in ("model", "tasks", "max_attempts", "cache"):
        assert one.get(field) == two.get(field), field
    assert one["owner"] == two["owner"] == "alice"
    assert one["status"] == two["status"] == "Queued"
    swap = f"/{a['job_id']}/", f"/{b['job_id']}/"
    assert one["argument"].replace(*swap) == two["argument"]
    # Both audited, in the same transaction as their rows.
    audit = client.get("/audit", headers=HEADERS, params={"action": "submit"}).json()
    audited = {i for entry in audit["entries"] for i in entry["job_ids"]}
    assert {a["job_id"], b["job_id"]} <= audited

    refusals = [
        {**body, "limit": "many"},  # pydantic's error list
        {**body, "limit": True},  # a boolean in a number option
        {"model": "dummy"},  # no tasks
        {**body, "tasks": " , "},  # only blanks
        {**body, "tasks": "no_such_task_anywhere"},  # the validator's 422
        {**body, "unknown_field": 1},  # the screen's refusal
        [body],  # not an object
        {**body, "lm_eval_path": "/bin/sh -c id"},
    ]
    statuses = {_same_refusal(client, solved, item) for item in refusals}
    assert statuses == {422}
    assert _same_refusal(client, solved, None, raw=b'{"model": "dummy", ') == 422
    # Refused requests queued nothing either way.
    assert client.get("/jobs", headers=HEADERS).json()["total"] == 3


def test_a_refused_caller_is_refused_as_before(make_client: Any, solved: list[str]) -> None:
    client = make_client(api_keys=[f"alice:{KEY}"])
    body = {"model": "dummy", "tasks": "demo_mc", "include_path": str(EXAMPLES_TASKS)}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        sent = {"content-type": "application/json", **headers}
        response = client.post("/job", content=json.dumps(body), headers=sent)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Missing or invalid API key" in response.json()["detail"]
    assert solved == ["/job", "/job"]  # FastAPI's handler answered both
    # Another media type than plain application/json is FastAPI's to judge too.
    sent = {**HEADERS, "content-type": "application/json; charset=utf-8"}
    response = client.post("/job", content=json.dumps(body), headers=sent)
    assert response.status_code == 200, response.text
    assert solved[-1] == "/job" and len(solved) == 3
    # The fixture's teardown sends no key: stop this test's job here.
    assert client.post("/jobs/stop", headers=HEADERS).status_code == 200
