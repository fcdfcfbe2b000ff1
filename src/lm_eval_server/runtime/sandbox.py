"""The job sandbox: the bubblewrap (`bwrap`) command line that confines one job's process tree.

Code a job runs is treated as hostile (task templates, `!function`, metrics, code tasks that run
what a model wrote, remote-code models): it runs in its own user, mount, PID, IPC and UTS
namespaces, as uid/gid 65534 with no capabilities, and sees

- the system (`/usr` and its merged-/usr links, an allowlist of `/etc`, `/sys`), the Python
  installation, the virtualenv and this package, read-only;
- the `read_only` paths of its view (ALLOWED_PATHS, the task index, its owner's uploads);
- nothing of the `hidden` paths (DATA_DIR, SECRETS_DIR): an empty read-only directory instead,
  with only what its view binds back on top;
- its owner's cache, mounted where every job expects the shared cache (so a warm worker's
  environment is the same for every owner), and its own job directory, writable;
- a private `/proc` (its own PID namespace: it cannot signal, trace or read the environment of
  the server or another job), a minimal `/dev`, empty `/tmp` and `/dev/shm`;
- the host network unless `network` is False.

Everything else of the file system is absent. bwrap's own process is the supervisor's child;
`--die-with-parent` ends the sandbox with it, and when the job's first process ends, the PID
namespace ends with it, so nothing a job started outlives it. The session is the supervisor's
(started with `setsid`, no controlling terminal): there is no terminal to push input into.

Stdlib only: the supervisor, the warm workers and Ray's nodes build or run these command lines.
"""

from __future__ import annotations

import functools
import glob
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

SANDBOX_UID = 65534  # "nobody" inside the user namespace
# Top-level system directories, bound read-only (or recreated as the symlinks they are).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
# What of /etc a job needs: name resolution, TLS roots, users, time zone, the loader's cache.
# An allowlist: /etc also holds the machine's credentials (shadow, ssh host keys, ...).
ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "fonts",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "pki",
    "protocols",
    "resolv.conf",
    "services",
    "ssl",
    "timezone",
)
# Accelerators, when the machine has them: a job given GPUs must reach their device nodes.
DEVICE_GLOBS = ("/dev/nvidia*", "/dev/dri", "/dev/kfd")
PROBE_TIMEOUT_S = 20.0


class SandboxMode(StrEnum):
    auto = "auto"
    bwrap = "bwrap"
    off = "off"


@dataclass(frozen=True)
class View:
    """What one sandboxed process tree may see. Paths are absolute and resolved."""

    work_dir: str  # writable; the working directory
    writable: tuple[str, ...] = ()  # other writable directories (a request's own output_path)
    read_only: tuple[str, ...] = ()  # ALLOWED_PATHS: bound before the hidden paths go
    hidden: tuple[str, ...] = ()  # DATA_DIR, SECRETS_DIR: emptied, read-only
    # Bound read-only after the hidden paths are emptied: the task index, the owner's uploads,
    # the paths a request names inside DATA_DIR that are not the server's.
    given_back: tuple[str, ...] = ()
    # (source, target), read-only: a path as the request or ALLOWED_PATHS typed it, through a
    # symlink, shown at that name (examples/ -> src/lm_eval_server/examples).
    aliases: tuple[tuple[str, str], ...] = ()
    # (source, target), writable: the owner's cache in place of the shared cache directory.
    remaps: tuple[tuple[str, str], ...] = ()
    network: bool = True
    # Empty writable tmpfs mounts, private to this sandbox, made right after the hidden paths
    # are emptied: a warm worker's DATA_DIR/jobs, where its one job links its directory in
    # (executors.warm_pool).
    scratch: tuple[str, ...] = ()


@functools.cache
def _python_paths() -> tuple[str, ...]:
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [sys.base_prefix, sys.prefix, package_root]
    resolved = [os.path.realpath(p) for p in paths]
    return tuple(_unique([*paths, *resolved]))


def python_paths() -> list[str]:
    """The interpreter, the virtualenv and this package's source tree (an editable install):
    found once (three realpaths, asked for at every job's launch), they do not move while the
    server runs."""
    return list(_python_paths())


