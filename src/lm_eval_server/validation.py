"""Turns a JSON job request into what will run, or refuses it with a message a person can act on.

Every check happens before a job is queued: lm-eval's own parser, the model registry, the task
index, and the server's security rules (allowed commands, environment variables, paths, remote
code).
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lm_eval_server.catalog import Catalog, TaskRequestRefused, UnknownTasks, close_matches
from lm_eval_server.config import DANGEROUS_ENV_VARS, Settings
from lm_eval_server.lm_eval_cli import (
    SERVER_FIELDS,
    ArgvError,
    OptionKind,
    OptionSpec,
    parse_argv,
    request_to_argv,
    task_list,
)

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# lm-eval options that name files or directories the job reads or writes.
PATH_DESTS = frozenset({"output_path", "include_path", "use_cache", "config"})
REMOTE_CODE_DESTS = ("trust_remote_code", "confirm_run_unsafe_code")


class InvalidRequest(ValueError):
    """The request cannot run as given; the message says why and what to change."""


@dataclass(frozen=True)
class ValidatedJob:
    values: dict[str, Any]
    lm_args: list[str]
    program: list[str]
    env_vars: dict[str, str]
    user_output_path: str | None
    timeout_s: float | None
    resources: dict[str, Any] = field(default_factory=dict)


def is_path_option(spec: OptionSpec, metavar: str | None) -> bool:
    return spec.dest in PATH_DESTS or (metavar is not None and "path" in metavar.lower())


def confine(value: str, roots: list[Path], base: Path, what: str) -> Path:
    """`value` as an absolute path, which must resolve (symlinks followed) inside a root."""
    if "\0" in value:
        raise InvalidRequest(f"{what}: a path cannot contain NUL bytes")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    resolved = path.resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise InvalidRequest(
        f"{what}: {value!r} resolves to {resolved}, outside the server's ALLOWED_PATHS "
        f"({allowed}); use a path inside one of them or ask the operator to extend ALLOWED_PATHS"
    )


class RequestValidator:
    def __init__(
        self,
        settings: Settings,
        parser: argparse.ArgumentParser,
        specs: list[OptionSpec],
        catalog: Catalog,
    ) -> None:
        self._settings = settings
        self._parser = parser
        self._specs = specs
        self._catalog = catalog
        self._default_program = tuple(shlex.split(settings.lm_eval_path_allowlist[0]))
        metavars = {a.dest: a.metavar for a in parser._actions if isinstance(a.metavar, str)}
        self._path_dests = {
            s.dest
            for s in specs
            if s.kind is OptionKind.value and is_path_option(s, metavars.get(s.dest))
        }

    def validate(self, request: BaseModel) -> ValidatedJob:
        values = request.model_dump(exclude_none=True)
        server = {k: values.pop(k) for k in SERVER_FIELDS if k in values}
        self._check_remote_code(values)
        program = self._program(server.get("lm_eval_path"))
        env_vars = self._env_vars(server.get("env_vars") or {})
        base = Path.cwd()
        include_paths = self._confine_paths(values, base)
        tasks = task_list(values)
        for index, task in enumerate(tasks):
            if task.endswith((".yaml", ".yml")):
                tasks[index] = str(confine(task, self._settings.allowed_roots, base, "tasks"))
        if tasks:
            values["tasks"] = tasks
        lm_args = request_to_argv(values, self._specs)
        try:
            namespace = parse_argv(self._parser, lm_args)
        except ArgvError as exc:
            raise InvalidRequest(f"lm-eval rejected the options: {exc}") from exc
        if not tasks and not getattr(namespace, "config", None):
            raise InvalidRequest('tasks is required, e.g. "tasks": "mmlu,arc_easy"')
        self._check_model(values.get("model"))
        self._check_tasks(tasks, include_paths)
        return ValidatedJob(
            values=values,
            lm_args=lm_args,
            program=program,
            env_vars=env_vars,
            user_output_path=values.get("output_path"),
            timeout_s=server.get("timeout_s"),
            resources=server.get("resources") or {},
        )

    def _check_remote_code(self, values: dict[str, Any]) -> None:
        if self._settings.allow_remote_code:
            return
        for dest in REMOTE_CODE_DESTS:
            if values.get(dest):
                raise InvalidRequest(
                    f"{dest} is refused by this server: it runs code downloaded with the model. "
                    "The operator can allow it with ALLOW_REMOTE_CODE=true"
                )
        model_args = values.get("model_args")
        text = str(model_args).lower().replace(" ", "").replace('"', "").replace("'", "")
        if re.search(r"trust_remote_code[=:]true", text):
            raise InvalidRequest(
                "model_args trust_remote_code=True is refused by this server; the operator "
                "can allow it with ALLOW_REMOTE_CODE=true"
            )

    def _program(self, lm_eval_path: str | None) -> list[str]:
        allowlist = self._settings.lm_eval_path_allowlist
        if lm_eval_path is None:
            return list(self._default_program)
        if lm_eval_path.strip() not in [p.strip() for p in allowlist]:
            raise InvalidRequest(
                f"lm_eval_path {lm_eval_path!r} is not allowed; the server's LM_EVAL_PATHS "
                f"setting lists the commands it may run: {allowlist}"
            )
        return shlex.split(lm_eval_path)

    def _env_vars(self, env_vars: dict[str, str]) -> dict[str, str]:
        settings = self._settings
        if len(env_vars) > settings.max_env_vars:
            raise InvalidRequest(
                f"env_vars has {len(env_vars)} entries; the limit is {settings.max_env_vars} "
                "(MAX_ENV_VARS)"
            )
        allowed = set(settings.allowed_env_vars)
        for name, value in env_vars.items():
            if not ENV_NAME.match(name):
                raise InvalidRequest(
                    f"env_vars: {name!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
                )
            if name.upper() in DANGEROUS_ENV_VARS and name not in allowed:
                raise InvalidRequest(
                    f"env_vars: {name} can make the job run code of the caller's choosing and "
                    "is refused; the operator can allow it with ALLOWED_ENV_VARS"
                )
            if "\0" in value or len(value.encode()) > settings.max_env_value_bytes:
                raise InvalidRequest(
                    f"env_vars: the value of {name} is longer than "
                    f"{settings.max_env_value_bytes} bytes or contains a NUL byte"
                )
        return env_vars

    def _confine_paths(self, values: dict[str, Any], base: Path) -> list[Path]:
        include_paths: list[Path] = []
        for dest in self._path_dests:
            value = values.get(dest)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidRequest(f"{dest} must be a path string")
            resolved = confine(value, self._settings.allowed_roots, base, dest)
            values[dest] = str(resolved)
            if dest == "include_path":
                include_paths.append(resolved)
        return include_paths

    def _check_model(self, model: str | None) -> None:
        names = self._catalog.model_names
        if model is None or names is None or model in names:
            return
        hint = close_matches(model, names)
        suggestion = f" Did you mean: {', '.join(hint)}?" if hint else ""
        raise InvalidRequest(
            f"Unknown model {model!r}.{suggestion} Known models: {', '.join(sorted(names))}"
        )

    def _check_tasks(self, tasks: list[str], include_paths: list[Path]) -> None:
        # TaskIndexUnavailable (503) and OffloadRequired (run again in a thread) pass through.
        try:
            unknown = self._catalog.unknown_tasks(tasks, include_paths)
        except TaskRequestRefused as exc:
            raise InvalidRequest(str(exc)) from None
        if unknown is not None:
            raise UnknownTaskNames(unknown)


class UnknownTaskNames(InvalidRequest):
    """Some tasks are unknown. `describe()` adds close matches; it is slow enough (a fuzzy
    search over ~15k names) that callers on an event loop should run it in a thread."""

    def __init__(self, unknown: UnknownTasks) -> None:
        super().__init__(self._message({name: [] for name in unknown.names}))
        self.unknown = unknown

    def describe(self) -> str:
        return self._message(self.unknown.suggestions())

    @staticmethod
    def _message(matches: dict[str, list[str]]) -> str:
        parts = []
        for task, hints in matches.items():
            hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
            parts.append(f"{task!r}{hint}")
        return (
            f"Unknown task(s): {'; '.join(parts)}. Tasks come from lm-eval's task list "
            "(`lm_eval ls tasks`) plus the request's include_path"
        )
