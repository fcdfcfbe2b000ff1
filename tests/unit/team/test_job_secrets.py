"""job_secrets.py: ALLOWED_SECRETS, names confined to SECRETS_DIR, reading values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm_eval_server.runtime.job_env import CREDENTIAL_ENV_VARS, DEFAULT_ALLOWED_ENV_VARS
from lm_eval_server.team.job_secrets import (
    SecretPolicy,
    SecretRefused,
    SecretUnavailable,
    find_reference,
    parse_allowed_secrets,
    parse_secret_env_vars,
    reference,
)
from lm_eval_server.team.redact import is_sensitive_key


def policy(
    directory: Path | None,
    allowed: str = "",
    max_bytes: int = 64,
    env_names: str = "",
    allowed_env_vars: tuple[str, ...] = ("FAKE_*",),
) -> SecretPolicy:
    rules = parse_allowed_secrets(allowed.split(",")) if allowed else None
    names = parse_secret_env_vars(env_names.split(","), allowed_env_vars) if env_names else {}
    return SecretPolicy(directory, rules, max_bytes, names)


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
    assert secrets.resolve({"OPENAI_API_KEY": reference("openai"), "B": "plain"}) == {
        "OPENAI_API_KEY": "sk-openai-value",
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
    from lm_eval_server.jobs.launch import launcher_command, warm_args

    argv = [*launcher_command(), "--model", "dummy"]
    assert warm_args(argv, {}) == ["--model", "dummy"]
    assert warm_args(argv, {"OPENAI_API_KEY": reference("openai")}) is None


def test_credentials_a_request_gives_its_job_are_learned_for_redaction() -> None:
    from lm_eval_server.jobs.launch import injected_values

    argv = ["lm_eval", "--model_args", 'api_key=abc,base_url=http://h,{"token": "t"}']
    env = {"OPENAI_API_KEY": "sk-plain", "HF_TOKEN": reference("hf"), "LMEVAL_LOG_LEVEL": "DEBUG"}
    assert injected_values(argv, env) == ["abc", "t", "sk-plain"]


# ---------------------------------------------------------------- a secret goes only where it
# means a credential (issue 20, item 5)


def test_the_credential_variables_are_the_credential_part_of_the_env_allowlist() -> None:
    assert set(CREDENTIAL_ENV_VARS) <= set(DEFAULT_ALLOWED_ENV_VARS)
    assert all(is_sensitive_key(name) for name in CREDENTIAL_ENV_VARS)
    # Every other default is a flag, a number or a log level; the one credential-sounding name
    # among them is a switch (whether huggingface_hub sends a token at all).
    others = [n for n in DEFAULT_ALLOWED_ENV_VARS if n not in CREDENTIAL_ENV_VARS]
    assert [n for n in others if is_sensitive_key(n)] == ["HF_HUB_DISABLE_IMPLICIT_TOKEN"]
    assert "LMEVAL_HASHMM" in others


def test_a_secret_in_a_variable_a_library_parses_is_refused(secrets_dir: Path) -> None:
    secrets = policy(secrets_dir)
    for env_name in ("LMEVAL_HASHMM", "LMEVAL_LOG_LEVEL", "HF_HUB_OFFLINE", "FAKE_TOKEN"):
        with pytest.raises(SecretRefused) as refused:
            secrets.check(env_name, "openai", "alice")
        message = str(refused.value)
        assert message.startswith(f"env_vars: {env_name} cannot take secret 'openai'. A secret")
        assert ", ".join(CREDENTIAL_ENV_VARS) in message
        assert "SECRET_ENV_VARS=<secret>:<NAME>" in message
        assert "sk-openai-value" not in message
    # Judged once the caller may use the secret: one that does not exist is refused as before.
    with pytest.raises(SecretRefused, match="does not exist or which 'alice' may not use"):
        secrets.check("LMEVAL_HASHMM", "no-such-secret", "alice")
    for env_name in CREDENTIAL_ENV_VARS:
        assert secrets.check(env_name, "openai", "alice") == "openai"
    # At launch too: a job stored before the rule never gets the value there.
    with pytest.raises(SecretUnavailable, match="LMEVAL_HASHMM may not take secret 'openai'"):
        secrets.resolve({"LMEVAL_HASHMM": reference("openai")})


def test_the_operator_lets_one_secret_go_into_a_listed_name(secrets_dir: Path) -> None:
    secrets = policy(secrets_dir, "openai:alice,hf:*", env_names="hf:FAKE_TOKEN|FAKE_KEY")
    assert secrets.check("FAKE_TOKEN", "hf", "bob") == "hf"
    assert secrets.resolve({"FAKE_KEY": reference("hf")}) == {"FAKE_KEY": "hf_value"}
    # Listed for hf, not for openai: the message says where openai may go.
    with pytest.raises(SecretRefused) as refused:
        secrets.check("FAKE_TOKEN", "openai", "alice")
    assert "FAKE_TOKEN cannot take secret 'openai'" in str(refused.value)
    assert "also into" not in str(refused.value)
    with pytest.raises(SecretUnavailable, match="FAKE_TOKEN may not take secret 'openai'"):
        secrets.resolve({"FAKE_TOKEN": reference("openai")})
    # A caller who may not use a secret learns nothing of where it may go.
    messages = []
    for name in ("openai", "nosuch"):
        with pytest.raises(SecretRefused) as refused:
            secrets.check("FAKE_TOKEN", name, "bob")
        messages.append(str(refused.value).replace(name, "<name>"))
    assert messages[0] == messages[1] and "may not use" in messages[0]
    # Where the secret may go, told to a caller who may use it.
    with pytest.raises(SecretRefused, match=r"secret 'hf' also into FAKE_KEY, FAKE_TOKEN"):
        secrets.check("FAKE_OTHER", "hf", "bob")


def test_secret_env_vars_entries_are_checked_at_parse() -> None:
    assert parse_secret_env_vars(
        ["wandb:WANDB_API_KEY", "ci:GITLAB_TOKEN|CI_TOKEN", "wandb:OPENAI_API_KEY"],
        ["WANDB_API_KEY", "*_TOKEN"],
    ) == {
        "wandb": frozenset({"WANDB_API_KEY", "OPENAI_API_KEY"}),
        "ci": frozenset({"GITLAB_TOKEN", "CI_TOKEN"}),
    }
    bad = {
        "wandb": "is not `secret:NAME|NAME`",
        "../x:WANDB_API_KEY": "is not `secret:NAME|NAME`",
        "wandb:": "names no variable",
        "wandb:WANDB_*": "is not a variable name",
        "wandb:LMEVAL_HASHMM": "not as a credential: a secret never goes there",
        "wandb:LMEVAL_LOG_LEVEL": "not as a credential",
        "wandb:CUDA_VISIBLE_DEVICES": "not as a credential",
        "wandb:LD_PRELOAD": "add LD_PRELOAD to ALLOWED_ENV_VARS as well",
    }
    for entry, words in bad.items():
        with pytest.raises(ValueError, match="SECRET_ENV_VARS") as refused:
            parse_secret_env_vars([entry], ["WANDB_API_KEY"])
        assert words in str(refused.value), (entry, str(refused.value))


def test_references_outside_env_vars_are_found() -> None:
    ref = reference("openai")
    assert find_reference({"api_key": ref}, "model_args") == "model_args.api_key"
    assert (
        find_reference({"header": {"Authorization": ref}}, "model_args")
        == "model_args.header.Authorization"
    )
    assert find_reference([1, {"a": [ref]}], "metadata") == "metadata[1].a[0]"
    assert find_reference({"secret": "x", "other": 1}, "model_args") is None
    assert find_reference({"secret": 1}, "model_args") is None
    assert find_reference({"pretrained": "x", "secret": "y"}, "model_args") is None


def test_secret_env_vars_is_a_startup_setting(
    monkeypatch: pytest.MonkeyPatch, secrets_dir: Path
) -> None:
    from pydantic import ValidationError

    from lm_eval_server.config import Settings

    monkeypatch.setenv("SECRETS_DIR", str(secrets_dir))
    monkeypatch.setenv("ALLOWED_ENV_VARS", "WANDB_API_KEY,FAKE_*")
    monkeypatch.setenv("SECRET_ENV_VARS", "wandb:WANDB_API_KEY, hf:FAKE_TOKEN|WANDB_API_KEY")
    policy = Settings().secret_policy()
    assert policy.env_names == {
        "wandb": frozenset({"WANDB_API_KEY"}),
        "hf": frozenset({"FAKE_TOKEN", "WANDB_API_KEY"}),
    }
    assert policy.check("FAKE_TOKEN", "hf", "default") == "hf"
    for value, words in (
        ("wandb:LMEVAL_HASHMM", "LMEVAL_HASHMM (in 'wandb:LMEVAL_HASHMM') is read by lm-eval"),
        ("wandb:GITLAB_TOKEN", "add GITLAB_TOKEN to ALLOWED_ENV_VARS as well"),
        ("wandb", "is not `secret:NAME|NAME`"),
    ):
        monkeypatch.setenv("SECRET_ENV_VARS", value)
        with pytest.raises(ValidationError) as refused:
            Settings()
        assert words in str(refused.value), str(refused.value)
    monkeypatch.setenv("SECRET_ENV_VARS", "wandb:WANDB_API_KEY")
    monkeypatch.delenv("SECRETS_DIR")
    with pytest.raises(ValidationError, match="SECRET_ENV_VARS needs SECRETS_DIR"):
        Settings()
