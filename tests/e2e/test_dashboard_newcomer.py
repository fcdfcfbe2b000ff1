"""The newcomer's path: the dashboard in a real browser (Debian's Chromium), the new-job form
opened directly (a bookmark, a reload), the README's demo task's multiple-choice samples, dates
on times, and the pages at phone width; and the requests lm-eval would refuse later, refused
at submission through the HTTP API.

SCREENSHOTS_DIR=imgs uv run pytest tests/e2e/test_dashboard_newcomer.py regenerates
imgs/samples-mc.png and imgs/jobs-phone.png.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, expect

from tests.e2e import test_dashboard as dashboard
from tests.e2e.test_dashboard import API_KEY, CHROMIUM, UI_TIMEOUT_MS
from tests.e2e.test_dashboard_samples import shots
from tests.support.completions_server import running_stub_server
from tests.support.jobs import EXAMPLES_TASKS, stub_job, submit, wait_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
browser = dashboard.browser
page = dashboard.page
DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
DEMO_DOCS = [
    json.loads(line) for line in (EXAMPLES_TASKS / "demo_mc.jsonl").read_text().splitlines()
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("dashboard-newcomer") / "data"
    server = ServerProcess(data_dir, index_dir, API_KEYS=API_KEY, MAX_CONCURRENCY="2").start()
    yield server
    server.stop_jobs_and_terminate()


def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )


@pytest.fixture(scope="module")
def mc_job(server: ServerProcess) -> int:
    """The README's demo task with samples logged: lm-eval's dummy model picks at random."""
    with http(server) as client:
        job_id = submit(
            client,
            {
                "model": "dummy",
                "tasks": "demo_mc",
                "include_path": str(EXAMPLES_TASKS),
                "limit": 8,
                "log_samples": True,
            },
        )
        job = wait_for(client, job_id, timeout_s=240)
    assert job["status"] == "Completed", job["error"]
    return job_id


def test_form_opened_directly_draws_each_field_once_and_one_click_posts_once(
    page: Page, server: ServerProcess
) -> None:
    with http(server) as client:
        properties = client.get("/openapi.json").json()["components"]["schemas"]["JobRequest"][
            "properties"
        ]
        before = client.get("/jobs", params={"include_completed": "true"}).json()
    # A bookmark or a reload: the page starts at /#/new, with the key already stored.
    page.goto(f"{server.url}/#/new")
    page.reload()
    expect(page.get_by_test_id("job-form")).to_be_visible()
    expect(page.get_by_test_id("whoami")).to_be_visible()  # /me has answered too
    fields = page.locator("#job-form [data-testid^=field-]")
    names = [fields.nth(i).get_attribute("name") for i in range(fields.count())]
    assert sorted(names) == sorted(properties)  # each option once
    ids = page.evaluate("[...document.querySelectorAll('#job-form [id]')].map((e) => e.id)")
    assert len(ids) == len(set(ids))

    posts: list[Request] = []
    page.on(
        "request",
        lambda r: posts.append(r) if r.method == "POST" and r.url.endswith("/job") else None,
    )
    dashboard.fill_job(
        page, model="dummy", tasks="demo_mc", include_path=str(EXAMPLES_TASKS), limit="4"
    )
    page.get_by_test_id("submit-job").click()
    job_id = int(dashboard.job_id_from_url(page))
    with http(server) as client:
        job = wait_for(client, job_id, timeout_s=240)
        after = client.get("/jobs", params={"include_completed": "true"}).json()
    assert job["status"] == "Completed", job["error"]
    assert len(posts) == 1
    assert len(after["jobs"]) == len(before["jobs"]) + 1


def _float(text: str) -> float:
    return float(text.replace("\u2212", "-"))


def test_multiple_choice_samples_show_choices_pick_and_target(
    page: Page, server: ServerProcess, mc_job: int, tmp_path: Path
) -> None:
    page.goto(f"{server.url}/#/job/{mc_job}")
    expect(page.get_by_test_id("samples-section")).to_be_visible()
    rows = page.get_by_test_id("sample-row")
    expect(rows).to_have_count(8)
    for i in range(8):
        row = rows.nth(i)
        doc = DEMO_DOCS[int(row.get_attribute("data-doc-id") or -1)]
        choices = row.get_by_test_id("mc-choice")
        expect(choices).to_have_count(len(doc["choices"]))
        texts = [choices.nth(c).locator(".mc-text").inner_text() for c in range(choices.count())]
        assert texts == doc["choices"]
        scores = [_float(choices.nth(c).get_by_test_id("mc-ll").inner_text()) for c in range(4)]
        picks = [choices.nth(c).get_attribute("data-pick") == "true" for c in range(4)]
        targets = [choices.nth(c).get_attribute("data-target") == "true" for c in range(4)]
        # The pick is the highest log-likelihood (lm-eval's acc); the target is the doc's answer.
        assert picks.index(True) == scores.index(max(scores)) and picks.count(True) == 1
        assert targets == [c == doc["answer"] for c in range(4)]
        expect(row.get_by_test_id("sample-target")).to_contain_text(doc["choices"][doc["answer"]])
        right = picks.index(True) == doc["answer"]
        expect(row.get_by_test_id("sample-verdict")).to_have_text("✓ right" if right else "✗ wrong")
    # Times carry their date.
    for fact in ("Created", "Started", "Finished"):
        expect(page.locator(f"[data-fact={fact}]")).to_have_text(DATE_TIME)
    page.get_by_test_id("samples-section").screenshot(path=shots(tmp_path) / "samples-mc.png")


# The outermost elements that end past the screen's right edge (for the failure message).
WIDE_ELEMENTS = """[...document.querySelectorAll('body *')]
  .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
  .filter((e) => !e.parentElement.closest('.table-wrap'))
  .slice(0, 8).map((e) => `${e.tagName}#${e.id}.${e.className}`)"""


def test_jobs_job_and_form_pages_fit_a_phone(
    browser: Browser, server: ServerProcess, mc_job: int, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    context.set_default_timeout(UI_TIMEOUT_MS)
    context.add_init_script(f"localStorage.setItem('lm-eval-server.api-key', {API_KEY!r})")
    phone = context.new_page()
    try:
        for hash_, ready in (
            ("#/", "jobs-count"),
            (f"#/job/{mc_job}", "samples-section"),
            ("#/new", "job-form"),
        ):
            phone.goto(f"{server.url}/{hash_}")
            expect(phone.get_by_test_id(ready)).to_be_visible()
            if hash_ == "#/":
                expect(phone.get_by_test_id("job-row").first).to_be_visible()
                cell = phone.get_by_test_id("job-row").first.locator("td").nth(6)
                expect(cell).to_have_text(DATE_TIME)
                phone.screenshot(path=shots(tmp_path) / "jobs-phone.png")
            # Nothing wider than the screen: wide tables scroll inside their own box.
            widths = phone.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            wide = phone.evaluate(WIDE_ELEMENTS)
            assert widths[0] <= widths[1], f"{hash_}: {widths[0]} px wide on a phone: {wide}"
    finally:
        context.close()


@pytest.mark.parametrize(
    ("extra", "detail"),
    [
        ({"num_fewshot": True}, "argument --num_fewshot/-f: invalid int value: 'true'"),
        ({"limit": False}, "argument --limit/-L: invalid float value: 'false'"),
        ({"max_batch_size": True}, "invalid int value: 'true'"),
        ({"limit": 0}, "task.build_requests() did not find any docs!"),
        ({"hf_hub_log_args": {"push": True}}, "unexpected keyword argument 'push'"),
        # The server's own JOBS_OFFLINE default would stop the push after the whole run.
        (
            {"hf_hub_log_args": {"push_results_to_hub": True, "hub_results_org": "me"}},
            '"OfflineModeIsEnabled" after the whole evaluation',
        ),
        ({"wandb_args": "project=x"}, 'pip install "lm-eval[wandb]"'),
        ({"trackio_args": "project=x"}, 'pip install "lm-eval[trackio]"'),
        ({"check_integrity": True}, "Unable to find package root"),
        ({"timeout_s": True}, "valid number"),
    ],
)
def test_what_lm_eval_would_refuse_is_a_422_through_the_api(
    server: ServerProcess, extra: dict[str, object], detail: str
) -> None:
    """The fidelity cases through the HTTP API of a real server: a 422 with lm-eval's reason,
    and nothing queued."""
    body = {"model": "dummy", "tasks": "demo_mc", "include_path": str(EXAMPLES_TASKS), **extra}
    with http(server) as client:
        before = len(client.get("/jobs", params={"include_completed": "true"}).json()["jobs"])
        response = client.post("/job", json=body)
        after = len(client.get("/jobs", params={"include_completed": "true"}).json()["jobs"])
    assert response.status_code == 422
    assert detail in json.dumps(response.json()["detail"], ensure_ascii=False).replace('\\"', '"')
    assert after == before


def test_a_failed_api_jobs_error_ends_with_the_model_servers_reason(server: ServerProcess) -> None:
    """A real lm-eval job against a completions server that answers 404: the error summary's
    last line is the server's own answer, not lm-eval's progress bar."""
    with running_stub_server() as stub, http(server) as client:
        wrong_path = stub.base_url.replace("/v1/completions", "/v1/nothing")
        job_id = submit(client, stub_job(wrong_path, "arith_gen", limit=2))
        job = wait_for(client, job_id, timeout_s=240)
    assert job["status"] == "Failed"
    lines = job["error"].splitlines()
    assert lines[-1].startswith("The model server answered: ")
    assert "no route for POST /v1/nothing" in lines[-1]
    assert "404 Client Error" in lines[-2]
    assert "Requesting API" not in job["error"]
