"""The response cache, server side: which file a job uses, what its environment says about it,
and the bound on all files together (RESPONSE_CACHE_MAX_BYTES, least recently used first).

The job side (reading and writing answers) is runtime.response_cache. Files are named by the
model fingerprint (admission.fingerprint) and live where the job's sandbox mounts its owner's
cache (DATA_DIR/owner-cache/<owner>/responses, seen by the job as DATA_DIR/cache/responses), or
in DATA_DIR/shared-responses with RESPONSE_CACHE_SHARED; without the sandbox, in
DATA_DIR/cache/responses, one file per fingerprint (the owner is part of it unless shared).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_server.admission.fingerprint import model_fingerprint
from lm_eval_server.config import OnOff, Settings
from lm_eval_server.runtime import response_cache
from lm_eval_server.runtime.sandbox import RESPONSE_CACHE_DIR_NAME

log = logging.getLogger(__name__)

SUFFIX = ".sqlite"
STATS_FILE = "response-cache.json"  # in the job's directory, written by the job


@functools.cache
def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Models whose answers are not a function of the request: lm-eval's `dummy` draws random
# numbers, so a cached answer would differ from the one a fresh run computes.
UNCACHEABLE_MODELS = frozenset({"dummy"})


def wanted(settings: Settings, request: dict[str, Any], model: str | None) -> bool:
    """Whether a job with this request uses the cache: on for the server, not refused by the
    request, and a model whose answers a cache can stand for."""
    return (
        settings.response_cache is OnOff.on
        and request.get("response_cache") is not False
        and model not in UNCACHEABLE_MODELS
    )


def fingerprint(
    settings: Settings, owner: str, model: str | None, model_args: dict[str, Any] | str | None
) -> str:
    shared = settings.response_cache_shared
    return model_fingerprint(None if shared else owner, model or "", model_args, lm_eval_version())


@dataclass(frozen=True)
class CacheFile:
    host: Path  # where the server finds it
    job: Path  # where the job opens it (inside its sandbox)


def cache_file(settings: Settings, owner: str, fp: str, sandboxed: bool) -> CacheFile:
    name = fp + SUFFIX
    job_path = settings.response_cache_dir / name
    if not sandboxed:
        return CacheFile(job_path, job_path)
    if settings.response_cache_shared:
        return CacheFile(settings.shared_response_cache_dir / name, job_path)
    host = settings.owner_cache_dir(owner) / RESPONSE_CACHE_DIR_NAME / name
    return CacheFile(host, job_path)


def job_env(cache: CacheFile | None, work_dir: Path) -> dict[str, str]:
    """The variables that tell the job's launcher which file to use and where to count."""
    if cache is None:
        return {}
    return {
        response_cache.ENV_CACHE: str(cache.job),
        response_cache.ENV_STATS: str(work_dir / STATS_FILE),
    }


def stats(work_dir: Path) -> dict[str, int] | None:
    return response_cache.read_stats(work_dir / STATS_FILE)


def cache_dirs(settings: Settings) -> list[Path]:
    dirs = [settings.response_cache_dir, settings.shared_response_cache_dir]
    owners = settings.owner_caches_dir
    if owners.is_dir():
        dirs += [d / RESPONSE_CACHE_DIR_NAME for d in sorted(owners.iterdir()) if d.is_dir()]
    return dirs


def _size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            total += os.lstat(f"{path}{suffix}").st_size
    return total


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.unlink(f"{path}{suffix}")


def evict(settings: Settings, keep: Path) -> list[Path]:
    """Marks `keep` as just used, then removes the least recently used fingerprints' files (set
    aside corrupt ones first) until all of them hold at most RESPONSE_CACHE_MAX_BYTES. Returns
    what was removed. File work: call it off the event loop."""
    try:
        keep.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if keep.exists():
            os.utime(keep)
    except OSError:
        pass
    entries: list[tuple[int, float, Path, int]] = []
    for directory in cache_dirs(settings):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = directory / name
            corrupt = response_cache.CORRUPT_SUFFIX in name
            if not (name.endswith(SUFFIX) or corrupt):
                continue
            try:
                mtime = os.lstat(path).st_mtime
            except OSError:
                continue
            # Corrupt files first (nobody reads them), then by last use.
            entries.append((0 if corrupt else 1, mtime, path, _size(path)))
    total = sum(e[3] for e in entries)
    removed: list[Path] = []
    for _, _, path, size in sorted(entries):
        if total <= settings.response_cache_max_bytes:
            break
        if path == keep:
            continue
        _remove(path)
        removed.append(path)
        total -= size
    if removed:
        log.info("response cache: evicted %d files (RESPONSE_CACHE_MAX_BYTES)", len(removed))
    return removed
