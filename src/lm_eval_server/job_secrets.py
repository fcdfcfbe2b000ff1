"""Secrets by reference: the operator's SECRETS_DIR, who may use which (ALLOWED_SECRETS), and a
request's `"env_vars": {"OPENAI_API_KEY": {"secret": "openai"}}`.

SECRETS_DIR holds one file per secret, as Docker and Kubernetes mount them: the file name is the
secret's name, its content the value (one trailing newline stripped). A request names a secret;
the store keeps only that reference; the value is read when the job launches and goes into the
job's environment alone. Stdlib only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_server.principals import NAME_PATTERN

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
    """Where secrets are and who may use them; `allowed` None: everyone may use every one."""

    directory: Path | None
    allowed: Mapping[str, frozenset[str]] | None
    max_bytes: int

    def may_use(self, name: str, principal: str) -> bool:
        if self.allowed is None:
            return True
        who = self.allowed.get(name, frozenset())
        return ANY_PRINCIPAL in who or principal in who

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
        """At submission: the reference names a secret this principal may use, which exists
        and can be read. Returns the secret's name."""
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
            raise SecretRefused(f"env_vars: {env_name}: {readable}") from None
        return name

    def resolve(self, env_vars: Mapping[str, Any]) -> dict[str, str]:
        """At launch: env_vars with every reference replaced by the secret's current value.
        SecretUnavailable names the variable and the secret; never an empty value."""
        out: dict[str, str] = {}
        for env_name, value in env_vars.items():
            name = reference_name(value)
            if name is None:
                out[env_name] = str(value)
                continue
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
