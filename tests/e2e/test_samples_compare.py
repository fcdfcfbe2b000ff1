"""Samples you can read and runs you can compare, through the HTTP API with the real lm_eval.

The stub model server answers arith_gen question q right exactly when
`is_answered_correctly(q, correct_per_cycle)` (tests/support/completions_server.py), so each
run's wrong doc_ids, score and stderr are known in advance.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from tests.support.completions_server import is_answered_correctly, running_stub_server
from tests.support.jobs import DUMMY_JOB, fake_job, stub_job, submit, wait_for

N_DOCS = 200


def stderr_of_mean(correct: int, n: int = N_DOCS) -> float:
    """lm-eval's stderr for a mean of 0/1 scores: sample stddev (n - 1) over sqrt(n)."""
    p = correct / n
    return math.sqrt(p * (1 - p) * n / (n - 1)) / math.sqrt(n)


def wrong_ids(correct_per_cycle: int) -> list[int]:
    return [q for q in range(N_DOCS) if not is_answered_correctly(q, correct_per_cycle)]


def run_arith(client: Any, correct_per_cycle: int) -> int:
    with running_stub_server(correct_per_cycle=correct_per_cycle) as stub:
        job_id = submit(client, stub_job(stub.base_url, "arith_gen", log_samples=True))
        job = wait_for(client, job_id, timeout_s=240)
    assert job["status"] == "Completed", job["error"]
    return job_id


def test_samples_filter_returns_exactly_the_wrong_answers_and_compare_the_runs(
    make_client: Any,
) -> None:
    client = make_client()
    base = run_arith(client, 27)  # 135/200
    better = run_arith(client, 35)  # 175/200
    close = run_arith(client, 28)  # 140/200

    # ---- samples: the raw file stays what it was
    raw = client.get(f"/job/{base}/samples", params={"task": "arith_gen"})
    assert raw.headers["content-type"] == "application/x-ndjson"
    assert len(raw.text.splitlines()) == N_DOCS
    raw_again = client.get(
        f"/job/{base}/samples",
        params={"task": "arith_gen", "format": "jsonl"},
        headers={"Accept": "application/json"},
    )
    assert raw_again.content == raw.content

    # ---- the wrong answers, page by page, are exactly the docs the stub gets wrong
    expected_wrong = wrong_ids(27)
    assert len(expected_wrong) == 65
    seen: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = client.get(
            f"/job/{base}/samples",
            params={"task": "arith_gen", "incorrect": "true", "offset": offset, "limit": 20},
        ).json()
        assert page["total"] == 65 and page["offset"] == offset and page["limit"] == 20
        assert len(page["samples"]) == min(20, 65 - offset)
        seen += page["samples"]
        offset = page["next_offset"]
    assert [s["doc_id"] for s in seen] == expected_wrong
    first = seen[0]
    a, b = first["doc"]["a"], first["doc"]["b"]
    assert first["target"] == str(a + b)
    assert first["responses"] == [str(a + b + 1)]  # the stub's wrong answer is sum + 1
    assert first["prompt"] == f"Question {first['doc_id']}: What is {a} + {b}?\nAnswer:"
    assert first["metrics"] == {"exact_match": 0.0}
    assert first["primary_metric"] == "exact_match" and first["correct"] is False
    assert first["filter"] == "none"

    # ---- every sample, as JSON when the client asks for JSON
    everything = client.get(
        f"/job/{base}/samples",
        params={"task": "arith_gen", "limit": 500},
    ).json()
    assert everything["total"] == N_DOCS and everything["next_offset"] is None
    assert everything["filters"] == ["none"]
    verdicts = {s["doc_id"]: s["correct"] for s in everything["samples"]}
    assert verdicts == {q: is_answered_correctly(q, 27) for q in range(N_DOCS)}
    by_accept = client.get(
        f"/job/{base}/samples",
        params={"task": "arith_gen"},
        headers={"Accept": "application/json"},
    )
    assert by_accept.headers["content-type"] == "application/json"
    assert by_accept.json()["samples"] == everything["samples"][:50]
    assert client.get(f"/job/{base}/samples").json() == {"job_id": base, "tasks": ["arith_gen"]}
    # The better run's wrong answers are a subset of the base's.
    better_wrong = client.get(
        f"/job/{better}/samples",
        params={"task": "arith_gen", "incorrect": "true", "limit": 500},
    ).json()
    assert [s["doc_id"] for s in better_wrong["samples"]] == wrong_ids(35)
    assert better_wrong["total"] == 25
    # A filter the file does not have matches nothing.
    none = client.get(
        f"/job/{base}/samples", params={"task": "arith_gen", "filter": "strict-match"}
    ).json()
    assert none["total"] == 0 and none["samples"] == [] and none["next_offset"] is None

    # ---- compare: the known difference, and its significance
    data = client.get("/compare", params={"jobs": f"{base},{better},{close}"}).json()
    assert data["jobs"] == [base, better, close]
    [row] = data["rows"]
    assert (row["task"], row["metric"], row["filter"]) == ("arith_gen", "exact_match", "none")
    assert row["values"] == [135 / 200, 175 / 200, 140 / 200]
    se = [stderr_of_mean(135), stderr_of_mean(175), stderr_of_mean(140)]
    assert row["stderrs"] == [
        _close(se[0], row["stderrs"][0]),
        _close(se[1], row["stderrs"][1]),
        _close(se[2], row["stderrs"][2]),
    ]
    assert row["deltas"] == [0.0, 175 / 200 - 135 / 200, 140 / 200 - 135 / 200]
    # 0.2 > 1.96 * 0.0406 = 0.0797: significant; 0.025 < 1.96 * 0.0464 = 0.0910: not.
    assert row["unpaired_significant"] == [False, True, False]
    # Paired: each run's wrong answers are a subset of the base's, so the discordant pairs
    # all improved: 40 (p = 2 / 2^40) and 5 (p = 2 / 2^5 = 0.0625, not below 0.05).
    assert row["tests"] == [None, "mcnemar", "mcnemar"]
    assert row["n_paired"] == [None, N_DOCS, N_DOCS]
    assert row["discordant"] == [
        None,
        {"regressed": 0, "improved": 40},
        {"regressed": 0, "improved": 5},
    ]
    assert row["p_values"] == [None, 2 / 2**40, 2 / 2**5]
    assert row["significant"] == [False, True, False]
    assert data["alpha"] == 0.05 and data["warnings"] == []

    table = client.get(
        "/compare", params={"jobs": f"{base},{better}"}, headers={"Accept": "text/csv"}
    )
    assert table.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert rows == [
        {
            "task": "arith_gen",
            "metric": "exact_match",
            "filter": "none",
            f"value_{base}": "0.675",
            f"stderr_{base}": repr(row["stderrs"][0]),
            f"value_{better}": "0.875",
            f"stderr_{better}": repr(row["stderrs"][1]),
            f"delta_{better}": repr(0.875 - 0.675),
            f"significant_{better}": "true",
            f"test_{better}": "mcnemar",
            f"p_value_{better}": repr(2 / 2**40),
            f"n_paired_{better}": "200",
            f"regressed_{better}": "0",
            f"improved_{better}": "40",
        }
    ]

    markdown = client.get(
        "/compare", params={"jobs": f"{better},{base}"}, headers={"Accept": "text/markdown"}
    )
    assert markdown.headers["content-type"] == "text/markdown; charset=utf-8"
    lines = markdown.text.splitlines()
    assert lines[0] == (
        f"| Task | Metric | Filter | Job {better} | Job {base} | Δ {base} | p {base} |"
    )
    assert lines[1] == "| --- | --- | --- | ---: | ---: | ---: | ---: |"
    assert lines[2] == (
        f"| arith_gen | exact_match | none | 0.8750 ± {se[1]:.4f} | 0.6750 ± {se[0]:.4f} "
        f"| -0.2000 * | {2 / 2**40:.2g} (McNemar 40/0 of 200) |"
    )
    assert f"difference from job {better}" in lines[4]
    assert client.get(
        "/compare", params={"jobs": f"{base},{better}", "format": "markdown"}
    ).text.startswith("| Task |")


