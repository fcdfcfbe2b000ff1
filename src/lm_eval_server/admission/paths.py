"""One rule for every path a job will read or write: absolute, symlinks resolved, inside
ALLOWED_PATHS, and never into files the server itself owns under DATA_DIR.

Pure apart from filesystem lookups (resolve, glob, is_dir); no lm-eval imports.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from lm_eval_server.config import Settings

# A glob may name at most this many task files (each is a YAML lm-eval loads).
MAX_GLOB_MATCHES = 1000
GLOB_CHARS = frozenset("*?[")
# lm-eval's GeneralConfigTracker takes the model name from these model_args keys, in this
# order, and sanitize_model_name replaces these characters (lm_eval/utils.py).
MODEL_NAME_KEYS = ("peft", "delta", "pretrained", "model", "path", "engine")
_MODEL_NAME_UNSAFE = re.compile(r"[\"<>:/|\\?*\[\]]+")


def inside(path: PurePath, root: PurePath) -> bool:
    """`path` is `root` or lies under it, compared part by part as `PurePath.is_relative_to`
    does, on the paths' text: the path rule asks this a dozen times per submission, and
    `is_relative_to` builds a new path object each time."""
    text, top = str(path), str(root)
    if text == top:
        return True
    if (text[:2] == "//") != (top[:2] == "//"):
        return False  # POSIX's distinct "//" root: never the same anchor as "/"
    return text.startswith(top if top.endswith("/") else top + "/")


class PathRefused(ValueError):
    """A path outside what the server allows; the message names the field and the setting."""


def confine(value: str, roots: list[Path], base: Path, what: str) -> Path:
    """`value` as an absolute path, which must resolve (symlinks followed) inside a root."""
    if "\0" in value:
        raise PathRefused(f"{what}: a path cannot contain NUL bytes")
    if value.startswith("~"):
        # No shell expands it for the job, and the server's home means nothing to a caller.
        raise PathRefused(f"{what}: {value!r}: '~' is not expanded; give an absolute path")
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    resolved = path.resolve()
    if any(inside(resolved, root) for root in roots):
        return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise PathRefused(
        f"{what}: {value!r} resolves to {resolved}, outside the server's ALLOWED_PATHS "
        f"({allowed}); use a path inside one of them or ask the operator to extend ALLOWED_PATHS"
    )


@dataclass(frozen=True)
class ServerFiles:
    """Paths under DATA_DIR that belong to the server: no job may write into them. Resolved
    once, when the validator is built (settings do not change while the server runs)."""

    jobs_dir: Path
    owned: tuple[Path, ...]

    @classmethod
    def of(cls, settings: Settings) -> ServerFiles:
        return cls(settings.jobs_dir.resolve(), tuple(settings.server_owned_paths))

    def refuse(self, path: Path, what: str) -> None:
        """`path` (resolved) must not be, or be inside, a server-owned path."""
        for owned in self.owned:
            if inside(path, owned):
                hint = (
                    "another job's directory"
                    if owned == self.jobs_dir
                    else "the server's own files"
                )
                raise PathRefused(
                    f"{what}: {path} is inside {owned}, {hint} under DATA_DIR; choose another "
                    "directory (leave output_path out to get the job's own results directory)"
                )


def model_name(model_args: dict[str, object]) -> str | None:
    """The name lm-eval's EvaluationTracker files results under (before sanitising)."""
    for key in MODEL_NAME_KEYS:
        if key in model_args:
            return str(model_args[key])
    return None


def check_results_dir(
    output: Path, model_args: dict[str, object], server: ServerFiles, roots: list[Path]
) -> None:
    """lm-eval writes results to `output/<sanitised model name>/` (or next to `output` when it
    ends in .json): that directory must stay inside `output`, inside ALLOWED_PATHS (a symlink
    there is followed) and outside server files."""
    if output.suffix == ".json":
        server.refuse(confine(str(output.parent), roots, output, "output_path"), "output_path")
        return
    server.refuse(output, "output_path")
    name = model_name(model_args)
    if name is None:
        return  # lm-eval picks a random id
    sanitized = _MODEL_NAME_UNSAFE.sub("__", name)
    if sanitized in ("", ".", "..") or "\0" in sanitized:
        raise PathRefused(
            f"model_args: the model name {name!r} would make lm-eval write its results to "
            f"{output / sanitized}, outside output_path; name the model by a path or hub id"
        )
    target = confine(str(output / sanitized), roots, output, "output_path")
    server.refuse(target, "output_path")