def _unique(paths: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for path in paths:
        seen.setdefault(os.path.normpath(path), None)
    return list(seen)


@functools.cache
def _system_mounts() -> tuple[str, ...]:
    """The system directories and /etc entries as this machine has them: read once (a dozen
    lookups per job's launch otherwise); devices are looked for at each launch."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in ETC_ENTRIES:
        path = os.path.join("/etc", name)
        if os.path.lexists(path):
            args += ["--ro-bind-try", path, path]
    return tuple(args)


def _system_args() -> list[str]:
    args = list(_system_mounts())
    args += ["--ro-bind-try", "/sys", "/sys"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--tmpfs", "/tmp"]
    for pattern in DEVICE_GLOBS:
        for device in sorted(glob.glob(pattern)):
            args += ["--dev-bind-try", device, device]
    return args


def command(
    view: View, argv: Sequence[str], bwrap: str = "bwrap", as_pid_1: bool = False
) -> list[str]:
    """`bwrap [options] -- argv`: argv run inside the view. Later mounts go over earlier ones,
    so the order is: system, Python, read-only paths, hidden paths emptied (and the scratch
    tmpfs mounts made), then what the view gives back inside them (re-exposed and read-only
    again, the owner's cache, the job's own directories), and last the hidden paths and the
    root made read-only.

    `as_pid_1`: argv itself is the PID namespace's init (`--as-pid-1`, in place of bwrap's
    own), so the kernel ends everything in the sandbox exactly when argv ends, whatever its
    parent does; `--die-with-parent` is left out. For a warm worker, whose parent is the server
    while the job it runs must outlive a server restart, as a cold job does (with bwrap's init,
    what a job left behind would outlive the worker unless bwrap died with its parent)."""
    args = [
        bwrap,
        "--unshare-user",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "lm-eval-job",
        *(["--as-pid-1"] if as_pid_1 else ["--die-with-parent"]),
        "--cap-drop",
        "ALL",
    ]
    if not view.network:
        args.append("--unshare-net")
    args += _system_args()
    for path in python_paths():
        args += ["--ro-bind", path, path]
    for path in view.read_only:
        args += ["--ro-bind-try", path, path]
    for path in view.hidden:
        if os.path.isdir(path):
            args += ["--perms", "0555", "--tmpfs", path]
        elif os.path.lexists(path):
            args += ["--ro-bind", os.devnull, path]
    for path in view.scratch:
        args += ["--perms", "0700", "--tmpfs", path]
    for path in view.given_back:
        args += ["--ro-bind-try", path, path]
    for source, target in view.aliases:
        args += ["--ro-bind-try", source, target]
    for source, target in view.remaps:
        args += ["--bind", source, target]
    for path in (view.work_dir, *view.writable):
        args += ["--bind", path, path]
    for path in view.hidden:
        if os.path.isdir(path):
            args += ["--remount-ro", path]
    args += ["--remount-ro", "/", "--chdir", view.work_dir, "--"]
    # bwrap sets PWD for its command, after any --unsetenv: a job's environment is exactly what
    # the server built (job_env), so `env -u PWD` takes it out again.
    return [*args, *UNSET_PWD, *argv]


UNSET_PWD = ("/usr/bin/env", "-u", "PWD", "--") if os.path.exists("/usr/bin/env") else ()


def _inside_any(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def program_dirs(commands: Iterable[str]) -> list[str]:
    """The directories of the files the operator's LM_EVAL_PATHS commands name (a script and
    the modules beside it): a job must be able to run the command it was allowed."""
    found = []
    for line in commands:
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for word in words:
            if os.path.isabs(word) and os.path.isfile(word):
                found.append(os.path.dirname(os.path.realpath(word)))
    return _unique(found)


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def probe(bwrap: str | None, scratch_dir: str) -> str | None:
    """Why the sandbox does not work here, or None when a sandboxed Python runs. `scratch_dir`:
    an empty directory to use as the probe's job directory."""
    if bwrap is None:
        return "bwrap (Debian/Ubuntu package bubblewrap) is not installed or not on PATH"
    view = View(work_dir=os.path.realpath(scratch_dir))
    check = "import os; os.getuid() == 65534 or exit(3); open('probe', 'w').write('ok')"
    argv = command(view, [sys.executable, "-I", "-S", "-c", check], bwrap)
    try:
        done = subprocess.run(
            argv,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{bwrap} did not run: {exc}"
    if done.returncode != 0:
        why = " ".join(done.stderr.decode(errors="replace").split())[-500:] or "no message"
        return (
            f"{bwrap} could not start a sandboxed process (exit code {done.returncode}: {why}); "
            "user namespaces may be disabled (kernel.unprivileged_userns_clone, "
            "user.max_user_namespaces) or forbidden by a container runtime's seccomp profile"
        )
    try:
        with open(os.path.join(scratch_dir, "probe")) as result:
            if result.read() != "ok":
                return "the sandboxed probe could not write its directory"
    except OSError:
        return "the sandboxed probe could not write its directory"
    return None


# ----------------------------------------------------------------- the server's side


class SandboxUnavailable(RuntimeError):
    """The sandbox is required (SANDBOX=bwrap, or named keys) and does not work here."""


@dataclass(frozen=True)
class Sandbox:
    """The mode in force, decided once at startup; `reason` says why it is off, if it is."""

    mode: SandboxMode  # bwrap or off
    bwrap: str | None = None
    reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode is SandboxMode.bwrap

    def wrap(self, view: View | None, argv: Sequence[str]) -> list[str]:
        if view is None or not self.enabled:
            return list(argv)
        return command(view, argv, self.bwrap or "bwrap")

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode.value, "reason": self.reason}


