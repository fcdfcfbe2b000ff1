"""Turns a JSON job request into what will run, or refuses it with a message a person can act on.

Every check happens before a job is queued, on the values lm-eval will see: the request is
rendered to an argv and parsed by lm-eval's own parser, merged with its `config` file the way
`EvaluatorConfig.from_cli` does (lm_eval_checks), and the merged options go through every rule:
lm-eval's run-time checks, the path rule (paths.py), remote and unsafe code judged by
truthiness wherever a key=value option can carry it, where model URLs may point, and the model
and task catalogs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lm_eval_server.admission import (
    backends,
    lm_eval_checks,
    lm_eval_cli,
    offload,
    paths,
    run_checks,
)
from lm_eval_server.admission.catalog import (
    Catalog,
    TaskRequestRefused,
    UnknownTasks,
    close_matches,
)
from lm_eval_server.admission.lm_eval_cli import (
    SERVER_FIELDS,
    ArgvError,
    OptionKind,
    OptionSpec,
    parse_argv,
    request_to_argv,
    task_items,
)
from lm_eval_server.admission.urls import url_allowed
from lm_eval_server.config import Settings
from lm_eval_server.errors import InvalidRequest
from lm_eval_server.jobs import gpus
from lm_eval_server.runtime import jobdir
from lm_eval_server.runtime.job_env import EnvVarsRefused, check_env_vars
from lm_eval_server.tasks.uploads import TaskUploads
from lm_eval_server.team import job_secrets
from lm_eval_server.webhooks import rules as webhooks

# lm-eval options that name files or directories the job reads or writes.
PATH_DESTS = frozenset({"output_path", "include_path", "use_cache", "config"})
# EvaluatorConfig reads `samples` as JSON text or, failing that, as a path to a JSON file.
JSON_OR_PATH_DESTS = frozenset({"samples"})
CONFIG_DEST = "config"
REMOTE_CODE_KEY = "trust_remote_code"
UNSAFE_CODE_KEY = "confirm_run_unsafe_code"
URL_KEY = "base_url"
# Bounds on walking a request's nested values (each JSON level costs a recursion).
MAX_DEPTH = 32


@dataclass(frozen=True)
class ValidatedJob:
    values: dict[str, Any]
    lm_args: list[str]
    program: list[str]
    # A value, or a secret reference {"secret": name} (job_secrets), read only at launch.
    env_vars: dict[str, str | dict[str, str]]
    user_output_path: str | None
    timeout_s: float | None
    resources: dict[str, Any] = field(default_factory=dict)
    # The validated `config` file, as YAML text with its paths made absolute: the job reads
    # this copy (see `job_lm_args`), so editing the file after submission changes nothing.
    config_snapshot: str | None = None
    # Where the job's webhook goes (webhooks.callback_target), or None.
    callback_url: str | None = None
    # The regression gate (gate_rules.Gate as a dict) evaluated when the job ends, or None.
    gate: dict[str, Any] | None = None
    # The model and model_args as lm-eval holds them (request and config file merged): what
    # the response cache's fingerprint is made of (admission.fingerprint).
    model: str | None = None
    model_args: Any = None


def job_lm_args(job: ValidatedJob, work_dir: Path) -> list[str]:
    """The job's lm-eval arguments, with `--config` pointing at the snapshot, written (0600)
    into `work_dir` (which must exist)."""
    args = list(job.lm_args)
    if job.config_snapshot is None:
        return args
    snapshot = work_dir / jobdir.CONFIG_SNAPSHOT
    snapshot.touch(mode=0o600)
    snapshot.write_text(job.config_snapshot)
    index = args.index("--config")
    args[index + 1] = str(snapshot)
    return args


def is_path_option(spec: OptionSpec, metavar: str | None) -> bool:
    return spec.dest in PATH_DESTS or (metavar is not None and "path" in metavar.lower())


def confine(value: str, roots: list[Path], base: Path, what: str) -> Path:
    """`value` as an absolute path, which must resolve (symlinks followed) inside a root."""
    try:
        return paths.confine(value, roots, base, what)
    except paths.PathRefused as exc:
        raise InvalidRequest(str(exc)) from None


def check_text(value: Any, where: str, depth: int = 0) -> None:
    """Every string encodable (no lone surrogate) and free of NUL, every number finite."""
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(
                f"{where}: contains a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                "which is not text"
            ) from None
        if "\0" in value:
            raise InvalidRequest(f"{where}: contains a NUL character")
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{where}: {value} is not a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where, depth + 1)
            check_text(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text(item, f"{where}[{index}]", depth + 1)


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON (UTF-8) cannot carry made visible: non-finite numbers as text,
    lone surrogates as backslash escapes."""
    if depth > MAX_DEPTH:
        return "..."
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k, depth + 1): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return value


