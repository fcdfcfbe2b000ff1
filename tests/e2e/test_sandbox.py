"""The job sandbox, attacked from inside: code that already runs in a job (an allowlisted
`lm_eval_path` script, an uploaded task's `!function` inside a real lm_eval job, the same code
in the upload check) tries to write the task index, the venv and the source tree; to read
jobs.db, another owner's running job, uploads and cache, SECRETS_DIR, the API key file and the
server's environment; to see, trace and kill the server and the other job; and to leave a
process behind. Each attempt is recorded by tests/data/sandbox_attack/attack.py and asserted
to have failed here, then checked from the host: nothing landed, the server and the other job
went on. Then what lies beside the sandbox's walls: links the job plants in its own
directory for the supervisor and the server (outside the sandbox) to follow, and another
owner's output_path under ALLOWED_PATHS. Also: the upload check's CPU/memory/file limits
against another owner's upload, JOB_NETWORK, and startup without a working bwrap. Real server
processes, real lm_eval; the attack and victim programs are tests/data/sandbox_attack/."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import lm_eval_server
from tests.support.jobs import (
    DEFAULT_LM_EVAL,
    DUMMY_JOB,
    ROOT,
    TERMINAL,
    process_alive,
    submit,
    wait_for,
)
from tests.support.server import ServerProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("bwrap") is None and not os.environ.get("CI"),
        reason="needs bubblewrap (/usr/bin/bwrap, Debian package bubblewrap); CI installs it",
    ),
]

ATTACK_DIR = ROOT / "tests" / "data" / "sandbox_attack"
ATTACK = f"{sys.executable} {ATTACK_DIR / 'attack.py'}"
VICTIM = f"{sys.executable} {ATTACK_DIR / 'victim.py'}"
PACKAGE_DIR = Path(lm_eval_server.__file__).resolve().parent
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])

ALICE = "alice-key-" + secrets.token_hex(8)  # the attacker: an ordinary key
BOB = "bob-key-" + secrets.token_hex(8)  # the other owner
ROOT_KEY = "root-key-" + secrets.token_hex(8)
CAROL = "carol-key-" + secrets.token_hex(8)  # only in API_KEYS_FILE
ZERO_CAPS = "0000000000000000"


def secret_of(token: str) -> str:
    """What the victim keeps (tests/data/sandbox_attack/victim.py's secret_of)."""
    return "victim-secret-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------- the world


class World:
    """A server with named keys, a key file, SECRETS_DIR, its task index in DATA_DIR/index,
    ALLOW_REMOTE_CODE, and the attack and victim programs allowlisted."""

    def __init__(self, tmp_path: Path, index_dir: Path) -> None:
        self.tmp = tmp_path.resolve()
        self.data = self.tmp / "data"
        self.data.mkdir()
        # The index in DATA_DIR, as a default server has it (the test's own copy: the
        # attack may try to replace its files).
        self.index = self.data / "index"
        shutil.copytree(index_dir, self.index, symlinks=True)
        self.secrets_dir = self.tmp / "secrets"
        self.secrets_dir.mkdir(mode=0o700)
        self.secret = f"sk-live-{secrets.token_hex(16)}"
        (self.secrets_dir / "openai").write_text(self.secret + "\n")
        self.key_file = self.tmp / "keys"
        self.key_file.write_text(f"carol:{CAROL}\n")
        self.token = secrets.token_hex(6)  # names what the attack creates
        self.victim_token = "victim-" + secrets.token_hex(12)
        self.bob_token = "bob-upload-" + secrets.token_hex(12)
        self.clients: list[httpx.Client] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "API_KEYS": f"alice:{ALICE},bob:{BOB}",
            "ADMIN_KEYS": f"root:{ROOT_KEY}",
            "API_KEYS_FILE": str(self.key_file),
            "SECRETS_DIR": str(self.secrets_dir),
            "ALLOW_REMOTE_CODE": "true",
            "LM_EVAL_PATHS": f"{DEFAULT_LM_EVAL},{ATTACK},{VICTIM}",
            "ALLOWED_ENV_VARS": "SANDBOX_TEST_*",
            "INDEX_DIR": str(self.index),
            "MAX_CONCURRENCY": "6",
            **extra,
        }

    def start(self, index_dir: Path, **extra: str) -> ServerProcess:
        server = ServerProcess(self.data, index_dir, **self.env(**extra)).start()
        self.server = server
        return server

    def client(self, key: str | None = None) -> httpx.Client:
        headers = auth(key) if key else {}
        made = httpx.Client(base_url=self.server.url, timeout=60, headers=headers)
        self.clients.append(made)
        return made

    def leaks(self) -> list[str]:
        """What the attack must never get hold of."""
        return [
            self.secret,
            ALICE,
            BOB,
            ROOT_KEY,
            CAROL,
            self.victim_token,
            secret_of(self.victim_token),
            self.bob_token,
            "SQLite format 3",
        ]

    def index_digest(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.index)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.index.rglob("*"))
            if p.is_file()
        }


