"""The dashboard on a server shared by a team, in a real browser (Debian's Chromium): a user sees
their name and only their own jobs; an admin sees every owner's jobs and filters by owner."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, UI_TIMEOUT_MS
from tests.support.jobs import fake_job, submit, wait_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)",
)

KEYS = {"alice": "dash-alice-key", "bob": "dash-bob-key", "root": "dash-root-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("dashboard-team") / "data"
    server = ServerProcess(
        data_dir,
        index_dir,
        API_KEYS=f"alice:{KEYS['alice']},bob:{KEYS['bob']}",
        ADMIN_KEYS=f"root:{KEYS['root']}",
    ).start()
    yield server
    server.stop_jobs_and_terminate()


@pytest.fixture(scope="module")
def jobs(server: ServerProcess) -> dict[str, list[int]]:
    """Two finished jobs of alice's and one of bob's, submitted through the API."""
    owned: dict[str, list[int]] = {"alice": [], "bob": []}
    for name in ("alice", "bob", "alice"):
        headers = {"Authorization": f"Bearer {KEYS[name]}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            job_id = submit(http, fake_job())
            wait_for(http, job_id)
            owned[name].append(job_id)
    return owned


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def signed_in(browser: Browser, server: ServerProcess) -> Iterator[Callable[[str], Page]]:
    """A fresh browser profile per principal, which entered its key through the key panel."""
    contexts = []
    errors: list[str] = []

    def open_as(name: str) -> Page:
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        context.set_default_timeout(UI_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.get_by_test_id("key-panel")).to_be_visible()
        expect(page.get_by_test_id("whoami")).to_be_hidden()  # no key yet: nobody
        page.get_by_test_id("key-input").fill(KEYS[name])
        page.get_by_test_id("key-save").click()
        expect(page.get_by_test_id("key-panel")).to_be_hidden()
        return page

    yield open_as
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"


def row_ids(page: Page) -> list[int]:
    rows = page.get_by_test_id("job-row")
    return sorted(int(rows.nth(i).get_attribute("data-job-id") or 0) for i in range(rows.count()))


def owners(page: Page) -> list[str]:
    return sorted(set(page.get_by_test_id("owner").all_inner_texts()))


def test_a_user_sees_their_name_and_only_their_jobs(
    signed_in: Callable[[str], Page], jobs: dict[str, list[int]]
) -> None:
    page = signed_in("alice")
    expect(page.get_by_test_id("whoami")).to_have_text("Signed in as alice")
    expect(page.get_by_test_id("jobs-count")).to_have_text("2 jobs")
    assert row_ids(page) == sorted(jobs["alice"])
    assert owners(page) == ["alice"]
    expect(page.get_by_test_id("owner-header")).to_have_text("Owner")
    expect(page.get_by_test_id("owner-filter")).to_be_hidden()

    # Her job's page names its owner; bob's job does not exist for her.
    page.locator(f"[data-testid=job-row][data-job-id='{jobs['alice'][0]}']").click()
    expect(page.get_by_test_id("job-status")).to_have_text("Completed")
    expect(page.locator("[data-fact=Owner]")).to_have_text("alice")
    bobs = jobs["bob"][0]
    page.goto(page.url.rsplit("#", 1)[0] + f"#/job/{bobs}")
    expect(page.get_by_test_id("flash")).to_have_text(f"Job {bobs} does not exist (deleted?).")


def test_an_admin_sees_every_owner_and_filters_by_owner(
    signed_in: Callable[[str], Page], jobs: dict[str, list[int]]
) -> None:
    page = signed_in("root")
    expect(page.get_by_test_id("whoami")).to_have_text("Signed in as root (admin)")
    every = sorted(jobs["alice"] + jobs["bob"])
    expect(page.get_by_test_id("jobs-count")).to_have_text(f"{len(every)} jobs")
    assert row_ids(page) == every
    assert owners(page) == ["alice", "bob"]

    select = page.get_by_test_id("owner-filter")
    expect(select).to_be_visible()
    expect(select.locator("option")).to_have_text(["All owners", "alice", "bob"])
    select.select_option("bob")
    expect(page.get_by_test_id("jobs-count")).to_have_text("1 job")
    assert row_ids(page) == jobs["bob"]
    assert owners(page) == ["bob"]
    select.select_option("alice")
    expect(page.get_by_test_id("jobs-count")).to_have_text("2 jobs")
    assert row_ids(page) == sorted(jobs["alice"])
    select.select_option("")
    expect(page.get_by_test_id("jobs-count")).to_have_text(f"{len(every)} jobs")

    # Switching to a user's key: the name follows, the filter goes, the list narrows.
    page.get_by_test_id("key-button").click()
    page.get_by_test_id("key-input").fill(KEYS["bob"])
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("whoami")).to_have_text("Signed in as bob")
    expect(select).to_be_hidden()
    expect(page.get_by_test_id("jobs-count")).to_have_text("1 job")
    assert row_ids(page) == jobs["bob"]
    assert re.fullmatch(r"\d+", str(jobs["bob"][0]))
