"""Run lm-eval's CLI with task templates rendered in Jinja's sandbox and the built-in task
index served from a cache.

Usage: ``python -m lm_eval_server.runtime.launcher [the argv lm_eval takes]``.

Template hook point: ``lm_eval.utils.env``, the module-level ``jinja2.Environment`` that
``lm_eval.utils.apply_template`` renders every templated task field with (``doc_to_text``,
``doc_to_target``, ``doc_to_choice``, ``description``, ``gen_prefix``, ...), as does the remote
tokenizer's chat template. ``sandbox_templates`` replaces it with a
``jinja2.sandbox.ImmutableSandboxedEnvironment`` of the same settings and lm-eval's extra
filters (``regex_replace``): a template then cannot read attributes starting with ``_`` (the
way from a value to Python's globals) or change a list or dict in place. This runs in every
job, cold or warm (``run_lm_eval``), whatever the index hook does. It fails closed: if the hook
point changed shape in another lm-eval, the launcher prints one line saying why and exits with
``EXIT_NO_TEMPLATE_SANDBOX`` before lm-eval runs, rather than render hostile templates
unsandboxed. There is no switch to turn it off.

Index hook point: ``lm_eval.tasks._index.TaskIndex.build``, a
staticmethod ``build(paths, *, resolve_includes=True) -> dict[str, Entry]``
that ``lm_eval.tasks.manager.TaskManager.__init__`` calls with lm-eval's
built-in tasks dir first and any ``include_path`` dirs after it. The wrapper
serves the built-in dir from the cache written by ``lm_eval_server.runtime.task_index``,
indexes every other path with the original ``build`` each time, and merges the
per-path results exactly like the original (later paths override earlier ones,
with lm-eval's own override warning on lm-eval's own logger).

Response cache: ``run_lm_eval`` also installs the server's response cache
(``lm_eval_server.runtime.response_cache``) when the job's environment names a file for it;
whatever goes wrong there, the job runs without it.

Environment:

* ``LM_EVAL_SERVER_INDEX_DIR``: the data dir holding the cache; unset -> plain lm-eval.
* ``LM_EVAL_SERVER_DISABLE_HOOK=1``: plain lm-eval regardless (tests the fallback).
* ``LM_EVAL_SERVER_LAUNCHER_DEBUG=1``: print marker lines, e.g. when the
  built-in index is served from the cache.

Whenever the index hook cannot be trusted (hook point changed shape, setup error) the
launcher runs lm-eval with its own indexing and prints one line to stderr saying why. A missing,
stale or unreadable cache also prints one line; lm-eval's own indexer then
builds the built-in index, and the launcher saves it for the next run.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from lm_eval_server.runtime import jobdir, response_cache, task_index

ENV_INDEX_DIR = "LM_EVAL_SERVER_INDEX_DIR"
ENV_DISABLE_HOOK = "LM_EVAL_SERVER_DISABLE_HOOK"
ENV_DEBUG = "LM_EVAL_SERVER_LAUNCHER_DEBUG"
HOOK_POINT = "lm_eval.tasks._index.TaskIndex.build"
JINJA_HOOK_POINT = "lm_eval.utils.env"
# EX_CONFIG: the job did not run, because templates could not be sandboxed.
EXIT_NO_TEMPLATE_SANDBOX = 78
CACHE_HIT_MARKER = "served built-in task index from cache"
_PREFIX = "lm_eval_server.runtime.launcher: "

Index = dict[str, Any]
BuildFn = Callable[..., Index]


def _say(message: str) -> None:
    # Plain stderr, not logging: lm-eval configures logging itself later and
    # skips its setup if handlers already exist.
    sys.stderr.write(_PREFIX + message + "\n")
    sys.stderr.flush()


def _debug(message: str) -> None:
    if os.environ.get(ENV_DEBUG) == "1":
        _say(message)


class BuiltinIndexSource:
    """Hands out private copies of the built-in tasks dir's index.

    From the cache's JSON (``task_index.decode_index``) when there is one; otherwise
    lm-eval's own ``build`` makes it once, and it is encoded before lm-eval can mutate
    it (TaskFactory adds names to the index dict) and saved via ``save`` for the next run.
    """

    def __init__(
        self,
        builtin_dir: Path,
        original_build: BuildFn,
        payload: bytes | None,
        save: Callable[[Index, bytes], None] | None = None,
    ) -> None:
        self.builtin_dir = Path(builtin_dir)
        self._real_builtin = os.path.realpath(builtin_dir)
        self._original = original_build
        self._payload = payload
        self._save = save
        self._preloaded: Index | None = None

    def is_builtin(self, path: Any) -> bool:
        return os.path.realpath(path) == self._real_builtin

    def preload(self) -> None:
        """Load the index now; the next ``get`` hands out this very copy.

        For a warm worker, which forks once per job: each fork's first ``get``
        returns the preloaded dict, made private to that job by fork itself.
        """
        self._preloaded = self.get()

    def get(self) -> Index:
        if self._preloaded is not None:
            index, self._preloaded = self._preloaded, None
            _debug(f"{CACHE_HIT_MARKER} (preloaded, {len(index)} entries)")
            return index
        if self._payload is not None:
            try:
                index = task_index.decode_index(self._payload, self.builtin_dir)
            except Exception as err:
                _say(f"cached task index unreadable ({err}); re-indexing with lm-eval")
                self._payload = None
            else:
                _debug(f"{CACHE_HIT_MARKER} ({len(index)} entries)")
                return index
        index = self._original([self.builtin_dir])
        try:
            payload: bytes | None = task_index.encode_index(index, self.builtin_dir)
        except task_index.CacheUnavailable as why:
            # Not cacheable: every later call indexes afresh (a private copy each time).
            _say(f"task index not cached: {why}")
            return index
        self._payload = payload
        if self._save is not None:
            save, self._save = self._save, None
            save(index, payload)
        return index


def make_build(original: BuildFn, source: BuiltinIndexSource, log: logging.Logger) -> BuildFn:
    """The replacement for ``TaskIndex.build`` (a plain function; wrap in staticmethod)."""

    @functools.wraps(original)
    def build(paths: Iterable[Path], *, resolve_includes: bool = True) -> Index:
        paths = list(paths)
        # The cache holds resolve_includes=True results for the built-in dir only.
        if not resolve_includes or not any(source.is_builtin(p) for p in paths):
            return original(paths, resolve_includes=resolve_includes)
        index: Index = {}
        log.debug("Building task index from %s", paths)
        for root in paths:
            if source.is_builtin(root):
                path_index = source.get()
            else:
                path_index = original([root], resolve_includes=resolve_includes)
            _merge(index, path_index, log)
        log.debug("Built task index with %d entries", len(index))
        return index

    build._lm_eval_server_hook = True  # type: ignore[attr-defined]
    return build


def _merge(index: Index, path_index: Index, log: logging.Logger) -> None:
    # Copied from TaskIndex.build's merge loop, message and logger included.
    for name, entry in path_index.items():
        if name in index:
            log.warning(
                "Task '%s' from %s overrides existing task from %s",
                name,
                entry.yaml_path,
                index[name].yaml_path,
            )
        index[name] = entry


def check_hook_point(index_mod: ModuleType, manager_mod: ModuleType) -> str | None:
    """Why the hook point cannot be used, or None if it has the expected shape."""
    task_index_cls = getattr(index_mod, "TaskIndex", None)
    if task_index_cls is None:
        return "lm_eval.tasks._index.TaskIndex not found"
    raw = inspect.getattr_static(task_index_cls, "build", None)
    if not isinstance(raw, staticmethod):
        return f"{HOOK_POINT} is not a staticmethod"
    params = list(inspect.signature(raw.__func__).parameters.values())
    expected = [
        ("paths", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("resolve_includes", inspect.Parameter.KEYWORD_ONLY, True),
    ]
    if [(p.name, p.kind, p.default) for p in params] != expected:
        return f"{HOOK_POINT} signature changed: {inspect.signature(raw.__func__)}"
    if not isinstance(getattr(index_mod, "log", None), logging.Logger):
        return "lm_eval.tasks._index.log is not a Logger"
    # TaskManager must reach build through this very class for the patch to apply.
    if getattr(manager_mod, "TaskIndex", None) is not task_index_cls:
        return "lm_eval.tasks.manager no longer uses lm_eval.tasks._index.TaskIndex"
    return None


def _saver(data_dir: Path, key: str, builtin_dir: Path) -> Callable[[Index, bytes], None]:
    def save(index: Index, payload: bytes) -> None:
        try:
            task_index.write_cache(data_dir, key, index, payload=payload, builtin_dir=builtin_dir)
        except Exception as err:  # a cache we cannot write must not fail the job
            _say(f"could not save task index cache ({type(err).__name__}: {err})")
        else:
            _debug(f"saved task index cache for key {key}")

    return save


def install_hook(data_dir: Path, *, preload: bool = False) -> str | None:
    """Patch the hook point; returns why it was not patched, or None.

    ``preload``: load the built-in index now rather than at the first ``build``
    (for warm workers; see ``BuiltinIndexSource.preload``).
    """
    import lm_eval.tasks
    import lm_eval.tasks._index as index_mod
    import lm_eval.tasks.manager as manager_mod

    problem = check_hook_point(index_mod, manager_mod)
    if problem is not None:
        return problem
    original = index_mod.TaskIndex.build
    if getattr(original, "_lm_eval_server_hook", False):
        return None
    # The same expression TaskManager uses, so the paths compare equal.
    builtin_dir = Path(lm_eval.tasks.__file__).parent
    key = task_index.cache_key(builtin_dir)
    try:
        payload: bytes | None = task_index.read_index_payload(data_dir, key)
    except task_index.CacheUnavailable as why:
        _say(f"task index cache {why}; indexing built-in tasks with lm-eval and saving the cache")
        payload = None
    source = BuiltinIndexSource(builtin_dir, original, payload, _saver(data_dir, key, builtin_dir))
    index_mod.TaskIndex.build = staticmethod(make_build(original, source, index_mod.log))
    _debug(f"hooked {HOOK_POINT} (cache key {key})")
    if preload:
        try:
            source.preload()
        except Exception as err:  # the hook still works; each job loads the index itself
            _say(f"could not preload the task index ({type(err).__name__}: {err})")
    return None


def prepare(*, preload: bool = False) -> str | None:
    """Install the hook if wanted and possible; returns why plain lm-eval runs."""
    data_dir = os.environ.get(ENV_INDEX_DIR)
    if not data_dir:
        return f"{ENV_INDEX_DIR} is not set"
    if os.environ.get(ENV_DISABLE_HOOK) == "1":
        return f"{ENV_DISABLE_HOOK}=1"
    try:
        return install_hook(Path(data_dir), preload=preload)
    except Exception as err:  # any surprise in our code must not cost the job
        return f"hook setup failed ({type(err).__name__}: {err})"


# ----------------------------------------------------------------- templates in the sandbox

# Environment settings that keep their name as an attribute (jinja2.Environment.__init__).
_ENV_SETTINGS = (
    "block_start_string",
    "block_end_string",
    "variable_start_string",
    "variable_end_string",
    "comment_start_string",
    "comment_end_string",
    "line_statement_prefix",
    "line_comment_prefix",
    "trim_blocks",
    "lstrip_blocks",
    "newline_sequence",
    "keep_trailing_newline",
    "optimized",
    "undefined",
    "finalize",
    "autoescape",
    "loader",
    "auto_reload",
    "bytecode_cache",
)


def check_jinja_hook_point(utils_mod: ModuleType) -> str | None:
    """Why ``lm_eval.utils.env`` cannot be swapped for a sandbox, or None."""
    import jinja2

    env = getattr(utils_mod, "env", None)
    if type(env) is not jinja2.Environment:
        return f"{JINJA_HOOK_POINT} is not a jinja2.Environment ({type(env).__name__})"
    apply = getattr(utils_mod, "apply_template", None)
    code = getattr(apply, "__code__", None)
    if (
        not inspect.isfunction(apply)
        or apply.__globals__ is not vars(utils_mod)
        or code is None
        or "env" not in code.co_names
    ):
        return f"lm_eval.utils.apply_template no longer renders with {JINJA_HOOK_POINT}"
    if env.extensions or env.is_async:
        return f"{JINJA_HOOK_POINT} has extensions or async rendering this launcher does not copy"
    return None


def sandboxed_copy(env: Any) -> Any:
    """An ImmutableSandboxedEnvironment with ``env``'s settings and the filters, tests and
    globals ``env`` adds to Jinja's defaults (the sandbox's own ``range`` stays)."""
    from jinja2 import defaults
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    sandbox = ImmutableSandboxedEnvironment(**{name: getattr(env, name) for name in _ENV_SETTINGS})
    for mine, theirs, default in (
        (sandbox.filters, env.filters, defaults.DEFAULT_FILTERS),
        (sandbox.tests, env.tests, defaults.DEFAULT_TESTS),
        (sandbox.globals, env.globals, defaults.DEFAULT_NAMESPACE),
    ):
        mine.update({k: v for k, v in theirs.items() if default.get(k) is not v})
    sandbox.policies.update(env.policies)
    return sandbox


def sandbox_templates() -> str | None:
    """Make lm-eval render templates in Jinja's sandbox; returns why it could not, or None."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        import lm_eval.utils as utils_mod

        if isinstance(getattr(utils_mod, "env", None), ImmutableSandboxedEnvironment):
            return None  # already (a warm worker's fork, or a second call)
        problem = check_jinja_hook_point(utils_mod)
        if problem is not None:
            return problem
        utils_mod.env = sandboxed_copy(utils_mod.env)
    except Exception as err:  # any surprise: no sandbox, so no job
        return f"sandbox setup failed ({type(err).__name__}: {err})"
    _debug(f"task templates render in Jinja's sandbox ({JINJA_HOOK_POINT})")
    return None


