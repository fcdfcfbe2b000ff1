"""Run-time refusals judged at submission (admission.run_checks): a push to the Hub from a
job that runs offline."""

from __future__ import annotations

from typing import Any

import pytest

from lm_eval_server.admission import run_checks


@pytest.mark.parametrize(
    ("env_vars", "jobs_offline", "offline"),
    [
        ({}, True, True),  # JOBS_OFFLINE's default
        ({}, False, False),
        ({"HF_HUB_OFFLINE": "0"}, True, False),  # the request opts this job into the Hub
        ({"HF_HUB_OFFLINE": "false"}, True, False),
        ({"HF_HUB_OFFLINE": "yes"}, False, True),  # huggingface_hub's own reading of "true"
        ({"HF_HUB_OFFLINE": " On "}, False, True),
        ({"HF_HUB_OFFLINE": {"secret": "x"}}, True, True),  # never an offline switch
    ],
)
def test_whether_a_job_runs_offline(
    env_vars: dict[str, Any], jobs_offline: bool, offline: bool
) -> None:
    assert run_checks.hub_offline(env_vars, jobs_offline) is offline


def test_a_push_to_the_hub_from_an_offline_job_is_refused_with_the_way_out() -> None:
    push = {"hf_hub_log_args": {"push_samples_to_hub": True, "hub_results_org": "me"}}
    refused = run_checks.hub_push_refusal(push, offline=True)
    assert refused is not None and "push_samples_to_hub" in refused
    assert '"HF_HUB_OFFLINE": "0"' in refused
    assert run_checks.hub_push_refusal(push, offline=False) is None
    no_push = {"hf_hub_log_args": {"push_results_to_hub": False, "hub_results_org": "me"}}
    assert run_checks.hub_push_refusal(no_push, offline=True) is None
    assert run_checks.hub_push_refusal({}, offline=True) is None