@pytest.fixture
def world(tmp_path: Path, index_dir: Path) -> Iterator[World]:
    made = World(tmp_path, index_dir)
    yield made
    for client in made.clients:
        client.close()
    server = getattr(made, "server", None)
    if server is not None:
        for path in made.data.glob("jobs/*"):
            (path / "release").touch()  # let held jobs end
        server.stop_jobs_and_terminate()


def victim_job(token: str, **env: Any) -> dict[str, Any]:
    return {
        **DUMMY_JOB,
        "lm_eval_path": VICTIM,
        "env_vars": {"SANDBOX_TEST_VICTIM_TOKEN": token, **env},
    }


def attack_job(plan: dict[str, Any]) -> dict[str, Any]:
    return {
        **DUMMY_JOB,
        "lm_eval_path": ATTACK,
        "env_vars": {"SANDBOX_TEST_PLAN": json.dumps(plan)},
    }


def wait_path(path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def host_processes(needle: str) -> dict[int, str]:
    """Host processes whose command line holds `needle`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline and process_alive(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


def job_processes(work_dir: Path, program: str) -> dict[str, int]:
    """The host pids of a running job: its supervisor, bwrap's processes, the program."""
    found: dict[str, int] = {}
    for pid, cmdline in sorted(host_processes(str(work_dir)).items()):
        if program not in cmdline:
            continue
        first = cmdline.split(" ", 1)[0]
        if "supervise.py" in cmdline.split(" -- ", 1)[0]:
            found["supervisor"] = pid
        elif first.endswith("bwrap"):
            found[f"bwrap {len([k for k in found if k.startswith('bwrap')])}"] = pid
        else:
            found["program"] = pid
    assert {"supervisor", "program"} <= set(found), found
    return found


def wait_heartbeat_stops(beat: Path, marker: str) -> None:
    """The sleeper the attack left beat at least once, stopped beating when its job ended,
    and no process of it is left on the host."""
    assert beat.is_file(), f"the sleeper never beat ({beat})"
    time.sleep(0.5)  # the sandbox's teardown is asynchronous to the job's end by a few ms
    before = beat.read_text()
    time.sleep(1.0)  # ten beats, were it alive
    assert beat.read_text() == before, f"{beat} still beats: a process outlived its job"
    assert host_processes(marker) == {}, "the sleeper is still running on the host"


# ---------------------------------------------------------------------- judging a report


def assert_confined(
    report: dict[str, Any], world: World, where: str, own_jobs: set[str] = frozenset()
) -> None:
    """Every attempt of one report failed. `own_jobs`: the attacker's own job ids, which a
    listing of DATA_DIR/jobs may show (the mount point of its own directory)."""
    assert report.get("done"), f"{where}: the attack did not run to its end: {report}"
    ident = report["identity"]
    assert (ident["uid"], ident["gid"], ident["euid"]) == (65534, 65534, 65534), ident
    assert ident["CapEff"] == ZERO_CAPS and ident["CapPrm"] == ZERO_CAPS, ident
    assert ident["hostname"] == "lm-eval-job"
    attempts = report["attempts"]
    got_through = []
    for name, outcome in attempts.items():
        if name in ("list /proc", "sleeper", "kill -1"):
            continue
        if not outcome["ok"]:
            continue
        # A read that works but finds an empty stand-in (an emptied directory, /dev/null
        # over the key file) found nothing.
        if outcome.get("op") in ("read", "list") and outcome.get("got") in ("", []):
            continue
        if name == "jobs dir" and set(outcome["got"]) <= own_jobs:
            continue
        got_through.append((name, outcome))
    assert got_through == [], f"{where}: attempts that got through: {got_through}"
    # The server and the other job are not even visible.
    seen = attempts["list /proc"]
    for pid, cmdline in seen["processes"].items():
        for needle in ("uvicorn", "supervise.py", "victim.py", "lm_eval_server.app"):
            assert needle not in (cmdline or ""), f"{where}: sees {pid}: {cmdline}"
    environs = json.dumps(seen["environs"])
    assert "API_KEYS" not in environs and "ADMIN_KEYS" not in environs
    text = json.dumps(report)
    for value in world.leaks():
        assert value not in text, f"{where}: the report holds {value[:20]}..."
    assert attempts["sleeper"]["ok"], f"{where}: the sleeper never started"


def write_targets(world: World, victim_dir: Path) -> dict[str, list[str]]:
    data, index = world.data, world.index
    token = f"{world.token}-{{phase}}"
    names = index / "task_index"
    writes: dict[str, list[str]] = {
        "index: new file": ["create", str(names / token)],
        "index: new dir": ["mkdir", str(names / f"{token}.d")],
    }
    for path in sorted(p for p in names.iterdir() if p.is_file()):
        writes[f"index: open {path.name}"] = ["open", str(path)]
        writes[f"index: replace {path.name}"] = ["replace", str(path)]
        writes[f"index: unlink {path.name}"] = ["unlink", str(path)]
    writes |= {
        "venv: new .pth": ["create", str(SITE_PACKAGES / f"{token}.pth")],
        "venv: open lm_eval": ["open", str(SITE_PACKAGES / "lm_eval" / "__init__.py")],
        "venv: new in bin": ["create", f"{sys.prefix}/bin/{token}"],
        "python: new module": [
            "create",
            str(Path(sysconfig.get_paths()["stdlib"]) / f"{token}.py"),
        ],
        "source: new module": ["create", str(PACKAGE_DIR / f"{token}.py")],
        "source: open supervise.py": ["open", str(PACKAGE_DIR / "supervise.py")],
        "source: open sandbox.py": ["open", str(PACKAGE_DIR / "sandbox.py")],
        "repo: tests/data": ["create", str(ROOT / "tests" / "data" / token)],
        "DATA_DIR: new file": ["create", str(data / token)],
        "jobs.db: open": ["open", str(data / "jobs.db")],
        "other job: new file": ["create", str(victim_dir / token)],
        "other job: open its secret": ["open", str(victim_dir / "victim-secret.txt")],
        "other owner's uploads: new file": ["create", str(data / "tasks" / "bob" / token)],
        "other owner's cache: new file": ["create", str(data / "owner-cache" / "bob" / token)],
        "SECRETS_DIR: new file": ["create", str(world.secrets_dir / token)],
        "key file: open": ["open", str(world.key_file)],
    }
    return writes


def created_paths(writes: dict[str, list[str]], phases: list[str]) -> list[Path]:
    return [
        Path(path.replace("{phase}", phase))
        for op, path in writes.values()
        if op in ("create", "mkdir")
        for phase in phases
    ]


def read_targets(world: World, victim_dir: Path) -> dict[str, list[str]]:
    data = world.data
    bob_task = data / "tasks" / "bob" / "bob_private"
    return {
        "jobs.db": ["read", str(data / "jobs.db")],
        "jobs.db-wal": ["read", str(data / "jobs.db-wal")],
        "jobs dir": ["list", str(data / "jobs")],
        "other job's dir": ["list", str(victim_dir)],
        "other job's secret": ["read", str(victim_dir / "victim-secret.txt")],
        "other job's results": ["read", str(victim_dir / "results/victim/results_victim.json")],
        "other job's stdout": ["read", str(victim_dir / "stdout.log")],
        "other owner's uploads": ["list", str(data / "tasks" / "bob")],
        "other owner's task yaml": ["read", str(bob_task / "bob_private.yaml")],
        "other owner's task data": ["read", str(bob_task / "bob.jsonl")],
        "other owner's cache": ["list", str(data / "owner-cache" / "bob")],
        "owner caches": ["list", str(data / "owner-cache")],
        "SECRETS_DIR": ["list", str(world.secrets_dir)],
        "secret": ["read", str(world.secrets_dir / "openai")],
        "key file": ["read", str(world.key_file)],
        "server log": ["read", str(world.server.log_path)],
        "/etc/shadow": ["read", "/etc/shadow"],
    }


BOB_TASK = """\
task: bob_private
dataset_path: json
dataset_kwargs:
  data_files:
    test: bob.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: exact_match
"""

ATTACK_TASK = """\
task: sandbox_attack
dataset_path: json
custom_dataset: !function attack.load
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def upload(http: httpx.Client, key: str, files: dict[str, str | bytes]) -> httpx.Response:
    sent = [
        ("files", (name, content if isinstance(content, bytes) else content.encode()))
        for name, content in files.items()
    ]
    return http.post("/tasks", files=sent, headers=auth(key), timeout=300)


# ---------------------------------------------------------------------- the attack


def test_code_inside_a_job_reaches_nothing_of_the_server_other_jobs_or_owners(
    world: World, index_dir: Path
) -> None:
    server = world.start(index_dir)
    http = world.client()
    ready = http.get("/ready", headers=auth(ROOT_KEY)).json()
    assert ready["sandbox"]["mode"] == "bwrap", ready
    index_before = world.index_digest()

    # Bob: an upload of his own, and a job that keeps a secret while it runs (with a real
    # secret of SECRETS_DIR in its environment).
    bob_data = json.dumps({"question": world.bob_token, "answer": "lol"}) + "\n"
    with ThreadPoolExecutor(4) as pool:
        bob_upload = pool.submit(upload, http, BOB, {"bob.yaml": BOB_TASK, "bob.jsonl": bob_data})
        victim_id = submit(
            http,
            victim_job(world.victim_token, OPENAI_API_KEY={"secret": "openai"}),
            headers=auth(BOB),
        )
        victim_dir = world.data / "jobs" / str(victim_id)
        wait_path(victim_dir / "ready")
        assert bob_upload.result().status_code == 201, bob_upload.result().text
    victim = job_processes(victim_dir, "victim.py")
    victim_files = {
        p: p.read_bytes() for p in victim_dir.rglob("*") if p.is_file() and "log" not in p.name
    }
    server_pid = server.proc.pid  # type: ignore[union-attr]
    targets = {"server": server_pid, **{f"other job's {k}": v for k, v in victim.items()}}
    writes = write_targets(world, victim_dir)
    plan: dict[str, Any] = {
        "token": world.token,
        "writes": writes,
        "reads": read_targets(world, victim_dir),
        "environ": targets,
        "ptrace": targets,
        "kill": targets,
        "killpg": {
            "server's group": os.getpgid(server_pid),
            "other job's group": victim["supervisor"],
        },
        "kill_all": True,
        "sleeper": True,
    }

    # Alice's code, three ways in at once: her lm_eval_path script, her uploaded task's
    # custom_dataset when the upload is checked, and the same in a real lm_eval job.
    with ThreadPoolExecutor(4) as pool:
        script_id = submit(http, attack_job({**plan, "phase": "script"}), headers=auth(ALICE))
        attack_files = {
            "attack.yaml": ATTACK_TASK,
            "attack.py": (ATTACK_DIR / "attack.py").read_text(),
            "plan.json": json.dumps(plan),
        }
        created = pool.submit(upload, http, ALICE, attack_files).result()
        assert created.status_code == 201, created.text
        task_id = submit(http, {"model": "dummy", "tasks": "sandbox_attack"}, headers=auth(ALICE))
        alice = world.client(ALICE)
        script_job = pool.submit(wait_for, alice, script_id, TERMINAL, 120)
        task_job = pool.submit(wait_for, alice, task_id, TERMINAL, 240)
        finished = {"script": script_job.result(), "job": task_job.result()}

    # The attacker's own jobs end with a status: the script's (exit 0) and lm_eval's.
    assert finished["script"]["status"] == "Completed", finished["script"]
    assert finished["job"]["status"] == "Completed", finished["job"]
    cache = world.data / "owner-cache" / "alice"
    reports = {
        "script": json.loads(
            (world.data / "jobs" / str(script_id) / "attack-report-script.json").read_text()
        ),
        "check": json.loads((cache / "attack-report-check.json").read_text()),
        "job": json.loads(
            (world.data / "jobs" / str(task_id) / "attack-report-job.json").read_text()
        ),
    }
    for phase, report in reports.items():
        assert_confined(report, world, phase, {str(script_id), str(task_id)})
        wait_heartbeat_stops(cache / f"heartbeat-{phase}", f"sandbox-sleeper-{world.token}")
    # The uploaded code did try its own stored upload, which is the server's.
    assert set(reports["job"]["attempts"]) >= {"own upload", "own upload yaml"}

    # From the host: nothing landed, and everyone else went on.
    phases = list(reports)
    landed = [p for p in created_paths(writes, phases) if p.exists() or p.is_symlink()]
    assert landed == [], landed
    assert world.index_digest() == index_before
    assert http.get("/health").status_code == 200 and server.proc.poll() is None  # type: ignore[union-attr]
    assert all(process_alive(pid) for pid in victim.values()), victim
    assert http.get(f"/job/{victim_id}", headers=auth(BOB)).json()["status"] == "Running"
    assert {p: p.read_bytes() for p in victim_files} == victim_files
    assert sorted(p.name for p in (world.data / "tasks" / "bob").iterdir()) == ["bob_private"]
    (victim_dir / "release").touch()
    done = wait_for(world.client(BOB), victim_id, TERMINAL, 60)
    assert done["status"] == "Completed", done
    assert "victim: intact\n" in done["stdout"]


# ---------------------------------------------------------------------- the confused deputy


def served(http: httpx.Client, job_id: int, task: str) -> dict[str, bytes]:
    """Everything the server shows its owner of a job's files."""
    out = {"job": http.get(f"/job/{job_id}").content}
    for stream in ("stdout", "stderr"):
        out[f"logs {stream}"] = http.get(f"/job/{job_id}/logs", params={"stream": stream}).content
    out["results"] = http.get(f"/job/{job_id}/results").content
    out["samples"] = http.get(f"/job/{job_id}/samples", params={"task": task}).content
    return out


def test_a_job_cannot_make_the_supervisor_or_the_server_touch_files_for_it(
    world: World, index_dir: Path
) -> None:
    """The job directory is writable to the job and read or written by the supervisor and
    the server outside the sandbox: links planted there must not lead them to files the job
    cannot reach itself."""
    # Small log segments: the job's output makes the supervisor rotate (and reopen) its logs.
    server = world.start(index_dir, MAX_LOG_BYTES="65536")
    http = world.client()
    victim_id = submit(
        http, victim_job(world.victim_token, SANDBOX_TEST_RESULTS_ON="go"), headers=auth(BOB)
    )
    victim_dir = world.data / "jobs" / str(victim_id)
    wait_path(victim_dir / "victim-secret.txt")
    canaries = {name: world.tmp / f"canary-{name}" for name in ("write", "append")}
    for path in canaries.values():
        path.write_text("canary\n")
    victim_results = victim_dir / "results" / "victim"
    date = "2099-01-01T00-00-00"
    plan = {
        "token": world.token,
        "processes": False,
        "deputy": {
            "canary_write": str(canaries["write"]),
            "canary_append": str(canaries["append"]),
            "race_s": 5,
            "links": {
                "stdout.log": str(world.data / "jobs.db"),
                "stdout.log.1": str(world.secrets_dir / "openai"),
                "stderr.log": str(world.key_file),
                "stderr.log.1": str(victim_dir / "victim-secret.txt"),
                f"results/attack/results_{date}.json": str(victim_results / "results_victim.json"),
                f"results/attack/samples_victim_task_{date}.jsonl": str(
                    victim_results / "samples_victim_task_victim.jsonl"
                ),
                "results/linked": str(victim_results),
            },
        },
    }
    attack_id = submit(http, attack_job(plan), headers=auth(ALICE))
    attack_dir = world.data / "jobs" / str(attack_id)
    report_file = attack_dir / "attack-report-script.json"
    deadline = time.monotonic() + 120
    while "deputy" not in (json.loads(report_file.read_text()) if report_file.exists() else {}).get(
        "attempts", {}
    ):
        assert time.monotonic() < deadline, "the attack never planted its links"
        time.sleep(0.1)
    # The other job's results appear after the attacker's job started (as a results file
    # written while it runs would).
    (victim_dir / "go").touch()
    wait_path(victim_dir / "ready")
    alice = world.client(ALICE)
    while_running = served(alice, attack_id, "victim_task")
    (attack_dir / "release").touch()
    job = wait_for(alice, attack_id, TERMINAL, 60)
    assert job["status"] == "Completed", job
    after = served(alice, attack_id, "victim_task")
    report = json.loads(report_file.read_text())
    print("deputy outcomes:", report["attempts"]["deputy"]["outcomes"])

    leaked = {
        f"{when}: {what}": [v[:24] for v in world.leaks() if v.encode() in body]
        for when, bodies in (("running", while_running), ("ended", after))
        for what, body in bodies.items()
    }
    changed = {name: p.read_text()[:200] for name, p in canaries.items()}
    changed = {name: text for name, text in changed.items() if text != "canary\n"}
    problems = {
        "served by the server": {k: v for k, v in leaked.items() if v},
        "written by the supervisor": changed,
    }
    assert not any(problems.values()), json.dumps(problems, indent=1)
    assert server.proc.poll() is None  # type: ignore[union-attr]
    (victim_dir / "release").touch()
    assert wait_for(world.client(BOB), victim_id, TERMINAL, 60)["status"] == "Completed"


# ---------------------------------------------------------------------- the upload check's limits

SPIN = """\
import datasets


def load(**kwargs):
    while True:  # lm-eval loads the task: this never returns
        pass
"""
GROW = """\
import datasets


def load(**kwargs):
    held = []
    while len(held) < 64:  # 100 MB at a time, up to 6.4 GB
        held.append(bytearray(100 << 20))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"q": "q", "a": "a"}])})
"""
SPILL = """\
import datasets


def load(**kwargs):
    with open("spill.bin", "wb") as out:
        for _ in range(64):  # 64 MB
            out.write(b"x" * (1 << 20))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"q": "q", "a": "a"}])})
"""


def code_task(name: str) -> str:
    return f"""\
task: {name}
dataset_path: json
custom_dataset: !function {name}.load
output_type: generate_until
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: exact_match
"""


def template_task(name: str, template: str) -> str:
    return f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
output_type: generate_until
test_split: test
doc_to_text: '{template}'
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
"""


def checks_running(world: World, owner: str = "") -> dict[int, str]:
    """The upload check processes of this test's server (of `owner`'s uploads)."""
    staging = f"{world.data / 'tasks' / '.staging'}/{owner}"
    return {
        pid: cmdline
        for pid, cmdline in host_processes("lm_eval_server.tasks.task_check").items()
        if staging in cmdline and "bwrap" not in cmdline.split(" ", 1)[0]
    }


def test_upload_checks_are_bounded_and_one_owner_cannot_hold_up_another(
    world: World, index_dir: Path
) -> None:
    world.start(
        index_dir,
        TASK_CHECK_CPU_S="8",
        TASK_CHECK_MEMORY_MB="2048",
        TASK_CHECK_FILE_MB="16",
        TASK_CHECK_TIMEOUT_S="120",
        TASK_CHECK_SLOTS="3",
    )
    http = world.client()
    data = json.dumps({"question": "q", "answer": "lol"}) + "\n"
    answers: dict[str, tuple[float, httpx.Response]] = {}

    def send(label: str, key: str, files: dict[str, str | bytes]) -> None:
        response = upload(http, key, files)
        answers[label] = (time.monotonic(), response)

    def code(name: str, source: str) -> dict[str, str | bytes]:
        return {f"{name}.yaml": code_task(name), f"{name}.py": source}

    def alice() -> None:  # code, with ALLOW_REMOTE_CODE: spins, then spills
        send("spin", ALICE, code("spin", SPIN))
        send("spill", ALICE, code("spill", SPILL))

    def carol() -> None:  # templates only: a loop of 10^12 steps, then a 3 GB string
        for name, template in (
            ("loop", "{% for i in range(10**12) %}{% endfor %}{{question}}"),
            ("big", '{{ ("x" * 3000000000)|length }}{{question}}'),
        ):
            send(
                name, CAROL, {f"{name}.yaml": template_task(name, template), f"{name}.jsonl": data}
            )

    with ThreadPoolExecutor(4) as pool:
        bombs = [pool.submit(alice), pool.submit(carol)]
        deadline = time.monotonic() + 60
        while not (checks_running(world, "alice.") and checks_running(world, "carol.")):
            assert time.monotonic() < deadline, "the checks never started"
            time.sleep(0.05)
        # Alice's next uploads: one waits for her own check, one more is refused (429); which
        # of the two arrives first is up to the network.
        bombs.append(pool.submit(send, "grow", ALICE, code("grow", GROW)))
        time.sleep(0.2)
        bombs.append(pool.submit(send, "grow2", ALICE, code("grow2", GROW)))
        # While both hold a check slot, bob uploads an ordinary task.
        send("bob", BOB, {"bob.yaml": BOB_TASK, "bob.jsonl": data})
        assert checks_running(world, "alice."), "alice's spinning check ended before bob's"
        for bomb in bombs:
            bomb.result()

    bob_at, bob = answers["bob"]
    assert bob.status_code == 201, bob.text
    assert bob_at < answers["spin"][0], "bob's upload waited for alice's"
    details = {label: answer.text for label, (_, answer) in answers.items()}
    statuses = {label: answer.status_code for label, (_, answer) in answers.items()}
    grows = sorted(("grow", "grow2"), key=lambda label: statuses[label])
    statuses["grow (waited)"], statuses["grow (refused)"] = (statuses.pop(g) for g in grows)
    details["grow (waited)"], details["grow (refused)"] = (details.pop(g) for g in grows)
    assert statuses == {
        "bob": 201,
        "spin": 422,
        "spill": 422,
        "loop": 422,
        "big": 422,
        "grow (waited)": 422,
        "grow (refused)": 429,
    }, details
    # The CPU limit stops a spinning check, and the answer says which limit it was.
    assert "TASK_CHECK_CPU_S" in details["spin"], f"stopped, not named: {details['spin'][:300]}"
    assert "MemoryError" in details["grow (waited)"], details["grow (waited)"]
    assert "still being checked" in details["grow (refused)"], details["grow (refused)"]
    assert "File too large" in details["spill"] or "EFBIG" in details["spill"], details["spill"]
    # A template that loops: stopped by the CPU limit (or refused by a sandboxed Jinja's range).
    assert "TASK_CHECK_CPU_S" in details["loop"] or "range" in details["loop"], (
        f"stopped, not named: {details['loop'][:300]}"
    )
    assert "MemoryError" in details["big"], details["big"]
    assert checks_running(world) == {}
    listed = http.get("/tasks", params={"source": "upload"}, headers=auth(ROOT_KEY)).json()
    assert [(t["name"], t["owner"]) for t in listed["tasks"]] == [("bob_private", "bob")]


# ---------------------------------------------------------------------- JOB_NETWORK


class Listener(threading.Thread):
    """A TCP server on 127.0.0.1 that records what each connection sends."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[str] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.received.append(conn.recv(1024).decode())

    def close(self) -> None:
        self.sock.close()