def plain_lm_eval_notice(reason: str) -> None:
    _say(f"running plain lm-eval: {reason}")


# The packages a job's reproduction receipt names (outputs.receipts).
RECEIPT_PACKAGES = ("lm_eval", "torch", "transformers", "datasets")


def write_job_facts() -> None:
    """Write the job's package versions (from its interpreter's metadata: nothing imported) and
    its environment's names (never values) into its directory, for its receipt. Only in a
    server job, whose cwd is its directory and HOME that directory's home/."""
    here = os.getcwd()
    home = os.environ.get("HOME")
    # realpath: a sandboxed warm job's directory is a symlink to its worker's slot.
    if not home or os.path.realpath(home) != os.path.join(os.path.realpath(here), jobdir.HOME):
        return
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECEIPT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    facts = {"versions": versions, "env_names": sorted(os.environ)}
    try:
        jobdir.write_atomic(jobdir.path(here, jobdir.JOB_FACTS), json.dumps(facts))
    except OSError as err:  # a receipt without versions must not cost the job
        _say(f"could not write {jobdir.JOB_FACTS} ({err})")


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's CLI with ``argv``, its templates in the sandbox; exits with
    EXIT_NO_TEMPLATE_SANDBOX (SystemExit) if they cannot be."""
    problem = sandbox_templates()
    if problem is not None:
        _say(
            f"refusing to run: task templates cannot be rendered in Jinja's sandbox: {problem}. "
            "Use the lm-eval version this server supports, or update lm-eval-server"
        )
        raise SystemExit(EXIT_NO_TEMPLATE_SANDBOX)
    write_job_facts()
    try:
        done = response_cache.install()
    except Exception as err:  # the response cache never costs a job
        _say(f"running without the response cache ({type(err).__name__}: {err})")
    else:
        if done:
            _debug(done)
    import lm_eval.__main__ as lm_eval_main

    # What `python -m lm_eval` puts in argv[0]; HarnessCLI inserts its legacy
    # 'run' subcommand by looking at argv[1:], so the rest must be untouched.
    sys.argv = [lm_eval_main.__file__, *argv]
    lm_eval_main.cli_evaluate()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    reason = prepare()
    if reason is not None:
        plain_lm_eval_notice(reason)
    run_lm_eval(args)


if __name__ == "__main__":
    main()
