"""Uploaded tasks: where they live, who owns them, how an upload is checked and stored.

`DATA_DIR/tasks/<owner>/<task>/` holds `<task>.yaml` (the uploaded YAML with its data_files
made absolute paths into this directory), the data files, and `upload.json` (who, when, what).
The directory is the record: every lookup reads it (the task names a submission needs from a
cache checked against the owner directory's mtime), so several server processes sharing
DATA_DIR agree, and a restart loses nothing. DATA_DIR/tasks is a server-owned path: no job
writes into it and no request names files in it; a job reaches an upload only through the
task name, which the validator maps to its owner's YAML.

An upload is checked in three steps: the rule over its files (`task_rules`, pure), names
(no clash with lm-eval's own tasks), then lm-eval itself loads it in a child process
(`task_check`) with the job environment and a timeout. Only a task that passes all three
replaces what was there, by a rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.config import Settings
from lm_eval_server.errors import DomainError
from lm_eval_server.runtime import job_env, sandbox
from lm_eval_server.tasks import task_rules
from lm_eval_server.team.principals import NAME_PATTERN, Principal

log = logging.getLogger(__name__)

STAGING = ".staging"
META = "upload.json"
# Characters of the check process's output kept for its error message.
CHECK_OUTPUT_CHARS = 64 * 1024
# Uploads checked by lm-eval at once (each is a Python process importing lm-eval).
MAX_PENDING_PER_OWNER = 2  # one upload being checked, one waiting for it
# How a check process ends when it passes RLIMIT_CPU (SIGXCPU; bwrap reports 128+24).
CPU_LIMIT_CODES = (-24, 152)


class UploadRefused(DomainError):
    """The upload breaks the rule or lm-eval cannot load it: 422 with the reason."""

    status_code = 422


class UnsupportedUpload(DomainError):
    status_code = 415


class UploadTooLarge(DomainError):
    status_code = 413


class TaskNameTaken(DomainError):
    status_code = 409


class UploadedTaskNotFound(DomainError, LookupError):
    status_code = 404

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"No uploaded task named {name[:200]!r} (GET /tasks?source=upload lists yours)."
        )


class ChecksBusy(DomainError):
    status_code = 429

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "10"}


@dataclass(frozen=True)
class UploadedTask:
    name: str
    owner: str
    directory: Path
    output_type: str | None = None
    created_at: float | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    docs: int | None = None

    @property
    def yaml_path(self) -> Path:
        return self.directory / f"{self.name}.yaml"


def prepare(
    files: list[tuple[str, bytes]], allow_code: bool, max_files: int, max_bytes: int
) -> tuple[task_rules.CheckedTask, dict[str, bytes]]:
    """The rule over an upload's files: counts, names, types, the YAML. Pure."""
    if not files:
        raise UploadRefused(
            "send the task as multipart form data: one `files` field per file, a task YAML "
            "and its data files"
        )
    if len(files) > max_files:
        raise UploadRefused(
            f"{len(files)} files sent; an upload holds at most {max_files} (MAX_UPLOAD_FILES)"
        )
    total = sum(len(data) for _, data in files)
    if total > max_bytes:
        raise UploadTooLarge(
            f"the files hold {total} bytes; an upload may hold at most {max_bytes} "
            "(MAX_UPLOAD_BYTES)"
        )
    kinds: dict[str, str] = {}
    contents: dict[str, bytes] = {}
    for name, data in files:
        try:
            kind = task_rules.check_file_name(name, allow_code)
        except task_rules.UnsupportedFile as exc:
            raise UnsupportedUpload(str(exc)) from None
        except task_rules.TaskRefused as exc:
            raise UploadRefused(str(exc)) from None
        if name in kinds:
            raise UploadRefused(f"file {name!r} is sent twice")
        kinds[name] = kind
        contents[name] = data
    yamls = [n for n, kind in kinds.items() if kind == "yaml"]
    if len(yamls) != 1:
        raise UploadRefused(
            f"an upload holds exactly one task YAML (.yaml or .yml); got {len(yamls)}"
            + (f": {', '.join(yamls)}" if yamls else "")
        )
    yaml_name = yamls[0]
    others = {n: k for n, k in kinds.items() if n != yaml_name}
    try:
        config = task_rules.parse_yaml(contents.pop(yaml_name), yaml_name)
        checked = task_rules.check_task(config, others, allow_code)
    except task_rules.TaskRefused as exc:
        raise UploadRefused(str(exc)) from None
    stored = {n: data for n, data in contents.items()}
    if f"{checked.name}.yaml" in stored or META in stored:
        raise UploadRefused(f"a data file may not be named {checked.name}.yaml or {META}")
    return checked, stored