def check_cache_prefix(value: Path, roots: list[Path], server: ServerFiles) -> None:
    """lm-eval's use_cache is a file name prefix: it writes `<use_cache>_rank<N>.db` next to it,
    so the directory holding it, and the file itself, must be confined."""
    confine(str(value.parent), roots, value, "use_cache")
    db = confine(f"{value}_rank0.db", roots, value, "use_cache")
    server.refuse(db.parent, "use_cache")
    server.refuse(db, "use_cache")


@dataclass(frozen=True)
class TaskPath:
    """A task entry lm-eval reads from disk: a YAML file, a glob of YAMLs or a directory."""

    text: str  # the entry as lm-eval will get it (absolute)
    files: list[Path]  # what it reads now, each confined


def is_path_like(task: str) -> bool:
    return "/" in task or task.endswith((".yaml", ".yml")) or task.startswith("~")


def resolve_task_path(task: str, roots: list[Path], base: Path, single: bool) -> TaskPath | None:
    """Confine a task entry that names files (lm-eval's `process_tasks`): an entry ending in
    `.yaml` is a file or a glob; the single entry may be a directory (its `*.yaml`). Other
    entries are task names and return None. Every file a glob or directory yields, and its
    base directory, must resolve inside ALLOWED_PATHS (a symlink inside pointing out is
    refused)."""
    if task.startswith("~"):
        raise PathRefused(f"tasks: {task!r}: '~' is not expanded; give an absolute path")
    if task.endswith(".yml") and not any(ch in task for ch in GLOB_CHARS):
        raise PathRefused(
            f"tasks: {task!r}: lm-eval reads task files only with the .yaml suffix (it would "
            "look for a task named like this); rename the file to .yaml"
        )
    if task.endswith(".yaml"):
        path = Path(task)
        absolute = path if path.is_absolute() else base / path
        if not any(ch in task for ch in GLOB_CHARS):
            resolved = confine(str(absolute), roots, base, "tasks")
            if not resolved.is_file():
                raise PathRefused(f"tasks: {task!r}: no such task file")
            return TaskPath(str(absolute), [resolved])
        return _glob_task(str(absolute), task, roots, base)
    if not is_path_like(task):
        return None
    path = Path(task)
    absolute = path if path.is_absolute() else base / path
    if single and absolute.is_dir():
        directory = confine(str(absolute), roots, base, "tasks")
        return _glob_task(str(directory / "*.yaml"), task, roots, base, text=str(directory))
    resolved = confine(str(absolute), roots, base, "tasks")
    if resolved.is_dir():
        raise PathRefused(
            f"tasks: {task!r} is a directory; lm-eval reads a directory of task YAMLs only "
            "when it is the single entry of tasks (or pass it as include_path)"
        )
    raise PathRefused(
        f"tasks: {task!r} looks like a path but is neither a .yaml file nor a directory"
    )


def _glob_task(
    pattern: str, task: str, roots: list[Path], base: Path, text: str | None = None
) -> TaskPath:
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if _magic(p))]
    confine(str(Path(*fixed)), roots, base, "tasks")
    files: list[Path] = []
    # lm-eval calls glob.glob without recursive=True: `**` matches one level, like `*`.
    for match in glob.iglob(pattern):
        if len(files) >= MAX_GLOB_MATCHES:
            raise PathRefused(f"tasks: {task!r} matches more than {MAX_GLOB_MATCHES} files")
        files.append(confine(match, roots, base, "tasks"))
    if not files:
        raise PathRefused(f"tasks: {task!r} matches no task file (.yaml)")
    return TaskPath(text or pattern, files)


def _magic(part: str) -> bool:
    return any(ch in part for ch in GLOB_CHARS)
