"""Known model and task names, for validating requests before they are queued.

Model names come from lm-eval's lazy model registry (no heavy imports). Task names come from
the task index cache that `task_index` builds in a child process, so the server never carries
lm-eval's task machinery; until that cache is ready, tasks are left for the job to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import fnmatch
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def load_model_names() -> set[str] | None:
    """Registered model names, or None when this lm-eval cannot list them cheaply."""
    try:
        import lm_eval.models  # noqa: F401 - registers the lazy placeholders
        from lm_eval.api.registry import model_registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return set(model_registry.keys())


def close_matches(name: str, candidates: set[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.6)


@dataclass(frozen=True)
class UnknownTasks:
    names: list[str]
    known: set[str]
    extra: set[str]

    def suggestions(self) -> dict[str, list[str]]:
        """Close matches per unknown name: tens of milliseconds over lm-eval's ~15k names."""
        candidates = self.known | self.extra
        return {name: close_matches(name, candidates) for name in self.names}


class Catalog:
    def __init__(self, index_dir: Path, build_index: bool) -> None:
        self._index_dir = index_dir
        self._build_index = build_index
        self.model_names = load_model_names()
        self.task_names: set[str] | None = None
        self.index_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        # Requests validate from worker threads; a lost update only costs a re-scan.
        self._include_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], set[str]]] = {}

    @property
    def tasks_ready(self) -> bool:
        return self.task_names is not None

    def start(self) -> None:
        if not self._build_index:
            return
        from lm_eval_server import task_index

        self.task_names = task_index.load_names(self._index_dir)
        if self.task_names is None:
            self._task = asyncio.create_task(self._build(), name="task-index-build")

    async def _build(self) -> None:
        from lm_eval_server import task_index

        self._index_dir.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lm_eval_server.task_index",
            "build",
            "--data-dir",
            str(self._index_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            self.index_error = err.decode(errors="replace")[-2000:]
            log.warning(
                "task index build failed; tasks are checked by each job: %s", self.index_error
            )
            return
        self.task_names = task_index.load_names(self._index_dir)
        log.info("task index ready: %d names", len(self.task_names or ()))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def unknown_tasks(self, tasks: list[str], include_paths: list[Path]) -> UnknownTasks | None:
        """The tasks nobody defines (cheap: membership tests only), or None when all are known
        or the index is not ready yet."""
        known = self.task_names
        if known is None:
            return None
        extra: set[str] = set()
        for path in include_paths:
            extra |= self._include_names(path)
        unknown: list[str] = []
        for task in tasks:
            if task in known or task in extra or _is_task_file(task):
                continue
            if any(ch in task for ch in "*?[") and (
                fnmatch.filter(known, task) or fnmatch.filter(extra, task)
            ):
                continue
            unknown.append(task)
        return UnknownTasks(unknown, known, extra) if unknown else None

    def _include_names(self, path: Path) -> set[str]:
        """Names defined under an include_path, re-read only when its YAML files change."""
        from lm_eval_server import task_index

        fingerprint = _yaml_fingerprint(path)
        cached = self._include_cache.get(path)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        names = task_index.scan_include_path(path)
        if len(self._include_cache) >= 256:
            self._include_cache.clear()
        self._include_cache[path] = (fingerprint, names)
        return names


def _yaml_fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    entries = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.endswith((".yaml", ".yml", ".py")):
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                entries.append((full, st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


def _is_task_file(task: str) -> bool:
    # lm-eval also accepts a path to a task YAML in --tasks.
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()
