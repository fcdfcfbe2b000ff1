"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a live server.

Needs `apt-get install chromium`; Playwright's own browser download is never used.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.jobs import EXAMPLES_TASKS, FAKE_LM_EVAL
from tests.support.server import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
JOB_TIMEOUT_MS = 240_000  # a dummy-model run on a busy 2-core machine
UI_TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)",
)


API_KEY = "dashboard-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("dashboard-server") / "data"
    server = ServerProcess(data_dir, index_dir, API_KEYS=API_KEY, MAX_CONCURRENCY="2").start()
    yield server
    server.stop_jobs_and_terminate()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server: ServerProcess) -> Iterator[Page]:
    """A fresh browser profile that has entered the API key through the dashboard's prompt."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Stop and Delete ask for confirmation.
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(server.url + "/")
    expect(page.get_by_test_id("key-panel")).to_be_visible()
    page.get_by_test_id("key-input").fill(API_KEY)
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("key-panel")).to_be_hidden()
    expect(page.get_by_test_id("jobs-count")).to_have_text(re.compile(r"\d+ jobs?"))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def open_form(page: Page) -> None:
    page.get_by_test_id("nav-new").click()
    expect(page.get_by_test_id("job-form")).to_be_visible()


def fill_job(page: Page, **fields: str) -> None:
    """Fill form fields by option name; opens "Advanced" for the options folded under it."""
    advanced = page.get_by_test_id("advanced")
    for name, value in fields.items():
        field = page.get_by_test_id(f"field-{name}")
        if not field.is_visible():
            advanced.locator("summary").click()
        field.fill(value)


def job_id_from_url(page: Page) -> str:
    page.wait_for_url(re.compile(r"#/job/\d+$"))
    return page.url.rsplit("/", 1)[1]


def test_submit_from_form_watch_progress_and_results(page: Page, server: ServerProcess) -> None:
    open_form(page)
    # The basic options come first; the rest wait under "Advanced".
    basic = page.locator("#form-basic [data-testid^=field-]")
    names = [basic.nth(i).get_attribute("name") for i in range(basic.count())]
    assert names == ["model", "tasks", "model_args", "limit", "num_fewshot"]
    # model_args takes key=value pairs or a JSON object (its schema also allows a list, which
    # must not make it look like a list of task names).
    expect(page.get_by_test_id("field-model_args")).to_have_attribute(
        "placeholder", "key=value,key2=value2 or a JSON object"
    )
    expect(page.get_by_test_id("field-log_samples")).to_have_attribute("type", "checkbox")
    expect(page.get_by_test_id("field-env_vars")).to_be_hidden()

    fill_job(page, model="dummy", tasks="demo_mc", limit="8", include_path=str(EXAMPLES_TASKS))
    page.get_by_test_id("field-log_samples").check()
    page.get_by_test_id("submit-job").click()
    job_id = job_id_from_url(page)
    expect(page.get_by_test_id("flash")).to_have_text(f"Job {job_id} successfully queued.")
    expect(page.get_by_test_id("job-argument")).to_contain_text("--tasks demo_mc")

    # Watch it in the live jobs table.
    page.get_by_test_id("nav-jobs").click()
    row = page.locator(f"[data-testid=job-row][data-job-id='{job_id}']")
    expect(row.get_by_test_id("status")).to_have_text("Completed", timeout=JOB_TIMEOUT_MS)
    expect(row.get_by_test_id("progress")).to_have_attribute("aria-valuenow", "100")
    expect(row.get_by_test_id("progress-label")).to_have_text("100%")
    expect(row).to_contain_text("dummy")
    expect(row).to_contain_text("demo_mc")

    # The job page: results table and the log tail.
    row.click()
    expect(page.get_by_test_id("job-status")).to_have_text("Completed")
    acc = page.locator("[data-testid=result-row][data-task=demo_mc][data-metric=acc]")
    expect(acc).to_have_count(1)
    value = float(acc.get_by_test_id("result-value").inner_text())
    assert 0.0 <= value <= 1.0
    expect(page.get_by_test_id("log")).to_contain_text("Running loglikelihood requests")
    page.get_by_test_id("log-tab-stdout").click()
    expect(page.get_by_test_id("log")).to_contain_text("|demo_mc|")
    expect(page.get_by_test_id("stop-button")).to_be_hidden()

    # The status filter keeps the job under Completed and hides it under Failed.
    page.get_by_test_id("nav-jobs").click()
    page.get_by_test_id("status-filter").select_option("Failed")
    expect(row).to_have_count(0)
    page.get_by_test_id("status-filter").select_option("Completed")
    expect(row).to_have_count(1)


def test_stop_and_delete_from_the_job_page(page: Page, server: ServerProcess) -> None:
    open_form(page)
    # The allowlisted lm_eval stand-in sleeps until stopped: no race with a finishing job.
    fill_job(
        page,
        model="dummy",
        tasks="demo_mc",
        include_path=str(EXAMPLES_TASKS),
        lm_eval_path=FAKE_LM_EVAL,
        env_vars="# the stand-in reads FAKE_* variables\nFAKE_SLEEP_S=600",
    )
    page.get_by_test_id("submit-job").click()
    job_id = job_id_from_url(page)
    expect(page.get_by_test_id("job-status")).to_have_text("Running")
    expect(page.get_by_test_id("log")).to_contain_text("sleeping 600")

    page.get_by_test_id("stop-button").click()
    expect(page.get_by_test_id("job-status")).to_have_text("Stopped")
    expect(page.get_by_test_id("stop-button")).to_be_hidden()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    job = httpx.get(f"{server.url}/job/{job_id}", headers=headers).json()
    assert job["status"] == "Stopped"

    page.get_by_test_id("delete-button").click()
    page.wait_for_url(re.compile(r"#/$"))
    expect(page.get_by_test_id("flash")).to_have_text(f"Job {job_id} deleted.")
    expect(page.locator(f"[data-testid=job-row][data-job-id='{job_id}']")).to_have_count(0)
    assert httpx.get(f"{server.url}/job/{job_id}", headers=headers).status_code == 404


def test_server_422_detail_is_shown_next_to_the_form(page: Page, server: ServerProcess) -> None:
    open_form(page)
    fill_job(page, model="dummy", tasks="demo_mcc", include_path=str(EXAMPLES_TASKS))
    page.get_by_test_id("submit-job").click()
    error = page.get_by_test_id("form-error")
    expect(error).to_contain_text("HTTP 422")
    expect(error).to_contain_text("demo_mcc")
    expect(error).to_contain_text("did you mean: demo_mc")
    assert page.url.endswith("#/new")

    # A schema error (a list `detail`) names the field and marks it.
    page.get_by_test_id("field-tasks").fill("demo_mc")
    fill_job(page, env_vars='{"FAKE_SLEEP_S": 5}')
    page.get_by_test_id("submit-job").click()
    expect(error).to_contain_text("env_vars.FAKE_SLEEP_S")
    expect(page.locator(".field.invalid [data-testid=field-env_vars]")).to_have_count(1)


def test_static_assets_need_no_key_and_docs_work_offline(page: Page, server: ServerProcess) -> None:
    for path in ("/", "/static/app.js", "/static/style.css", "/docs"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(f"{server.url}/jobs").status_code == 401
    assert httpx.get(f"{server.url}/static/%2e%2e/api/dashboard.py").status_code == 404

    # Readable in both colour schemes: dark mode swaps the palette, not just one colour.
    def colours() -> tuple[str, str]:
        style = "getComputedStyle(document.body)"
        return tuple(page.evaluate(f"[{style}.backgroundColor, {style}.color]"))

    page.emulate_media(color_scheme="light")
    light = colours()
    page.emulate_media(color_scheme="dark")
    dark = colours()
    assert light[0] != dark[0] and light[1] != dark[1]

    # Swagger UI renders from the vendored copy (nothing reachable outside this machine).
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(f"{server.url}/docs")
    expect(page.locator(".swagger-ui .information-container")).to_contain_text("lm-eval-server")
    expect(page.locator(".opblock-summary-path", has_text="/job/{job_id}/results")).to_be_visible()
    outside = [u for u in requested if not u.startswith((server.url, "data:"))]
    assert not outside, outside


def test_resume_a_stopped_job_from_the_job_page(page: Page, server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "model": "dummy",
        "tasks": "demo_mc",
        "include_path": str(EXAMPLES_TASKS),
        "lm_eval_path": FAKE_LM_EVAL,
        "env_vars": {"FAKE_SLEEP_S": "600"},
    }
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        job_id = http.post("/job", json=body).json()["job_id"]
        assert http.post(f"/job/{job_id}/stop").status_code == 200
        page.goto(f"{server.url}/#/job/{job_id}")
        expect(page.get_by_test_id("job-status")).to_have_text("Stopped")
        expect(page.locator("[data-fact=Attempt]")).to_have_text("1")
        page.get_by_test_id("resume-button").click()
        expect(page.get_by_test_id("flash")).to_have_text(
            f"Job {job_id} queued again as attempt 2."
        )
        expect(page.get_by_test_id("job-status")).to_have_text("Running")
        expect(page.get_by_test_id("resume-button")).to_be_hidden()
        expect(page.locator("[data-fact=Attempt]")).to_have_text("2")
        assert http.get(f"/job/{job_id}").json()["attempt"] == 2
        assert http.post(f"/job/{job_id}/stop").status_code == 200
        expect(page.get_by_test_id("resume-button")).to_be_visible()
