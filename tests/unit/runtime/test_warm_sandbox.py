"""A warm job is confined as a cold job of its owner is: code inside it (an include_path task's
`!function`, tests/data/warm_probe/probe.py) cannot read another owner's running warm job,
jobs.db, SECRETS_DIR or the server's /proc/<pid>/environ, cannot kill the server or the other
job, and leaves nothing running; its output, exit code, logs and stop still work. A real
server process with named keys, WARM_WORKERS=2 and the real lm_eval.

The cheap pieces of the sandboxed pool (owner shares, the directory hand-over, the view
check) are tested at the end without a server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lm_eval_server.runtime import sandbox
from lm_eval_server.runtime.executors import warm_protocol, warm_sandboxed
from lm_eval_server.runtime.executors.base import LaunchSpec
from tests.support.jobs import DUMMY_JOB, ROOT, TERMINAL, process_alive, submit, wait_for
from tests.support.server import ServerProcess

WARM_MARKER = warm_protocol.MARKER_PREFIX + warm_protocol.FORKED_MARKER
PROBE_DIR = ROOT / "tests" / "data" / "warm_probe"
ALICE = "alice-" + secrets.token_hex(8)  # the attacker
BOB = "bob-" + secrets.token_hex(8)  # the other owner
ADMIN = "root-" + secrets.token_hex(8)
ZERO_CAPS = "0000000000000000"

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"),
    reason="needs bubblewrap (/usr/bin/bwrap, Debian package bubblewrap); CI installs it",
)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def host_processes(needle: str) -> dict[int, str]:
    """Live host processes whose command line holds `needle`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline and process_alive(int(entry.name)):
                found[int(entry.name)] = cmdline
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def eventually(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def wait_path(path: Path, timeout_s: float = 180) -> None:
    eventually(path.exists, timeout_s)


def beats_stopped(beat: Path, marker: str) -> None:
    """The sleeper beat while its job ran, and neither it nor any process of it is left."""
    assert beat.is_file(), f"the sleeper never beat ({beat})"
    time.sleep(0.5)  # the sandbox's teardown follows the job's end by a few ms
    before = beat.read_text()
    time.sleep(1.0)  # ten beats, were it alive
    assert beat.read_text() == before, f"{beat} still beats: a process outlived its job"
    assert host_processes(marker) == {}


@pytest.fixture
def world(tmp_path: Path, index_dir: Path) -> Iterator[dict[str, Any]]:
    tmp = tmp_path.resolve()
    probe = tmp / "warm_probe"
    shutil.copytree(PROBE_DIR, probe, ignore=shutil.ignore_patterns("__pycache__"))
    token = secrets.token_hex(12)
    (probe / "plan.json").write_text(json.dumps({"token": token}))
    secrets_dir = tmp / "secrets"
    secrets_dir.mkdir(mode=0o700)
    secret = "sk-live-" + secrets.token_hex(16)
    (secrets_dir / "openai").write_text(secret + "\n")
    data = tmp / "data"
    server = ServerProcess(
        data,
        index_dir,
        API_KEYS=f"alice:{ALICE},bob:{BOB}",
        ADMIN_KEYS=f"root:{ADMIN}",
        SECRETS_DIR=str(secrets_dir),
        ALLOWED_PATHS=f"{probe},{ROOT / 'examples'}",
        WARM_WORKERS="2",
        MAX_CONCURRENCY="4",
    ).start()
    try:
        yield {
            "server": server,
            "data": data,
            "probe": probe,
            "token": token,
            "secrets_dir": secrets_dir,
            "secret": secret,
        }
    finally:
        for path in data.glob("jobs/*"):
            (path / "release").touch()
        server.stop_jobs_and_terminate()


def probe_job(task: str, probe: Path) -> dict[str, Any]:
    return {"model": "dummy", "tasks": task, "include_path": str(probe)}


def ready_workers(http: httpx.Client) -> int:
    warm = http.get("/ready", headers=auth(ADMIN)).json()["warm_workers"]
    return int(warm["ready"]) if warm["ready"] == warm["configured"] else -1


@needs_bwrap
def test_a_warm_job_reaches_nothing_of_the_server_or_another_owners_warm_job(
    world: dict[str, Any],
) -> None:
    server: ServerProcess = world["server"]
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(server.client())
        clients = {
            owner: stack.enter_context(
                httpx.Client(base_url=server.url, timeout=30, headers=auth(key))
            )
            for owner, key in (("alice", ALICE), ("bob", BOB))
        }
        attack_a_warm_job(world, http, clients)


def attack_a_warm_job(
    world: dict[str, Any], http: httpx.Client, clients: dict[str, httpx.Client]
) -> None:
    server: ServerProcess = world["server"]
    data: Path = world["data"]
    ready = http.get("/ready", headers=auth(ADMIN)).json()
    assert ready["sandbox"]["mode"] == "bwrap", ready

    # Named keys: no worker until an owner starts a job; each owner's first job starts cold
    # and makes the pool warm one worker for each.
    firsts = {owner: submit(c, {**DUMMY_JOB, "limit": 1}) for owner, c in clients.items()}
    for owner, job_id in firsts.items():
        done = wait_for(clients[owner], job_id, TERMINAL, 300)
        assert done["status"] == "Completed", done
    eventually(lambda: ready_workers(http) == 2, 300)

    # Bob's warm job keeps a secret in its directory and runs until stopped.
    victim_id = submit(clients["bob"], probe_job("warm_victim", world["probe"]))
    victim_dir = data / "jobs" / str(victim_id)
    wait_path(victim_dir / "ready")
    victim_log = clients["bob"].get(f"/job/{victim_id}/logs", params={"stream": "stderr"}).text
    assert WARM_MARKER in victim_log, victim_log[-2000:]
    [supervisor] = [
        pid for pid, cmd in host_processes(str(victim_dir)).items() if "supervise.py" in cmd
    ]
    [victim_process] = children_of(supervisor)
    victim_worker = parent_of(supervisor)
    victim = {"supervisor": supervisor, "job": victim_process, "worker": victim_worker}
    assert f"{WARM_MARKER} {victim_worker}\n" in victim_log
    assert clients["bob"].get(f"/job/{victim_id}").json()["status"] == "Running"
    victim_secret = (victim_dir / "victim-secret.txt").read_text()

    # Alice's warm job, with everything of the server and of Bob's job as its targets.
    server_pid = server.proc.pid  # type: ignore[union-attr]
    plan = {
        "token": world["token"],
        "reads": {
            "jobs.db": str(data / "jobs.db"),
            "other job's secret": str(victim_dir / "victim-secret.txt"),
            "other job's stderr": str(victim_dir / "stderr.log"),
            "secret": str(world["secrets_dir"] / "openai"),
            "server log": str(server.log_path),
        },
        "lists": {
            "DATA_DIR": str(data),
            "jobs dir": str(data / "jobs"),
            "other job's dir": str(victim_dir),
            "warm slots": str(data / "warm" / "slots"),
            "SECRETS_DIR": str(world["secrets_dir"]),
            "other owner's cache": str(data / "owner-cache" / "bob"),
        },
        "environ": {"server": server_pid, **{f"other job's {k}": v for k, v in victim.items()}},
        "kill": {"server": server_pid, **{f"other job's {k}": v for k, v in victim.items()}},
        "killpg": {"server's group": os.getpgid(server_pid), "other job's group": supervisor},
    }
    (world["probe"] / "plan.json").write_text(json.dumps(plan))
    attacker_id = submit(clients["alice"], probe_job("warm_probe", world["probe"]))
    attacker = wait_for(clients["alice"], attacker_id, TERMINAL, 300)
    attacker_dir = data / "jobs" / str(attacker_id)

    # Its own output, exit code and logs work as a cold job's.
    assert attacker["status"] == "Completed", attacker
    assert attacker["exit_code"] == 0
    stderr = clients["alice"].get(f"/job/{attacker_id}/logs", params={"stream": "stderr"}).text
    assert stderr.startswith(WARM_MARKER), stderr[:2000]
    stdout = clients["alice"].get(f"/job/{attacker_id}/logs", params={"stream": "stdout"}).text
    assert "warm-probe: done" in stdout and "|warm_probe|" in stdout
    results = clients["alice"].get(f"/job/{attacker_id}/results").json()
    assert "acc,none" in results["results"]["results"]["warm_probe"]

    # Everything it tried failed.
    report = json.loads((attacker_dir / "probe-report.json").read_text())
    ident = report["identity"]
    assert (ident["uid"], ident["gid"], ident["CapEff"]) == (65534, 65534, ZERO_CAPS), ident
    assert ident["hostname"] == "lm-eval-job"
    # Its directory, as a cold job's; the kernel knows it by the worker's slot, now renamed.
    assert ident["cwd"] == str(attacker_dir)
    assert ident["real_cwd"].startswith(str(data / "warm" / "slots") + "/")
    attempts = report["attempts"]
    assert set(attempts) >= {
        *(f"read {n}" for n in plan["reads"]),
        *(f"environ {n}" for n in plan["environ"]),
        *(f"kill {n}" for n in plan["kill"]),
        *(f"killpg {n}" for n in plan["killpg"]),
    }
    listed = {name: attempts.pop(f"list {name}") for name in plan["lists"]}
    through = {name: a for name, a in attempts.items() if a["ok"]}
    assert through == {}, through
    # DATA_DIR is an empty stand-in but for what every job of its owner is given back; its
    # jobs directory holds its own link only, its slots directory its own slot only.
    assert "jobs.db" not in listed["DATA_DIR"].get("got", [])
    assert listed["jobs dir"]["got"] == [str(attacker_id)]
    assert len(listed["warm slots"]["got"]) == 1
    for name in ("other job's dir", "SECRETS_DIR", "other owner's cache"):
        assert listed[name].get("got") in (None, []), (name, listed[name])
    for pid, cmdline in ident["processes"].items():
        for needle in ("uvicorn", "src.main", f"jobs/{victim_id}", "victim"):
            assert needle not in (cmdline or ""), (pid, cmdline)
    text = json.dumps(report)
    for value in (world["secret"], ALICE, BOB, ADMIN, victim_secret.strip(), "SQLite format 3"):
        assert value not in text

    # The server and Bob's job went on; nothing of Alice's job is left running.
    assert http.get("/health").status_code == 200 and server.proc.poll() is None  # type: ignore[union-attr]
    assert all(process_alive(pid) for pid in victim.values()), victim
    assert clients["bob"].get(f"/job/{victim_id}").json()["status"] == "Running"
    assert (victim_dir / "victim-secret.txt").read_text() == victim_secret
    marker = f"warm-sleeper-{world['token']}"
    beats_stopped(attacker_dir / "heartbeat-attacker", f"{marker}-attacker")
    assert host_processes(str(attacker_dir)) == {}
    assert host_processes(ident["real_cwd"]) == {}  # its worker and sandbox, by the slot

    # Stop works on a warm job as on a cold one, and ends its whole sandbox.
    stopped = clients["bob"].post(f"/job/{victim_id}/stop")
    assert stopped.status_code == 200, stopped.text
    job = clients["bob"].get(f"/job/{victim_id}").json()
    assert job["status"] == "Stopped" and job["exit_code"] == -signal.SIGTERM, job
    assert (
        "warm-victim: ready"
        in clients["bob"].get(f"/job/{victim_id}/logs", params={"stream": "stdout"}).text
    )
    beats_stopped(victim_dir / "heartbeat-victim", f"{marker}-victim")
    eventually(lambda: not any(process_alive(pid) for pid in victim.values()))
    assert host_processes(str(victim_dir)) == {}
    # Each owner's slot was taken and refilled: the pool is warm again for both.
    eventually(lambda: ready_workers(http) == 2, 300)


# ----------------------------------------------------------------- cheap pieces, no server


def make_view(work_dir: Path, **changes: Any) -> sandbox.View:
    view = sandbox.View(
        work_dir=str(work_dir),
        read_only=("/opt/models",),
        hidden=("/srv/data",),
        given_back=("/srv/data/index", "/srv/data/tasks/alice"),
        remaps=(("/srv/data/owner-cache/alice", "/srv/data/cache"),),
    )
    return dataclasses.replace(view, **changes)


def test_a_worker_takes_only_a_job_with_its_very_confinement(tmp_path: Path) -> None:
    slot = make_view(tmp_path / "slot", scratch=("/srv/data/jobs",))
    job = make_view(tmp_path / "job")
    assert warm_sandboxed._same_confinement(job, slot)
    for changed in (
        {"writable": (str(tmp_path / "out"),)},  # its own output_path
        {"given_back": ("/srv/data/index", "/srv/data/tasks/bob")},  # another owner
        {"remaps": (("/srv/data/owner-cache/bob", "/srv/data/cache"),)},
        {"network": False},
        {"read_only": ()},
    ):
        assert not warm_sandboxed._same_confinement(dataclasses.replace(job, **changed), slot)
    # A path of the view that appears after the worker started (the owner's first upload):
    # the same view, another sandbox.
    uploads = tmp_path / "uploads"
    view = make_view(tmp_path / "job", given_back=(str(uploads),))
    before = warm_sandboxed._fingerprint(view)
    uploads.mkdir()
    assert warm_sandboxed._fingerprint(view) != before


def test_the_job_directory_becomes_the_slot(tmp_path: Path) -> None:
    work_dir, slot = tmp_path / "jobs" / "7", tmp_path / "warm" / "slots" / "0-x"
    (work_dir / "home").mkdir(parents=True)
    (work_dir / "config.yaml").write_text("x: 1\n")
    slot.mkdir(parents=True, mode=0o700)
    slot_inode = slot.stat().st_ino
    warm_sandboxed._move_into_slot(work_dir, slot)
    assert not slot.exists()
    assert work_dir.stat().st_ino == slot_inode  # what the worker's sandbox has mounted
    assert sorted(p.name for p in work_dir.iterdir()) == ["config.yaml", "home"]
    assert (work_dir / "config.yaml").read_text() == "x: 1\n"
    # A slot that is not empty is refused, and the job directory is left as it was.
    other = tmp_path / "warm" / "slots" / "1-x"
    other.mkdir()
    (other / "stray").write_text("")
    with pytest.raises(OSError, match="not empty"):
        warm_sandboxed._move_into_slot(work_dir, other)
    assert sorted(p.name for p in work_dir.iterdir()) == ["config.yaml", "home"]


def make_pool(
    tmp_path: Path, size: int, default_owner: str | None
) -> warm_sandboxed.SandboxedWarmPool:
    class NoViews:
        pass

    sandboxing = warm_sandboxed.WorkerSandbox(
        NoViews(),  # type: ignore[arg-type]
        "bwrap",
        tmp_path / "jobs",
        default_owner,
    )
    return warm_sandboxed.SandboxedWarmPool(size, {"PATH": "/usr/bin"}, tmp_path, sandboxing)


def test_owners_share_the_slots_by_recency(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool = make_pool(tmp_path, 3, "default")
        assert pool._shares() == {"default": 3}
        pool._note("alice")
        assert pool._shares() == {"alice": 2, "default": 1}
        pool._note("bob")
        assert pool._shares() == {"bob": 1, "alice": 1, "default": 1}
        pool._note("carol")  # only the three most recent owners keep a share
        assert pool._shares() == {"carol": 1, "bob": 1, "alice": 1}
        pool._note("alice")
        assert pool._recent == ["alice", "carol", "bob"]
        assert pool._owner_for_new_worker() == "alice"
        # Several named keys: nobody is warmed for before a job.
        assert make_pool(tmp_path, 2, None)._recent == []

    asyncio.run(scenario())


def test_sandboxed_pool_declines_what_it_cannot_run_warm(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "lm_eval_server.runtime.launcher", "--model", "dummy"]
    view = make_view(tmp_path / "job")

    def spec(**changes: Any) -> LaunchSpec:
        values: dict[str, Any] = {
            "job_id": 1,
            "argv": argv,
            "env": {},
            "work_dir": tmp_path / "job",
            "warm_args": ["--model", "dummy"],
            "view": view,
            "owner": "alice",
        }
        return LaunchSpec(**{**values, **changes})

    async def scenario() -> None:
        pool = make_pool(tmp_path, 1, None)  # not started: no worker is ever ready
        for declined in (
            spec(warm_args=None),
            spec(view=None),
            spec(owner=None),
            spec(view=dataclasses.replace(view, writable=(str(tmp_path / "out"),))),
            spec(),  # eligible, but no worker of alice's is ready
        ):
            assert await pool.run(declined, 1024) is None
        assert pool._recent == ["alice"]  # only the eligible job counts as alice's activity

    asyncio.run(scenario())


class FakeWorker:
    """What SandboxedWarmPool._take reads of a ready worker."""

    def __init__(self, slot: int, owner: str, view: sandbox.View) -> None:
        self.slot, self.owner, self.view = slot, owner, view
        self.fingerprint = warm_sandboxed._fingerprint(view)
        self.ready, self.taken = True, False
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released = asyncio.Event()
        self.closed = False
        self.writer = self

    def close(self) -> None:
        self.closed = True


def test_a_job_takes_its_owners_worker_unless_its_request_adds_to_the_view(
    tmp_path: Path,
) -> None:
    base = make_view(tmp_path / "job")
    slot_view = dataclasses.replace(base, work_dir=str(tmp_path / "slot"), scratch=("/j",))

    def spec(view: sandbox.View, owner_view: sandbox.View = base) -> LaunchSpec:
        return LaunchSpec(
            1, [], {}, tmp_path / "job", view=view, owner="alice", owner_view=owner_view
        )

    async def scenario() -> None:
        pool = make_pool(tmp_path, 2, "alice")
        worker = FakeWorker(0, "alice", slot_view)
        pool._idle[0] = worker  # type: ignore[assignment]
        # Its own output_path: no worker has that view; this one stays ready for others.
        own_output = dataclasses.replace(base, writable=(str(tmp_path / "out"),))
        assert pool._take(spec(own_output)) is None
        assert worker.ready and not worker.closed
        assert pool._take(spec(base)) is worker and worker.taken
        # A worker made before the owner's view changed (another owner's output directory is
        # hidden from now on) retires instead.
        old = FakeWorker(1, "alice", slot_view)
        pool._idle[1] = old  # type: ignore[assignment]
        changed = dataclasses.replace(base, hidden=(*base.hidden, str(tmp_path / "bobs")))
        assert pool._take(spec(changed, owner_view=changed)) is None
        assert old.closed and old.released.is_set()
        for task in pool._busy.values():
            task.cancel()

    asyncio.run(scenario())
