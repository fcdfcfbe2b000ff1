"""job_secrets.py: ALLOWED_SECRETS, names confined to SECRETS_DIR, reading values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm_eval_server.job_secrets import (
    SecretPolicy,
    SecretRefused,
    SecretUnavailable,
    parse_allowed_secrets,
    reference,
)


def policy(directory: Path | None, allowed: str = "", max_bytes: int = 64) -> SecretPolicy:
    rules = parse_allowed_secrets(allowed.split(",")) if allowed else None
    return SecretPolicy(directory, rules, max_bytes)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / "openai").write_text("sk-openai-value\n")
    (directory / "hf").write_text("hf_value\r\n")
    (directory / "empty").write_text("\n")
    (directory / "big").write_text("x" * 65)
    (tmp_path / "outside").write_text("outside-value")
    os.symlink(tmp_path / "outside", directory / "escape")
    # Kubernetes' layout: each secret links into ..data, itself a link to a dated directory.
    dated = directory / "..2026_11_30"
    dated.mkdir()
    (dated / "k8s").write_text("k8s-value")
    os.symlink("..2026_11_30", directory / "..data")
    os.symlink("..data/k8s", directory / "k8s")
    return directory


def test_allowed_secrets_parse_and_refuse_bad_entries() -> None:
    assert parse_allowed_secrets(["openai:alice|bob", "hf:*", "openai:carol"]) == {
        "openai": frozenset({"alice", "bob", "carol"}),
        "hf": frozenset({"*"}),
    }
    for bad in ["openai", "openai:", "../x:alice", "openai:al ice", ".hidden:*"]:
        with pytest.raises(ValueError, match="ALLOWED_SECRETS"):
            parse_allowed_secrets([bad])


def test_values_read_with_one_trailing_newline_stripped(secrets_dir: Path) -> None:
    secrets = policy(secrets_dir)
    assert secrets.read("openai") == "sk-openai-value"
    assert secrets.read("hf") == "hf_value"
    assert secrets.read("k8s") == "k8s-value"
    assert secrets.resolve({"A": reference("openai"), "B": "plain"}) == {
        "A": "sk-openai-value",
        "B": "plain",
    }
    assert sorted(secrets.read_all()) == ["hf_value", "k8s-value", "sk-openai-value"]


@pytest.mark.parametrize(
    "name", ["../outside", "/etc/passwd", "escape", "..data", ".hidden", "a/b", "-x", "", "..", "."]
)
def test_names_that_leave_the_directory_are_refused(secrets_dir: Path, name: str) -> None:
    secrets = policy(secrets_dir)
    with pytest.raises(SecretRefused) as refused:
        secrets.check("OPENAI_API_KEY", name, "alice")
    assert "outside-value" not in str(refused.value)
    with pytest.raises(SecretUnavailable):
        secrets.read(name)


def test_forbidden_and_missing_secrets_answer_alike(secrets_dir: Path) -> None:
    secrets = policy(secrets_dir, "openai:alice|bob,hf:*")
    assert secrets.check("OPENAI_API_KEY", "openai", "bob") == "openai"
    assert secrets.check("HF_TOKEN", "hf", "carol") == "hf"
    messages = []
    for name in ("openai", "nosuch"):
        with pytest.raises(SecretRefused) as refused:
            secrets.check("OPENAI_API_KEY", name, "carol")
        messages.append(str(refused.value).replace(name, "<name>"))
    assert messages[0] == messages[1]
    assert "does not exist or which 'carol' may not use" in messages[0]
    # Listed for nobody: k8s is not in ALLOWED_SECRETS.
    with pytest.raises(SecretRefused, match="does not exist or"):
        secrets.check("HF_TOKEN", "k8s", "alice")


def test_an_allowed_secret_that_cannot_be_used_says_why(secrets_dir: Path) -> None:
    secrets = policy(secrets_dir)
    with pytest.raises(SecretRefused, match="secret 'empty' is empty"):
        secrets.check("HF_TOKEN", "empty", "alice")
    with pytest.raises(SecretRefused, match="larger than 64 bytes"):
        secrets.check("HF_TOKEN", "big", "alice")
    with pytest.raises(SecretRefused, match="no SECRETS_DIR"):
        policy(None).check("HF_TOKEN", "openai", "alice")


def test_a_secret_gone_at_launch_fails_clearly(secrets_dir: Path) -> None:
    secrets = policy(secrets_dir)
    (secrets_dir / "openai").unlink()
    with pytest.raises(SecretUnavailable) as gone:
        secrets.resolve({"OPENAI_API_KEY": reference("openai")})
    assert "secret 'openai' is not in SECRETS_DIR" in str(gone.value)
    assert "OPENAI_API_KEY" in str(gone.value) and "not started" in str(gone.value)
    (secrets_dir / "openai").write_text("")
    with pytest.raises(SecretUnavailable, match="is empty"):
        secrets.resolve({"OPENAI_API_KEY": reference("openai")})


def test_a_job_with_a_secret_never_runs_warm() -> None:
    from lm_eval_server.launch import launcher_command, warm_args

    argv = [*launcher_command(), "--model", "dummy"]
    assert warm_args(argv, {}) == ["--model", "dummy"]
    assert warm_args(argv, {"OPENAI_API_KEY": reference("openai")}) is None


def test_credentials_a_request_gives_its_job_are_learned_for_redaction() -> None:
    from lm_eval_server.launch import injected_values

    argv = ["lm_eval", "--model_args", 'api_key=abc,base_url=http://h,{"token": "t"}']
    env = {"OPENAI_API_KEY": "sk-plain", "HF_TOKEN": reference("hf"), "LMEVAL_LOG_LEVEL": "DEBUG"}
    assert injected_values(argv, env) == ["abc", "t", "sk-plain"]
