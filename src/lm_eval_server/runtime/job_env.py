"""A job's environment: which names a request may set, and the whole environment a job gets.

A job's environment is built from nothing (never from the server's `os.environ`):

1. what the server chooses: `PATH`, locale, `HOME` and `TMPDIR` inside the job's directory,
   cache locations under `DATA_DIR/cache`, `PYTHONUNBUFFERED`, the task index location;
2. the names the operator lists in `JOB_ENV_PASSTHROUGH`, copied from the server's environment,
   then Hugging Face's offline switches unless the operator sets `JOBS_OFFLINE=false`;
3. the request's `env_vars`, each name allowed by `DEFAULT_ALLOWED_ENV_VARS` or the operator's
   `ALLOWED_ENV_VARS` (names or case-sensitive glob patterns).

So a job never sees `API_KEYS` or any other setting of the server, and a request cannot set a
variable that changes where Python, the dynamic loader, a shell or the Hugging Face libraries
find code, files or hosts. Stdlib only: the executors and the warm workers import it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from lm_eval_server.runtime import jobdir

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# An ALLOWED_ENV_VARS entry: a name, or an fnmatch pattern over name characters.
ENV_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!]+\Z")

# Credentials the caller brings for providers lm-eval calls: the variables whose meaning is a
# credential, the only default names a secret reference may go into (job_secrets). Where they
# are sent is decided by the model and its base_url, never by an allowed variable (no
# *_BASE_URL, *_ENDPOINT).
CREDENTIAL_ENV_VARS: tuple[str, ...] = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "TEXTSYNTH_API_SECRET_KEY",
    "WATSONX_API_KEY",
    "PERSPECTIVE_API_KEY",
    "HF_TOKEN",
)

# Each name is read by lm-eval or a library it uses, and its value is a flag, a number, a log
# level or a credential: none of them names a file, a directory, a module, a command or a host.
# No glob patterns: a family such as OMP_* or NCCL_* also holds loaders (OMP_TOOL_LIBRARIES,
# NCCL_NET_PLUGIN) and file paths (NCCL_DEBUG_FILE). docs: the table in the env documentation.
DEFAULT_ALLOWED_ENV_VARS: tuple[str, ...] = (
    # Network switches of the Hugging Face libraries: they stop network use, or (set to 0)
    # undo JOBS_OFFLINE's default for one job; the job's network is still JOB_NETWORK's.
    "HF_DATASETS_OFFLINE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_EVALUATE_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_HUB_ETAG_TIMEOUT",
    # Log levels and progress output.
    "LMEVAL_LOG_LEVEL",
    "TRANSFORMERS_VERBOSITY",
    "DATASETS_VERBOSITY",
    "TQDM_MININTERVAL",
    "TQDM_DISABLE",
    # lm-eval's own switches (lm_eval/defaults.py, models/api_models.py, api/metrics.py).
    "LMEVAL_HASHMM",
    "LMEVAL_DISABLE_MULTIPROC",
    "DISABLE_MULTIPROC",
    "LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER",
    # Thread counts.
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMEXPR_MAX_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "RAYON_NUM_THREADS",
    # CUDA debugging: synchronous kernel launches.
    "CUDA_LAUNCH_BLOCKING",
    *CREDENTIAL_ENV_VARS,
)

# Copied from the server's environment into every job unless JOB_ENV_PASSTHROUGH says otherwise:
# the offline switches (the operator's "no network" holds for jobs too) and the device
# assignment of the machine. Neither is a secret.
DEFAULT_JOB_ENV_PASSTHROUGH: tuple[str, ...] = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_EVALUATE_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
)

# Hugging Face's network switches, on in every job while JOBS_OFFLINE holds (the default):
# lm-eval then loads datasets, tokenizers and models from the shared cache only, and a job
# never spends its time retrying a Hub it cannot reach (the dummy model loads a tokenizer when
# it saves results: 45 s of MaxRetryError on a machine without a network). Set after the
# passthrough; a request that needs the Hub says so in its env_vars (the original README's
# example.json sends HF_DATASETS_OFFLINE=0), and JOB_NETWORK=none takes the network away.
OFFLINE_VARS: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

# Which devices a process sees, and how they are numbered: the server's to set (GPU slots), so
# refused in env_vars even where ALLOWED_ENV_VARS would allow them.
DEVICE_VARS = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "NVIDIA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
    }
)

# Set per job (its own directory); everything else in a job's environment is the same for
# every job of a server that has no env_vars, which is what lets a warm worker run it.
# The response cache's variables (runtime.response_cache) name the job's own file and stats.
PER_JOB_NAMES = frozenset(
    {"HOME", "TMPDIR", "LM_EVAL_SERVER_RESPONSE_CACHE", "LM_EVAL_SERVER_RESPONSE_STATS"}
)
SAFE_PATH_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")
LOCALE = "C.UTF-8"
INDEX_DIR_NAME = "LM_EVAL_SERVER_INDEX_DIR"  # lm_eval_server.runtime.launcher.ENV_INDEX_DIR


class JobEnvSettings(Protocol):
    """The settings this module reads (config.Settings has them)."""

    data_dir: Path
    allowed_env_vars: list[str]
    job_env_passthrough: list[str]
    max_env_vars: int
    max_env_value_bytes: int
    jobs_offline: bool

    @property
    def task_index_dir(self) -> Path: ...

    @property
    def cache_dir(self) -> Path: ...


class EnvVarsRefused(ValueError):
    """A request's env_vars cannot be used; the message names the variable and the setting."""


