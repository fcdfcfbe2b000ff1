"""Known model and task names, for validating requests before they are queued.

Model names come from lm-eval's lazy model registry (no heavy imports). Task names come from
the task index cache that `task_index` builds in a child process, so the server never carries
lm-eval's task machinery. Task names are checked on every request: while the index is being
built, or after its build failed, `unknown_tasks` raises `TaskIndexUnavailable` (503) instead
of letting names through. Only `TASK_INDEX=false` turns the name check off, by the operator's
choice.

Every check here has a bound: task names and glob patterns per request, directory entries
walked and YAML files read per include_path, unknown names given close-match suggestions, and
candidates compared per suggestion. Walking an include_path and matching glob patterns happen
in a worker thread (`offload.require_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import enum
import fnmatch
import hashlib
import logging
import math
import re
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lm_eval_server.admission.offload import OffloadRequired, on_event_loop, require_thread
from lm_eval_server.errors import DomainError

if TYPE_CHECKING:
    from lm_eval_server.config import Settings

log = logging.getLogger(__name__)

# A failed index build is tried again after this delay, doubled after each failure up to the
# maximum: a full disk or a permissions mistake can be fixed without restarting the server.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 600.0
# Submissions that may wait for a build at once; more get 503 at once (each holds its body).
MAX_WAITING_SUBMISSIONS = 64
# Directory entries an include_path walk may look at on the event loop; a bigger tree, or one
# whose YAML files changed since the last scan, is walked in a worker thread.
LOOP_WALK_ENTRIES = 64
# Task YAML paths in one request that may be stat()ed on the event loop.
LOOP_FILE_TASKS = 16
# Unknown task names that get close-match suggestions; the others are listed without.
MAX_SUGGESTED_NAMES = 5
# Candidates (by shared trigrams) that the close-match ratio is computed for, per name.
SUGGESTION_CANDIDATES = 40
# Characters of an unknown name used to look for close matches.
MAX_QUERY_CHARS = 100
# Cached include_path scans: entries, and names across all entries.
INCLUDE_CACHE_ENTRIES = 64
INCLUDE_CACHE_NAMES = 200_000
# A build attempt's stderr kept for the log.
ERROR_TAIL_CHARS = 4000


def load_model_names() -> set[str] | None:
    """Registered model names, or None when this lm-eval cannot list them cheaply."""
    try:
        import lm_eval.models  # noqa: F401 - registers the lazy placeholders
        from lm_eval.api.registry import model_registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return set(model_registry.keys())


def close_matches(name: str, candidates: set[str], n: int = 5) -> list[str]:
    """Close matches among a small set (model names, request fields)."""
    return difflib.get_close_matches(name[:MAX_QUERY_CHARS], sorted(candidates), n=n, cutoff=0.6)


class TaskRequestRefused(ValueError):
    """The request's tasks exceed a per-request bound; the message names the setting."""


class TaskIndexUnavailable(DomainError):
    """Task names cannot be checked now: the index is building, or its build failed."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)}


@dataclass(frozen=True)
class TaskLimits:
    max_tasks: int = 1000
    max_patterns: int = 32
    max_include_entries: int = 10_000

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskLimits:
        return cls(
            max_tasks=settings.max_tasks_per_request,
            max_patterns=settings.max_task_patterns,
            max_include_entries=settings.max_include_entries,
        )


def check_task_count(count: int, limit: int) -> None:
    if count > limit:
        raise TaskRequestRefused(
            f"tasks names {count} tasks; this server takes at most {limit} per request "
            "(MAX_TASKS_PER_REQUEST): split the evaluation into several jobs, or use a group "
            "or tag name that stands for many tasks"
        )


def is_pattern(task: str) -> bool:
    return any(ch in task for ch in "*?[")


def _grams(name: str) -> set[str]:
    padded = f"\0{name}\0"
    return {padded[i : i + 3] for i in range(len(padded) - 2)}


class NameSuggester:
    """Close matches for a misspelt task name, at a bounded cost.

    difflib over all ~15k names took 50 ms to 1 s per unknown name. Here the names that share
    the most character trigrams with the query (an inverted index, ~2 MB) are the candidates,
    and difflib's ratio is computed for at most SUGGESTION_CANDIDATES of them.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._names = sorted(names)
        postings: dict[str, list[int]] = {}
        for index, name in enumerate(self._names):
            for gram in _grams(name[:MAX_QUERY_CHARS]):
                ids = postings.get(gram)
                if ids is None:
                    postings[gram] = [index]
                else:
                    ids.append(index)
        # Arrays of 4-byte ids: ~2 MB where lists of ints take ~4 times that.
        self._postings = {gram: array("I", ids) for gram, ids in postings.items()}

    def suggest(self, name: str, extra: Iterable[str] = (), n: int = 5) -> list[str]:
        query = name[:MAX_QUERY_CHARS]
        grams = _grams(query)
        counts: Counter[int] = Counter()
        for gram in grams:
            ids = self._postings.get(gram)
            if ids is not None:
                counts.update(ids)
        candidates = [self._names[i] for i, _ in counts.most_common(SUGGESTION_CANDIDATES)]
        # The include_path's own names: few, and bounded by MAX_INCLUDE_ENTRIES.
        scored = sorted(
            ((len(grams & _grams(e[:MAX_QUERY_CHARS])), e) for e in extra),
            reverse=True,
        )[:SUGGESTION_CANDIDATES]
        candidates += [e for shared, e in scored if shared]
        return difflib.get_close_matches(query, sorted(set(candidates)), n=n, cutoff=0.6)