def _close(expected: float, got: float) -> float:
    """`got` when it equals `expected` to float rounding (lm-eval sums in another order)."""
    assert math.isclose(got, expected, rel_tol=1e-12), (got, expected)
    return got


def test_compare_refuses_bad_lists_unfinished_and_other_owners_jobs(make_client: Any) -> None:
    client = make_client(api_keys=["alice:alice-key-0123456789", "bob:bob-key-0123456789"])
    alice = {"Authorization": "Bearer alice-key-0123456789"}
    bob = {"Authorization": "Bearer bob-key-0123456789"}
    client.headers.update(alice)  # so the fixture's clean-up stops alice's jobs
    done = [submit(client, {**DUMMY_JOB, "limit": 2}, headers=alice) for _ in range(2)]
    for job_id in done:
        assert wait_for_as(client, job_id, alice)["status"] == "Completed"
    no_results = submit(client, fake_job(), headers=alice)  # the stand-in writes no results
    assert wait_for_as(client, no_results, alice)["status"] == "Completed"
    running = submit(client, fake_job(FAKE_SLEEP_S="600"), headers=alice)
    bobs = submit(client, fake_job(), headers=bob)
    assert wait_for_as(client, bobs, bob)["status"] == "Completed"

    def refused(jobs: str, status: int, *words: str) -> None:
        response = client.get("/compare", params={"jobs": jobs}, headers=alice)
        assert response.status_code == status, (jobs, response.text)
        detail = response.json()["detail"]
        for word in words:
            assert word in str(detail), (jobs, detail)

    a, b = done
    ok = client.get("/compare", params={"jobs": f" {a}, {b} "}, headers=alice)
    assert ok.status_code == 200 and ok.json()["jobs"] == [a, b]
    repeated = client.get("/compare", params=[("jobs", a), ("jobs", b)], headers=alice)
    assert repeated.json() == ok.json()
    [row] = ok.json()["rows"]
    assert (row["task"], row["metric"]) == ("demo_mc", "acc")
    # lm-eval's dummy model scores at random: whatever the values, the rule holds.
    assert row["deltas"] == [0.0, row["values"][1] - row["values"][0]]
    refused(f"{a}", 422, "at least 2")
    refused(f"{a},{a}", 422, f"job {a} is listed twice")
    refused(f"{a},x", 422, "'x' is not a job id")
    refused(f"{a},-1", 422, "'-1' is not a job id")
    refused(f"{a},", 422, "'' is not a job id")
    refused(",".join(str(i) for i in range(1, 22)), 422, "at most 20")
    refused(f"{a},{running}", 409, f"Job {running} is Running")
    refused(f"{no_results},{a}", 409, f"Job {no_results} completed but lm-eval wrote no results")
    # Another owner's job answers exactly like a missing one.
    refused(f"{a},{bobs}", 404, f"Job {bobs} not found.")
    refused(f"{a},99999", 404, "Job 99999 not found.")
    # Without a key: 401, like every job route.
    anonymous = client.get("/compare", params={"jobs": f"{a},{b}"}, headers={"Authorization": ""})
    assert anonymous.status_code == 401 and "API key" in anonymous.json()["detail"]
    missing = client.get("/compare", headers=alice)
    assert missing.status_code == 422 and "jobs" in str(missing.json()["detail"])
    # The samples of another owner's job are not there either.
    theirs = client.get(f"/job/{bobs}/samples", params={"task": "demo_mc"}, headers=alice)
    assert theirs.status_code == 404 and theirs.json()["detail"] == f"Job {bobs} not found."
    client.post(f"/job/{running}/stop", headers=alice)


