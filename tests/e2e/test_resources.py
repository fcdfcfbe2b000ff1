"""`resources` on POST /job takes exact JSON types and only the keys it knows (issue 20, item 6),
through a real server process: `true` or `"1"` is not a number of GPUs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.support.jobs import fake_job, submit, wait_for
from tests.support.server import ServerProcess


def test_resources_take_exact_types_and_known_keys(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers(GPUS="0")  # one GPU slot (an id the local executor hands out)
    with server.client() as client:

        def refused(resources: Any) -> list[dict[str, Any]]:
            response = client.post("/job", json={**fake_job(), "resources": resources})
            assert response.status_code == 422, (resources, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, list), detail
            return detail

        for resources, loc, words in (
            ({"num_gpus": True}, "num_gpus", "valid number"),
            ({"num_gpus": "1"}, "num_gpus", "valid number"),
            ({"num_gpus": [1]}, "num_gpus", "valid number"),
            ({"num_cpus": "2"}, "num_cpus", "valid number"),
            ({"num_cpus": False}, "num_cpus", "valid number"),
            ({"memory": "1024"}, "memory", "valid integer"),
            ({"memory": 1.5}, "memory", "valid integer"),
            ({"memory": 1024.0}, "memory", "valid integer"),
            ({"memory": True}, "memory", "valid integer"),
        ):
            [error] = refused(resources)
            assert error["loc"] == ["body", "resources", loc], error
            assert words in error["msg"], error
        for resources, named in (
            ({"gpus": 1}, "'gpus'"),
            ({"num_gpus": 1, "num_gpu": 1, "cpu": 2}, "'num_gpu', 'cpu'"),
        ):
            [error] = refused(resources)
            assert error["loc"] == ["body", "resources"], error
            assert error["msg"] == (
                f"Value error, unknown key(s) {named}; resources takes only num_gpus, "
                "num_cpus, memory"
            ), error
        [error] = refused("1")
        assert error["loc"] == ["body", "resources"]
        assert client.get("/jobs").json()["total"] == 0

        # Exact types pass: an integer is a number of GPUs.
        job_id = submit(client, {**fake_job(), "resources": {"num_gpus": 1}})
        job = wait_for(client, job_id)
        assert (job["status"], job["gpus"]) == ("Completed", ["0"]), json.dumps(job)
        job_id = submit(client, {**fake_job(), "resources": {"num_gpus": 0.0}})
        assert wait_for(client, job_id)["gpus"] == []
