"""Paired comparison and regression gates through a real server, the real lm_eval, the
webhook, the CLI and the dashboard (Debian's Chromium).

SCREENSHOTS_DIR=imgs uv run pytest tests/e2e/test_paired_gates.py regenerates
imgs/compare-paired.png and imgs/job-verdict.png.

One completions stub answers every job; a job's model name (`wrong_A-B_...`,
tests/support/completions_server.py) chooses exactly which arith_gen questions it gets wrong,
so each discordant count, p-value and verdict below is known in advance:

- base:    wrong on [0, 65)               135/200 = 0.675
- worse:   wrong on [0, 80)               120/200 = 0.600: 15 regressed, 0 improved (the
           issue's example: unpaired "not significant", McNemar p = 2 / 2^15 = 6.1e-5)
- better:  wrong on [0, 50)               150/200 = 0.750: 0 regressed, 15 improved
- mixed:   wrong on [10, 70) + [150, 160) 130/200 = 0.650: 15 regressed, 10 improved
- limited: base's model with limit=100 (35/100): pairs 100 documents, and warns
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, UI_TIMEOUT_MS
from tests.support.completions_server import (
    CompletionsStubServer,
    model_args_for,
    running_stub_server,
    wrong_model,
)
from tests.support.jobs import TEST_TASKS, submit, wait_for
from tests.support.server import ServerProcess
from tests.support.webhook_listener import WebhookListener

ALICE, BOB = "alice-gate-key-0123456789", "bob-gate-key-0123456789"
SECRET = "gate-webhook-secret-0123456789"
N = 200
NO_DROP = {"metric": "exact_match", "no_significant_drop": True}
GATE_RULES = [NO_DROP, {"task": "arith_gen", "metric": "exact_match", "max_drop": 0.1}]


def direct_mcnemar(regressed: int, improved: int) -> float:
    """Two-sided exact McNemar, computed from the binomial sum as a reader would."""
    n = regressed + improved
    tail = sum(math.comb(n, k) for k in range(min(regressed, improved) + 1))
    return min(1.0, 2 * tail / 2**n)


def stderr_of_mean(correct: int, n: int = N) -> float:
    p = correct / n
    return math.sqrt(p * (1 - p) * n / (n - 1)) / math.sqrt(n)


@pytest.fixture(scope="module")
def stub() -> Iterator[CompletionsStubServer]:
    with running_stub_server() as server:
        yield server


@pytest.fixture(scope="module")
def hook() -> Iterator[WebhookListener]:
    with WebhookListener() as listener:
        yield listener


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, index_dir: Path, hook: WebhookListener
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("paired-gates") / "data"
    server = ServerProcess(
        data_dir,
        index_dir,
        API_KEYS=f"alice:{ALICE},bob:{BOB}",
        MAX_CONCURRENCY="4",
        WEBHOOK_URL_PREFIXES=hook.url("/hooks/"),
        WEBHOOK_SECRET=SECRET,
    ).start()
    yield server
    server.stop_jobs_and_terminate()


def http_for(server: ServerProcess, key: str = ALICE) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def job_body(stub: CompletionsStubServer, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "local-completions",
        "model_args": model_args_for(stub.base_url, model=model),
        "tasks": "arith_gen",
        "include_path": str(TEST_TASKS),
        "log_samples": True,
        **extra,
    }


def cli(server: ServerProcess, *args: str) -> subprocess.Popen[str]:
    env = {"PATH": "/usr/bin:/bin", "LM_EVAL_SERVER_URL": server.url}
    env["LM_EVAL_SERVER_TOKEN"] = ALICE
    return subprocess.Popen(
        [sys.executable, "-m", "lm_eval_server.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str], timeout_s: float = 400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(
    server: ServerProcess, stub: CompletionsStubServer, hook: WebhookListener, tmp_path_factory: Any
) -> dict[str, Any]:
    """Every job of the module: the base first, then the others at once (worse and better
    submitted by the CLI with `--wait --gate-file` and a webhook)."""
    files = tmp_path_factory.mktemp("gate-files")
    with http_for(server) as http:
        base = submit(http, job_body(stub, wrong_model((0, 65))))
        assert wait_for(http, base, timeout_s=300)["status"] == "Completed"
        gate_file = files / "gate.json"
        gate_file.write_text(json.dumps({"baseline": base, "rules": GATE_RULES}))
        procs = {}
        for name, model in (("worse", wrong_model((0, 80))), ("better", wrong_model((0, 50)))):
            request = files / f"{name}.json"
            body = job_body(stub, model, callback_url=hook.url(f"/hooks/{name}"))
            request.write_text(json.dumps(body))
            procs[name] = cli(
                server, "submit", str(request), "--wait", "--gate-file", str(gate_file)
            )
        mixed = submit(http, job_body(stub, wrong_model((10, 70), (150, 160))))
        limited = submit(http, job_body(stub, wrong_model((0, 65)), limit=100))
        exits = {name: finish(proc) for name, proc in procs.items()}
        ids = {name: int(out.split()[0]) for name, (_, out, _) in exits.items()}
        for job_id in (mixed, limited, *ids.values()):
            assert wait_for(http, job_id, timeout_s=300)["status"] == "Completed"
    return {"base": base, "mixed": mixed, "limited": limited, **ids, "exits": exits}


def test_compare_pairs_documents_and_flags_what_unpaired_misses(
    server: ServerProcess, runs: dict[str, Any]
) -> None:
    order = ["base", "worse", "better", "mixed", "limited"]
    jobs = [runs[name] for name in order]
    with http_for(server) as http:
        data = http.get("/compare", params={"jobs": ",".join(map(str, jobs))}).json()
    assert data["jobs"] == jobs and data["alpha"] == 0.05
    [row] = data["rows"]
    # limited scores only the first 100 documents, 35 of them right, as does base's model there.
    assert row["values"] == [135 / N, 120 / N, 150 / N, 130 / N, 0.35]
    assert row["tests"] == [None, "mcnemar", "mcnemar", "mcnemar", "mcnemar"]
    assert row["n_paired"] == [None, N, N, N, 100]
    assert row["discordant"] == [
        None,
        {"regressed": 15, "improved": 0},
        {"regressed": 0, "improved": 15},
        {"regressed": 15, "improved": 10},
        {"regressed": 0, "improved": 0},  # the first 100 documents: base's model again
    ]
    expected_p = [direct_mcnemar(15, 0), direct_mcnemar(0, 15), direct_mcnemar(15, 10), 1.0]
    for got, want in zip(row["p_values"][1:], expected_p, strict=True):
        assert abs(got - want) <= 1e-9, (got, want)
    assert abs(row["p_values"][1] - 6.103515625e-05) <= 1e-9  # 2 / 2^15, the number
    # The unpaired test cannot tell 0.600 or 0.750 from 0.675 on 200 documents ...
    spread = math.sqrt(stderr_of_mean(135) ** 2 + stderr_of_mean(120) ** 2)
    assert 1.96 * spread > 0.075
    # ... the paired test flags both: the regression and the improvement (its delta > 0).
    # Against the run with another limit the unpaired test sees a large "difference" where
    # the paired documents show none: the same answers on the 100 documents both scored.
    assert row["unpaired_significant"] == [False, False, False, False, True]
    assert row["significant"] == [False, True, True, False, False]
    assert row["deltas"][1] < 0 < row["deltas"][2]

    # Only the run with another limit is flagged as not comparable, and said why.
    assert data["warnings"], data
    assert {tuple(w["jobs"]) for w in data["warnings"]} == {(runs["base"], runs["limited"])}
    [limit] = [w for w in data["warnings"] if w["field"] == "limit"]
    assert limit["values"] == [None, 100.0] and "limit differs" in limit["message"]

    with http_for(server) as http:
        strict = http.get(
            "/compare", params={"jobs": f"{runs['base']},{runs['worse']}", "alpha": 1e-5}
        ).json()
        bad_alpha = http.get("/compare", params={"jobs": f"{runs['base']},1", "alpha": 2})
        table = http.get(
            "/compare",
            params={"jobs": f"{runs['base']},{runs['limited']}"},
            headers={"Accept": "text/markdown"},
        ).text
    assert strict["alpha"] == 1e-5 and strict["rows"][0]["significant"] == [False, False]
    assert bad_alpha.status_code == 422
    assert "Warning: limit differs" in table and "(McNemar 0/0 of 100)" in table


def test_gate_fails_the_worse_candidate_and_passes_the_better(
    server: ServerProcess, runs: dict[str, Any], hook: WebhookListener
) -> None:
    base, worse = runs["base"], runs["worse"]
    # `submit --wait --gate-file`: 1 for the failed gate, 0 for the passed one.
    code, out, _ = runs["exits"]["worse"]
    assert code == 1, runs["exits"]["worse"]
    assert "Gate FAILED" in out and "dropped significantly" in out
    code, out, _ = runs["exits"]["better"]
    assert code == 0, runs["exits"]["better"]
    assert "Gate PASSED" in out

    with http_for(server) as http:
        verdicts = {
            name: http.get(f"/job/{runs[name]}").json()["verdict"]
            for name in runs
            if name != "exits"
        }
        # The API: each rule with its numbers and p-value.
        bad = verdicts["worse"]
        assert bad["passed"] is False and bad["baseline"] == base and bad["candidate"] == worse
        no_drop, max_drop = bad["rules"]
        assert (no_drop["kind"], no_drop["passed"], no_drop["test"]) == (
            "no_significant_drop",
            False,
            "mcnemar",
        )
        assert no_drop["discordant"] == {"regressed": 15, "improved": 0}
        assert abs(no_drop["p_value"] - direct_mcnemar(15, 0)) <= 1e-9
        assert (no_drop["baseline"], no_drop["candidate"]) == (0.675, 0.6)
        # max_drop 0.1 holds: the drop is 0.075. Only the significance rule fails.
        assert max_drop["kind"] == "max_drop" and max_drop["passed"] is True
        assert math.isclose(max_drop["drop"], 0.075)
        good = verdicts["better"]
        assert good["passed"] is True and [c["passed"] for c in good["rules"]] == [True, True]
        assert good["rules"][0]["discordant"] == {"regressed": 0, "improved": 15}
        # Jobs without a gate have no verdict.
        assert verdicts["base"] is None and verdicts["mixed"] is None

        # POST /gate gives the same verdict object for the same rules.
        for name in ("worse", "better"):
            answer = http.post(
                "/gate", json={"baseline": base, "candidate": runs[name], "rules": GATE_RULES}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == verdicts[name]

    # The webhooks carry the same verdicts, signed.
    received = {r.path.rsplit("/", 1)[1]: r for r in hook.wait_for(2)}
    for name in ("worse", "better"):
        assert received[name].signed_with(SECRET)
        body = received[name].json()
        assert body["job_id"] == runs[name] and body["verdict"] == verdicts[name]

    # The CLI's gate command: exit 1 fails, 0 passes, 2 errors.
    rule = "exact_match:no_significant_drop"
    for name, expected in (("worse", 1), ("better", 0)):
        code, out, err = finish(
            cli(
                server,
                "gate",
                "--baseline",
                str(base),
                "--candidate",
                str(runs[name]),
                "--rule",
                rule,
            )
        )
        assert code == expected, (name, out, err)
    code, out, err = finish(
        cli(server, "gate", "--baseline", str(base), "--candidate", "99999", "--rule", rule)
    )
    assert code == 2 and "HTTP 404: Job 99999 not found." in err
    code, _, err = finish(cli(server, "gate", "--candidate", str(worse), "--rule", "exact_match"))
    assert code == 2 and "KIND one of" in err
    code, out, _ = finish(
        cli(server, "gate", "--candidate", str(worse), "--rule", "arith_gen/exact_match:min=0.62")
    )
    assert code == 1 and "0.6 < 0.62" in out


def test_gate_requests_are_checked_at_submission(
    server: ServerProcess, stub: CompletionsStubServer, runs: dict[str, Any]
) -> None:
    base = runs["base"]
    body = job_body(stub, "stub")
    with http_for(server, BOB) as bob, http_for(server) as alice:
        before = alice.get("/jobs").json()["total"]
        # Alice's job is no baseline for Bob: a 404, as the job itself would be.
        other = bob.post("/job", json={**body, "gate": {"baseline": base, "rules": [NO_DROP]}})
        assert other.status_code == 404 and other.json()["detail"] == (
            f"gate.baseline: Job {base} not found."
        )
        assert bob.get(f"/job/{base}").status_code == 404
        assert (
            bob.post(
                "/gate", json={"baseline": base, "candidate": base, "rules": [NO_DROP]}
            ).status_code
            == 404
        )
        for gate, words in (
            ({"baseline": base, "rules": [{"metric": "acc"}]}, "exactly one of min, max"),
            ({"baseline": base, "rules": []}, "at least 1"),
            ({"rules": [NO_DROP]}, 'add "baseline": <job id>'),
            (
                {"baseline": base, "rules": [{"metric": "acc", "min": 0.5, "max_drop": 1}]},
                "has min, max_drop",
            ),
        ):
            refused = alice.post("/job", json={**body, "gate": gate})
            assert refused.status_code == 422, refused.text
            messages = " ".join(item["msg"] for item in refused.json()["detail"])
            assert words in messages, messages
        assert alice.get("/jobs").json()["total"] == before  # nothing was queued
        bob_total = bob.get("/jobs").json()["total"]
        assert bob_total == 0


# ----------------------------------------------------------------------------- the dashboard


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


def test_dashboard_draws_the_comparison_and_shows_the_verdicts(
    browser: Any, server: ServerProcess, runs: dict[str, Any], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    out = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.get_by_test_id("key-input").fill(ALICE)
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("key-panel")).to_be_hidden()

    base, worse, better, mixed = (runs[n] for n in ("base", "worse", "better", "mixed"))
    page.goto(f"{server.url}/#/compare?jobs={base},{worse},{better},{mixed}")
    chart = page.get_by_test_id("compare-chart-svg")
    expect(chart).to_be_visible()
    # One lane per job, each with its interval; the two paired significant differences
    # marked, down for the regression and up for the improvement.
    points = chart.get_by_test_id("chart-point")
    expect(points).to_have_count(4)
    for i in range(4):
        assert points.nth(i).locator("line").count() == 3  # the interval and its two ends
    marks = chart.get_by_test_id("chart-significant")
    expect(marks).to_have_count(2)
    expect(marks.nth(0)).to_contain_text("▼ -0.0750")
    expect(marks.nth(0)).to_contain_text("McNemar")
    expect(marks.nth(1)).to_contain_text("▲ +0.0750")
    expect(chart.get_by_test_id("chart-note")).to_have_count(1)  # mixed: not significant
    tests = page.get_by_test_id("compare-test")
    expect(tests.nth(0)).to_have_text("6.1e-5 McNemar 15/0 of 200")
    expect(tests.nth(0)).to_have_attribute(
        "title", "p = 6.1e-5 (McNemar, 15 regressed / 0 improved of 200)"
    )
    # The gates taken against the first job: worse failed, better passed.
    verdicts = page.get_by_test_id("compare-verdicts").get_by_test_id("verdict")
    expect(verdicts).to_have_count(2)
    expect(verdicts.nth(0)).to_have_attribute("data-passed", "false")
    expect(verdicts.nth(1)).to_have_attribute("data-passed", "true")
    page.get_by_test_id("compare-view").screenshot(path=str(out / "compare-paired.png"))

    page.goto(f"{server.url}/#/compare?jobs={base},{runs['limited']}")
    expect(page.get_by_test_id("compare-warning").first).to_contain_text("limit differs")

    page.goto(f"{server.url}/#/job/{worse}")
    section = page.get_by_test_id("verdict-section")
    expect(section).to_be_visible()
    expect(section.get_by_test_id("verdict-badge")).to_have_text("✗ gate failed")
    rules = section.get_by_test_id("verdict-rule")
    expect(rules).to_have_count(2)
    expect(rules.nth(0)).to_have_attribute("data-passed", "false")
    expect(rules.nth(0)).to_contain_text("dropped significantly")
    section.screenshot(path=str(out / "job-verdict.png"))
    page.goto(f"{server.url}/#/job/{base}")
    expect(page.get_by_test_id("verdict-section")).to_be_hidden()
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