OFF = Sandbox(SandboxMode.off, reason="SANDBOX=off")


def resolve(requested: SandboxMode, principals: int, scratch_dir: str) -> Sandbox:
    """The sandbox in force for `requested`; SandboxUnavailable when it is required and the
    probe fails. `principals`: how many named keys the server has."""
    if requested is SandboxMode.off:
        return OFF
    bwrap = find_bwrap()
    problem = probe(bwrap, scratch_dir)
    if problem is None:
        return Sandbox(SandboxMode.bwrap, bwrap=bwrap)
    if requested is SandboxMode.bwrap:
        raise SandboxUnavailable(f"SANDBOX=bwrap, but the job sandbox does not work: {problem}")
    if principals > 1:
        raise SandboxUnavailable(
            f"this server has {principals} principals (named keys), and their jobs must not "
            f"reach each other, but the job sandbox does not work: {problem}. Install "
            "bubblewrap (apt-get install bubblewrap) and allow user namespaces, or set "
            "SANDBOX=off to run every job as the server's user (see docs/security.md)"
        )
    return Sandbox(SandboxMode.off, reason=f"SANDBOX=auto and {problem}")


class ViewSettings(Protocol):
    """The settings a job's view is built from (config.Settings has them)."""

    data_dir: Path
    secrets_dir: Path | None
    api_keys_file: Path | None

    allowed_paths: list[str]

    @property
    def allowed_roots(self) -> list[Path]: ...

    @property
    def lm_eval_path_allowlist(self) -> list[str]: ...

    @property
    def task_index_dir(self) -> Path: ...

    @property
    def cache_dir(self) -> Path: ...

    @property
    def tasks_dir(self) -> Path: ...

    @property
    def server_owned_paths(self) -> list[Path]: ...

    def owner_cache_dir(self, owner: str) -> Path: ...

    @property
    def response_cache_shared(self) -> bool: ...

    @property
    def shared_response_cache_dir(self) -> Path: ...


# job_env's HF_HOME and LM_HARNESS_CACHE_PATH, and the server's response cache (its
# RESPONSE_CACHE_DIR_NAME, where the shared one is mounted with RESPONSE_CACHE_SHARED).
CACHE_SUBDIRS = ("huggingface", "lm_eval", "responses")
RESPONSE_CACHE_DIR_NAME = "responses"