# ----------------------------------------------------------------- the request's env_vars


def is_allowed(name: str, patterns: Iterable[str]) -> bool:
    return name in DEFAULT_ALLOWED_ENV_VARS or any(fnmatchcase(name, p) for p in patterns)


def check_env_vars(
    env_vars: Mapping[str, object], settings: JobEnvSettings
) -> dict[str, str | dict[str, str]]:
    """The request's env_vars, if every name is allowed and every value within bounds. A
    secret reference (`{"secret": name}`, job_secrets) is kept as it is: its name is checked
    against SECRETS_DIR by the caller, its value read only when the job starts."""
    if len(env_vars) > settings.max_env_vars:
        raise EnvVarsRefused(
            f"env_vars has {len(env_vars)} entries; the limit is {settings.max_env_vars} "
            "(MAX_ENV_VARS)"
        )
    checked: dict[str, str | dict[str, str]] = {}
    for name, value in env_vars.items():
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise EnvVarsRefused(
                f"env_vars: {name!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )
        if not is_allowed(name, settings.allowed_env_vars):
            raise EnvVarsRefused(
                f"env_vars: {name} is not allowed on this server. A request may set only "
                "variables that cannot change which code, files or hosts the job uses (e.g. "
                "HF_HUB_OFFLINE, LMEVAL_LOG_LEVEL, OPENAI_API_KEY); the operator can allow "
                f"{name} by adding it (or a pattern) to ALLOWED_ENV_VARS"
            )
        if name in DEVICE_VARS:
            raise EnvVarsRefused(
                f"env_vars: {name} is set by the server, not by a request: a job's GPUs come "
                'from "resources": {"num_gpus": N} (GPU slots, GPUS), whatever '
                "ALLOWED_ENV_VARS allows"
            )
        if isinstance(value, Mapping):
            secret = value.get("secret") if set(value) == {"secret"} else None
            if not isinstance(secret, str):
                raise EnvVarsRefused(
                    f"env_vars: the value of {name} must be a string or a secret reference "
                    '{"secret": "<name>"}'
                )
            checked[name] = {"secret": secret}
            continue
        if not isinstance(value, str):
            raise EnvVarsRefused(f"env_vars: the value of {name} must be a string")
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise EnvVarsRefused(
                f"env_vars: the value of {name} is not valid Unicode text (lone surrogate)"
            ) from None
        if "\0" in value or size > settings.max_env_value_bytes:
            raise EnvVarsRefused(
                f"env_vars: the value of {name} is longer than "
                f"{settings.max_env_value_bytes} bytes (MAX_ENV_VALUE_BYTES) or contains a "
                "NUL byte"
            )
        checked[name] = value
    return checked


# ----------------------------------------------------------------- settings checks (startup)


def check_allowed_patterns(patterns: Iterable[str]) -> None:
    for pattern in patterns:
        if not ENV_PATTERN.match(pattern):
            raise ValueError(
                f"ALLOWED_ENV_VARS: {pattern!r} is neither a variable name nor a glob pattern "
                "of name characters (e.g. FAKE_*)"
            )


def check_passthrough(names: Iterable[str], server_settings: Iterable[str]) -> None:
    """Refuses a JOB_ENV_PASSTHROUGH that would hand a job one of the server's settings."""
    reserved = {s.upper() for s in server_settings}
    for name in names:
        if not ENV_NAME.match(name):
            raise ValueError(f"JOB_ENV_PASSTHROUGH: {name!r} is not a variable name")
        if name.upper() in reserved:
            raise ValueError(
                f"JOB_ENV_PASSTHROUGH: {name} is a setting of this server; jobs never get the "
                "server's settings (API keys among them). Remove it from JOB_ENV_PASSTHROUGH"
            )


# ----------------------------------------------------------------- the whole environment


def safe_path() -> str:
    # The server's own virtualenv first, as its lm_eval command expects; not resolved, so a
    # venv's bin/python symlink keeps pointing into the venv.
    return os.pathsep.join([str(Path(sys.executable).parent), *SAFE_PATH_DIRS])


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def base_env(
    settings: JobEnvSettings, home: Path, tmp: Path, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What the server chooses plus JOB_ENV_PASSTHROUGH, for a process with this HOME and TMPDIR
    (creates the directories)."""
    environ = os.environ if environ is None else environ
    caches = _private_dir(settings.cache_dir)
    env = {
        "PATH": safe_path(),
        "LANG": LOCALE,
        "LC_ALL": LOCALE,
        "HOME": str(_private_dir(home)),
        "TMPDIR": str(_private_dir(tmp)),
        # Shared caches: models and datasets are downloaded once for all jobs, never into the
        # virtualenv (lm-eval's request cache defaults to its own package directory).
        "XDG_CACHE_HOME": str(caches),
        "HF_HOME": str(_private_dir(caches / "huggingface")),
        "LM_HARNESS_CACHE_PATH": str(_private_dir(caches / "lm_eval")),
        # stdout reaches the logs as it is written, not when the job ends.
        "PYTHONUNBUFFERED": "1",
        # HOME is the job's own directory, whose files the job writes: never import from it.
        "PYTHONNOUSERSITE": "1",
        INDEX_DIR_NAME: str(settings.task_index_dir),
    }
    # The operator's explicit choice, so it may replace a default above (e.g. a shared HF_HOME).
    env.update({n: environ[n] for n in settings.job_env_passthrough if n in environ})
    if settings.jobs_offline:
        env.update(dict.fromkeys(OFFLINE_VARS, "1"))
    return env


def job_home(work_dir: Path) -> Path:
    return work_dir / jobdir.HOME


def job_tmp(work_dir: Path) -> Path:
    return work_dir / jobdir.TMP


def device_env(gpus: Sequence[str] | None, env: Mapping[str, str]) -> dict[str, str]:
    """The device variables of a job given `gpus` by the GPU slots (None: no GPU slots).

    Exactly its devices, or none at all ("" hides every device): a job that asked for no GPU
    cannot allocate memory on one another job holds. Ids are nvidia-smi's numbering, so CUDA is
    told to number devices the same way (PCI bus order) unless the operator passes
    CUDA_DEVICE_ORDER through.
    """
    if gpus is None:
        return {}
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(gpus),
        "CUDA_DEVICE_ORDER": env.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    }


def job_environment(
    settings: JobEnvSettings,
    work_dir: Path,
    env_vars: Mapping[str, str],  # secret references already resolved (job_secrets.resolve)
    environ: Mapping[str, str] | None = None,
    gpus: Sequence[str] | None = None,
) -> dict[str, str]:
    """A job's whole environment: the base for its directory, its checked env_vars, then its
    GPU allocation (last: nothing overrides it)."""
    home, tmp = job_home(work_dir), job_tmp(work_dir)
    env = {**base_env(settings, home, tmp, environ), **env_vars}
    return {**env, **device_env(gpus, env)}


def worker_environment(
    settings: JobEnvSettings,
    run_dir: Path,
    environ: Mapping[str, str] | None = None,
    gpus: Sequence[str] | None = None,
) -> dict[str, str]:
    """A warm worker's environment: a job's, with a HOME and TMPDIR of the worker's own. With
    GPU slots (`gpus=[]`) it sees no device, as the jobs it may run (those given none)."""
    env = base_env(settings, job_home(run_dir), job_tmp(run_dir), environ)
    return {**env, **device_env(gpus, env)}


def shared_part(env: Mapping[str, str]) -> dict[str, str]:
    """What of an environment is the same for every job that may run in a warm worker."""
    return {k: v for k, v in env.items() if k not in PER_JOB_NAMES}
