"""Property-based fuzz of the whole API from its own OpenAPI schema: no 5xx, no crash."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.jobs import FAKE_LM_EVAL, ROOT
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[str]:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    # Only the fake lm_eval may run: a body that passes validation costs milliseconds.
    server = ServerProcess(
        data,
        index_dir,
        LM_EVAL_PATHS=FAKE_LM_EVAL,
        MAX_CONCURRENCY="2",
        ALLOWED_PATHS=f"{data},{ROOT / 'examples'}",
    ).start()
    yield server.url
    server.stop_jobs_and_terminate()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log[-5000:]


def test_no_server_errors(fuzz_server: str) -> None:
    # schemathesis' pytest plugin does not support this pytest yet; drive its strategies with
    # hypothesis directly, operation by operation.
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    statuses: list[int] = []

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.text)

        check()
    assert len(statuses) >= 10 * len(operations)
    assert 422 in statuses and 200 in statuses
