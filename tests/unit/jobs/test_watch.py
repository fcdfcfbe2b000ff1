"""The failure summary of a job: what a person reads first when a job fails."""

from __future__ import annotations

from lm_eval_server.jobs.watch import summarize_failure

# The end of a real lm-eval 0.4.13 stderr: local-completions against a server that answers
# 404 (captured from `python -m lm_eval run` against tests/support/completions_server.py).
LOG = [
    "2026-12-02:06:52:58 INFO     [evaluator:574] Running generate_until requests",
    "Requesting API:   0%|          | 0/4 [00:00<?, ?it/s]2026-12-02:06:52:59 WARNING  "
    '[models.api_models:479] API request failed with error message: {"error": {"message": '
    '"no route for POST /v1/nothing", "type": "invalid_request_error"}}. Retrying...',
    "Traceback (most recent call last):",
    '  File "lm_eval/models/api_models.py", line 482, in model_call',
    "    response.raise_for_status()",
    "requests.exceptions.HTTPError: 404 Client Error: Not Found for url: http://127.0.0.1:1/v1/x",
    "\rRequesting API:   0%|          | 0/4 [00:01<?, ?it/s]",
]


def test_summary_ends_with_the_model_servers_reason_not_a_progress_bar() -> None:
    summary = summarize_failure(LOG, 1).splitlines()
    assert summary[0] == "exit code 1"
    assert summary[1] == "Traceback (most recent call last):"
    assert "Requesting API" not in "\n".join(summary[1:])
    assert summary[-2].startswith("requests.exceptions.HTTPError: 404")
    assert summary[-1] == (
        'The model server answered: {"error": {"message": "no route for POST /v1/nothing", '
        '"type": "invalid_request_error"}}'
    )


def test_summary_without_traceback_or_server_reason() -> None:
    lines = ["loading", "Killed", "100%|██████████| 10/10 [00:01<00:00,  9.9it/s]"]
    assert summarize_failure(lines, -9) == "exit code -9\nloading\nKilled"
    assert summarize_failure([], None) == "no exit code was recorded"
    long = ["x Response text: " + "e" * 900 + ". Retrying..."]
    assert summarize_failure(long, 1).endswith("e" * 500 + "...")