def test_job_network_none_takes_the_network_away_and_the_default_keeps_it(
    tmp_path: Path, index_dir: Path
) -> None:
    listener = Listener()
    listener.start()
    servers: list[ServerProcess] = []
    try:
        env = {"LM_EVAL_PATHS": ATTACK, "ALLOWED_ENV_VARS": "SANDBOX_TEST_*"}
        with ThreadPoolExecutor(2) as pool:
            started = [
                pool.submit(ServerProcess(tmp_path / name, index_dir, **env, **extra).start)
                for name, extra in (("none", {"JOB_NETWORK": "none"}), ("host", {}))
            ]
            servers = [s.result() for s in started]
        outcomes = {}
        for name, server in zip(("none", "host"), servers, strict=True):
            with server.client() as http:
                plan = {"token": name, "processes": False, "connect": ["127.0.0.1", listener.port]}
                job_id = submit(http, attack_job(plan))
                job = wait_for(http, job_id, TERMINAL, 60)
                assert job["status"] == "Completed", job
                report = json.loads(
                    (
                        server.data_dir / "jobs" / str(job_id) / "attack-report-script.json"
                    ).read_text()
                )
                outcomes[name] = report["attempts"]["connect"]
    finally:
        listener.close()
        for server in servers:
            server.stop_jobs_and_terminate()
    assert outcomes["none"]["ok"] is False, outcomes
    assert outcomes["host"] == {"ok": True}, outcomes
    assert listener.received == ["host script\n"]


