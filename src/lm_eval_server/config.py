"""Every environment variable the server reads, validated once at startup.

A bad value is a startup error, never a silent default.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lm_eval_server.api.hosts import parse_rules
from lm_eval_server.jobs.gpus import check_ids as check_gpu_ids
from lm_eval_server.runtime import job_env
from lm_eval_server.runtime.sandbox import SandboxMode
from lm_eval_server.team import job_secrets
from lm_eval_server.team.principals import Principal, key_table, parse_entry


class StoreKind(StrEnum):
    sqlite = "sqlite"
    memory = "memory"


class ExecutorKind(StrEnum):
    local = "local"
    ray = "ray"


class OnOff(StrEnum):
    on = "on"
    off = "off"


class JobNetwork(StrEnum):
    host = "host"
    none = "none"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]

MIN_WEBHOOK_SECRET_CHARS = 16


class Settings(BaseSettings):
    # Errors name the setting and the rule, never echo the value: API_KEYS and ADMIN_KEYS are
    # secrets, and a startup error goes to logs that more people read than the key file.
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )
    # Paths with symlinks resolved, by the path asked for: each job's launch asks for several
    # directories under DATA_DIR, and a realpath is a system call per component. Keyed by the
    # unresolved path, so a changed data_dir (tests) is resolved afresh.
    _real: dict[Path, Path] = PrivateAttr(default_factory=dict)

    def _resolved(self, path: Path) -> Path:
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = path.resolve()
        return real

    @property
    def data_real(self) -> Path:
        """DATA_DIR with symlinks resolved."""
        return self._resolved(self.data_dir)

    max_concurrency: int = Field(4, ge=1, description="Jobs run at once.")
    queue_process_interval: float = Field(
        15.0,
        gt=0,
        description="Seconds between safety sweeps of the queue (jobs start on events).",
    )
    data_dir: Path = Field(Path("./data"), description="Job directories and the job database.")
    store: StoreKind = Field(StoreKind.sqlite, description="sqlite (durable) or memory.")
    log_tail_lines: int = Field(1000, ge=1, description="Lines of stdout/stderr in GET /job/{id}.")
    stop_grace_s: float = Field(10.0, ge=0, description="SIGTERM to SIGKILL grace period.")
    shutdown_stops_jobs: bool = False
    job_retention_days: float | None = Field(None, gt=0)
    max_finished_jobs: int | None = Field(None, ge=0)
    task_index: bool = Field(True, description="Build lm-eval's task index to validate tasks.")
    index_dir: Path | None = Field(None, description="Task index cache; default DATA_DIR/index.")
    use_launcher: bool = Field(True, description="Start jobs through the cached-index launcher.")

    # Security
    api_keys: CsvList = Field(
        default_factory=list,
        description="name:key entries (a bare key belongs to the principal 'default').",
    )
    api_keys_file: Path | None = None
    admin_keys: CsvList = Field(
        default_factory=list,
        description="name:key entries for admins, who see and act on every owner's jobs.",
    )
    lm_eval_paths: CsvList = Field(default_factory=list)
    allowed_paths: CsvList = Field(default_factory=list)
    allowed_env_vars: CsvList = Field(default_factory=list)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_queued_jobs: int = Field(10_000, ge=1)
    max_log_bytes: int = Field(100 * 1024 * 1024, ge=1024)  # per job and stream; tail kept
    allow_remote_code: bool = False
    max_env_vars: int = Field(64, ge=0)
    max_env_value_bytes: int = Field(32 * 1024, ge=1)

    # The job sandbox (runtime/sandbox.py): every job, warm worker and upload check runs in
    # its own namespaces through bubblewrap.
    sandbox: SandboxMode = Field(
        SandboxMode.auto,
        description="auto (use bubblewrap when it works here), bwrap (required: startup fails "
        "without it) or off (jobs run as the server's user, with its files in reach). A server "
        "with more than one principal refuses to start without a sandbox unless this is off.",
    )
    job_network: JobNetwork = Field(
        JobNetwork.host,
        description="host: sandboxed jobs share the host's network (API models need it); "
        "none: they get no network at all.",
    )
    task_check_cpu_s: int = Field(
        60, ge=1, description="CPU seconds the upload check process may use."
    )
    task_check_memory_mb: int = Field(
        4096, ge=256, description="Address space (MB) the upload check process may use."
    )
    task_check_file_mb: int = Field(
        64, ge=1, description="Largest file (MB) the upload check process may write."
    )
    task_check_slots: int = Field(
        4,
        ge=1,
        le=64,
        description="Upload checks run at once; one owner holds at most one of them.",
    )

    # Submission readiness and bounded work per request (POST /job): a submission never skips
    # the task-name check, and what one request can make the server do has a ceiling.
    index_wait_s: float = Field(
        30.0,
        ge=0,
        le=600,
        description="While the task index builds, a submission waits this long for it, then "
        "gets 503 with Retry-After.",
    )
    max_tasks_per_request: int = Field(1000, ge=1, description="Task names in one request.")
    max_task_patterns: int = Field(
        32, ge=0, description="Glob patterns (*, ?, [) among one request's task names."
    )
    max_include_entries: int = Field(
        10_000,
        ge=1,
        description="Directory entries walked, and YAML files read, under one include_path.",
    )
    max_body_depth: int = Field(16, ge=2, le=1000, description="Nesting of the JSON body.")
    max_body_values: int = Field(
        2000, ge=100, description="JSON values (keys, items, scalars) in one request body."
    )

    # HTTP boundary (Host check, cross-site refusal, slow clients, log followers)
    allowed_hosts: CsvList = Field(
        default_factory=list,
        description="Host header values the server answers to besides localhost, 127.0.0.1, "
        "::1 and the bound address (names or IPs, optional :port, '*.example.com' for "
        "subdomains, '*' for any).",
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a client may take to send a request body."
    )
    max_log_followers: int = Field(
        64, ge=1, description="Concurrent logs?follow=true streams; more get 429."
    )
    log_follow_idle_s: float = Field(
        900.0, gt=0, description="A follow stream ends after this long without new output."
    )
    log_follow_max_s: float = Field(
        6 * 3600.0, gt=0, description="A follow stream ends after this long in total."
    )

    @field_validator("allowed_hosts", mode="after")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        parse_rules(value)  # a ValueError names the bad entry
        return value

    # Job environment (lm_eval_server.runtime.job_env). ALLOWED_ENV_VARS above:
    # names or case-sensitive glob patterns a request's env_vars may set besides the defaults.
    job_env_passthrough: CsvList = Field(
        default_factory=lambda: list(job_env.DEFAULT_JOB_ENV_PASSTHROUGH),
        description="Names copied from the server's environment into every job's.",
    )
    jobs_offline: bool = Field(
        True,
        description="Jobs get HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (models, tokenizers "
        "and datasets from the cache only) unless their env_vars set them; false: jobs get "
        "only what JOB_ENV_PASSTHROUGH copies.",
    )

    @field_validator("job_env_passthrough", mode="before")
    @classmethod
    def _csv_passthrough(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _check_job_env(self) -> Settings:
        job_env.check_allowed_patterns(self.allowed_env_vars)
        job_env.check_passthrough(self.job_env_passthrough, type(self).model_fields)
        return self

    # Executors
    executor: ExecutorKind = ExecutorKind.local
    ray_address: str | None = None
    ray_job_runtime_env: dict[str, Any] | None = Field(
        None,
        description="Ray runtime_env (JSON object) for every job, e.g. a pip/uv spec. Its "
        "env_vars are set by Ray on the node; each job's own environment comes from job-env.json.",
    )
    ray_job_python: str | None = Field(
        None,
        description="Python that runs jobs on Ray nodes (e.g. `python` with a pip runtime_env); "
        "default: this server's interpreter, right for a local head or same-image nodes.",
    )
    ray_lost_after_s: float = Field(
        600.0,
        gt=0,
        description="Seconds the Ray cluster may be unreachable before a job it runs is Failed.",
    )
    warm_workers: int = Field(
        0, ge=0, description="Pre-started lm-eval processes that fork jobs (local executor)."
    )

    # Request -> argv boundary: remote/unsafe code, where model tokens may go
    allow_unsafe_code: bool = Field(
        False,
        description="Allow confirm_run_unsafe_code (tasks that execute model-written code); "
        "separate from ALLOW_REMOTE_CODE.",
    )
    model_url_prefixes: CsvList = Field(
        default_factory=list,
        description="When set, a base_url in model_args/metadata must start with one of "
        "these URLs (compared after normalisation).",
    )

    # Uploaded tasks (POST /tasks) and task discovery (GET /tasks)
    max_upload_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Whole body of POST /tasks (every file and the multipart framing); this "
        "route's cap in place of MAX_BODY_BYTES.",
    )
    max_upload_files: int = Field(
        16, ge=2, le=1000, description="Files in one task upload (the YAML and its data)."
    )
    max_uploaded_tasks: int = Field(100, ge=1, description="Uploaded tasks one owner may keep.")
    task_check_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds lm-eval may take to load an uploaded task in the check process.",
    )

    # Scheduling: quotas per principal, the fair queue, GPU slots for the local executor
    # (lm_eval_server.jobs.scheduler, lm_eval_server.jobs.gpus).
    max_queued_per_key: int | None = Field(
        None, ge=1, description="Queued jobs one principal may have; more get 429. Unset: no limit."
    )
    max_running_per_key: int | None = Field(
        None,
        ge=1,
        description="Running jobs one principal may have; their further jobs wait. Unset: none.",
    )
    fair_share_window_s: float = Field(
        3600.0,
        gt=0,
        description="The fair queue ranks owners by their jobs' running seconds in this window.",
    )
    gpus: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="GPU device ids local jobs are given (e.g. 0,1). Unset: the server's "
        "CUDA_VISIBLE_DEVICES, else nvidia-smi -L. Empty: no GPU slots.",
    )
    gpu_reserve_after_s: float = Field(
        600.0,
        ge=0,
        description="A job needing GPUs that has waited this long reserves them (no other "
        "job takes a GPU until it starts).",
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _csv_gpus(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("gpus", mode="after")
    @classmethod
    def _gpu_ids(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_gpu_ids(value)

    # Audit trail (GET /audit): who submitted, stopped or deleted what
    audit_retention_days: float | None = Field(
        None,
        gt=0,
        description="Audit entries older than this many days are removed (at startup and "
        "hourly); unset: kept for as long as the store.",
    )

    # Secrets by reference (team/job_secrets.py): a request's env_vars may name a file of
    # SECRETS_DIR instead of carrying a value; ALLOWED_SECRETS says who may name which.
    secrets_dir: Path | None = Field(
        None,
        description="One file per secret (name = secret, content = value), as Docker and "
        'Kubernetes mount them; env_vars may then say {"secret": "<name>"}.',
    )
    allowed_secrets: CsvList = Field(
        default_factory=list,
        description="secret:principal|principal or secret:* entries; unset, every key may use "
        "every secret in SECRETS_DIR.",
    )

    @field_validator("allowed_secrets", mode="before")
    @classmethod
    def _csv_secrets(cls, value: object) -> object:
        return _split_csv(value)

    # Where a secret may go: a secret reference is taken only by a credential variable
    # (job_env.CREDENTIAL_ENV_VARS) or by a name listed here for that secret.
    secret_env_vars: CsvList = Field(
        default_factory=list,
        description="secret:NAME|NAME entries (wandb:WANDB_API_KEY): environment variables, "
        "besides OPENAI_API_KEY, HF_TOKEN and the other credential variables, that the secret "
        "may go into. Each name must also be allowed by ALLOWED_ENV_VARS.",
    )

    @field_validator("secret_env_vars", mode="before")
    @classmethod
    def _csv_secret_env_vars(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        job_secrets.parse_allowed_secrets(self.allowed_secrets)
        job_secrets.parse_secret_env_vars(self.secret_env_vars, self.allowed_env_vars)
        if self.secret_env_vars and self.secrets_dir is None:
            raise ValueError("SECRET_ENV_VARS needs SECRETS_DIR (the directory of the secrets)")
        if self.secrets_dir is not None and not self.secrets_dir.is_dir():
            raise ValueError(f"SECRETS_DIR {self.secrets_dir} is not a directory")
        if self.allowed_secrets and self.secrets_dir is None:
            raise ValueError("ALLOWED_SECRETS needs SECRETS_DIR (the directory of the secrets)")
        return self

    def secret_policy(self) -> job_secrets.SecretPolicy:
        allowed = self.allowed_secrets
        return job_secrets.SecretPolicy(
            directory=self.secrets_dir.resolve() if self.secrets_dir is not None else None,
            allowed=job_secrets.parse_allowed_secrets(allowed) if allowed else None,
            max_bytes=self.max_env_value_bytes,
            env_names=job_secrets.parse_secret_env_vars(
                self.secret_env_vars, self.allowed_env_vars
            ),
        )

    # Webhooks (a job's callback_url): where job-end notifications may go, their signing key,
    # and how a delivery is retried. Off unless WEBHOOK_URL_PREFIXES is set.
    webhook_url_prefixes: CsvList = Field(
        default_factory=list,
        description="URLs a job's callback_url must start with (compared after "
        "normalisation); unset: callback_url is refused.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 in each webhook's X-Signature; required (at least "
        f"{MIN_WEBHOOK_SECRET_CHARS} characters) when WEBHOOK_URL_PREFIXES is set.",
    )
    webhook_max_attempts: int = Field(
        10, ge=1, le=100, description="Attempts per delivery before it is marked failed."
    )
    webhook_retry_base_s: float = Field(
        2.0, gt=0, le=3600, description="Wait before the first retry; doubles after each."
    )
    webhook_retry_max_s: float = Field(
        300.0, gt=0, le=86400, description="Longest wait between two attempts."
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="An attempt's whole time budget (connect to answer)."
    )
    webhook_concurrency: int = Field(
        4, ge=1, le=64, description="Deliveries in flight at once; the rest wait their turn."
    )

    @field_validator("webhook_url_prefixes", mode="before")
    @classmethod
    def _csv_webhook_prefixes(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("webhook_url_prefixes")
    @classmethod
    def _webhook_prefixes(cls, value: list[str]) -> list[str]:
        from lm_eval_server.admission.urls import normalise_url

        return [normalise_url(prefix, "WEBHOOK_URL_PREFIXES") for prefix in value]

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:
        # Unsigned webhooks would let anyone who can reach a receiver forge "Completed".
        if not self.webhook_url_prefixes:
            return self
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        if len(secret) < MIN_WEBHOOK_SECRET_CHARS:
            raise ValueError(
                "WEBHOOK_URL_PREFIXES is set, so WEBHOOK_SECRET must be too (at least "
                f"{MIN_WEBHOOK_SECRET_CHARS} characters, e.g. `openssl rand -hex 32`): every "
                "webhook is signed with it"
            )
        return self

    log_level: str = Field("INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    host_hint: str = Field("", description="Set by the CLI; used for the open-server warning.")

    @field_validator(
        "api_keys",
        "admin_keys",
        "lm_eval_paths",
        "allowed_paths",
        "allowed_env_vars",
        "allowed_hosts",
        "model_url_prefixes",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("model_url_prefixes")
    @classmethod
    def _url_prefixes(cls, value: list[str]) -> list[str]:
        from lm_eval_server.admission.urls import normalise_url

        return [normalise_url(prefix, "MODEL_URL_PREFIXES") for prefix in value]

    @model_validator(mode="after")
    def _load_key_file(self) -> Settings:
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text()
            except OSError as exc:
                raise ValueError(f"API_KEYS_FILE {self.api_keys_file}: {exc}") from exc
            keys = [line.strip() for line in text.splitlines()]
            self.api_keys = [*self.api_keys, *(k for k in keys if k and not k.startswith("#"))]
        self.key_table()  # a malformed or ambiguous key entry stops startup
        if self.executor is ExecutorKind.ray and not self.ray_address:
            raise ValueError("EXECUTOR=ray needs RAY_ADDRESS (e.g. http://head:8265)")
        if self.warm_workers and self.executor is not ExecutorKind.local:
            raise ValueError("WARM_WORKERS works with EXECUTOR=local only")
        if self.gpus is not None and self.executor is not ExecutorKind.local:
            raise ValueError("GPUS works with EXECUTOR=local only (Ray places jobs on GPUs)")
        if self.warm_workers and not self.use_launcher:
            raise ValueError("WARM_WORKERS needs USE_LAUNCHER=true (warm jobs run the launcher)")
        return self

    def key_table(self) -> dict[bytes, Principal]:
        """Every API key to the principal it names; empty when the server is open."""
        return key_table(
            (parse_entry(entry, "API_KEYS") for entry in self.api_keys),
            (parse_entry(entry, "ADMIN_KEYS") for entry in self.admin_keys),
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @property
    def default_lm_eval_path(self) -> str:
        return f"{sys.executable} -m lm_eval"

    @property
    def lm_eval_path_allowlist(self) -> list[str]:
        return self.lm_eval_paths or [self.default_lm_eval_path]

    @property
    def examples_dir(self) -> Path:
        # Shipped inside the package (`examples/` at the repository root links here), so an
        # installed server has them too.
        return Path(__file__).resolve().parent / "examples"

    @property
    def allowed_roots(self) -> list[Path]:
        if self.allowed_paths:
            return [Path(p).resolve() for p in self.allowed_paths]
        return [self.data_real, self.examples_dir]

    # Resume and reuse (docs/resume-and-cache.md): the server's response cache, and retries.
    response_cache: OnOff = Field(
        OnOff.on,
        description="on: jobs answer requests already computed for the same model fingerprint "
        "from the server's response cache, and store what they compute.",
    )
    response_cache_shared: bool = Field(
        False,
        description="Owners share one cache per model fingerprint (otherwise each owner has "
        "their own): one owner's jobs can then answer another's.",
    )
    response_cache_max_bytes: int = Field(
        10 * 1024**3,
        ge=0,
        description="Bytes all response cache files may hold; the least recently used "
        "fingerprint's file goes first.",
    )
    max_attempts: int = Field(
        5, ge=1, le=100, description="The most a request's max_attempts may ask for."
    )
    retry_backoff_max_s: float = Field(
        300.0,
        ge=0,
        description="An automatic retry waits 2^(attempt-1) s, at most this long.",
    )

    @property
    def response_cache_dir(self) -> Path:
        """Where jobs see the response cache: DATA_DIR/cache/responses (their owner's cache
        in the sandbox, or the shared one with RESPONSE_CACHE_SHARED)."""
        return self.cache_dir / "responses"

    @property
    def shared_response_cache_dir(self) -> Path:
        """The owners' shared response cache (RESPONSE_CACHE_SHARED with the sandbox on)."""
        return self.data_real / "shared-responses"

    @property
    def task_index_dir(self) -> Path:
        return self._resolved(self.index_dir or self.data_dir / "index")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.db"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def cache_dir(self) -> Path:
        """Jobs' shared caches (HF_HOME, lm-eval's request cache)."""
        return self.data_real / "cache"

    @property
    def owner_caches_dir(self) -> Path:
        """Each owner's own cache, mounted at `cache_dir` inside that owner's sandboxed jobs."""
        return self.data_real / "owner-cache"

    def owner_cache_dir(self, owner: str) -> Path:
        return self.owner_caches_dir / owner

    @property
    def warm_dir(self) -> Path:
        """The warm workers' own directory (their HOME and TMPDIR)."""
        return self.data_real / "warm"

    @property
    def tasks_dir(self) -> Path:
        """Uploaded tasks, DATA_DIR/tasks/<owner>/<task>/."""
        return self.data_real / "tasks"

    @property
    def server_owned_paths(self) -> list[Path]:
        """Everything under DATA_DIR the server writes itself: no job may write into them."""
        db = self.db_path.resolve()
        sidecars = [db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal")]
        return [
            self.jobs_dir.resolve(),
            self.task_index_dir,
            self.cache_dir,
            self.owner_caches_dir,
            self.shared_response_cache_dir,
            self.warm_dir,
            self.tasks_dir,
            db,
            *sidecars,
        ]


class SettingsError(SystemExit):
    """A bad setting at startup: exits with one line per problem, naming the variable, and no
    traceback (SystemExit prints its message and nothing else)."""


def describe_errors(exc: ValidationError) -> str:
    """One line per problem: the variable (upper case, as it is set) and what is wrong."""
    lines = []
    see = " (settings: docs/configuration.md)"
    for error in exc.errors(include_url=False, include_input=False):
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
        name = loc[0].upper() if loc else None
        # A model check names its variables itself ("JOB_ENV_PASSTHROUGH: ...").
        if name is None or message.upper().startswith(name):
            lines.append(f"bad setting: {message}{see}")
        else:
            lines.append(f"bad setting {name}: {message}{see}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and `overrides`), or SettingsError naming what is wrong."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None
    # Made here, not first at startup: a DATA_DIR that cannot be made is a bad setting too
    # (one line naming it), not a traceback from the server's lifespan.
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(
            f"bad setting DATA_DIR: cannot create {settings.data_dir} ({reason}); set DATA_DIR "
            "to a directory this user can create or write (settings: docs/configuration.md)"
        ) from None
    return settings
