"""What lm-eval 0.4.13's `run` refuses only once the job is under way, judged at submission.

Each of these options passes lm-eval's parser and `EvaluatorConfig.from_cli`, then fails the
job (or quietly does nothing) seconds or minutes later, depending on what the job's interpreter
has installed:

- `hf_hub_log_args` becomes `EvaluationTracker(**hf_hub_log_args)`: an unknown key is a
  TypeError before any task loads. The tracker's parameters are read from its source with
  `ast` (no import: lm_eval.loggers pulls in datasets and huggingface_hub).
- `wandb_args` / `trackio_args` build lm-eval's W&B / Trackio logger, which imports the
  package: without it W&B logs a warning and nothing is logged, Trackio raises ImportError.
  The refusal names lm-eval's extra.
- `check_integrity` runs lm-eval's own test suite, `tests/test_version_stable.py`, found by
  `find_test_root` at most three directories above lm_eval/evaluator_utils.py: a source
  checkout has it, an installed lm-eval (this server's venv) never does.

Only jobs that run in this server's interpreter are judged (validation asks
`backends.runs_here`): another lm-eval (LM_EVAL_PATHS) or Ray nodes may have what we lack.
Presence is read with `find_spec` and file checks, cached per process (installing a package
needs a server restart, as for model backends).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lm_eval_server.admission import backends

# lm-eval's loggers: the option, the module its logger imports (with lm-eval's extra for it),
# and what lm-eval does without it.
LOGGERS: tuple[tuple[str, backends.Requirement, str], ...] = (
    (
        "wandb_args",
        backends.Requirement(("wandb",), extra="wandb"),
        "lm-eval would run the job and log nothing to W&B",
    ),
    (
        "trackio_args",
        backends.Requirement(("trackio",), extra="trackio"),
        'lm-eval would stop with "trackio is not installed"',
    ),
)
# Keys lm-eval's run adds to hf_hub_log_args itself (output_path, and token from HF_TOKEN).
TRACKER_ADDED_KEYS = frozenset({"output_path", "token"})
# find_test_root's search: this many directories up from lm_eval/evaluator_utils.py.
TEST_ROOT_LAYERS = 3
TEST_FILE = Path("tests") / "test_version_stable.py"


def _lm_eval_dir() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def tracker_parameters() -> frozenset[str] | None:
    """The keyword parameters of lm-eval's `EvaluationTracker.__init__`, or None when its
    source cannot be read (then nothing is judged)."""
    root = _lm_eval_dir()
    source = root / "loggers" / "evaluation_tracker.py" if root else None
    if source is None or not source.is_file():
        return None
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "EvaluationTracker":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    if args.kwarg is not None:
                        return None  # takes any key
                    names = [a.arg for a in (*args.args, *args.kwonlyargs)]
                    return frozenset(n for n in names if n != "self")
    return None


@functools.cache
def test_root() -> Path | None:
    """Where lm-eval's check_integrity finds its test suite, replaying `find_test_root`; None
    when it would raise FileNotFoundError."""
    root = _lm_eval_dir()
    if root is None:
        return None
    current = (root / "evaluator_utils.py").resolve()
    for _ in range(TEST_ROOT_LAYERS):
        if (current / TEST_FILE).exists():
            return current
        current = current.parent.resolve()
    return None


def _hf_hub_refusal(value: Any, known: frozenset[str] | None) -> str | None:
    if not isinstance(value, Mapping) or known is None:
        return None
    unknown = [str(k) for k in value if k not in known]
    if not unknown:
        return None
    takes = ", ".join(sorted(known - TRACKER_ADDED_KEYS))
    return (
        'hf_hub_log_args: lm-eval would stop with "EvaluationTracker.__init__() got an '
        f'unexpected keyword argument {unknown[0][:100]!r}". It takes: {takes}'
    )


def _logger_refusal(dest: str, req: backends.Requirement, without: str) -> str | None:
    missing = [m for m in req.modules if not backends.module_present(m)]
    if not missing:
        return None
    command = backends.install_command(req, backends.project_extras())
    return (
        f"{dest}: lm-eval's {req.modules[0]} logger needs the {', '.join(missing)} package, "
        f"which this server's environment lacks ({without}). Install lm-eval's {req.extra} "
        f"extra with {command} and restart the server, or leave {dest} out"
    )


def _integrity_refusal() -> str:
    return (
        "check_integrity: lm-eval runs its own test suite for it (tests/test_version_stable.py), "
        "which only a source checkout of lm-eval has; this server's lm-eval is an installed "
        'package, so lm-eval would stop with "Unable to find package root within '
        f'{TEST_ROOT_LAYERS} upwards". Leave check_integrity out, or run an lm-eval from a '
        "source checkout (LM_EVAL_PATHS)"
    )


# What huggingface_hub reads as true in HF_HUB_OFFLINE (its `_is_true`).
_HUB_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
HUB_PUSH_KEYS = ("push_results_to_hub", "push_samples_to_hub")


def hub_offline(env_vars: Mapping[str, Any], jobs_offline: bool) -> bool:
    """Whether a job's HF_HUB_OFFLINE will be on: JOBS_OFFLINE sets it unless the request's
    env_vars give it another value (a plain value; a secret is never an offline switch)."""
    value = env_vars.get("HF_HUB_OFFLINE")
    if isinstance(value, str):
        return value.strip().upper() in _HUB_TRUE
    return jobs_offline


def hub_push_refusal(configured: Mapping[str, Any], offline: bool) -> str | None:
    """A push to the Hub (hf_hub_log_args) from a job run with HF_HUB_OFFLINE on: lm-eval
    would run the whole evaluation, then fail the job when it pushes."""
    value = configured.get("hf_hub_log_args")
    if not offline or not isinstance(value, Mapping):
        return None
    pushes = [k for k in HUB_PUSH_KEYS if value.get(k) is True]
    if not pushes:
        return None
    return (
        f"hf_hub_log_args: {pushes[0]} needs the Hugging Face Hub, and this job would run with "
        "HF_HUB_OFFLINE=1 (the server's JOBS_OFFLINE default): lm-eval would stop with "
        '"OfflineModeIsEnabled" after the whole evaluation. Add "env_vars": '
        '{"HF_HUB_OFFLINE": "0", "HF_TOKEN": {"secret": "<name>"}} to push, or leave it out'
    )


def refusal(configured: Mapping[str, Any]) -> str | None:
    """Why lm-eval, run in this server's interpreter, would fail on these configured options
    (EvaluatorConfig's values after the config-file merge), or None."""
    found = _hf_hub_refusal(configured.get("hf_hub_log_args"), tracker_parameters())
    if found:
        return found
    for dest, req, without in LOGGERS:
        if configured.get(dest) and (found := _logger_refusal(dest, req, without)):
            return found
    if configured.get("check_integrity") and test_root() is None:
        return _integrity_refusal()
    return None