# ---------------------------------------------------------------------- startup without bwrap


def test_startup_without_a_working_bwrap(tmp_path: Path, index_dir: Path) -> None:
    no_bwrap = str(tmp_path / "empty-bin")  # PATH without bwrap: sandbox.find_bwrap finds none
    Path(no_bwrap).mkdir()
    keys = {"API_KEYS": f"alice:{ALICE},bob:{BOB}"}
    cases = {
        "bwrap required": {"SANDBOX": "bwrap"},
        "named keys": {"SANDBOX": "auto", **keys},
        "named keys, off": {"SANDBOX": "off", **keys},
        "one principal": {},
    }

    def start(name: str, extra: dict[str, str]) -> ServerProcess | str:
        server = ServerProcess(tmp_path / name.replace(" ", "-"), index_dir, PATH=no_bwrap, **extra)
        try:
            return server.start()
        except RuntimeError as exc:
            return str(exc)

    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = dict(zip(cases, pool.map(start, cases, cases.values()), strict=True))
    try:
        refused = outcomes["bwrap required"]
        assert isinstance(refused, str), "SANDBOX=bwrap started without bwrap"
        assert "SANDBOX=bwrap, but the job sandbox does not work" in refused, refused
        assert "bwrap (Debian/Ubuntu package bubblewrap) is not installed or not on PATH" in refused
        refused = outcomes["named keys"]
        assert isinstance(refused, str), "a server with named keys started without a sandbox"
        assert "this server has 2 principals (named keys)" in refused, refused
        assert "set SANDBOX=off" in refused and "apt-get install bubblewrap" in refused, refused
        off = outcomes["named keys, off"]
        assert isinstance(off, ServerProcess), off
        ready = httpx.get(f"{off.url}/ready", headers=auth(ALICE)).json()
        assert ready["sandbox"] == {"mode": "off", "reason": "SANDBOX=off"}, ready
        alone = outcomes["one principal"]
        assert isinstance(alone, ServerProcess), alone
        ready = httpx.get(f"{alone.url}/ready").json()
        assert ready["sandbox"]["mode"] == "off", ready
        assert (
            "bwrap (Debian/Ubuntu package bubblewrap) is not installed"
            in ready["sandbox"]["reason"]
        )
    finally:
        for outcome in outcomes.values():
            if isinstance(outcome, ServerProcess):
                outcome.stop_jobs_and_terminate()