@dataclass(frozen=True)
class UnknownTasks:
    names: list[str]
    extra: frozenset[str]
    # The catalog's shared suggester, built on first use (~1 s of CPU, once).
    suggester: Callable[[], NameSuggester] = field(repr=False, compare=False)

    def suggestions(self) -> dict[str, list[str]]:
        """Close matches for the first MAX_SUGGESTED_NAMES unknown names (each a few ms; run it
        in a thread); the other names are listed with none."""
        suggester = self.suggester()
        return {
            name: suggester.suggest(name, self.extra) if index < MAX_SUGGESTED_NAMES else []
            for index, name in enumerate(self.names)
        }


class IndexState(enum.StrEnum):
    disabled = "disabled"  # TASK_INDEX=false: the operator turned task-name checks off
    not_started = "not_started"
    building = "building"
    ready = "ready"
    failed = "failed"


class Catalog:
    def __init__(
        self,
        index_dir: Path,
        build_index: bool,
        limits: TaskLimits | None = None,
        retry_first_s: float = RETRY_FIRST_S,
    ) -> None:
        self._index_dir = index_dir
        self._retry_first_s = retry_first_s
        self._build_index = build_index
        self.limits = limits or TaskLimits()
        self.model_names = load_model_names()
        self.task_names: frozenset[str] | None = None
        self.state = IndexState.not_started if build_index else IndexState.disabled
        self.index_error: str | None = None
        self.build_attempts = 0
        self._build_started = 0.0
        self._next_retry = 0.0
        # Set whenever no build attempt runs; made by start(), on the loop that serves requests.
        self._settled: asyncio.Event | None = None
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._suggester: NameSuggester | None = None
        self._suggester_lock = threading.Lock()
        # GET /tasks: (name, kind, output_type, lowercased name) of every built-in name, in
        # name order; and name -> YAML path. Read from the index's names file on first use.
        self._listing: list[tuple[str, str, str | None, str]] | None = None
        self._yaml_paths: dict[str, str] = {}
        # Validations run in worker threads too; a lost update only costs a re-scan.
        self._include_cache: dict[Path, tuple[bytes, frozenset[str]]] = {}

    @property
    def tasks_ready(self) -> bool:
        return self.task_names is not None

    # ------------------------------------------------------------ the index build

    def start(self) -> None:
        if not self._build_index:
            return
        from lm_eval_server.runtime import task_index

        self._settled = asyncio.Event()
        names = task_index.load_names(self._index_dir)
        if names is not None:
            self._set_ready(names)
            return
        self.state = IndexState.building
        self._task = asyncio.create_task(self._build_until_ready(), name="task-index-build")

    async def _build_until_ready(self) -> None:
        delay_s = self._retry_first_s
        settled = self._settled
        assert settled is not None
        while True:
            self.state = IndexState.building
            settled.clear()
            self._build_started = time.monotonic()
            self.build_attempts += 1
            try:
                names = await self._build_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the child's failure, or ours (no such dir, no memory)
                self._set_failed(exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
                continue
            self._set_ready(names)
            log.info("task index ready: %d names", len(names))
            return

    async def _build_once(self) -> set[str]:
        from lm_eval_server.runtime import task_index

        if self.build_attempts > 1:
            # After a failure, an index built meanwhile (by hand with `python -m
            # lm_eval_server.runtime.task_index build`, or by another server) is taken as it is.
            names = await asyncio.to_thread(task_index.load_names, self._index_dir)
            if names is not None:
                return names
        await asyncio.to_thread(self._index_dir.mkdir, parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lm_eval_server.runtime.task_index",
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
            raise IndexBuildFailed(proc.returncode or 0, err.decode(errors="replace"))
        # Reading 15k names and re-keying the lm-eval install takes tens of ms: off the loop.
        names = await asyncio.to_thread(task_index.load_names, self._index_dir)
        if names is None:
            raise IndexBuildFailed(0, "the build finished but its names file is missing or stale")
        return names

    def _set_ready(self, names: set[str]) -> None:
        self.task_names = frozenset(names)
        self.index_error = None
        self.state = IndexState.ready
        if self._settled is not None:
            self._settled.set()

    def _set_failed(self, exc: Exception, retry_in_s: float) -> None:
        self.index_error = _one_line(exc)
        self.state = IndexState.failed
        self._next_retry = time.monotonic() + retry_in_s
        detail = exc.stderr_tail if isinstance(exc, IndexBuildFailed) else repr(exc)
        log.error(
            "task index build failed (attempt %d): %s. Submissions get 503 until a build "
            "succeeds; retrying in %.0f s. Fix the cause (INDEX_DIR=%s must be writable) or "
            "set TASK_INDEX=false to run jobs without task-name checks. Build output:\n%s",
            self.build_attempts,
            self.index_error,
            retry_in_s,
            self._index_dir,
            detail,
        )
        if self._settled is not None:
            self._settled.set()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def status(self) -> dict[str, object]:
        """The index's state for /ready."""
        body: dict[str, object] = {"state": self.state.value}
        if self.task_names is not None:
            body["names"] = len(self.task_names)
        if self.state is IndexState.building:
            body["building_for_s"] = round(time.monotonic() - self._build_started, 1)
        if self.state is IndexState.failed:
            body["error"] = self.index_error
            body["attempts"] = self.build_attempts
            body["retry_in_s"] = self._retry_in_s()
        return body

    def _retry_in_s(self) -> int:
        return max(1, math.ceil(self._next_retry - time.monotonic()))

    async def wait_for_index(self, timeout_s: float) -> None:
        """Wait, up to `timeout_s`, for a running build to end (a no-op otherwise)."""
        settled = self._settled
        if settled is None or settled.is_set() or self._waiting >= MAX_WAITING_SUBMISSIONS:
            return
        self._waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await settled.wait()
        finally:
            self._waiting -= 1

    def unavailable(self, waited_s: float | None = None) -> TaskIndexUnavailable:
        if self.state is IndexState.failed:
            retry_s = self._retry_in_s()
            return TaskIndexUnavailable(
                f"Task names cannot be checked: the task index could not be built "
                f"({self.index_error}). The server tries again in {retry_s} s; GET /ready "
                "shows the state. The operator can fix the cause (see the server log) or set "
                "TASK_INDEX=false to run jobs without task-name checks",
                retry_after_s=retry_s,
            )
        waited = f" (this request waited {waited_s:g} s, INDEX_WAIT_S)" if waited_s else ""
        return TaskIndexUnavailable(
            "The task index is still being built, so task names cannot be checked yet"
            f"{waited}; retry in a few seconds. GET /ready answers 200 once it is ready",
            retry_after_s=5,
        )

    # ------------------------------------------------------------ checking names

    # ------------------------------------------------------------ discovery (GET /tasks)

    async def listing(self) -> list[tuple[str, str, str | None, str]]:
        """(name, kind, output_type, lowercased name) of every built-in task, group and tag,
        in name order; empty with TASK_INDEX=false. TaskIndexUnavailable while the index is
        not ready."""
        if self.state is IndexState.disabled:
            return []
        if self.task_names is None:
            raise self.unavailable()
        if self._listing is None:
            from lm_eval_server.runtime import task_index

            info = await asyncio.to_thread(task_index.load_info, self._index_dir)
            if info is None:  # the names file went stale under us: names without details
                info = {name: ["task", None, None] for name in self.task_names}
            self._yaml_paths = {n: v[2] for n, v in info.items() if isinstance(v[2], str)}
            self._listing = sorted(
                ((n, str(v[0]), v[1], n.lower()) for n, v in info.items()), key=lambda e: e[0]
            )
        return self._listing

    async def builtin_config(self, name: str) -> tuple[str, str | None, dict[str, object]] | None:
        """(kind, output_type, config) of a built-in name, or None; the config is read from
        its YAML (includes merged), a tag has none."""
        from lm_eval_server.runtime import task_index

        entries = await self.listing()
        found = _find(entries, name)
        if found is None:
            return None
        _, kind, output_type, _ = found
        path = self._yaml_paths.get(name)
        config: dict[str, object] = {}
        if path is not None:
            with contextlib.suppress(Exception):  # an unreadable YAML: the index's facts only
                config = await asyncio.to_thread(task_index.load_config, Path(path))
        return kind, output_type, config

    def unknown_tasks(
        self, tasks: list[str], include_paths: list[Path], extra_names: Iterable[str] = ()
    ) -> UnknownTasks | None:
        """The tasks nobody defines, or None when all are known (or TASK_INDEX=false).

        Raises TaskRequestRefused past a per-request bound, TaskIndexUnavailable while the
        index is not ready, and OffloadRequired on the event loop when the check needs a
        worker thread.
        """
        limits = self.limits
        check_task_count(len(tasks), limits.max_tasks)
        patterns = sum(1 for task in tasks if is_pattern(task))
        if patterns > limits.max_patterns:
            raise TaskRequestRefused(
                f"tasks holds {patterns} glob patterns; this server matches at most "
                f"{limits.max_patterns} per request (MAX_TASK_PATTERNS): name the tasks, or "
                "use a group or tag"
            )
        if self.state is IndexState.disabled:
            return None
        known = self.task_names
        if known is None:
            raise self.unavailable()
        if patterns or sum(1 for t in tasks if t.endswith((".yaml", ".yml"))) > LOOP_FILE_TASKS:
            require_thread("glob patterns or many task files")
        # Uploaded names are run by exact name only: lm-eval gets each one's YAML path, which
        # a glob pattern in --tasks would not reach.
        exact = frozenset(extra_names)
        extra: set[str] = set()
        for path in include_paths:
            extra |= self._include_names(path)
        unknown: list[str] = []
        for task in tasks:
            if task in known or task in extra or task in exact:
                continue
            if is_pattern(task):
                if _matches_any(task, known) or _matches_any(task, extra):
                    continue
            elif _is_task_file(task):
                continue
            unknown.append(task)
        if not unknown:
            return None
        return UnknownTasks(unknown, frozenset(extra | exact), self._name_suggester)

    def _name_suggester(self) -> NameSuggester:
        if self._suggester is None:
            require_thread("building the suggestion index")
            with self._suggester_lock:
                if self._suggester is None:
                    self._suggester = NameSuggester(self.task_names or ())
        return self._suggester

    def _include_names(self, path: Path) -> set[str] | frozenset[str]:
        """Names defined under an include_path, re-read only when its YAML files change.

        Walked on every request (a cache must not hide a change); on the event loop only
        while the tree is small and unchanged since the last scan.
        """
        from lm_eval_server.runtime import task_index

        limit = self.limits.max_include_entries
        on_loop = on_event_loop()
        try:
            files = task_index.yaml_files(path, min(limit, LOOP_WALK_ENTRIES) if on_loop else limit)
        except task_index.ScanLimitExceeded:
            if on_loop and limit > LOOP_WALK_ENTRIES:
                raise OffloadRequired("a large include_path") from None
            raise self._include_too_large(path) from None
        fingerprint = _fingerprint(files)
        cached = self._include_cache.get(path)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        require_thread("an include_path to scan")
        try:
            names = frozenset(task_index.names_in(files, limit))
        except task_index.ScanLimitExceeded:
            raise self._include_too_large(path) from None
        cache = self._include_cache
        if (
            len(cache) >= INCLUDE_CACHE_ENTRIES
            or sum(len(v[1]) for v in list(cache.values())) > INCLUDE_CACHE_NAMES
        ):
            cache.clear()
        cache[path] = (fingerprint, names)
        return names

    def _include_too_large(self, path: Path) -> TaskRequestRefused:
        limit = self.limits.max_include_entries
        return TaskRequestRefused(
            f"include_path {str(path)!r} holds more than {limit} directory entries or YAML "
            f"files to read (MAX_INCLUDE_ENTRIES={limit}); point include_path at the directory "
            "that holds just your task YAMLs"
        )


class IndexBuildFailed(RuntimeError):
    def __init__(self, returncode: int, stderr: str) -> None:
        lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {returncode}, no output"
        if returncode < 0:
            last = f"killed by signal {-returncode}; {last}"
        super().__init__(last)
        self.stderr_tail = stderr[-ERROR_TAIL_CHARS:]


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, IndexBuildFailed):
        text = f"{type(exc).__name__}: {text}"
    return text[:500]


def _fingerprint(files: list[object]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(repr(file).encode(errors="surrogateescape"))
    return digest.digest()


def _matches_any(pattern: str, names: Iterable[str]) -> bool:
    # fnmatch.filter's semantics, stopping at the first match.
    match = re.compile(fnmatch.translate(pattern)).match
    return any(match(name) for name in names)


def _find(
    entries: list[tuple[str, str, str | None, str]], name: str
) -> tuple[str, str, str | None, str] | None:
    import bisect

    index = bisect.bisect_left(entries, name, key=lambda e: e[0])
    if index < len(entries) and entries[index][0] == name:
        return entries[index]
    return None


def _is_task_file(task: str) -> bool:
    # lm-eval also accepts a path to a task YAML in --tasks.
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()