class TaskUploads:
    """The uploaded tasks under DATA_DIR/tasks, owner-aware."""

    def __init__(self, settings: Settings, job_sandbox: sandbox.Sandbox = sandbox.OFF) -> None:
        self._settings = settings
        self.root = settings.tasks_dir
        self._locks: dict[str, asyncio.Lock] = {}
        self._sandbox = job_sandbox
        # The check never needs the network: it reads the upload's own files.
        self._views = sandbox.Views(settings, network=False)
        self._checking: set[str] = set()  # owners whose upload lm-eval is checking now
        self._pending: dict[str, int] = {}  # each owner's uploads being checked or waiting
        # names() per owner: (the owner directory's (dev, inode, mtime) when read, the names).
        self._names: dict[str, tuple[tuple[int, int, int] | None, dict[str, Path]]] = {}

    # ------------------------------------------------------------ reading

    def owner_dir(self, owner: str) -> Path:
        # A principal's name ([A-Za-z0-9][A-Za-z0-9_.@-]*) is a plain directory name; any other
        # text (an admin's ?owner=) never becomes a path.
        if not NAME_PATTERN.fullmatch(owner):
            raise UploadedTaskNotFound(owner, f"No owner named {owner[:100]!r}.")
        return self.root / owner

    def names(self, owner: str) -> dict[str, Path]:
        """The owner's task names -> their stored YAML. Every submission asks, so the answer is
        kept per owner and used while the owner's directory is unchanged: an upload or a delete
        renames an entry in or out of it, which changes its mtime (so another server process's
        changes count too), and this process's own drop the entry at once. One stat, no scan."""
        if not NAME_PATTERN.fullmatch(owner):
            return {}
        try:
            st = os.stat(self.owner_dir(owner))
            signature: tuple[int, int, int] | None = (st.st_dev, st.st_ino, st.st_mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            signature = None
        cached = self._names.get(owner)
        if cached is not None and cached[0] == signature:
            return dict(cached[1])
        found = self._scan(owner)
        self._names[owner] = (signature, found)
        return dict(found)

    def _changed(self, owner: str) -> None:
        self._names.pop(owner, None)

    def _scan(self, owner: str) -> dict[str, Path]:
        """The owner's task names -> their stored YAML (one scandir, bounded)."""
        found: dict[str, Path] = {}
        limit = self._settings.max_uploaded_tasks * 2 + 8
        try:
            with os.scandir(self.owner_dir(owner)) as entries:
                for index, entry in enumerate(entries):
                    if index >= limit:
                        break
                    name = entry.name
                    if not task_rules.TASK_NAME.fullmatch(name):
                        continue
                    yaml_path = Path(entry.path) / f"{name}.yaml"
                    if entry.is_dir(follow_symlinks=False) and yaml_path.is_file():
                        found[name] = yaml_path
        except (FileNotFoundError, NotADirectoryError):
            pass
        return found

    def _read(self, owner: str, name: str) -> UploadedTask | None:
        directory = self.owner_dir(owner) / name
        if not task_rules.TASK_NAME.fullmatch(name) or not (directory / f"{name}.yaml").is_file():
            return None
        try:
            meta = json.loads((directory / META).read_text())
        except (OSError, ValueError):
            meta = {}
        return UploadedTask(
            name=name,
            owner=owner,
            directory=directory,
            output_type=meta.get("output_type"),
            created_at=meta.get("created_at"),
            files=meta.get("files") or [],
            docs=meta.get("docs"),
        )

    def owners(self, viewer: Principal) -> list[str]:
        if not viewer.admin:
            return [viewer.name]
        try:
            return sorted(
                e.name
                for e in os.scandir(self.root)
                if e.is_dir(follow_symlinks=False) and NAME_PATTERN.fullmatch(e.name)
            )
        except FileNotFoundError:
            return []

    def list(self, viewer: Principal) -> list[UploadedTask]:
        """The uploads `viewer` may see: their own; an admin's, everyone's."""
        found: list[UploadedTask] = []
        for owner in self.owners(viewer):
            for name in sorted(self.names(owner)):
                task = self._read(owner, name)
                if task is not None:
                    found.append(task)
        return found

    def get(self, name: str, viewer: Principal, owner: str | None = None) -> UploadedTask:
        """The viewer's own upload of that name; an admin may name another `owner`, and
        without one finds another owner's when they have none of their own."""
        if owner is not None and not (viewer.can_see(owner) and NAME_PATTERN.fullmatch(owner)):
            raise UploadedTaskNotFound(name)
        candidates = [owner] if owner is not None else [viewer.name]
        if owner is None and viewer.admin:
            candidates += [o for o in self.owners(viewer) if o != viewer.name]
        for candidate in candidates:
            task = self._read(candidate, name)
            if task is not None:
                return task
        raise UploadedTaskNotFound(name)

    def config(self, task: UploadedTask) -> dict[str, Any]:
        return task_rules.parse_yaml(task.yaml_path.read_bytes(), task.yaml_path.name)

    # ------------------------------------------------------------ writing

    def clean_staging(self, older_than_s: float = 3600.0) -> None:
        """Remove what uploads interrupted by a crash left in the staging directory (entries
        old enough that no running upload, of this process or another, still uses them)."""
        staging = self.root / STAGING
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(staging))
        except FileNotFoundError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)

    def _lock(self, owner: str) -> asyncio.Lock:
        return self._locks.setdefault(owner, asyncio.Lock())

    async def add(
        self, owner: str, files: list[tuple[str, bytes]], builtin_names: Iterable[str]
    ) -> tuple[UploadedTask, bool]:
        """Check and store an upload; returns it and whether it replaced one of the owner's."""
        settings = self._settings
        allow_code = settings.allow_remote_code
        # The YAML parse and the template rule are pure Python over up to MAX_YAML_BYTES (about
        # a second for 256 KB of templates): off the event loop.
        checked, data = await asyncio.to_thread(
            prepare, files, allow_code, settings.max_upload_files, settings.max_upload_bytes
        )
        name = checked.name
        if name in builtin_names:
            raise TaskNameTaken(
                f"task {name!r} is one of lm-eval's own tasks, groups or tags; give the "
                "uploaded task another name (task: in the YAML)"
            )
        # One owner holds at most one check slot (its uploads are checked one at a time) and
        # may have one more upload waiting: it cannot take the slots other owners need.
        if self._pending.get(owner, 0) >= MAX_PENDING_PER_OWNER:
            raise ChecksBusy(
                "your earlier uploads are still being checked by lm-eval; retry when they are done"
            )
        self._pending[owner] = self._pending.get(owner, 0) + 1
        try:
            async with self._lock(owner):
                slots = settings.task_check_slots
                if len(self._checking) >= slots:
                    raise ChecksBusy(
                        f"{slots} uploads of other owners are being checked by lm-eval right "
                        "now (TASK_CHECK_SLOTS); retry shortly"
                    )
                existing = self.names(owner)
                replaced = name in existing
                if not replaced and len(existing) >= settings.max_uploaded_tasks:
                    raise UploadRefused(
                        f"you have {len(existing)} uploaded tasks, the most this server keeps "
                        f"per owner (MAX_UPLOADED_TASKS={settings.max_uploaded_tasks}); delete "
                        "one with DELETE /tasks/{name}"
                    )
                self._checking.add(owner)
                try:
                    task = await self._store(owner, checked, data, allow_code)
                finally:
                    self._checking.discard(owner)
        finally:
            self._pending[owner] -= 1
            if not self._pending[owner]:
                del self._pending[owner]
        log.info("task %r uploaded by %s (%s)", name, owner, "replaced" if replaced else "new")
        return task, replaced

    async def _store(
        self,
        owner: str,
        checked: task_rules.CheckedTask,
        data: dict[str, bytes],
        allow_code: bool,
    ) -> UploadedTask:
        name = checked.name
        staging_root = self.root / STAGING
        staging = staging_root / f"{owner}.{name}.{uuid.uuid4().hex[:12]}"
        final = self.owner_dir(owner) / name
        check_dir = staging.with_name(staging.name + ".check")
        try:
            await asyncio.to_thread(self._write, staging, checked, data, staging)
            result = await self._check(owner, staging / f"{name}.yaml", check_dir, allow_code)
            meta = {
                "name": name,
                "owner": owner,
                "created_at": time.time(),
                "output_type": result.get("output_type") or checked.output_type,
                "docs": result.get("docs"),
                "files": [{"name": n, "bytes": len(b)} for n, b in sorted(data.items())],
            }
            try:
                await asyncio.to_thread(self._commit, staging, final, checked, data, meta)
            finally:
                self._changed(owner)
        finally:
            for leftover in (staging, check_dir):
                await asyncio.to_thread(shutil.rmtree, leftover, True)
        task = self._read(owner, name)
        assert task is not None
        return task

    def _write(
        self,
        directory: Path,
        checked: task_rules.CheckedTask,
        data: dict[str, bytes],
        data_dir: Path,
    ) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for file_name, content in data.items():
            (directory / file_name).write_bytes(content)
        config = task_rules.data_files_in(checked.config, data_dir)
        (directory / f"{checked.name}.yaml").write_text(task_rules.dump_yaml(config))

    def _commit(
        self,
        staging: Path,
        final: Path,
        checked: task_rules.CheckedTask,
        data: dict[str, bytes],
        meta: dict[str, Any],
    ) -> None:
        # The YAML again, now pointing at the data where it will live.
        config = task_rules.data_files_in(checked.config, final)
        (staging / f"{checked.name}.yaml").write_text(task_rules.dump_yaml(config))
        (staging / META).write_text(json.dumps(meta))
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = staging.with_name(staging.name + ".old")
            final.rename(old)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    async def _check(
        self, owner: str, yaml_path: Path, work_dir: Path, allow_code: bool
    ) -> dict[str, Any]:
        """lm-eval loads the task in a child process with the job environment, in the owner's
        sandbox (the upload is code) and within CPU, memory and file-size limits."""
        settings = self._settings
        await asyncio.to_thread(work_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        env = job_env.job_environment(settings, work_dir, {})
        # The check reads local files only; it never needs the network.
        env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        argv = [sys.executable, "-m", "lm_eval_server.tasks.task_check", str(yaml_path)]
        argv += ["--cpu-s", str(settings.task_check_cpu_s)]
        argv += ["--memory-mb", str(settings.task_check_memory_mb)]
        argv += ["--file-mb", str(settings.task_check_file_mb)]
        if allow_code:
            argv.append("--allow-code")
        if self._sandbox.enabled:
            view = await asyncio.to_thread(
                self._views.job, owner, work_dir, read_only=[yaml_path.parent]
            )
            argv = self._sandbox.wrap(view, argv)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=work_dir,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        timeout_s = settings.task_check_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            raise UploadRefused(
                f"lm-eval did not finish loading the task within {timeout_s:g} s "
                "(TASK_CHECK_TIMEOUT_S)"
            ) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            raise
        result = _last_json(out[-CHECK_OUTPUT_CHARS:].decode(errors="replace"))
        if result is None and proc.returncode in CPU_LIMIT_CODES:
            raise UploadRefused(
                f"lm-eval used more than {settings.task_check_cpu_s} CPU seconds loading the "
                "task (TASK_CHECK_CPU_S): a template or data that costs this much is refused"
            )
        if result is None:
            tail = " ".join(err[-2000:].decode(errors="replace").split())
            raise UploadRefused(
                f"lm-eval could not load the task (exit code {proc.returncode}): {tail[-1000:]}"
            )
        if not result.get("ok"):
            raise UploadRefused(f"lm-eval could not load the task: {result.get('error')}")
        return result

    async def delete(self, name: str, viewer: Principal, owner: str | None = None) -> UploadedTask:
        task = self.get(name, viewer, owner)
        async with self._lock(task.owner):
            trash = self.root / STAGING / f"{task.owner}.{name}.{uuid.uuid4().hex[:12]}.deleted"
            trash.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                task.directory.rename(trash)
            except FileNotFoundError:
                raise UploadedTaskNotFound(name) from None
            finally:
                self._changed(task.owner)
            await asyncio.to_thread(shutil.rmtree, trash, True)
        return task


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None