def wait_for_as(client: Any, job_id: int, headers: dict[str, str]) -> dict[str, Any]:
    saved = dict(client.headers)
    client.headers.update(headers)
    try:
        return wait_for(client, job_id)
    finally:
        client.headers.clear()
        client.headers.update(saved)


def test_samples_query_rules(client: Any) -> None:
    job_id = submit(client, {**DUMMY_JOB, "limit": 3, "log_samples": True})
    assert wait_for(client, job_id, timeout_s=240)["status"] == "Completed"
    url = f"/job/{job_id}/samples"

    def refused(params: dict[str, Any], *words: str) -> None:
        response = client.get(url, params=params)
        assert response.status_code == 422, (params, response.text)
        for word in words:
            assert word in str(response.json()["detail"]), (params, response.json())

    refused({"task": "demo_mc", "limit": 501}, "limit")
    refused({"task": "demo_mc", "limit": 0}, "limit")
    refused({"task": "demo_mc", "offset": -1}, "offset")
    refused({"task": "demo_mc", "format": "xml"}, "format")
    refused({"task": "demo_mc", "format": "jsonl", "limit": 5}, "format=jsonl", "format=json")
    refused({"format": "jsonl"}, "format=jsonl needs task=NAME")

    page = client.get(url, params={"task": "demo_mc", "format": "json"}).json()
    assert page["total"] == 3 and [s["doc_id"] for s in page["samples"]] == [0, 1, 2]
    for sample in page["samples"]:
        # Multiple choice: acc per doc is 0 or 1, so every sample is judged.
        assert sample["primary_metric"] == "acc"
        assert sample["correct"] is (sample["metrics"]["acc"] == 1.0)
        assert len(sample["responses"]) == 4  # one loglikelihood per choice
    wrong = client.get(url, params={"task": "demo_mc", "incorrect": "true"}).json()
    assert [s["doc_id"] for s in wrong["samples"]] == [
        s["doc_id"] for s in page["samples"] if s["correct"] is False
    ]
    beyond = client.get(url, params={"task": "demo_mc", "offset": 10}).json()
    assert beyond["total"] == 3 and beyond["samples"] == [] and beyond["next_offset"] is None
    # JSON only when the client prefers it: */* and a q-weighted preference keep the raw file.
    prefers_raw = "application/x-ndjson, application/json;q=0.5"
    for accept, media in [
        ("*/*", "application/x-ndjson"),
        (prefers_raw, "application/x-ndjson"),
        ("application/json, */*;q=0.1", "application/json"),
        ("application/*", "application/x-ndjson"),
    ]:
        response = client.get(url, params={"task": "demo_mc"}, headers={"Accept": accept})
        assert response.headers["content-type"] == media, accept
    missing = client.get(url, params={"task": "nope", "format": "json"})
    assert missing.status_code == 404 and "demo_mc" in missing.json()["detail"]
