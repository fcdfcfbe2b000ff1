"""Shared fixtures: settings in tmp dirs, an in-process app with its lifespan."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from lm_eval_server.config import Settings
from tests.support.jobs import DEFAULT_LM_EVAL, FAKE_LM_EVAL, ROOT
from tests.support.server import ServerProcess

# No test may reach the internet. These reach every job through JOB_ENV_PASSTHROUGH's defaults
# (a job's environment is built from nothing, see lm_eval_server.runtime.job_env).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lm-eval's task index, built once per test session and shared by every server."""
    path = tmp_path_factory.mktemp("task-index")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval_server.runtime.task_index",
            "build",
            "--data-dir",
            str(path),
        ],
        check=True,
        timeout=300,
    )
    return path


@pytest.fixture
def make_settings(tmp_path: Path, index_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "index_dir": index_dir,
            "lm_eval_paths": [DEFAULT_LM_EVAL, FAKE_LM_EVAL],
            "allowed_paths": [str(tmp_path), str(ROOT / "examples"), str(ROOT / "tests" / "data")],
            "stop_grace_s": 3.0,
            # TestClient sends `Host: testserver`; Host checks are tested on real servers.
            "allowed_hosts": ["testserver"],
            # The stand-in lm_eval (tests/support/fake_lm_eval.py) follows FAKE_* variables.
            "allowed_env_vars": ["FAKE_*"],
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        # The server leaves running jobs to be re-adopted on shutdown; a test must not.
        client.get("/jobs/stop", headers=client.headers)
        client.__exit__(None, None, None)


@pytest.fixture
def servers(tmp_path: Path, index_dir: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Real server processes (uvicorn src.main:app) sharing one DATA_DIR, stopped at the end."""
    started: list[ServerProcess] = []

    def make(**env: str) -> ServerProcess:
        server = ServerProcess(tmp_path / "data", index_dir, **env).start()
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop_jobs_and_terminate()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


# Fixtures that start real servers or build lm-eval's task index: a test using one is end to end.
_E2E_FIXTURES = frozenset(
    {"index_dir", "make_settings", "make_client", "client", "server", "servers"}
)
_E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m "not e2e"` selects the fast unit tests: everything under tests/e2e/, every test that
    uses a server or the task index, and tests marked by hand are end to end."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(_E2E_DIR) or fixtures & _E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)


# What .ci/run installs: in CI (CI=true) a test skipped for want of one of these means the
# install step is broken, and the run fails instead of passing with less tested.
CI_INSTALLED = ("ray", "torch", "chromium", "bubblewrap", "bwrap", "playwright", "transformers")
_ci_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get("CI") != "true" or not report.skipped:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if any(name in reason.lower() for name in CI_INSTALLED):
        _ci_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci_skips:
        session.config.stash[_CI_SKIPS_KEY] = list(_ci_skips)
        if exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


_CI_SKIPS_KEY = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    skips = config.stash.get(_CI_SKIPS_KEY, [])
    if skips:
        terminalreporter.section("CI: tests skipped for a dependency .ci/run installs")
        for line in skips:
            terminalreporter.line(line)