class Views:
    """What each kind of sandboxed process may see, from the settings."""

    def __init__(self, settings: ViewSettings, network: bool = True) -> None:
        self._settings = settings
        self.network = network
        data_dir = str(settings.data_dir.resolve())
        private = [str(p) for p in settings.server_owned_paths]
        hidden = [data_dir]
        for extra in (settings.secrets_dir, settings.api_keys_file):
            if extra is not None:
                hidden.append(str(extra.resolve()))
                private.append(str(extra.resolve()))
        self._hidden = tuple(_unique(hidden))
        self._private = tuple(private)
        roots = [str(r) for r in settings.allowed_roots]
        roots += program_dirs(settings.lm_eval_path_allowlist)
        self._roots = tuple(roots)
        # ALLOWED_PATHS as typed, where a symlink makes it differ from the resolved root.
        self._root_aliases = tuple(
            (os.path.realpath(p), os.path.abspath(p))
            for p in settings.allowed_paths
            if os.path.realpath(p) != os.path.abspath(p)
        )
        # An allowed root inside a hidden path is given back after the hiding, unless it is,
        # or holds, one of the server's own paths.
        self._roots_before = tuple(r for r in roots if not _inside_any(r, self._hidden))
        self._roots_after = tuple(
            r
            for r in roots
            if _inside_any(r, self._hidden)
            and not any(_inside_any(p, [r]) or _inside_any(r, [p]) for p in self._private)
        )

    def _given_back(self, owner: str | None) -> list[str]:
        back = [str(self._settings.task_index_dir), *self._roots_after]
        if owner is not None:
            back.append(str(self._settings.tasks_dir / owner))
        return _unique(back)

    def named(
        self, paths: Iterable[str], others: Sequence[str]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """What of the paths a request names (include_path, a task file, a local model) its
        job may see read-only: those that resolve inside ALLOWED_PATHS, never into the server's
        own files or another owner's write targets. Returns (given back inside the hidden
        paths, aliases for names that reach their target through a symlink)."""
        back: list[str] = []
        aliases: list[tuple[str, str]] = []
        for name in paths:
            typed, resolved = os.path.abspath(name), os.path.realpath(name)
            if not _inside_any(resolved, self._roots):
                continue
            if any(_inside_any(resolved, [p]) or _inside_any(p, [resolved]) for p in others):
                continue
            if _inside_any(resolved, self._private) or _inside_any(typed, self._private):
                continue
            if _inside_any(resolved, self._hidden):
                back.append(resolved)
            if typed != resolved:
                aliases.append((resolved, typed))
        return back, aliases

    def owner_cache(self, owner: str) -> tuple[str, str]:
        """(the owner's cache, where it is mounted); creates the owner's cache directories."""
        source = self._settings.owner_cache_dir(owner)
        for sub in CACHE_SUBDIRS:
            (source / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self._settings.cache_dir
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        return str(source), str(target)

    def cache_remaps(self, owner: str) -> tuple[tuple[str, str], ...]:
        """The owner's cache at the cache directory; with RESPONSE_CACHE_SHARED, the owners'
        shared response cache over its responses/ (mounted after it, so inside it)."""
        source, target = self.owner_cache(owner)
        if not self._settings.response_cache_shared:
            return ((source, target),)
        shared = self._settings.shared_response_cache_dir
        shared.mkdir(mode=0o700, parents=True, exist_ok=True)
        return ((source, target), (str(shared), os.path.join(target, RESPONSE_CACHE_DIR_NAME)))

    def job(
        self,
        owner: str,
        work_dir: Path,
        writable: Iterable[Path] = (),
        read_only: Iterable[Path] = (),
        network: bool | None = None,
        named: Iterable[str] = (),
        others: Iterable[Path] = (),
    ) -> View:
        """A job's view: its own directory and `writable` (a request's own output_path),
        its owner's cache and uploads, the task index and ALLOWED_PATHS read-only, the paths
        its request `named` (`Views.named`), and nothing of `others`: the directories other
        owners' jobs write outside their own (emptied like DATA_DIR)."""
        other_dirs = [str(p) for p in others if p.is_dir()]
        named_back, aliases = self.named(named, other_dirs)
        return View(
            work_dir=str(work_dir.resolve()),
            writable=tuple(str(p.resolve()) for p in writable),
            read_only=self._roots_before,
            hidden=tuple(_unique([*self._hidden, *other_dirs])),
            given_back=tuple(
                _unique(
                    [
                        *self._given_back(owner),
                        *(str(p.resolve()) for p in read_only),
                        *named_back,
                    ]
                )
            ),
            aliases=(*self._root_aliases, *aliases),
            remaps=self.cache_remaps(owner),
            network=self.network if network is None else network,
        )
