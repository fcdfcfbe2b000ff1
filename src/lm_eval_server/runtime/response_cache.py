"""The server's response cache, job side: answers stored as JSON in SQLite, and the wrapper
around the model lm-eval creates that reads and writes them.

The server picks the file (one per model fingerprint, admission.fingerprint) and names it in
the job's environment; `install()` (called by the launcher in every job, cold or warm) wraps
the model lm-eval builds in `simple_evaluate`, at its one construction point
``lm_eval.api.registry.get_model(model).create_from_arg_string/obj``:

* a request whose answer is in the file is answered from it (a hit), the others go to the model
  (misses); each computed answer is stored as the model gives it, through lm-eval's own
  ``cache_hook.add_partial`` (so a job killed halfway keeps what it had computed), and once more
  when the call returns (for backends that never call the hook);
* keys are lm-eval's own ``hash_args(request_type, args)``; values are JSON, never pickles, and
  a value read back must have the type its request type returns (``loglikelihood``: a number
  and a bool; ``loglikelihood_rolling``: a number; ``generate_until``: a string), else it is a
  miss: another job of the same fingerprint may have written the file;
* sampled generations are neither served nor stored: ``do_sample`` true, or ``temperature`` above
  0 (or unreadable), in the request's generation kwargs, which are the task's with the request's
  ``gen_kwargs`` merged in;
* a caller's own ``use_cache`` (lm-eval's CachingLM) still wraps the model as lm-eval defines it:
  it sits outside this wrapper and receives every computed answer through its own hook;
* a file that cannot be opened or read is renamed ``<file>.corrupt-<time>`` and the job runs
  without the cache; a write that fails turns the cache off for the rest of the job. The cache
  never fails a job.

Hits are counted when a call starts; misses are the answers the model computed, counted as
each one arrives through the hook (and, for a backend that does not call the hook, when its call
returns), so a job stopped or killed halfway reports what it computed, not what it asked for.
The stats file is written after every call and at most every STATS_EVERY_S while answers
arrive (`read_stats` reads it).
Environment: LM_EVAL_SERVER_RESPONSE_CACHE (the file), LM_EVAL_SERVER_RESPONSE_STATS (the stats
file in the job's directory). Stdlib and lm-eval only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ENV_CACHE = "LM_EVAL_SERVER_RESPONSE_CACHE"
ENV_STATS = "LM_EVAL_SERVER_RESPONSE_STATS"
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
CORRUPT_SUFFIX = ".corrupt-"
STATS_MAX_BYTES = 4096
_PREFIX = "lm_eval_server.response_cache: "


def _say(message: str) -> None:
    sys.stderr.write(_PREFIX + message + "\n")
    sys.stderr.flush()


# ----------------------------------------------------------------- pure rules


def is_sampled(request_type: str, args: tuple[Any, ...] | list[Any]) -> bool:
    """Whether a request asks for a sampled generation (never cached)."""
    if request_type != "generate_until":
        return False
    kwargs = args[1] if len(args) > 1 else None
    if not isinstance(kwargs, dict):
        return False
    if kwargs.get("do_sample"):
        return True
    temperature = kwargs.get("temperature")
    if temperature is None:
        return False
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        return True  # unreadable: the backend may well sample
    return not value <= 0.0  # NaN counts as sampled


def encode_answer(request_type: str, answer: Any) -> str | None:
    """The JSON text stored for an answer, or None when it has not the expected shape."""
    decoded = decode_answer(request_type, _plain(answer))
    if decoded is None:
        return None
    return json.dumps(_plain(decoded))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        # numpy scalars: float() of anything with __float__ but not a str
        if hasattr(value, "__float__") and not isinstance(value, str | bytes | bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
        return None
    return float(value)


def decode_answer(request_type: str, value: Any) -> Any:
    """An answer as lm-eval's request type returns it, or None if `value` is not one."""
    if request_type == "generate_until":
        return value if isinstance(value, str) else None
    if request_type == "loglikelihood_rolling":
        return _number(value)
    if request_type == "loglikelihood":
        if isinstance(value, list | tuple) and len(value) == 2:
            number, greedy = _number(value[0]), value[1]
            if number is not None and (isinstance(greedy, bool) or _is_bool_like(greedy)):
                return (number, bool(greedy))
        return None
    return None