# ---------------------------------------------------------------------- another owner's output


def test_another_owners_output_path_is_out_of_reach(world: World, index_dir: Path) -> None:
    """A request may name an output_path under ALLOWED_PATHS (DATA_DIR among them by
    default): another owner's job must neither read what one wrote there nor be given it."""
    world.start(index_dir)
    http = world.client()
    bob_out = world.data / "bob-out"
    victim_id = submit(
        http,
        {**victim_job(world.victim_token), "output_path": str(bob_out)},
        headers=auth(BOB),
    )
    wait_path(world.data / "jobs" / str(victim_id) / "ready")
    results = bob_out / "victim" / "results_victim.json"
    assert results.is_file()
    plan = {
        "token": world.token,
        "processes": False,
        "reads": {
            "other owner's output_path": ["list", str(bob_out)],
            "other owner's results": ["read", str(results)],
        },
        "writes": {
            "other owner's output_path: new file": ["create", str(bob_out / world.token)],
            "other owner's results: open": ["open", str(results)],
        },
    }
    alice = world.client(ALICE)
    reader = submit(alice, attack_job(plan))
    # The same attack with bob's output_path as its own.
    as_own = alice.post(
        "/job", json={**attack_job({**plan, "phase": "own"}), "output_path": str(bob_out)}
    )
    jobs = {"reader": reader}
    if as_own.status_code == 200:
        jobs["as own output_path"] = as_own.json()["job_id"]
    else:
        assert as_own.status_code == 422, as_own.text
    got_through = {}
    for label, job_id in jobs.items():
        job = wait_for(alice, job_id, TERMINAL, 60)
        assert job["status"] == "Completed", job
        phase = "own" if label != "reader" else "script"
        report_file = world.data / "jobs" / str(job_id) / f"attack-report-{phase}.json"
        attempts = json.loads(report_file.read_text())["attempts"]
        got_through[label] = {
            name: outcome
            for name, outcome in attempts.items()
            if outcome["ok"] and outcome.get("got") != []
        }
    landed = (bob_out / world.token).exists()
    (world.data / "jobs" / str(victim_id) / "release").touch()
    done = wait_for(world.client(BOB), victim_id, TERMINAL, 60)
    assert done["status"] == "Completed" and "victim: intact\n" in done["stdout"], done
    assert not any(got_through.values()), json.dumps(got_through, indent=1)
    assert not landed
