"""Finding the results lm-eval wrote for a job and flattening its metrics. Pure but for the
functions that read the job's output directory (`find_results_file`, `samples_files`,
`open_under`, `read_results`).

A job writes its output directory itself, so anything there may be a symlink planted to make
the server read another file (`jobs.db`, another job's results) in its name. These functions
never follow one: the directory is walked with `O_NOFOLLOW` at every step from its root (the
output directory recorded at submission), only regular files count, and a read has a bound.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from lm_eval_server.runtime import jobdir

_NOT_METRICS = {"alias", "name", "sample_len", "samples"}
# A results JSON is kilobytes to a few megabytes (it holds every task's config).
MAX_RESULTS_BYTES = 64 * 1024 * 1024
# Directory entries find_results_file looks at in one output directory.
MAX_SCAN_ENTRIES = 100_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def results_root(output_path: Path) -> Path:
    """The directory lm-eval writes a job's results under: `output_path` itself, or its parent
    for a `.json` output_path."""
    return output_path.parent if output_path.suffix == ".json" else output_path


def _open_dir(root: Path, parts: tuple[str, ...] = ()) -> int:
    """An fd of the directory `root/parts...`, reached without following a symlink at `root`
    itself or at any of `parts` (jobdir.UnsafeFile, or OSError, otherwise)."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except NotADirectoryError:
        raise jobdir.UnsafeFile(f"{root}: not a directory (a symlink?)") from None
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise jobdir.UnsafeFile(f"{root}: {part!r} in a path below it")
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                raise jobdir.UnsafeFile(f"{root}: {part} is not a directory (a symlink?)") from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _relative_parts(root: Path, path: Path) -> tuple[str, ...]:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise jobdir.UnsafeFile(f"{path} is not inside {root}") from None
    if not parts:
        raise jobdir.UnsafeFile(f"{path} is the directory {root} itself")
    return parts


def open_under(root: Path, path: Path) -> int:
    """A read-only fd of the regular file `path`, which must lie inside `root`, opened
    component by component from `root` without following any symlink; jobdir.UnsafeFile if
    something else is in the way, FileNotFoundError if it is gone."""
    parts = _relative_parts(root, path)
    dir_fd = _open_dir(root, parts[:-1])
    try:
        return jobdir.open_file(parts[-1], dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def read_results(path: Path, root: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """The results JSON at `path` (inside `root`, see open_under). jobdir.FileTooLarge past
    `max_bytes` (MAX_RESULTS_BYTES), ValueError if it is not a JSON object."""
    max_bytes = MAX_RESULTS_BYTES if max_bytes is None else max_bytes
    fd = open_under(root, path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise jobdir.FileTooLarge(f"{path}: larger than {max_bytes} bytes")
    parsed = json.loads(data)
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: not a JSON object")
    return parsed


def _regular_files(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """(name, stat) of each regular file in the directory (symlinks are not regular here)."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    yield entry.name, entry.stat(follow_symlinks=False)
            except OSError:
                continue


def _results_files(root: Path, prefix: str, recursive: bool) -> list[tuple[Path, float]]:
    """(path, mtime) of the regular files `prefix*.json` under root, walked without following
    symlinks, looking at no more than MAX_SCAN_ENTRIES entries."""
    found: list[tuple[Path, float]] = []
    try:
        top = _open_dir(root)
    except OSError:
        return found
    stack: list[tuple[int, Path]] = [(top, root)]
    seen = 0
    try:
        while stack:
            fd, where = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        seen += 1
                        if seen > MAX_SCAN_ENTRIES:
                            return found
                        name = entry.name
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                if recursive:
                                    inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
                                    stack.append((inner, where / name))
                            elif (
                                entry.is_file(follow_symlinks=False)
                                and name.startswith(prefix)
                                and name.endswith(".json")
                            ):
                                mtime = entry.stat(follow_symlinks=False).st_mtime
                                found.append((where / name, mtime))
                        except OSError:
                            continue
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return found


def find_results_file(output_path: Path, not_before: datetime | None) -> Path | None:
    """The newest results JSON lm-eval wrote under `output_path` since `not_before`.

    lm-eval writes `<output_path>/<model>/results_<date>.json`, or `<stem>_<date>.json` beside
    a `.json` output_path; a shared output_path may hold other jobs' files, hence the time bound.
    Symlinks (to a file or a directory) are not followed: only lm-eval's own regular files.
    """
    if output_path.suffix == ".json":
        candidates = _results_files(output_path.parent, f"{output_path.stem}_", recursive=False)
    else:
        candidates = _results_files(output_path, "results_", recursive=True)
    threshold = not_before.timestamp() - 1 if not_before is not None else 0
    fresh = [(mtime, str(p), p) for p, mtime in candidates if mtime >= threshold]
    return max(fresh)[2] if fresh else None


def samples_files(results_file: Path, root: Path) -> dict[str, Path]:
    """{task: samples file} for the run that wrote `results_file` (inside `root`, the job's
    results root), from a listing of its directory: lm-eval writes
    `samples_<task>_<date>.jsonl` beside `results_<date>.json`.

    Callers look a task name up in this dict; the name a client sends never becomes part of a
    path, so no value of it (`..`, `/`, a glob, NUL) can reach another file. Only regular
    files count; the directory is reached from `root` without following symlinks.
    """
    date = results_file.stem.rpartition("_")[2]
    found: dict[str, tuple[bool, str, Path]] = {}
    try:
        dir_fd = _open_dir(root, _relative_parts(root, results_file)[:-1])
    except OSError:
        return {}
    try:
        files = list(_regular_files(dir_fd))
    except OSError:
        return {}
    finally:
        os.close(dir_fd)
    for name, _ in files:
        if not (name.startswith("samples_") and name.endswith(".jsonl")):
            continue
        task, sep, file_date = name[len("samples_") : -len(".jsonl")].rpartition("_")
        if not sep or not task:
            continue
        path = results_file.parent / name
        # This run's file first, else the newest.
        rank = (file_date == date, file_date, path)
        if task not in found or rank > found[task]:
            found[task] = rank
    return {task: rank[2] for task, rank in sorted(found.items())}


def find_samples_file(results_file: Path, root: Path, task: str) -> Path | None:
    return samples_files(results_file, root).get(task)


def flatten_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """[{task, metric, filter, value, stderr}] from lm-eval's `"acc,none"` keys."""
    rows: list[dict[str, Any]] = []
    sections = [results.get("results") or {}, results.get("groups") or {}]
    seen: set[tuple[str, str, str]] = set()
    for section in sections:
        for task, values in section.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                metric, sep, filter_name = key.partition(",")
                if not sep or metric in _NOT_METRICS or metric.endswith("_stderr"):
                    continue
                if (task, metric, filter_name) in seen:
                    continue
                seen.add((task, metric, filter_name))
                stderr = values.get(f"{metric}_stderr,{filter_name}")
                rows.append(
                    {
                        "task": task,
                        "metric": metric,
                        "filter": filter_name,
                        "value": _number_or_text(value),
                        "stderr": _number_or_text(stderr),
                    }
                )
    return rows


def _number_or_text(value: Any) -> float | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return str(value)