def _is_bool_like(value: Any) -> bool:
    return type(value).__name__ == "bool_"  # numpy.bool_


# ----------------------------------------------------------------- the file


class CacheUnreadable(Exception):
    pass


class ResponseStore:
    """One fingerprint's answers: SQLite, key TEXT -> JSON text."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL)"
            )
            self._db.execute("SELECT key, kind, value FROM responses LIMIT 1").fetchall()
        except (sqlite3.Error, OSError) as err:
            raise CacheUnreadable(f"{type(err).__name__}: {err}") from None

    def get(self, key: str, request_type: str) -> Any:
        row = self._db.execute("SELECT kind, value FROM responses WHERE key=?", (key,)).fetchone()
        if row is None or row[0] != request_type:
            return None
        try:
            return decode_answer(request_type, json.loads(row[1]))
        except (ValueError, RecursionError):
            return None

    def put(self, key: str, request_type: str, answer: Any) -> None:
        text = encode_answer(request_type, answer)
        if text is None:
            return
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, kind, value) VALUES (?, ?, ?)",
            (key, request_type, text),
        )

    def close(self) -> None:
        self._db.close()


def set_aside(path: Path, now: Callable[[], float] = time.time) -> Path | None:
    """Rename an unreadable cache file out of the way; where it went, or None."""
    target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{int(now())}")
    try:
        os.replace(path, target)
    except OSError:
        return None
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.unlink(f"{path}{suffix}")
    return target


def open_store(path: Path) -> ResponseStore | None:
    """The store, or None (after setting an unreadable file aside): run without the cache."""
    try:
        return ResponseStore(path)
    except CacheUnreadable as why:
        moved = set_aside(path) if path.exists() else None
        where = f"; set aside as {moved.name}" if moved else ""
        _say(f"response cache {path.name} cannot be read ({why}){where}; running without it")
        return None


# ----------------------------------------------------------------- counts


# How often the stats file is rewritten while a call's answers arrive: a job stopped or killed
# mid-call then reports its misses to within this much, for one small write per interval.
STATS_EVERY_S = 0.5


class Stats:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.hits = 0
        self.misses = 0
        self._written_at = 0.0
        # Seconds spent answering requests (lookups, the model's calls, stores): what
        # bench/resume_cache.py compares between a fresh run, a repeat and a resume.
        self.answer_s = 0.0

    def computed(self) -> None:
        """One answer the model computed (a miss)."""
        self.misses += 1
        now = time.monotonic()
        if now - self._written_at >= STATS_EVERY_S:
            self.write()

    def write(self) -> None:
        self._written_at = time.monotonic()
        if not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"hits": self.hits, "misses": self.misses, "answer_s": self.answer_s}, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def read_stats(path: Path) -> dict[str, int] | None:
    """{"hits": H, "misses": M} from a job's stats file, or None (absent or not that shape).
    The job wrote it, so it is read as untrusted JSON: a bounded read of a regular file."""
    from lm_eval_server.runtime import jobdir

    try:
        data = json.loads(jobdir.read_file(path, STATS_MAX_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    hits, misses = data.get("hits"), data.get("misses")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (hits, misses)):
        return None
    return {"hits": hits, "misses": misses}


# ----------------------------------------------------------------- the model wrapper


def _hash_args() -> Callable[[str, Iterable[Any]], str]:
    from lm_eval.api.model import hash_args

    return hash_args


class _Hook:
    """The hook the model writes every computed answer through: into the server's cache, and
    into a caller's own CachingLM's hook when there is one."""

    def __init__(self, owner: ServerCachedLM) -> None:
        self._owner = owner

    def add_partial(self, attr: str, req: Iterable[Any], res: Any) -> None:
        owner = self._owner
        args = tuple(req)
        if attr in REQUEST_TYPES:
            owner.partials += 1
            owner.stats.computed()
        owner.store_answer(attr, args, res)
        if owner.user_hook is not None:
            owner.user_hook.add_partial(attr, args, res)


class ServerCachedLM:
    """A model behind the server's cache; every other attribute is the model's own."""

    def __init__(self, lm: Any, store: ResponseStore, stats: Stats) -> None:
        self.lm = lm
        self.store: ResponseStore | None = store
        self.stats = stats
        self.user_hook: Any = None
        # Answers the model reported through the hook during the current call.
        self.partials = 0
        self._hash = _hash_args()
        lm.set_cache_hook(_Hook(self))

    def set_cache_hook(self, cache_hook: Any) -> None:
        # A caller's use_cache (CachingLM) hooks the model: it gets the answers via ours.
        self.user_hook = cache_hook

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.lm, attr)
        if attr not in REQUEST_TYPES:
            return value

        def call(requests: list[Any]) -> list[Any]:
            return self._answer(attr, requests)

        return call

    def _disable(self, err: BaseException) -> None:
        _say(f"response cache turned off for this job ({type(err).__name__}: {err})")
        if self.store is not None:
            with contextlib.suppress(sqlite3.Error):
                self.store.close()
        self.store = None

    def lookup(self, attr: str, args: tuple[Any, ...]) -> Any:
        if self.store is None or is_sampled(attr, args):
            return None
        try:
            return self.store.get(self._hash(attr, args), attr)
        except (sqlite3.Error, TypeError, ValueError) as err:
            self._disable(err)
            return None

    def store_answer(self, attr: str, args: tuple[Any, ...], answer: Any) -> None:
        if self.store is None or attr not in REQUEST_TYPES or is_sampled(attr, args):
            return
        try:
            self.store.put(self._hash(attr, args), attr, answer)
        except (sqlite3.Error, TypeError, ValueError, OverflowError) as err:
            self._disable(err)

    def _answer(self, attr: str, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        try:
            return self._answer_all(attr, requests)
        finally:
            self.stats.answer_s += time.perf_counter() - started
            self.stats.write()

    def _answer_all(self, attr: str, requests: list[Any]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        remaining: list[int] = []
        for i, request in enumerate(requests):
            found = self.lookup(attr, tuple(request.args))
            if found is None:
                remaining.append(i)
            else:
                results[i] = found
        hits = len(requests) - len(remaining)
        if hits:
            _say(f"{attr}: {hits} of {len(requests)} requests answered from the response cache")
        self.stats.hits += hits
        self.stats.write()
        if remaining:
            self.partials = 0
            computed = getattr(self.lm, attr)([requests[i] for i in remaining])
            # What the hook did not count (a backend that never calls it, or calls it less).
            self.stats.misses += max(0, len(remaining) - self.partials)
            for i, answer in zip(remaining, computed, strict=True):
                results[i] = answer
                self.store_answer(attr, tuple(requests[i].args), answer)
        return results


def _wrapping_factory(model_cls: Any, wrap: Callable[[Any], Any]) -> Any:
    class Factory:
        """What `get_model(name)` returns: the model class's two constructors, wrapped."""

        def __getattr__(self, attr: str) -> Any:
            return getattr(model_cls, attr)

        def create_from_arg_string(self, *args: Any, **kwargs: Any) -> Any:
            return wrap(model_cls.create_from_arg_string(*args, **kwargs))

        def create_from_arg_obj(self, *args: Any, **kwargs: Any) -> Any:
            return wrap(model_cls.create_from_arg_obj(*args, **kwargs))

    return Factory()


def install(environ: dict[str, str] | os._Environ[str] | None = None) -> str | None:
    """Wrap the models lm-eval builds with the file the environment names; returns what was
    done (for a debug line), or None when the job has no response cache."""
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_CACHE)
    if not path:
        return None
    import lm_eval.api.registry as registry

    original = registry.get_model
    if getattr(original, "_lm_eval_server_cache", False):
        return "already installed"
    stats = Stats(environ.get(ENV_STATS))

    def wrap(lm: Any) -> Any:
        store = open_store(Path(path))
        if store is None:
            return lm  # no stats file: the job reports no cache counts
        stats.write()
        return ServerCachedLM(lm, store, stats)

    def get_model(model_name: str) -> Any:
        return _wrapping_factory(original(model_name), wrap)

    get_model._lm_eval_server_cache = True  # type: ignore[attr-defined]
    registry.get_model = get_model
    return f"response cache {Path(path).name}"
