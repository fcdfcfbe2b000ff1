"""Regenerate imgs/openapi.png, imgs/dashboard.png and imgs/job.png from a real server.

    uv run python scripts/screenshots.py [--out imgs]

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`), like the browser
tests. Starts the server with MAX_CONCURRENCY=1 and real jobs (lm-eval's dummy model, and
local-completions against the test stub) so the table shows every state: Completed, Failed,
Stopped, Running with a moving progress bar, and Queued. Takes about a minute.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the live-server and stub helpers

import httpx  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402
from tests.support.completions_server import model_args_for, running_completions_server  # noqa: E402
from tests.support.jobs import DUMMY_JOB, TEST_TASKS  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


def wait(http: httpx.Client, job_id: int, until: Any, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = http.get(f"/job/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} stuck: {job['status']} {job.get('error')}")
        time.sleep(0.5)


def submit(http: httpx.Client, body: dict[str, Any]) -> int:
    response = http.post("/job", json=body)
    response.raise_for_status()
    return int(response.json()["job_id"])


def populate(http: httpx.Client, stub_url: str) -> int:
    """Jobs in every state; returns the id of a Completed job worth a job-page screenshot."""
    stub = {
        "model": "local-completions",
        "model_args": model_args_for(stub_url),
        "include_path": str(TEST_TASKS),
    }
    done = submit(http, {**stub, "tasks": "arith_gen_tiny"})
    submit(http, DUMMY_JOB)
    # No torch and no network here: a realistic failure with a readable error.
    failed = submit(
        http, {**DUMMY_JOB, "model": "hf", "model_args": "pretrained=EleutherAI/pythia-70m"}
    )
    wait(http, failed, lambda j: j["status"] in ("Completed", "Failed", "Stopped"))
    running = submit(http, {**stub, "tasks": "arith_gen"})
    stopped = submit(http, {**DUMMY_JOB, "limit": 20})
    http.post(f"/job/{stopped}/stop").raise_for_status()
    submit(http, {**DUMMY_JOB, "tasks": "demo_mc", "num_fewshot": 2})
    wait(http, running, lambda j: (j["inference_progress_pct"] or 0) >= 35)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "imgs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, running_completions_server(delay_s=0.4) as stub:
        # No task index: the screenshots need none, and building one takes a while.
        server = ServerProcess(
            Path(tmp) / "data", Path(tmp) / "index", MAX_CONCURRENCY="1", TASK_INDEX="false"
        ).start()
        try:
            take(server, stub, args.out)
        finally:
            server.stop_jobs_and_terminate()
    for name in ("openapi.png", "dashboard.png", "job.png"):
        print(args.out / name)
    return 0


def take(server: ServerProcess, stub_url: str, out: Path) -> None:
    with server.client() as http, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, color_scheme="light")
        page.goto(f"{server.url}/docs")
        expect(page.locator(".opblock-summary-path").first).to_be_visible()
        page.screenshot(path=out / "openapi.png")

        page.set_viewport_size({"width": 1280, "height": 720})

        done = populate(http, stub_url)
        page.goto(f"{server.url}/#/")
        expect(page.get_by_test_id("job-row")).to_have_count(6)
        page.wait_for_timeout(2000)  # let the progress bars finish their transition
        page.screenshot(path=out / "dashboard.png")

        page.goto(f"{server.url}/#/job/{done}")
        expect(page.get_by_test_id("result-row").first).to_be_visible()
        page.screenshot(path=out / "job.png")
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
