"""The `lm-eval-server` CLI against a live server with API keys, as a CI job would use it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lm_eval_server import cli
from tests.support.jobs import DUMMY_JOB, EXAMPLES_TASKS, FAKE_LM_EVAL
from tests.support.server import ServerProcess, free_port

API_KEY = "cli-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("cli-server") / "data"
    server = ServerProcess(data_dir, index_dir, API_KEYS=API_KEY, MAX_CONCURRENCY="2").start()
    yield server
    server.stop_jobs_and_terminate()


def run(
    server: ServerProcess, *args: str, token: str | None = API_KEY
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LM_EVAL_SERVER_URL": server.url}
    env.pop("LM_EVAL_SERVER_TOKEN", None)
    if token is not None:
        env["LM_EVAL_SERVER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "lm_eval_server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def sleeper_args() -> list[str]:
    """A job that runs until stopped, through the allowlisted stand-in for lm_eval."""
    return [
        "--model", "dummy", "--tasks", "demo_mc", "--include_path", str(EXAMPLES_TASKS),
        "--lm_eval_path", FAKE_LM_EVAL, "--env", "FAKE_SLEEP_S=600",
    ]  # fmt: skip


def test_submit_wait_results_logs_delete(server: ServerProcess) -> None:
    out = ok(
        run(
            server, "submit", "--model", "dummy", "--tasks", "demo_mc",
            "--include_path", str(EXAMPLES_TASKS), "--limit", "8", "--log_samples",
        )
    )  # fmt: skip
    job_id = out.strip()
    assert job_id.isdigit()

    waited = ok(run(server, "wait", job_id, "--timeout", "280", "--interval", "0.5"))
    assert f"Job {job_id} Completed" in waited

    lines = ok(run(server, "results", job_id)).splitlines()
    assert lines[0].split() == ["TASK", "FILTER", "METRIC", "VALUE", "STDERR"]
    row = next(line.split() for line in lines[1:] if " acc " in f" {line} ")
    assert row[:3] == ["demo_mc", "none", "acc"]
    assert 0.0 <= float(row[3]) <= 1.0
    # VALUE is right-aligned under its header.
    value_end = lines[0].index("VALUE") + len("VALUE")
    acc_line = next(line for line in lines if " acc " in line)
    assert acc_line[:value_end].endswith(row[3])

    full = json.loads(ok(run(server, "results", job_id, "--json")))
    assert "demo_mc" in full["results"]["results"]

    assert "demo_mc" in ok(run(server, "logs", job_id))
    assert len(ok(run(server, "logs", job_id, "--tail", "2")).splitlines()) <= 2
    # A finished job's followed log ends by itself; stdout holds lm-eval's results table.
    assert "demo_mc" in ok(run(server, "logs", job_id, "-f", "--stream", "stdout"))

    status = ok(run(server, "status", job_id))
    assert "Completed (exit code 0)" in status
    assert "demo_mc" in status
    listing = ok(run(server, "jobs", "--status", "Completed"))
    assert any(line.split()[:2] == [job_id, "Completed"] for line in listing.splitlines()[1:])
    assert json.loads(ok(run(server, "status", job_id, "--json")))["status"] == "Completed"

    assert f"Job {job_id} deleted." in ok(run(server, "delete", job_id))
    gone = run(server, "status", job_id)
    assert gone.returncode == 1
    assert "HTTP 404" in gone.stderr


def test_submit_file_wait_timeout_stop(server: ServerProcess, tmp_path: Path) -> None:
    body = {**DUMMY_JOB, "lm_eval_path": FAKE_LM_EVAL, "env_vars": {"FAKE_SLEEP_S": "600"}}
    request = tmp_path / "job.json"
    request.write_text(json.dumps(body))
    # Options after the file override its fields.
    job_id = ok(run(server, "submit", str(request), "--limit", "3")).strip()
    assert "--limit 3" in json.loads(ok(run(server, "status", job_id, "--json")))["argument"]

    timed_out = run(server, "wait", job_id, "--timeout", "0.5", "--interval", "0.1")
    assert timed_out.returncode == cli.EXIT_TIMEOUT, timed_out.stderr

    assert f"Job {job_id}" in ok(run(server, "stop", job_id))
    stopped = run(server, "wait", job_id, "--timeout", "60", "--interval", "0.2")
    assert stopped.returncode == cli.EXIT_STOPPED, stopped.stderr
    assert "Stopped" in stopped.stdout

    not_done = run(server, "results", job_id)
    assert not_done.returncode == 1
    assert "HTTP 409" in not_done.stderr


def test_submit_wait_flag_reports_failure(server: ServerProcess) -> None:
    args = [a if a != "FAKE_SLEEP_S=600" else "FAKE_EXIT=3" for a in sleeper_args()]
    result = run(server, "submit", *args, "--wait", "--wait_timeout", "120")
    assert result.returncode == cli.EXIT_ERROR, result.stderr
    job_id, final = result.stdout.splitlines()
    assert final.startswith(f"Job {job_id} Failed, exit code 3")


def test_errors_exit_1_with_the_servers_detail(server: ServerProcess) -> None:
    unknown_model = run(server, "submit", "--model", "no_such_model", "--tasks", "demo_mc")
    assert unknown_model.returncode == 1
    assert "HTTP 422" in unknown_model.stderr and "no_such_model" in unknown_model.stderr

    typo = run(server, "submit", "--modle", "dummy")
    assert typo.returncode == 1
    assert "did you mean --model" in typo.stderr

    bad_number = run(server, "submit", "--model", "dummy", "--num_fewshot", "two")
    assert bad_number.returncode == 1 and "--num_fewshot" in bad_number.stderr

    assert "HTTP 404" in run(server, "stop", "999999").stderr
    assert run(server, "delete", "999999").returncode == 1


def test_api_key_from_flag_env_or_missing(server: ServerProcess) -> None:
    refused = run(server, "jobs", token=None)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "API key" in refused.stderr
    ok(run(server, "jobs", "--token", API_KEY, token=None))
    ok(run(server, "--token", API_KEY, "jobs", token=None))
    # submit --help lists the server's options; it needs no key (the schema is public).
    help_text = ok(run(server, "submit", "--help", token=None))
    assert "--num_fewshot" in help_text and "--log_samples " in help_text


def test_serve_runs_the_app(tmp_path: Path, index_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "INDEX_DIR": str(index_dir)}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lm_eval_server.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        listing = subprocess.run(
            [sys.executable, "-m", "lm_eval_server.cli", "--url", url, "jobs"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.stdout.split()[:3] == ["ID", "STATUS", "PROGRESS"], listing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log_text = log_path.read_text()
    # The default host is loopback, so there is no warning about an open server.
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log_text
    assert "No API_KEYS set" not in log_text


def test_unreachable_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval_server.cli", "--url", "http://127.0.0.1:9", "jobs"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr


def test_parse_submit_follows_the_schema() -> None:
    properties = {
        "model": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "limit": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "num_fewshot": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "log_samples": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "apply_chat_template": {
            "anyOf": [{"type": "boolean"}, {"type": "string"}, {"type": "null"}]
        },
        "model_args": {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]},
        "env_vars": {"anyOf": [{"type": "object"}, {"type": "null"}]},
    }
    tokens = [
        "job.json", "--model", "hf", "--limit", "8", "--num-fewshot=5", "--log_samples",
        "--apply_chat_template", "--model_args", '{"pretrained": "gpt2"}',
        "--env", "A=1", "--env_vars", '{"B": "2"}', "--wait",
    ]  # fmt: skip
    file, body, client = cli.parse_submit(tokens, properties)
    assert file == "job.json"
    assert body == {
        "model": "hf",
        "limit": 8,
        "num_fewshot": 5,
        "log_samples": True,
        "apply_chat_template": True,
        "model_args": {"pretrained": "gpt2"},
        "env_vars": {"B": "2", "A": "1"},
    }
    assert client == {"wait": True}
    _, body, _ = cli.parse_submit(["--apply_chat_template", "chatml", "--limit", "0.5"], properties)
    assert body == {"apply_chat_template": "chatml", "limit": 0.5}
    # A value is the text typed, even when it reads like a boolean: lm-eval judges it.
    _, body, _ = cli.parse_submit(["--apply_chat_template", "false"], properties)
    assert body == {"apply_chat_template": "false"}
    with pytest.raises(cli.CliError, match="is a flag"):
        cli.parse_submit(["--log_samples=maybe"], properties)
    with pytest.raises(cli.CliError, match="needs a value"):
        cli.parse_submit(["--model"], properties)


def test_progress_column_names_the_phase_before_the_first_request() -> None:
    from lm_eval_server.cli import fmt_progress

    loading = {"phase": "loading model", "done": 0, "total": 0, "eta_s": None}
    counting = {"phase": "loglikelihood", "done": 5, "total": 20, "eta_s": 3.0}
    assert fmt_progress({"status": "Queued"}) == "-"
    assert fmt_progress({"status": "Running", "progress": loading}) == "0% loading model"
    running = {"status": "Running", "inference_progress_pct": 25, "progress": counting}
    assert fmt_progress(running).startswith("25% 5/20 eta ")


def test_submit_secret_option_sends_a_reference() -> None:
    properties = {"env_vars": {"anyOf": [{"type": "object"}, {"type": "null"}]}}
    tokens = ["--env", "A=1", "--secret", "OPENAI_API_KEY=openai"]
    _, body, _ = cli.parse_submit(tokens, properties)
    assert body == {"env_vars": {"A": "1", "OPENAI_API_KEY": {"secret": "openai"}}}
    with pytest.raises(cli.CliError, match="--secret wants KEY=SECRET"):
        cli.parse_submit(["--secret", "OPENAI_API_KEY"], properties)


def test_gate_rules_from_the_command_line() -> None:
    assert cli.parse_rule("arc_easy/acc:min=0.6") == {
        "task": "arc_easy",
        "metric": "acc",
        "min": 0.6,
    }
    assert cli.parse_rule("acc:max_drop=0.02") == {"metric": "acc", "max_drop": 0.02}
    assert cli.parse_rule("gsm8k/exact_match,strict-match:no_significant_drop=0.01") == {
        "task": "gsm8k",
        "metric": "exact_match",
        "filter": "strict-match",
        "no_significant_drop": True,
        "alpha": 0.01,
    }
    assert cli.parse_rule('{"metric": "acc", "max": 2}') == {"metric": "acc", "max": 2}
    for bad, words in (
        ("acc", "KIND one of"),
        ("acc:min", "min needs a value"),
        ("acc:min=x", "'x' is not a number"),
        ("acc:most=1", "KIND one of"),
        ("{nope", "not valid JSON"),
    ):
        with pytest.raises(cli.CliError, match=words):
            cli.parse_rule(bad)


def test_verdict_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    check = {"passed": False, "reason": "t/acc = 0.5 < 0.6"}
    failed = {"passed": False, "baseline": 1, "candidate": 2, "rules": [check], "warnings": []}
    assert cli.verdict_exit(failed) == cli.GATE_FAILED
    assert "Gate FAILED for job 2 against job 1" in capsys.readouterr().out
    passed = {**failed, "passed": True, "rules": [{**check, "passed": True}]}
    assert cli.verdict_exit(passed) == cli.GATE_PASSED
    assert cli.verdict_exit({**failed, "error": "the baseline job 1 no longer exists"}) == 2
    assert cli.verdict_exit(None) == cli.GATE_ERROR


def test_resume_status_and_logs_of_an_earlier_attempt(server: ServerProcess) -> None:
    job_id = ok(run(server, "submit", *sleeper_args())).strip()
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        while "sleeping 600" not in http.get(f"/job/{job_id}/logs").text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    ok(run(server, "stop", job_id))
    assert ok(run(server, "resume", job_id)).strip() == f"Job {job_id} queued again as attempt 2."
    conflict = run(server, "resume", job_id)  # queued or running now
    assert conflict.returncode == 1 and "HTTP 409" in conflict.stderr
    status = ok(run(server, "status", job_id))
    assert re.search(r"attempt:\s+2\n", status) and re.search(r"cache:\s+-\n", status)
    assert "sleeping 600" in ok(run(server, "logs", job_id, "--attempt", "1"))
    ok(run(server, "stop", job_id))
