"""The sample browser and the compare view in a real browser (Debian's Chromium), on two runs
whose answers are known (tests/support/completions_server.py).

SCREENSHOTS_DIR=imgs uv run pytest tests/e2e/test_dashboard_samples.py regenerates
imgs/samples.png and imgs/compare.png.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.e2e import test_dashboard as dashboard
from tests.e2e.test_dashboard import API_KEY, CHROMIUM, UI_TIMEOUT_MS
from tests.support.completions_server import is_answered_correctly, running_stub_server
from tests.support.jobs import stub_job, submit, wait_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
# The browser and a page that has entered the API key, as the dashboard tests have them.
browser = dashboard.browser
page = dashboard.page
EN = "\u2013"  # the en dash in "1-20 of 65" ranges


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("dashboard-samples-server") / "data"
    server = ServerProcess(data_dir, index_dir, API_KEYS=API_KEY, MAX_CONCURRENCY="2").start()
    yield server
    server.stop_jobs_and_terminate()


@pytest.fixture(scope="module")
def runs(server: ServerProcess) -> tuple[int, int]:
    """Two Completed arith_gen runs with samples: 135/200 right, then 175/200."""
    ids = []
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as http:
        for correct_per_cycle in (27, 35):
            with running_stub_server(correct_per_cycle=correct_per_cycle) as stub:
                job_id = submit(http, stub_job(stub.base_url, "arith_gen", log_samples=True))
                job = wait_for(http, job_id, timeout_s=240)
            assert job["status"] == "Completed", job["error"]
            ids.append(job_id)
    return ids[0], ids[1]


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def row_ids(page: Page) -> list[int]:
    rows = page.get_by_test_id("sample-row")
    return [int(rows.nth(i).get_attribute("data-doc-id") or -1) for i in range(rows.count())]


def test_sample_browser_pages_through_exactly_the_wrong_answers(
    page: Page, server: ServerProcess, runs: tuple[int, int], tmp_path: Path
) -> None:
    base, _ = runs
    wrong = [q for q in range(200) if not is_answered_correctly(q, 27)]
    page.goto(f"{server.url}/#/job/{base}")
    section = page.get_by_test_id("samples-section")
    expect(section).to_be_visible()
    expect(page.get_by_test_id("samples-task")).to_have_value("arith_gen")
    expect(page.get_by_test_id("samples-range")).to_have_text(f"1{EN}20 of 200 samples")
    assert row_ids(page) == list(range(20))
    verdicts = page.get_by_test_id("sample-row")
    for q in range(20):
        expected = "true" if is_answered_correctly(q, 27) else "false"
        expect(verdicts.nth(q)).to_have_attribute("data-correct", expected)
    expect(page.get_by_test_id("samples-prev")).to_be_disabled()

    page.get_by_test_id("samples-wrong").check()
    expect(page.get_by_test_id("samples-range")).to_have_text(f"1{EN}20 of 65 wrong answers")
    assert row_ids(page) == wrong[:20]
    first = page.get_by_test_id("sample-row").first
    expect(first.get_by_test_id("sample-verdict")).to_have_text("✗ wrong")
    target = int(first.get_by_test_id("sample-target").inner_text())
    # The stub's wrong answer is the sum plus one; the response shows it as lm-eval logged it.
    expect(first.get_by_test_id("sample-response")).to_have_text(f'["{target + 1}"]')
    page.screenshot(path=shots(tmp_path) / "samples.png", full_page=False)

    collected = list(wrong[:20])
    for start in (21, 41, 61):
        page.get_by_test_id("samples-next").click()
        end = min(start + 19, 65)
        expect(page.get_by_test_id("samples-range")).to_have_text(
            f"{start}{EN}{end} of 65 wrong answers"
        )
        collected += row_ids(page)
    assert collected == wrong
    expect(page.get_by_test_id("samples-next")).to_be_disabled()
    page.get_by_test_id("samples-prev").click()
    expect(page.get_by_test_id("samples-range")).to_have_text(f"41{EN}60 of 65 wrong answers")


def test_tick_two_jobs_and_compare(
    page: Page, server: ServerProcess, runs: tuple[int, int], tmp_path: Path
) -> None:
    base, better = runs
    button = page.get_by_test_id("compare-button")
    expect(button).to_be_disabled()
    for job_id in (base, better):
        row = page.locator(f"[data-testid=job-row][data-job-id='{job_id}']")
        row.get_by_test_id("compare-pick").check()
    expect(button).to_have_text("Compare (2)")
    # Ticking a box does not open the job page.
    assert not re.search(r"#/job/", page.url)
    button.click()
    page.wait_for_url(re.compile(rf"#/compare\?jobs={base},{better}$"))
    expect(page.get_by_test_id("compare-title")).to_have_text(f"#{base} · #{better}")
    row = page.locator("[data-testid=compare-row][data-task=arith_gen][data-metric=exact_match]")
    expect(row).to_have_count(1)
    values = row.get_by_test_id("compare-value")
    expect(values.nth(0)).to_have_text("0.6750 ± 0.0332")
    expect(values.nth(1)).to_have_text("0.8750 ± 0.0234")
    delta = row.get_by_test_id("compare-delta")
    expect(delta).to_have_text("+0.2000 *")
    expect(delta).to_have_attribute("data-significant", "true")
    page.locator("#compare-view details summary").click()
    expect(page.get_by_test_id("compare-markdown")).to_contain_text(
        "| arith_gen | exact_match | none | 0.6750 ± 0.0332 | 0.8750 ± 0.0234 | +0.2000 * |"
    )
    page.screenshot(path=shots(tmp_path) / "compare.png", full_page=False)

    # A bad list shows the server's reason.
    page.goto(f"{server.url}/#/compare?jobs={base},{base}")
    expect(page.get_by_test_id("compare-error")).to_have_text(
        f"jobs: job {base} is listed twice; list each job once", timeout=UI_TIMEOUT_MS
    )
