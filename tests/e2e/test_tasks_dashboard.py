"""Task autocomplete and the upload form, in headless Chromium against a live server.

`UPDATE_SCREENSHOTS=1` saves imgs/tasks-autocomplete.png and imgs/tasks-upload.png.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.e2e import test_dashboard as dashboard
from tests.e2e.test_dashboard import API_KEY, open_form
from tests.e2e.test_tasks_api import DATA, task_yaml
from tests.support.jobs import ROOT
from tests.support.server import ServerProcess

# The dashboard tests' fixtures and their skip without Chromium: one server with an API key, a
# browser, a page with the key.
pytestmark = dashboard.pytestmark
server = dashboard.server
browser = dashboard.browser
page = dashboard.page


def shot(tab: Page, name: str, tmp_path: Path) -> None:
    out = ROOT / "imgs" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    tab.screenshot(path=out / name)


def test_tasks_field_suggests_names_from_the_server(
    page: Page, server: ServerProcess, tmp_path: Path
) -> None:
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/tasks?" in r.url else None)
    open_form(page)
    field = page.get_by_test_id("field-tasks")
    field.fill("")
    field.press_sequentially("arc_ea", delay=30)
    suggestions = page.get_by_test_id("task-suggestion")
    expect(suggestions.first).to_be_visible()
    names = suggestions.evaluate_all("els => els.map(e => e.dataset.name)")
    assert names[0] == "arc_easy"  # the name that starts with what was typed comes first
    assert all("arc_ea" in n for n in names) and len(names) <= 20
    # Debounced: typing six characters quickly asked once or twice, not six times.
    assert 1 <= len(asked) <= 2, asked
    assert "search=arc_ea" in asked[-1] and "limit=20" in asked[-1]
    shot(page, "tasks-autocomplete.png", tmp_path)

    page.locator('[data-testid="task-suggestion"][data-name="arc_easy"]').click()
    expect(field).to_have_value("arc_easy")
    expect(page.get_by_test_id("task-suggestions")).to_be_hidden()

    # The next entry of the list is completed in place, the first kept.
    field.press_sequentially(",hellasw", delay=30)
    page.locator('[data-testid="task-suggestion"][data-name="hellaswag"]').click()
    expect(field).to_have_value("arc_easy, hellaswag")


def test_upload_form_stores_a_task_that_autocomplete_then_finds(
    page: Page, server: ServerProcess, tmp_path: Path
) -> None:
    yaml_path = tmp_path / "say.yaml"
    yaml_path.write_text(task_yaml(name="say_lol_ui"))
    data_path = tmp_path / "say.jsonl"
    data_path.write_text(DATA)
    bad_path = tmp_path / "notes.txt"
    bad_path.write_text("not a task")

    open_form(page)
    page.get_by_test_id("task-upload").locator("summary").click()
    form = page.get_by_test_id("task-upload-form")
    expect(form).to_be_visible()

    # A refusal is shown with the server's reason.
    page.get_by_test_id("task-files").set_input_files([str(yaml_path), str(bad_path)])
    page.get_by_test_id("task-upload-submit").click()
    message = page.get_by_test_id("task-upload-message")
    expect(message).to_have_text(
        re.compile(r"Upload refused \(HTTP 415\): file 'notes.txt': unsupported file type")
    )

    page.get_by_test_id("task-files").set_input_files([str(yaml_path), str(data_path)])
    page.get_by_test_id("task-upload-submit").click()
    expect(message).to_have_text("Uploaded task say_lol_ui (5 documents).", timeout=120_000)
    expect(page.locator('[data-testid="task-upload-item"][data-name="say_lol_ui"]')).to_be_visible()
    field = page.get_by_test_id("field-tasks")
    expect(field).to_have_value(re.compile(r"say_lol_ui|demo_mc"))
    shot(page, "tasks-upload.png", tmp_path)

    field.fill("")
    field.press_sequentially("say_lol", delay=30)
    item = page.locator('[data-testid="task-suggestion"][data-name="say_lol_ui"]')
    expect(item).to_be_visible()
    expect(item).to_contain_text("uploaded")

    # Deleted from the list: gone from the server too.
    page.locator('[data-testid="task-upload-item"][data-name="say_lol_ui"]').get_by_test_id(
        "task-upload-delete"
    ).click()
    expect(page.locator('[data-testid="task-upload-item"]')).to_have_count(0)
    with server.client() as http:
        gone = http.get("/tasks/say_lol_ui", headers={"Authorization": f"Bearer {API_KEY}"})
        assert gone.status_code == 404
