"""Known scores through /results, live progress, big logs, follow, and failure reasons."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.support.completions_server import running_stub_server
from tests.support.fake_lm_eval import pattern
from tests.support.jobs import fake_job, stub_job, submit, wait_for


def test_known_answers_progress_and_samples(client: Any) -> None:
    with running_stub_server(delay_s=0.02) as stub:
        exact = submit(client, stub_job(stub.base_url, "arith_gen", log_samples=True))
        # Its answers are arith_gen's first 20: left out of the response cache, so that `exact`
        # computes all of its own requests whenever the two run.
        slow = submit(client, stub_job(stub.base_url, "arith_gen_tiny", response_cache=False))
        broken = submit(client, stub_job(stub.base_url, "broken_data"))
        seen: set[int] = set()
        phases: set[str] = set()
        deadline = time.monotonic() + 180
        while client.get(f"/job/{exact}").json()["status"] not in {"Completed", "Failed"}:
            for job in client.get("/jobs").json()["jobs"]:
                if job["job_id"] == exact and job["status"] == "Running":
                    seen.add(job["inference_progress_pct"])
                    if job["progress"]:
                        phases.add(job["progress"]["phase"])
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job = wait_for(client, exact)
        assert job["status"] == "Completed", job["error"]
        assert [p for p in seen if 0 < p < 100], f"no intermediate progress in {sorted(seen)}"
        # An API model's bars count the request type lm-eval said it was running.
        assert "generate_until" in phases
        assert phases <= {
            "starting",
            "loading model",
            "building requests",
            "generate_until",
            "writing results",
        }
        assert job["inference_progress_pct"] == 100
        assert job["progress"]["done"] == job["progress"]["total"] == 200

        results = client.get(f"/job/{exact}/results").json()
        [metric] = [m for m in results["metrics"] if m["metric"] == "exact_match"]
        assert metric["task"] == "arith_gen" and metric["value"] == 135 / 200
        assert results["results"]["results"]["arith_gen"]["exact_match,none"] == 0.675
        assert results["results"]["n-samples"]["arith_gen"]["effective"] == 200

        samples = client.get(f"/job/{exact}/samples", params={"task": "arith_gen"})
        assert samples.status_code == 200
        assert len(samples.text.splitlines()) == 200
        assert client.get(f"/job/{exact}/samples", params={"task": "nope"}).status_code == 404

        assert wait_for(client, slow)["status"] == "Completed"
        tiny = client.get(f"/job/{slow}/results").json()
        assert tiny["metrics"][0]["value"] == 13 / 20
        assert stub.request_count >= 220

        failed = wait_for(client, broken)
        assert failed["status"] == "Failed"
        assert failed["exit_code"] not in (0, None)
        assert "Traceback" in failed["error"]
        assert "this_file_does_not_exist.jsonl" in failed["error"]


def test_big_log_comes_back_byte_for_byte(client: Any) -> None:
    size = 30 * 1024 * 1024
    job_id = submit(client, fake_job(FAKE_STDERR_BYTES=str(size)))
    job = wait_for(client, job_id)
    assert job["status"] == "Completed"
    assert len(job["stderr"]) <= 1000 and job["stderr_truncated"] is True
    full = client.get(f"/job/{job_id}/logs", params={"stream": "stderr"})
    assert full.content == pattern(size)
    started = time.perf_counter()
    detail = client.get(f"/job/{job_id}")
    # Bounded in size, not timed: the detail carries at most LOG_TAIL_LINES lines per stream.
    assert len(detail.content) < 200_000
    assert time.perf_counter() >= started


def test_follow_streams_until_the_job_ends(client: Any) -> None:
    job_id = submit(client, fake_job(FAKE_SLEEP_S="2"))
    wait_for(client, job_id, {"Running"})
    received: list[tuple[float, bytes]] = []

    def watch() -> None:
        with client.stream(
            "GET", f"/job/{job_id}/logs", params={"stream": "stdout", "follow": "true"}
        ) as response:
            for chunk in response.iter_bytes():
                received.append((time.monotonic(), chunk))

    reader = threading.Thread(target=watch)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "follow did not end when the job ended"
    finished = client.get(f"/job/{job_id}").json()
    assert finished["status"] == "Completed"
    text = b"".join(chunk for _, chunk in received).decode()
    assert text == "fake lm_eval started\nfake lm_eval done\n"
    # The first line arrived as a separate chunk, before the job's 2 s sleep ended.
    assert received[0][1].startswith(b"fake lm_eval started")
    assert b"done" not in received[0][1]
