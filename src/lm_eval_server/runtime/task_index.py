"""On-disk cache of lm-eval's built-in task index, and task-name discovery.

lm-eval spends ~6 s per run indexing its ~14,700 built-in task YAMLs with
``lm_eval.tasks._index.TaskIndex.build(paths)`` (called from
``lm_eval.tasks.manager.TaskManager.__init__``). This module owns a cache of
that index for the built-in tasks directory only; ``lm_eval_server.runtime.launcher``
serves it back to lm-eval by wrapping ``TaskIndex.build`` (the one hook point).

Two files live in ``<data_dir>/task_index/``, both written atomically
(temp file + ``os.replace``), so concurrent builders are harmless. Both are data, parsed with
``json`` and never unpickled or executed: whoever manages to write them can at most make a job
re-index (every field is type-checked on load, anything unexpected reads as a corrupt cache).

* ``builtin_index.jsonl`` -- for the launcher: two lines of JSON. The first is a header
  ``{"format", "key", "lm_eval_version", "builtin_dir", "entries"}`` (a reader checks the key
  without parsing 16 MB); the second is the list of ``dict[str, Entry]`` that
  ``TaskIndex.build([builtin_dir])`` returned, one row ``[name, kind, yaml_rel, cfg, tags]``
  per entry in index order: ``kind`` is a ``Kind`` member's name, ``yaml_rel`` the YAML's path
  relative to the built-in dir (``None`` for a tag), ``cfg`` the parsed YAML (``None`` for a
  tag), ``tags`` a sorted list. ``decode_index`` rebuilds lm-eval's ``Entry`` objects and
  refuses a row whose path leaves the built-in dir (lm-eval re-reads that YAML with
  ``!function`` resolved, i.e. imports the ``utils.py`` beside it).
* ``task_names.json`` -- for the server: ``{"lm_eval_version", "key",
  "tasks", "groups", "tags", "info"}``, where ``info`` maps each name to
  ``[kind, output_type, yaml_path]`` (kind ``task``, ``group`` or ``tag``; the
  others null where the index has none) for ``GET /tasks``.

``cache_key`` and ``load_names`` never import ``lm_eval`` (the server calls
them); ``build`` does, so the server runs it in a child process:
``python -m lm_eval_server.runtime.task_index build --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import yaml

# Bump when the layout of either cache file changes, so old files read as stale.
FORMAT_VERSION = 3
CACHE_SUBDIR = "task_index"
INDEX_FILENAME = "builtin_index.jsonl"
NAMES_FILENAME = "task_names.json"
# Written by earlier versions; never read, removed when a new cache is written.
LEGACY_INDEX_FILENAMES = ("builtin_index.pickle",)
# Bounds on reading the cache back (lm-eval 0.4.13: a 16 MB index, 3 MB of names): a file
# past them is not one this module wrote.
MAX_HEADER_BYTES = 64 * 1024
MAX_INDEX_BYTES = 256 * 1024 * 1024
MAX_NAMES_BYTES = 64 * 1024 * 1024
# Entry kinds a built index holds (lm_eval.tasks._index.Kind names; UNKNOWN never is).
ENTRY_KINDS = ("TASK", "PY_TASK", "GROUP", "TAG")
# lm-eval's TaskIndex skips these directories (lm_eval/tasks/_index.py).
_IGNORE_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})


class CachePaths(NamedTuple):
    index: Path
    names: Path


class CacheUnavailable(Exception):
    """The cached index cannot be used; the message says why (one line)."""


# ----------------------------------------------------------------- cache key


def builtin_tasks_dir() -> Path:
    """lm-eval's built-in tasks directory, located without importing lm_eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm_eval is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def _yaml_fingerprint(root: Path) -> tuple[int, int, int]:
    """(count, max mtime_ns, total size) of the YAML files lm-eval would index.

    File stats rather than directory mtimes: importing a task's utils.py writes
    a __pycache__ dir, which bumps its parent's mtime without changing any task.
    Symlinked dirs are not followed, like pathlib's ``**`` in Python 3.11.
    """
    count = max_mtime = total_size = 0
    stack = [os.fspath(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in _IGNORE_DIRS:
                            stack.append(entry.path)
                    elif entry.name.endswith(".yaml"):
                        st = entry.stat()
                        count += 1
                        max_mtime = max(max_mtime, st.st_mtime_ns)
                        total_size += st.st_size
        except OSError:
            continue  # unreadable subtree: lm-eval cannot index it either
    return count, max_mtime, total_size


def cache_key(builtin_dir: Path | None = None) -> str:
    """Key of the current lm-eval install's built-in tasks (~40 ms for 14k files)."""
    root = builtin_tasks_dir() if builtin_dir is None else builtin_dir
    count, max_mtime, total_size = _yaml_fingerprint(root)
    material = {
        "format": FORMAT_VERSION,
        "lm_eval_version": lm_eval_version(),
        "builtin_dir": os.fspath(root.resolve()),
        "yaml_count": count,
        "yaml_max_mtime_ns": max_mtime,
        "yaml_total_size": total_size,
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ----------------------------------------------------------------- cache files


def cache_paths(data_dir: Path) -> CachePaths:
    base = Path(data_dir) / CACHE_SUBDIR
    return CachePaths(index=base / INDEX_FILENAME, names=base / NAMES_FILENAME)


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a unique temp file in the same dir, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600; jobs may run as another user of the same group.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def names_by_kind(index: Mapping[str, Any]) -> dict[str, list[str]]:
    """Split index names the way TaskManager does (all_subtasks/groups/tags)."""
    kinds = {"TASK": "tasks", "PY_TASK": "tasks", "GROUP": "groups", "TAG": "tags"}
    out: dict[str, list[str]] = {"tasks": [], "groups": [], "tags": []}
    for name, entry in index.items():
        bucket = kinds.get(entry.kind.name)
        if bucket is not None:
            out[bucket].append(name)
    return {k: sorted(v) for k, v in out.items()}


KINDS = {"TASK": "task", "PY_TASK": "task", "GROUP": "group", "TAG": "tag"}


def entry_info(index: Mapping[str, Any]) -> dict[str, list[str | None]]:
    """Name -> [kind, output_type, yaml_path] for GET /tasks, from the index's entries."""
    info: dict[str, list[str | None]] = {}
    for name, entry in index.items():
        kind = KINDS.get(entry.kind.name)
        if kind is None or not isinstance(name, str):
            continue
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        output_type = cfg.get("output_type") if kind == "task" else None
        path = getattr(entry, "yaml_path", None)
        info[name] = [
            kind,
            output_type if isinstance(output_type, str) else None,
            os.fspath(path) if path is not None else None,
        ]
    return info


def _rel_yaml_path(rel: Any) -> bool:
    """A YAML path relative to the built-in dir that stays inside it (no ``..``, no root)."""
    return (
        type(rel) is str
        and rel.endswith(".yaml")
        and "\0" not in rel
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def encode_index(index: Mapping[str, Any], builtin_dir: Path) -> bytes:
    """The body line of the index file (see the module doc) for ``index``, the result of
    ``TaskIndex.build([builtin_dir])``.

    Raises CacheUnavailable if the index holds anything ``decode_index`` would not give back
    equal (a path outside ``builtin_dir``, a value JSON cannot hold): such an index is not
    cached rather than cached wrong.
    """
    prefix = os.fspath(builtin_dir) + os.sep
    rows: list[list[Any]] = []
    for name, entry in index.items():
        kind = getattr(getattr(entry, "kind", None), "name", None)
        path = getattr(entry, "yaml_path", None)
        rel = None
        if path is not None:
            text = os.fspath(path)
            rel = text[len(prefix) :] if text.startswith(prefix) else None
            if not _rel_yaml_path(rel):
                raise CacheUnavailable(f"entry {name!r}: {text} is not a YAML in {builtin_dir}")
        tags = getattr(entry, "tags", None)
        if not isinstance(tags, set | frozenset) or not all(type(t) is str for t in tags):
            raise CacheUnavailable(f"entry {name!r}: tags are not a set of names")
        rows.append([name, kind, rel, entry.cfg, sorted(tags)])
    try:
        body = json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        payload = body.encode()
        # JSON turns tuples into lists and int keys into strings without a word: only an
        # index that reads back equal is cached.
        same = decode_index(payload, builtin_dir) == dict(index)
    except (TypeError, ValueError, CacheUnavailable) as err:
        raise CacheUnavailable(f"index not representable as JSON ({err})") from None
    if not same:
        raise CacheUnavailable("index not representable as JSON (it reads back different)")
    return payload


def decode_index(payload: bytes, builtin_dir: Path) -> dict[str, Any]:
    """Rebuild ``dict[str, Entry]`` from ``encode_index``'s bytes: parsed, never executed.

    Every field is type-checked; a row of any other shape raises CacheUnavailable (the
    launcher then re-indexes with lm-eval). ``cfg`` is JSON by construction (objects with
    string keys, lists, strings, numbers, booleans, null), what lm-eval's YAML loader gives.
    A task's or group's path must name a YAML inside ``builtin_dir``: lm-eval re-reads that
    file with ``!function`` resolved, which imports the ``utils.py`` beside it.
    """
    from lm_eval.tasks._index import Entry, Kind

    kinds = {name: Kind[name] for name in ENTRY_KINDS}
    tag = kinds["TAG"]
    join = Path(builtin_dir).joinpath
    # The cyclic GC would run dozens of times over ~700k new containers (none garbage).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            rows = json.loads(payload, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise CacheUnavailable(f"not JSON ({type(err).__name__})") from None
        if type(rows) is not list:
            raise CacheUnavailable("not a list of entries")
        index: dict[str, Any] = {}
        for row in rows:
            if type(row) is not list or len(row) != 5:
                raise CacheUnavailable("an entry is not [name, kind, path, cfg, tags]")
            name, kind_name, rel, cfg, tags = row
            kind = kinds.get(kind_name) if type(kind_name) is str else None
            if type(name) is not str or kind is None or name in index:
                raise CacheUnavailable(f"entry {str(name)[:100]!r}: bad name or kind")
            if type(tags) is not list or not all(type(t) is str for t in tags):
                raise CacheUnavailable(f"entry {name[:100]!r}: tags are not a list of names")
            if kind is tag and rel is None and cfg is None:
                path = None
            elif kind is not tag and type(cfg) is dict and _rel_yaml_path(rel):
                path = join(rel)
            else:
                raise CacheUnavailable(f"entry {name[:100]!r}: bad path or config")
            index[name] = Entry(name=name, kind=kind, yaml_path=path, cfg=cfg, tags=set(tags))
        return index
    finally:
        if was_enabled:
            gc.enable()


def _header(key: str, version: str, builtin_dir: Path, entries: int) -> bytes:
    header = {
        "format": FORMAT_VERSION,
        "key": key,
        "lm_eval_version": version,
        "builtin_dir": os.fspath(builtin_dir),
        "entries": entries,
    }
    return json.dumps(header).encode() + b"\n"


def write_cache(
    data_dir: Path,
    key: str,
    index: Mapping[str, Any],
    *,
    payload: bytes | None = None,
    builtin_dir: Path | None = None,
) -> CachePaths:
    """Write both cache files. ``payload`` is ``encode_index(index, builtin_dir)`` if the
    caller already has it (the launcher encodes before lm-eval can mutate the index).
    Raises CacheUnavailable if the index cannot be encoded."""
    paths = cache_paths(data_dir)
    version = lm_eval_version()
    builtin_dir = builtin_dir or builtin_tasks_dir()
    if payload is None:
        payload = encode_index(index, builtin_dir)
    header = _header(key, version, builtin_dir, len(index))

    def write_index(fh: IO[bytes]) -> None:
        fh.write(header)
        fh.write(payload)
        fh.write(b"\n")

    names = {
        "lm_eval_version": version,
        "key": key,
        **names_by_kind(index),
        "info": entry_info(index),
    }
    _atomic_write(paths.index, write_index)
    _atomic_write(paths.names, lambda fh: fh.write(json.dumps(names).encode()))
    for legacy in LEGACY_INDEX_FILENAMES:
        with contextlib.suppress(OSError):
            (paths.index.parent / legacy).unlink()
    return paths


def _open_cache_file(path: Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file: a symlink, FIFO or device put in
    its place is refused (OSError), never followed or blocked on."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise OSError(f"{path} is not a regular file")
    return fh


def read_index_payload(data_dir: Path, key: str) -> bytes:
    """The body of the cached index (for ``decode_index``) if its key is ``key``.

    Returns bytes rather than entries so every consumer can decode a private copy (lm-eval
    mutates the index dict it is given). Only the header is parsed here, so a stale cache is
    told apart without reading 16 MB. Raises CacheUnavailable with a one-line reason.
    """
    path = cache_paths(data_dir).index
    try:
        with _open_cache_file(path) as fh:
            line = fh.readline(MAX_HEADER_BYTES + 1)
            try:
                header = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                header = None
            if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
                raise CacheUnavailable(f"{path}: unknown format")
            found = header.get("key")
            if found != key:
                raise CacheUnavailable(f"{path}: stale (key {str(found)[:40]} != {key})")
            body = fh.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise CacheUnavailable(f"{path}: missing") from None
    except CacheUnavailable:
        raise
    except Exception as err:  # a symlink or FIFO in its place, permissions, ...
        raise CacheUnavailable(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if len(body) > MAX_INDEX_BYTES:
        raise CacheUnavailable(f"{path}: larger than {MAX_INDEX_BYTES} bytes")
    if not body.endswith(b"\n"):
        raise CacheUnavailable(f"{path}: truncated")
    return body


def _read_names(data_dir: Path) -> dict[str, Any] | None:
    """The names file if it is current (a regular file of its key), else None."""
    path = cache_paths(data_dir).names
    try:
        with _open_cache_file(path) as fh:
            text = fh.read(MAX_NAMES_BYTES + 1)
        if len(text) > MAX_NAMES_BYTES:
            return None
        data = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("key") != cache_key():
        return None
    return data


def load_names(data_dir: Path) -> set[str] | None:
    """All built-in task/group/tag names, or None if the JSON is missing/stale/malformed."""
    data = _read_names(data_dir)
    if data is None:
        return None
    lists = [data.get("tasks"), data.get("groups"), data.get("tags")]
    if not all(type(v) is list and all(type(n) is str for n in v) for v in lists):
        return None
    return {name for names in lists for name in names}  # type: ignore[union-attr]


def _info_row(row: Any, prefix: str) -> bool:
    if type(row) is not list or len(row) != 3 or row[0] not in KINDS.values():
        return False
    output_type, path = row[1], row[2]
    if output_type is not None and type(output_type) is not str:
        return False
    # GET /tasks/{name} reads the YAML at this path: only one among the built-in tasks.
    return path is None or (
        type(path) is str and _rel_yaml_path(path[len(prefix) :]) and path.startswith(prefix)
    )


def load_info(data_dir: Path) -> dict[str, list[str | None]] | None:
    """Name -> [kind, output_type, yaml_path] of every built-in name, or None if the names
    file is missing, stale or malformed (a path outside the built-in tasks dir included)."""
    data = _read_names(data_dir)
    if data is None:
        return None
    info = data.get("info")
    if type(info) is not dict:
        return None
    prefix = os.fspath(builtin_tasks_dir()) + os.sep
    if not all(_info_row(row, prefix) for row in info.values()):
        return None
    return info


def load_config(yaml_path: Path) -> dict[str, Any]:
    """A built-in task's config as lm-eval reads it (includes merged, functions unresolved),
    without importing lm_eval."""
    return _load_yaml(Path(yaml_path), set(), _ReadBudget(16))


def _check_writable(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def build(data_dir: Path, builtin_dir: Path | None = None) -> CachePaths:
    """Index the built-in tasks with lm-eval's own TaskIndex and write the cache.

    ``builtin_dir`` defaults to lm-eval's tasks dir; tests pass a small one.
    """
    # Fail in a second, not after the ~10 s of indexing, when the cache cannot be written.
    _check_writable(cache_paths(data_dir).index.parent)
    from lm_eval.tasks._index import TaskIndex

    if builtin_dir is None:
        import lm_eval.tasks

        # The same expression TaskManager uses, so the launcher's paths compare equal.
        builtin_dir = Path(lm_eval.tasks.__file__).parent
    # Key first: a task file edited mid-build then reads as stale, never as fresh.
    key = cache_key(builtin_dir)
    index = TaskIndex.build([builtin_dir])
    return write_cache(data_dir, key, index, builtin_dir=builtin_dir)


# ----------------------------------------------------------------- include_path scan


class _TolerantLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that accepts ``!function`` and any other unknown tag."""


def _function_ctor(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    # lm-eval's unresolved "!function" yields a path string; the value is unused here.
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


def _unknown_tag_ctor(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    # lm-eval skips files with tags it cannot load; accepting them instead can only
    # add names, so the server never rejects a name lm-eval would accept.
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_TolerantLoader.add_constructor("!function", _function_ctor)
_TolerantLoader.add_multi_constructor("", _unknown_tag_ctor)


class ScanLimitExceeded(ValueError):
    """An include_path holds more entries, or makes the scan read more YAML files, than allowed."""


# A task YAML is a few kilobytes; a bigger file is not a task config, and reading one (or a device
# or a FIFO named by an `include:`) would hold the scanning thread for as long as it lasts.
MAX_YAML_BYTES = 4 * 1024 * 1024


class _ReadBudget:
    """YAML files one scan may open, includes counted: a file included by every other file is
    read once per includer, as lm-eval reads it."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self, path: Path) -> None:
        if self.left is None:
            return
        self.left -= 1
        if self.left < 0:
            raise ScanLimitExceeded(f"reading {path}: more YAML reads than the scan allows")


def _read_regular(path: Path) -> bytes:
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file")
    # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = fh.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ValueError(f"{path} is larger than {MAX_YAML_BYTES} bytes")
    return data


def _load_yaml(path: Path, seen: set[Path], budget: _ReadBudget) -> dict[str, Any]:
    """Mirror of lm_eval.tasks._yaml_loader.load_yaml(resolve_func=False, recursive=True)."""
    path = path.expanduser().resolve()
    if path in seen:
        raise ValueError(f"Include cycle at {path}")
    seen.add(path)
    budget.take(path)
    cfg = yaml.load(_read_regular(path), Loader=_TolerantLoader)  # a SafeLoader subclass
    if not isinstance(cfg, dict):
        raise ValueError(f"Expected YAML dict from {path}, got {type(cfg).__name__}")
    if "include" not in cfg:
        return cfg
    includes = cfg.pop("include")
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        # seen is shared across siblings, as in lm-eval
        inc_cfg = _load_yaml(inc_path, seen, budget)
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    merged.update(cfg)
    return merged


class YamlFile(NamedTuple):
    path: str
    mtime_ns: int
    size: int


def yaml_files(root: Path | str, max_entries: int | None = None) -> list[YamlFile]:
    """The `*.yaml` entries lm-eval indexes under ``root``, in its order, with their stats.

    The same set as TaskIndex._iter_yaml_files (``root.glob("**/*.yaml")`` minus paths with an
    ignored part): every entry whose name ends in ``.yaml``, in directories reached without
    following symlinks. Looks at no more than ``max_entries`` directory entries
    (ScanLimitExceeded beyond), so its cost has a bound whatever the tree holds.
    """
    # A Path is already in the form glob yields (no trailing or doubled separators).
    base = os.fspath(root if isinstance(root, Path) else Path(root))
    if not _IGNORE_DIRS.isdisjoint(base.split(os.sep)):
        return []
    found: list[YamlFile] = []
    seen_entries = 0
    stack = [base]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    seen_entries += 1
                    if max_entries is not None and seen_entries > max_entries:
                        raise ScanLimitExceeded(
                            f"{base} holds more than {max_entries} directory entries"
                        )
                    if entry.name.endswith(".yaml"):
                        try:
                            st = entry.stat()
                            found.append(YamlFile(entry.path, st.st_mtime_ns, st.st_size))
                        except OSError:  # a dangling symlink: lm-eval skips it too
                            found.append(YamlFile(entry.path, -1, -1))
                    if entry.name not in _IGNORE_DIRS and entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue  # unreadable or missing directory: glob skips it as well
    found.sort(key=lambda f: f.path)
    return found


def _check_tags(tags: Any) -> None:
    # TaskIndex._str_to_set runs before an entry is registered: a tag value it
    # cannot turn into a set (an int, a list holding a dict) drops the whole file.
    if tags is not None:
        set().update([tags] if isinstance(tags, str) else tags)


def _register(cfg: dict[str, Any], registered: dict[Any, None]) -> None:
    """Mirror of TaskIndex.process_cfg, keeping only the names (insertion-ordered).

    A config with ``class`` or ``task`` is a task and registers its ``tag``
    (str or list) as tags; one with ``group`` is a group whose ``task:`` list
    names members, not new tasks, and whose ``tag`` is not registered. A name
    already registered by an earlier file (of any kind) makes lm-eval skip this
    config, tags included, so order matters.
    """
    if "class" in cfg or ("task" in cfg and "group" not in cfg):
        name = cfg["task"]
        if name in registered:
            return
        _check_tags(cfg.get("tag"))
        registered[name] = None
        tags = cfg.get("tag")
        if not tags:
            return
        for tag in tags if isinstance(tags, list) else [tags]:
            registered.setdefault(tag, None)
    elif "group" in cfg:
        name = cfg["group"]
        if name in registered:
            return
        _check_tags(cfg.get("tag"))
        registered[name] = None
    else:
        raise ValueError(f"Unknown config shape: keys={list(cfg)}")


def names_in(files: list[YamlFile], max_reads: int | None = None) -> set[str]:
    """Task, group and tag names the YAML files define (``yaml_files`` gives them in order).

    Parses in-process without importing lm_eval. Like TaskIndex.build, a file that fails to load
    is skipped, but names it registered before failing count. At most ``max_reads`` files are
    opened, includes counted (ScanLimitExceeded beyond).
    """
    registered: dict[Any, None] = {}
    budget = _ReadBudget(max_reads)
    for file in files:
        try:
            _register(_load_yaml(Path(file.path), set(), budget), registered)
        except ScanLimitExceeded:
            raise
        except Exception:
            continue
    # TaskIndex keys int/None names too, but no --tasks string can match them.
    return {name for name in registered if isinstance(name, str)}


def scan_include_path(path: Path | str, max_entries: int | None = None) -> set[str]:
    """Names defined under an include_path; ``max_entries`` bounds the walk and the reads."""
    return names_in(yaml_files(path, max_entries), max_entries)


# ----------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_server.runtime.task_index")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="index lm-eval's built-in tasks into DIR")
    build_cmd.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    paths = build(args.data_dir)
    print(f"wrote {paths.index} and {paths.names}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
