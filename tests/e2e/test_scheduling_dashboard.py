"""The dashboard shows the GPUs a job was given (real Chromium against a real server)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, UI_TIMEOUT_MS
from tests.support.jobs import fake_job, submit, wait_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)",
)


def test_the_job_page_lists_its_gpus(servers: Callable[..., ServerProcess], tmp_path: Path):
    server = servers(GPUS="0,1", SHUTDOWN_STOPS_JOBS="true")
    with server.client() as client:
        two = submit(client, {**fake_job(), "resources": {"num_gpus": 2}})
        none = submit(client, fake_job())
        assert wait_for(client, two)["gpus"] == ["0", "1"]
        assert wait_for(client, none)["gpus"] == []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        for job_id, shown in ((two, "0, 1"), (none, "none")):
            page.goto(f"{server.url}/#/job/{job_id}")
            expect(page.get_by_test_id("job-id")).to_have_text(f"#{job_id}")
            expect(page.locator('[data-fact="GPUs"]')).to_have_text(shown)
        browser.close()
    assert not errors, errors