def truthy_keys(value: Any, keys: tuple[str, ...], depth: int = 0) -> set[str]:
    """Which of `keys` map to a truthy value anywhere in `value` (nested dicts and lists), as
    Python code tests it (1, "yes", 1.0 and the string "False" are all true), in one walk;
    too deep to judge counts as all of them: refuse rather than guess."""
    found: set[str] = set()
    if depth > MAX_DEPTH:
        return set(keys)
    if isinstance(value, dict):
        found.update(k for k in keys if value.get(k))
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return found
    for item in items:
        if len(found) == len(keys):
            break
        if isinstance(item, dict | list):
            found |= truthy_keys(item, keys, depth + 1)
    return found


MAX_MODEL_PATH_CHECKS = 256  # model_args entries looked at for local paths


def values_of(value: Any, key: str, depth: int = 0) -> list[Any]:
    """Every value stored under `key` in nested dicts and lists."""
    found: list[Any] = []
    if depth > MAX_DEPTH:
        return found
    if isinstance(value, dict):
        for k, v in value.items():
            if k == key:
                found.append(v)
            found += values_of(v, key, depth + 1)
    elif isinstance(value, list):
        for item in value:
            found += values_of(item, key, depth + 1)
    return found


class RequestValidator:
    def __init__(
        self,
        settings: Settings,
        parser: argparse.ArgumentParser,
        specs: list[OptionSpec],
        catalog: Catalog,
        gpus: list[str] | None = None,
        uploads: TaskUploads | None = None,
    ) -> None:
        self._settings = settings
        # The local executor's GPU devices (GPU slots); None when jobs run on Ray, which
        # places them itself.
        self._gpus = gpus
        self._uploads = uploads
        self._tasks_dir = settings.tasks_dir
        self._parser = parser
        self._specs = specs
        self._catalog = catalog
        self._default_program = tuple(shlex.split(settings.lm_eval_path_allowlist[0]))
        backends.installed()  # probe the installed backends once, at startup
        # Resolved once: settings do not change while the server runs.
        self._roots = settings.allowed_roots
        self._secrets = settings.secret_policy()
        self._server_files = paths.ServerFiles.of(settings)
        metavars = {a.dest: a.metavar for a in parser._actions if isinstance(a.metavar, str)}
        self._path_dests = {
            s.dest
            for s in specs
            if s.kind is OptionKind.value and is_path_option(s, metavars.get(s.dest))
        }
        # Options whose false a request can only say by leaving them out.
        self._false_by_omission = {
            s.dest
            for s in specs
            if s.kind is OptionKind.flag
            or (s.kind is OptionKind.optional_value and s.false_token is None)
        }

    def validate(self, request: BaseModel, principal: str | None = None) -> ValidatedJob:
        """`principal`: the caller's name, which ALLOWED_SECRETS judges secret references by
        and whose uploaded tasks are known by name (None: the server itself, e.g. a test; it
        may use no secret ALLOWED_SECRETS limits and has no uploads)."""
        try:
            return self._validate(request, principal)
        except OSError as exc:
            # A path the filesystem will not even look up (too long, unreadable, ...).
            raise InvalidRequest(f"a path in the request cannot be used: {exc}") from None

    def _validate(self, request: BaseModel, principal: str | None) -> ValidatedJob:
        values = request.model_dump(exclude_none=True)
        check_text(values, "request")
        values = lm_eval_cli.bools_as_text(values, self._specs)
        server = {k: values.pop(k) for k in SERVER_FIELDS if k in values}
        self._check_option_text(values)
        program = self._program(server.get("lm_eval_path"))
        env_vars = self._env_vars(server.get("env_vars") or {}, principal)
        if self._gpus is not None and (
            refused := gpus.check_request(server.get("resources"), self._gpus)
        ):
            raise InvalidRequest(refused)
        callback_url = self._callback_url(server.get("callback_url"))
        self._check_max_attempts(values.get("max_attempts"))
        base = Path.cwd()
        self._absolute_paths(values, base)
        try:
            tasks = task_items(values.get("tasks"))
        except ArgvError as exc:
            raise InvalidRequest(str(exc)) from None
        tasks = self._task_paths(tasks, base)
        if tasks:
            values["tasks"] = tasks
        try:
            lm_args = request_to_argv(values, self._specs)
            lm_eval_cli.check_argv_words(lm_args)
            namespace = parse_argv(self._parser, lm_args)
        except lm_eval_cli.OptionTooLarge as exc:
            raise InvalidRequest(str(exc)) from None
        except ArgvError as exc:
            raise InvalidRequest(_argv_message(str(exc))) from exc
        yaml_config, snapshot = self._config(getattr(namespace, CONFIG_DEST, None), base)
        self._check_false_overrides(values, yaml_config or {})
        merged = lm_eval_checks.merge(vars(namespace), yaml_config)
        user_output = merged.get("output_path") or None
        if not user_output:
            # The manager gives every job an output directory of its own.
            merged["output_path"] = str(self._settings.jobs_dir / "<job>" / jobdir.RESULTS)
        try:
            configured = lm_eval_checks.check(merged, base)
        except lm_eval_checks.LmEvalCheckError as exc:
            raise InvalidRequest(f"lm-eval would refuse these options: {exc}") from None
        self._check_code(configured)
        self._check_no_secret_refs(configured)
        self._check_urls(configured)
        self._check_model_paths(configured)
        include_paths = self._check_paths(configured, user_output)
        all_tasks = task_items(configured.get("tasks"))
        if not all_tasks:
            raise InvalidRequest('tasks is required, e.g. "tasks": "mmlu,arc_easy"')
        names = [t for t in all_tasks if not paths.is_path_like(t)]
        model = configured.get("model")
        self._check_model(model)
        if missing := backends.missing_extra(model, program, self._settings):
            raise InvalidRequest(missing)
        if backends.runs_here(program, self._settings) and (
            refused := run_checks.refusal(configured)
        ):
            raise InvalidRequest(refused)
        if refused := run_checks.hub_push_refusal(
            configured,
            offline=run_checks.hub_offline(env_vars, self._settings.jobs_offline),
        ):
            raise InvalidRequest(refused)
        uploaded = self._uploads.names(principal) if principal and self._uploads else {}
        self._check_tasks(names, include_paths, uploaded)
        if used := {t: str(uploaded[t]) for t in names if t in uploaded}:
            lm_args, snapshot = self._run_uploaded(values, yaml_config, used)
        return ValidatedJob(
            values=values,
            lm_args=lm_args,
            program=program,
            env_vars=env_vars,
            user_output_path=user_output,
            timeout_s=server.get("timeout_s"),
            resources=server.get("resources") or {},
            config_snapshot=snapshot,
            callback_url=callback_url,
            gate=server.get("gate"),
            model=model,
            model_args=configured.get("model_args"),
        )

    def _run_uploaded(
        self, values: dict[str, Any], yaml_config: dict[str, Any] | None, used: dict[str, str]
    ) -> tuple[list[str], str | None]:
        """The argv and config snapshot with the owner's uploaded task names replaced by their
        stored YAML: lm-eval reads a task given by path, and the request's own include_path
        (lm-eval takes one) stays as it was. The record keeps the names."""

        def swap(tasks: list[str]) -> list[str]:
            return [used.get(task, task) for task in tasks]

        argv_values = dict(values)
        if values.get("tasks"):
            argv_values["tasks"] = swap(task_items(values["tasks"]))
        lm_args = request_to_argv(argv_values, self._specs)
        snapshot = None
        if yaml_config is not None:
            config = dict(yaml_config)
            if isinstance(config.get("tasks"), list):
                config["tasks"] = swap(config["tasks"])
            import yaml

            snapshot = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        return lm_args, snapshot

    def _not_uploads(self, path: Path, what: str) -> None:
        """Uploaded tasks are reached by name, by their owner only: never by path."""
        if paths.inside(path, self._tasks_dir):
            raise InvalidRequest(
                f"{what}: {path} is inside the server's uploaded tasks (DATA_DIR/tasks); "
                "name an uploaded task in tasks instead"
            )

    def _check_max_attempts(self, max_attempts: int | None) -> None:
        limit = self._settings.max_attempts
        if max_attempts is not None and max_attempts > limit:
            raise InvalidRequest(
                f"max_attempts: {max_attempts} is more than this server allows (MAX_ATTEMPTS="
                f"{limit}); ask for at most {limit}, or POST /job/{{id}}/resume a failed job"
            )

    def _check_option_text(self, values: dict[str, Any]) -> None:
        """The lm-eval options' text within lm_eval_cli's bounds, checked before anything
        splits or parses it; a request with more than a little text is parsed in a worker
        thread (the whole validation runs again there)."""
        try:
            total = lm_eval_cli.check_option_sizes(values, self._specs)
            if total > lm_eval_cli.THREAD_PARSE_BYTES:
                offload.require_thread(f"{total} bytes of option text")
            lm_eval_cli.check_key_value_options(values, self._specs)
        except lm_eval_cli.OptionTooLarge as exc:
            raise InvalidRequest(str(exc)) from None

    # ------------------------------------------------------------------ paths
    def _absolute_paths(self, values: dict[str, Any], base: Path) -> None:
        """Path options confined and made absolute in place (the job runs in its own dir)."""
        roots = self._roots
        for dest in self._path_dests:
            value = values.get(dest)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidRequest(f"{dest} must be a path string")
            values[dest] = str(confine(value, roots, base, dest))
            self._not_uploads(Path(values[dest]), dest)
        for dest in JSON_OR_PATH_DESTS:
            value = values.get(dest)
            if isinstance(value, str) and _is_path_text(value):
                values[dest] = str(confine(value, roots, base, dest))
                self._not_uploads(Path(values[dest]), dest)

    def _task_paths(self, tasks: list[str], base: Path) -> list[str]:
        roots = self._roots
        out = []
        for task in tasks:
            try:
                found = paths.resolve_task_path(task, roots, base, single=len(tasks) == 1)
            except paths.PathRefused as exc:
                raise InvalidRequest(str(exc)) from None
            for file in found.files if found is not None else ():
                self._not_uploads(file, "tasks")
            out.append(found.text if found is not None else task)
        return out

    def _config(self, config: str | None, base: Path) -> tuple[dict[str, Any] | None, str | None]:
        """The config file as lm-eval loads it, its paths confined and made absolute, and the
        YAML snapshot the job will read."""
        if not config:
            return None, None
        try:
            data = lm_eval_checks.load_yaml_config(Path(config))
        except lm_eval_checks.LmEvalCheckError as exc:
            raise InvalidRequest(f"config: {exc}") from None
        check_text(data, "config")
        roots = self._roots
        for dest in self._path_dests - {CONFIG_DEST}:
            value = data.get(dest)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidRequest(f"config file {config}: {dest} must be a path string")
            data[dest] = str(confine(value, roots, base, f"config file {config}: {dest}"))
        for dest in JSON_OR_PATH_DESTS:
            value = data.get(dest)
            if isinstance(value, str) and _is_path_text(value):
                data[dest] = str(confine(value, roots, base, f"config file {config}: {dest}"))
        if data.get("tasks") is not None:
            value = data["tasks"]
            if isinstance(value, list) and not all(isinstance(t, str) for t in value):
                raise InvalidRequest(f"config file {config}: tasks must be names or paths")
            items = value.split(",") if isinstance(value, str) else value
            items = [t.strip() for t in items if isinstance(t, str) and t.strip()]
            data["tasks"] = self._task_paths(items, base)
        import yaml

        return data, yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def _check_false_overrides(self, values: dict[str, Any], yaml_config: dict[str, Any]) -> None:
        for dest in self._false_by_omission:
            if values.get(dest) is False and yaml_config.get(dest):
                raise InvalidRequest(
                    f"{dest}: false cannot override the config file's "
                    f"{yaml_config[dest]!r} on lm-eval's command line (it has no way to say "
                    f"false); remove {dest} from the config file"
                )

    def _check_paths(self, configured: dict[str, Any], user_output: str | None) -> list[Path]:
        server = self._server_files
        try:
            if user_output:
                # Already absolute and resolved (request or config file alike).
                model_args = configured.get("model_args") or {}
                paths.check_results_dir(Path(user_output), model_args, server, self._roots)
            for dest in self._path_dests - {CONFIG_DEST, "output_path"}:
                value = configured.get(dest)
                if isinstance(value, str) and value:
                    server.refuse(Path(value), dest)
            cache = configured.get("use_cache")
            if isinstance(cache, str) and cache:
                paths.check_cache_prefix(Path(cache), self._roots, server)
        except paths.PathRefused as exc:
            raise InvalidRequest(str(exc)) from None
        include = configured.get("include_path")
        return [Path(include)] if isinstance(include, str) and include else []

    # ------------------------------------------------------------------ code and hosts
    def _check_code(self, configured: dict[str, Any]) -> None:
        settings = self._settings
        wanted = tuple(
            key
            for key, allowed in (
                (REMOTE_CODE_KEY, settings.allow_remote_code),
                (UNSAFE_CODE_KEY, settings.allow_unsafe_code),
            )
            if not allowed
        )
        found = truthy_keys(configured, wanted) if wanted else set()
        if REMOTE_CODE_KEY in found:
            raise InvalidRequest(
                "trust_remote_code is refused by this server (found true in the options, "
                "model_args, metadata or the config file): it runs code downloaded with the "
                "model. The operator can allow it with ALLOW_REMOTE_CODE=true"
            )
        if UNSAFE_CODE_KEY in found:
            raise InvalidRequest(
                "confirm_run_unsafe_code is refused by this server: those tasks execute code "
                "the model wrote. The operator can allow it with ALLOW_UNSAFE_CODE=true "
                "(ALLOW_REMOTE_CODE does not cover it)"
            )

    def _check_model_paths(self, configured: dict[str, Any]) -> None:
        """A local model, tokenizer or adapter named in model_args (an absolute path that
        exists) must lie inside ALLOWED_PATHS: they are all a job's sandbox shows it of the
        machine's files, and all a job may read."""
        model_args = configured.get("model_args")
        if not isinstance(model_args, dict):
            return
        for key, value in list(model_args.items())[:MAX_MODEL_PATH_CHECKS]:
            if not isinstance(value, str) or not value.startswith(("/", "~")):
                continue
            path = Path(value).expanduser()
            if not path.exists():
                continue  # a hub id or a path lm-eval will report missing itself
            resolved = path.resolve()
            if not any(paths.inside(resolved, root) for root in self._roots):
                raise InvalidRequest(
                    f"model_args: {key}={value} is outside ALLOWED_PATHS "
                    f"({', '.join(map(str, self._roots))}); put local models in one of "
                    "those directories (the operator can add one to ALLOWED_PATHS)"
                )

    def _check_urls(self, configured: dict[str, Any]) -> None:
        prefixes = self._settings.model_url_prefixes
        if not prefixes:
            return
        for dest in ("model_args", "metadata"):
            for url in values_of(configured.get(dest) or {}, URL_KEY):
                try:
                    allowed = isinstance(url, str) and url_allowed(url, prefixes)
                except ValueError as exc:
                    raise InvalidRequest(f"{dest}: {exc}") from None
                if not allowed:
                    raise InvalidRequest(
                        f"{dest}: base_url {url!r} is not under the server's "
                        f"MODEL_URL_PREFIXES ({', '.join(prefixes)})"
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

    def _callback_url(self, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            return webhooks.callback_target(url, self._settings.webhook_url_prefixes)
        except webhooks.CallbackRefused as exc:
            raise InvalidRequest(str(exc)) from None

    def _env_vars(
        self, env_vars: dict[str, Any], principal: str | None
    ) -> dict[str, str | dict[str, str]]:
        try:
            checked = check_env_vars(env_vars, self._settings)
            for name, value in checked.items():
                secret = job_secrets.reference_name(value)
                if secret is not None:
                    self._secrets.check(name, secret, principal or "")
        except (EnvVarsRefused, job_secrets.SecretRefused) as exc:
            raise InvalidRequest(str(exc)) from None
        return checked

    def _check_no_secret_refs(self, configured: dict[str, Any]) -> None:
        """A secret goes only into env_vars (job_secrets): a reference in lm-eval's options
        (model_args, from the request or its config file) would reach lm-eval as the literal
        object, never as the secret."""
        for dest, value in configured.items():
            if isinstance(value, dict | list) and (
                where := job_secrets.find_reference(value, dest, MAX_DEPTH)
            ):
                raise InvalidRequest(job_secrets.not_here(where))

    def _check_model(self, model: str | None) -> None:
        names = self._catalog.model_names
        if model is None or names is None or model in names:
            return
        hint = close_matches(model, names)
        suggestion = f" Did you mean: {', '.join(hint)}?" if hint else ""
        raise InvalidRequest(
            f"Unknown model {model!r}.{suggestion} Known models: {', '.join(sorted(names))}"
        )

    def _check_tasks(
        self, tasks: list[str], include_paths: list[Path], uploaded: dict[str, Path]
    ) -> None:
        # TaskIndexUnavailable (503) and OffloadRequired (run again in a thread) pass through.
        try:
            unknown = self._catalog.unknown_tasks(tasks, include_paths, uploaded)
        except TaskRequestRefused as exc:
            raise InvalidRequest(str(exc)) from None
        if unknown is not None:
            raise UnknownTaskNames(unknown)


def _is_path_text(value: str) -> bool:
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return "{" not in value  # lm-eval refuses broken JSON itself
    except RecursionError:
        return False  # JSON nested too deeply: not a path; parse_argv refuses it
    return False


def _argv_message(message: str) -> str:
    text = f"lm-eval rejected the options: {message}"
    if "expected `key=value`" in message:
        text += (
            ". Words separated by spaces are separate key=value items, as on the command "
            "line: quote a value that contains spaces (key='a b') or send a JSON object"
        )
    return text


# Unknown task names an error message lists (the rest are counted).
MAX_NAMES_LISTED = 50


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
        for task, hints in list(matches.items())[:MAX_NAMES_LISTED]:
            hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
            parts.append(f"{task[:200]!r}{hint}")
        if len(matches) > MAX_NAMES_LISTED:
            # A message is read by a person: a thousand names help nobody, and cost bytes.
            parts.append(f"and {len(matches) - MAX_NAMES_LISTED} more")
        return (
            f"Unknown task(s): {'; '.join(parts)}. Tasks come from lm-eval's task list "
            "(`lm_eval ls tasks`, GET /tasks), your uploaded tasks and the request's "
            "include_path"
        )
