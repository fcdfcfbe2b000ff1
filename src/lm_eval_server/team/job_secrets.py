"""Secrets by reference: the operator's SECRETS_DIR, who may use which (ALLOWED_SECRETS), where
each may go (SECRET_ENV_VARS), and a request's
`"env_vars": {"OPENAI_API_KEY": {"secret": "openai"}}`.

SECRETS_DIR holds one file per secret, as Docker and Kubernetes mount them: the file name is the
secret's name, its content the value (one trailing newline stripped). A request names a secret;
the store keeps only that reference; the value is read when the job launches and goes into the
job's environment alone.

A secret goes only where it means a credential, an allowlist: into a variable of
`job_env.CREDENTIAL_ENV_VARS` (OPENAI_API_KEY, HF_TOKEN, ...), or into a name the operator lists
for that secret in SECRET_ENV_VARS. Never into a variable some library parses or prints as a
flag, a number or a log level (LMEVAL_HASHMM, LMEVAL_LOG_LEVEL, ...), and nowhere but env_vars:
lm-eval's models read their keys from the environment, so a reference elsewhere (model_args) is
refused by validation. Checked at submission and again at launch. Stdlib only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.runtime.job_env import (
    CREDENTIAL_ENV_VARS,
    DEFAULT_ALLOWED_ENV_VARS,
    DEVICE_VARS,
    ENV_NAME,
    is_allowed,
)
from lm_eval_server.team.principals import NAME_PATTERN

log = logging.getLogger(__name__)

REF_KEY = "secret"
# A plain file name: no path separator, and no leading '.' (no `..`, nor Kubernetes' `..data`
# bookkeeping entries) or '-'.
SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
ANY_PRINCIPAL = "*"
# Secrets read from SECRETS_DIR for redaction at most (entries beyond are ignored, with a warning).
MAX_SECRETS = 1000

EnvValue = str | dict[str, str]


class SecretRefused(ValueError):
    """A request's secret reference cannot be used; the message never says whether a secret
    the caller may not use exists."""


class SecretUnavailable(RuntimeError):
    """A secret cannot be read now (at launch): gone, empty, too large or not text."""


def reference(name: str) -> dict[str, str]:
    return {REF_KEY: name}


def reference_name(value: object) -> str | None:
    """The secret a stored env_vars value refers to, or None for a plain string."""
    if isinstance(value, Mapping) and set(value) == {REF_KEY}:
        name = value[REF_KEY]
        return name if isinstance(name, str) else None
    return None


def find_reference(value: object, where: str, max_depth: int = 32) -> str | None:
    """Where in `value` (nested dicts and lists) a secret reference `{"secret": "<name>"}` is,
    as a dotted path from `where`, or None. Not below `max_depth` (validation refuses deeper
    requests; a reference is never resolved outside env_vars anyway)."""
    stack: list[tuple[object, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > max_depth:
            continue
        if isinstance(item, Mapping):
            if reference_name(item) is not None:
                return path
            stack.extend((v, f"{path}.{k}", depth + 1) for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
    return None


def not_here(where: str) -> str:
    """The refusal of a secret reference outside env_vars."""
    return (
        f'{where}: {{"secret": ...}} is a secret reference, which this server takes only in '
        "env_vars, as the value of a credential variable ("
        f"{', '.join(CREDENTIAL_ENV_VARS)}, or one SECRET_ENV_VARS lists for that secret). "
        "lm-eval's models read their keys from the environment (local-completions and the "
        "openai models OPENAI_API_KEY, the anthropic models ANTHROPIC_API_KEY, ...): send "
        '"env_vars": {"OPENAI_API_KEY": {"secret": "<name>"}} instead'
    )


def parse_allowed_secrets(entries: Iterable[str]) -> dict[str, frozenset[str]]:
    """`openai:alice|bob`, `hf:*` -> {"openai": {"alice", "bob"}, "hf": {"*"}}; a ValueError
    names the bad entry. Entries for one secret add up."""
    allowed: dict[str, set[str]] = {}
    for entry in entries:
        name, sep, who = entry.strip().partition(":")
        name = name.strip()
        if not sep or not SECRET_NAME.match(name):
            raise ValueError(
                f"ALLOWED_SECRETS: {entry!r} is not `secret:principal|principal` or `secret:*` "
                "(a secret is a file name in SECRETS_DIR)"
            )
        principals = {p.strip() for p in who.split("|") if p.strip()}
        if not principals:
            raise ValueError(f"ALLOWED_SECRETS: {entry!r} names no principal (use * for all)")
        for principal in principals:
            if principal != ANY_PRINCIPAL and not NAME_PATTERN.fullmatch(principal):
                raise ValueError(
                    f"ALLOWED_SECRETS: {principal!r} in {entry!r} is not a principal name "
                    "(the name before ':' in API_KEYS) nor *"
                )
        allowed.setdefault(name, set()).update(principals)
    return {name: frozenset(who) for name, who in allowed.items()}


def parse_secret_env_vars(
    entries: Iterable[str], allowed_env_vars: Iterable[str] = ()
) -> dict[str, frozenset[str]]:
    """SECRET_ENV_VARS: `wandb:WANDB_API_KEY`, `ci:GITLAB_TOKEN|CI_JOB_TOKEN` -> {"wandb":
    {"WANDB_API_KEY"}, "ci": {...}}: the variables, besides CREDENTIAL_ENV_VARS, that the secret
    may go into. Each must be a variable a request may set at all (the defaults or
    `allowed_env_vars`, i.e. ALLOWED_ENV_VARS) and must not be one of the defaults that a
    library reads as a flag, a number or a log level. A ValueError names the bad entry."""
    patterns = list(allowed_env_vars)
    not_credentials = set(DEFAULT_ALLOWED_ENV_VARS) - set(CREDENTIAL_ENV_VARS)
    out: dict[str, set[str]] = {}
    for entry in entries:
        secret, sep, names = entry.strip().partition(":")
        secret = secret.strip()
        if not sep or not SECRET_NAME.match(secret):
            raise ValueError(
                f"SECRET_ENV_VARS: {entry!r} is not `secret:NAME|NAME` (a secret of SECRETS_DIR, "
                "then the environment variables it may go into), e.g. wandb:WANDB_API_KEY"
            )
        listed = {n.strip() for n in names.split("|") if n.strip()}
        if not listed:
            raise ValueError(f"SECRET_ENV_VARS: {entry!r} names no variable")
        for name in sorted(listed):
            if not ENV_NAME.match(name):
                raise ValueError(
                    f"SECRET_ENV_VARS: {name!r} in {entry!r} is not a variable name "
                    "([A-Za-z_][A-Za-z0-9_]*; no patterns: a secret goes into names the "
                    "operator chose one by one)"
                )
            if name in not_credentials or name in DEVICE_VARS:
                raise ValueError(
                    f"SECRET_ENV_VARS: {name} (in {entry!r}) is read by lm-eval or a library "
                    "it uses as a flag, a number, a log level or a device list, not as a "
                    "credential: a secret never goes there (its value could come back in an "
                    "error or a log, changed past recognition)"
                )
            if not is_allowed(name, patterns):
                raise ValueError(
                    f"SECRET_ENV_VARS: {name} (in {entry!r}) is not a variable a request may "
                    f"set; add {name} to ALLOWED_ENV_VARS as well"
                )
        out.setdefault(secret, set()).update(listed)
    return {secret: frozenset(names) for secret, names in out.items()}


def _decode(name: str, data: bytes, max_bytes: int) -> str:
    if len(data) > max_bytes + 2:  # + a trailing \r\n, stripped below
        raise SecretUnavailable(
            f"secret {name!r} is larger than {max_bytes} bytes (MAX_ENV_VALUE_BYTES)"
        )
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnavailable(f"secret {name!r} is not UTF-8 text") from None
    # As Docker and Kubernetes secrets are usually written: `echo value > file`.
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    if "\0" in value:
        raise SecretUnavailable(f"secret {name!r} contains a NUL byte")
    if not value:
        raise SecretUnavailable(f"secret {name!r} is empty")
    if len(value.encode()) > max_bytes:
        raise SecretUnavailable(
            f"secret {name!r} is larger than {max_bytes} bytes (MAX_ENV_VALUE_BYTES)"
        )
    return value


@dataclass(frozen=True)
class SecretPolicy:
    """Where secrets are, who may use them (`allowed` None: everyone may use every one), and
    which variables besides CREDENTIAL_ENV_VARS each may go into (`env_names`,
    SECRET_ENV_VARS)."""

    directory: Path | None
    allowed: Mapping[str, frozenset[str]] | None
    max_bytes: int
    env_names: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def may_use(self, name: str, principal: str) -> bool:
        if self.allowed is None:
            return True
        who = self.allowed.get(name, frozenset())
        return ANY_PRINCIPAL in who or principal in who

    def may_go_into(self, env_name: str, name: str) -> bool:
        """Whether secret `name` may be the value of variable `env_name`."""
        return env_name in CREDENTIAL_ENV_VARS or env_name in self.env_names.get(name, ())

    def _not_a_credential(self, env_name: str, name: str) -> str:
        """Where secret `name` may go, told to a caller who may use it and put it elsewhere
        (the names SECRET_ENV_VARS adds for it included)."""
        extra = sorted(self.env_names.get(name, ()))
        also = f"; secret {name!r} also into {', '.join(extra)} (SECRET_ENV_VARS)" if extra else ""
        return (
            f"env_vars: {env_name} cannot take secret {name!r}. A secret goes only into a "
            f"variable that means a credential: {', '.join(CREDENTIAL_ENV_VARS)}{also}. Put "
            f"the secret in the variable your model reads its key from, or give {env_name} a "
            "plain string value; the operator can let a secret go into another credential "
            "variable with SECRET_ENV_VARS=<secret>:<NAME> (docs/secrets.md)"
        )

    def path(self, name: str) -> Path:
        """The secret's file, which must be a regular file inside SECRETS_DIR once symlinks are
        followed (Kubernetes mounts each secret as a link into a `..data` directory)."""
        if self.directory is None or not SECRET_NAME.match(name):
            raise SecretUnavailable(f"secret {name!r} is not in SECRETS_DIR")
        root = self.directory.resolve()
        try:
            found = (root / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise SecretUnavailable(f"secret {name!r} is not in SECRETS_DIR") from None
        if not found.is_relative_to(root) or not found.is_file():
            raise SecretUnavailable(f"secret {name!r} is not in SECRETS_DIR")
        return found

    def read(self, name: str) -> str:
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_bytes + 3)
        except OSError as exc:
            raise SecretUnavailable(f"secret {name!r} cannot be read: {exc.strerror}") from None
        return _decode(name, data, self.max_bytes)

    def check(self, env_name: str, name: object, principal: str) -> str:
        """At submission: the reference names a secret this principal may use, which exists,
        may go into `env_name` and can be read. Returns the secret's name."""
        if self.directory is None:
            raise SecretRefused(
                f"env_vars: {env_name} refers to a secret, but this server has no SECRETS_DIR "
                "(secrets by reference are off); send the value as a string, or ask the "
                "operator to set SECRETS_DIR"
            )
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise SecretRefused(
                f"env_vars: {env_name}: {str(name)[:100]!r} is not a secret name (the name of a "
                "file in SECRETS_DIR: letters, digits, '.', '_' and '-', not starting with '.' "
                'or \'-\'), e.g. {"secret": "openai"}'
            )
        # One answer for "no such secret" and "not yours": a caller cannot probe for names.
        refused = SecretRefused(
            f"env_vars: {env_name} refers to secret {name!r}, which does not exist or which "
            f"{principal!r} may not use (SECRETS_DIR, ALLOWED_SECRETS)"
        )
        try:
            self.read(name)
            readable: SecretUnavailable | None = None
        except SecretUnavailable as exc:
            readable = exc
        if not self.may_use(name, principal):
            raise refused
        if readable is not None:
            try:
                self.path(name)
            except SecretUnavailable:
                raise refused from None
        # Judged once the caller may use the secret, so where it may go tells nothing of
        # secrets the caller may not use.
        if not self.may_go_into(env_name, name):
            raise SecretRefused(self._not_a_credential(env_name, name))
        if readable is not None:
            raise SecretRefused(f"env_vars: {env_name}: {readable}")
        return name

    def resolve(self, env_vars: Mapping[str, Any]) -> dict[str, str]:
        """At launch: env_vars with every reference replaced by the secret's current value.
        SecretUnavailable names the variable and the secret; never an empty value, and never a
        secret in a variable it may not go into now (a job queued before SECRET_ENV_VARS lost
        an entry, or before the rule)."""
        out: dict[str, str] = {}
        for env_name, value in env_vars.items():
            name = reference_name(value)
            if name is None:
                out[env_name] = str(value)
                continue
            if not self.may_go_into(env_name, name):
                raise SecretUnavailable(
                    f"env_vars: {env_name} may not take secret {name!r} on this server (a "
                    "secret goes only into a credential variable, or one SECRET_ENV_VARS "
                    "lists for it); the job was not started. Submit it again with the secret "
                    "in the variable the model reads its key from"
                )
            try:
                out[env_name] = self.read(name)
            except SecretUnavailable as exc:
                raise SecretUnavailable(
                    f"{exc}; the job was not started (env_vars: {env_name} refers to it). "
                    "Restore the secret in SECRETS_DIR and submit the job again"
                ) from None
        return out

    def read_all(self) -> list[str]:
        """Every secret's value, for redaction; unreadable entries are skipped."""
        if self.directory is None:
            return []
        values = []
        try:
            names = sorted(e for e in os.listdir(self.directory) if SECRET_NAME.match(e))
        except OSError as exc:
            log.warning("SECRETS_DIR %s cannot be listed: %s", self.directory, exc)
            return []
        if len(names) > MAX_SECRETS:
            log.warning("SECRETS_DIR has %d entries; only %d are read", len(names), MAX_SECRETS)
            names = names[:MAX_SECRETS]
        for name in names:
            try:
                values.append(self.read(name))
            except SecretUnavailable as exc:
                log.debug("SECRETS_DIR: %s", exc)
        return values
