from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lm_eval_server.config import Settings


def test_env_vars_are_read_and_lists_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONCURRENCY", "2")
    monkeypatch.setenv("API_KEYS", "a, b,,c")
    monkeypatch.setenv("LM_EVAL_PATHS", "/usr/bin/python3 -m lm_eval,/opt/lm/bin/lm_eval")
    settings = Settings()
    assert settings.max_concurrency == 2
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.lm_eval_path_allowlist == ["/usr/bin/python3 -m lm_eval", "/opt/lm/bin/lm_eval"]


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("MAX_CONCURRENCY", "0", "max_concurrency"),
        ("MAX_CONCURRENCY", "four", "max_concurrency"),
        ("STORE", "postgres", "store"),
        ("EXECUTOR", "ray", "RAY_ADDRESS"),
        ("LOG_LEVEL", "LOUD", "log_level"),
        ("API_KEYS_FILE", "/nonexistent/keys", "API_KEYS_FILE"),
    ],
)
def test_bad_values_are_startup_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=needle):
        Settings()


def test_defaults_allow_data_dir_and_examples(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.allowed_roots == [tmp_path.resolve(), settings.examples_dir]
    assert (settings.examples_dir / "tasks" / "demo_mc.yaml").exists()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"MAX_CONCURRENCY": "0"},
            "bad setting MAX_CONCURRENCY: Input should be greater than or equal to 1",
        ),
        ({"SANDBOX": "maybe"}, "bad setting SANDBOX: Input should be 'auto', 'bwrap' or 'off'"),
        ({"JOB_ENV_PASSTHROUGH": "API_KEYS"}, "bad setting: JOB_ENV_PASSTHROUGH: API_KEYS is a"),
        # A directory that cannot be made (under a file): a setting, not a lifespan traceback.
        ({"DATA_DIR": "/etc/hostname/data"}, "bad setting DATA_DIR: cannot create /etc/hostname"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_not_a_traceback(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    """The README's launch line, as a real process: it exits 1 with one line on stderr."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "src.main:app", "--port", "0"],
        cwd=root,
        env={**os.environ, "DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), result.stderr
    assert lines[0].endswith("(settings: docs/configuration.md)")
    assert "Traceback" not in result.stderr + result.stdout
