"""EXECUTOR=ray end to end, against a real local Ray head that this module starts and stops.

The head runs `ray start --head --block` in a session of its own, on loopback, with free ports
and its own temp dir; teardown signals only the processes of that session, so other Ray
instances on the machine are left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from lm_eval_server.config import Settings
from tests.support.fake_lm_eval import pattern
from tests.support.jobs import DUMMY_JOB, fake_job, session_members, submit, wait_for

try:
    from ray.job_submission import JobStatus as RayJobStatus
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors
except ImportError as exc:  # the `ray` extra is optional
    pytest.skip(f"ray is not installed ({exc}); run `uv sync --extra ray`", allow_module_level=True)

# Ray jobs take a while to start on a small machine (a worker for the job supervisor, then
# the lm-eval import); deadlines are generous and nothing asserts on speed.
JOB_TIMEOUT_S = 300.0
HEAD_START_TIMEOUT_S = 240.0

# Set to a running cluster's dashboard address to test against it instead of a fresh local head
# (the cluster must see this machine's paths, see docs/ray.md).
EXISTING_RAY = os.environ.get("LM_EVAL_SERVER_TEST_RAY_ADDRESS")


@dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard / Jobs API address, as RAY_ADDRESS takes it

    def client(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.address)


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kill_session(sid: int, grace_s: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(sid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextmanager
def running_head() -> Iterator[RayHead]:
    """A fresh single-node Ray head on loopback, killed (its whole session) on exit."""
    # Short: Ray's unix socket paths live under it and must stay under ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lmes-ray-", dir="/tmp"))
    gcs, dashboard, *others = _free_ports(9)
    agent_http, agent_grpc, metrics, client_server, env_agent, node_mgr, obj_mgr = others
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={100 * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client_server}",
        f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
    ]
    output = open(temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # Under `uv run` (as when tests run with `uv run pytest`), Ray starts its workers with
        # `uv run` too, in a directory whose project is not this one; they then lack ray.
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(head, address, temp_dir)
        yield RayHead(address=address)
    finally:
        _kill_session(head.pid)
        head.wait(timeout=30)
        output.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    if EXISTING_RAY:
        yield RayHead(address=EXISTING_RAY)
        return
    with running_head() as head:
        yield head


def _wait_for_jobs_api(head: subprocess.Popen[bytes], address: str, temp_dir: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        if head.poll() is not None:
            log = (temp_dir / "ray-start.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"`ray start` exited with {head.returncode}:\n{log}")
        try:
            # Up when a job runs: the Jobs API answers before the node's job agent is ready.
            client = JobSubmissionClient(address)
            ref = client.submit_job(entrypoint="true")
            while not (status := client.get_job_status(ref)).is_terminal():
                assert time.monotonic() < deadline, client.get_job_info(ref)
                time.sleep(0.5)
            assert status == RayJobStatus.SUCCEEDED, client.get_job_info(ref)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray's Jobs API at {address} not up: {exc}") from exc
        time.sleep(1.0)


def ray_overrides(head: RayHead) -> dict[str, Any]:
    return {"executor": "ray", "ray_address": head.address}


@pytest.fixture
def ray_client(
    make_client: Callable[..., TestClient], ray_head: RayHead
) -> Callable[..., TestClient]:
    def make(**overrides: Any) -> TestClient:
        return make_client(**{**ray_overrides(ray_head), **overrides})

    return make


def eventually(probe: Callable[[], Any], what: str) -> Any:
    """The first truthy result of `probe`, polled until JOB_TIMEOUT_S."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (result := probe()):
        assert time.monotonic() < deadline, f"no {what} after {JOB_TIMEOUT_S}s"
        time.sleep(0.2)
    return result


def submission_id(client: TestClient, job_id: int) -> str:
    manager = client.app.state.server.manager  # type: ignore[attr-defined]
    return str(eventually(lambda: manager.get(job_id).executor_ref, "Ray submission id"))


def stderr_bytes(client: TestClient, job_id: int) -> bytes:
    work_dir = Path(client.app.state.server.manager.get(job_id).work_dir)  # type: ignore[attr-defined]
    return (work_dir / "stderr.log").read_bytes()


def supervisor_actor(head: RayHead, ref: str) -> Any:
    """The actor that runs a Ray job's entrypoint; it holds the job's entrypoint resources."""
    name = f"_ray_internal_job_actor_{ref}"
    actors = eventually(
        lambda: list_actors(address=head.address, filters=[("name", "=", name)], detail=True),
        f"actor {name}",
    )
    assert len(actors) == 1, actors
    return actors[0]


def wait_for_output(client: TestClient, job_id: int, text: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.get(f"/job/{job_id}").json()
        if any(text in line for line in job["stderr"]):
            return
        assert job["status"] == "Running", job
        assert time.monotonic() < deadline, f"{text!r} never appeared: {job}"
        time.sleep(0.2)


def test_dummy_job_completes_on_ray(ray_client: Callable[..., TestClient], ray_head: RayHead):
    client = ray_client()
    job_id = submit(client, {**DUMMY_JOB, "resources": {"num_cpus": 1}})
    job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)

    assert job["status"] == "Completed", job
    assert job["exit_code"] == 0
    assert job["inference_progress_pct"] == 100
    stderr = client.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text
    assert "Running loglikelihood requests" in stderr
    assert client.get(f"/job/{job_id}/logs", params={"stream": "stdout"}).text == ""

    results = client.get(f"/job/{job_id}/results")
    assert results.status_code == 200, results.text
    acc = [m for m in results.json()["metrics"] if (m["task"], m["metric"]) == ("demo_mc", "acc")]
    assert len(acc) == 1 and isinstance(acc[0]["value"], float)

    ray = ray_head.client()
    ref = submission_id(client, job_id)
    info = ray.get_job_info(ref)
    assert info.status == RayJobStatus.SUCCEEDED
    assert info.metadata is not None
    assert info.metadata["lm_eval_server_job_id"] == str(job_id)
    assert supervisor_actor(ray_head, ref).required_resources == {"CPU": 1.0}
    # Ray's whole log, exactly once.
    assert stderr_bytes(client, job_id) == ray.get_job_logs(ref).encode()


def test_stop_a_running_ray_job(ray_client: Callable[..., TestClient], ray_head: RayHead):
    client = ray_client()
    job_id = submit(client, fake_job(FAKE_SLEEP_S="600"))
    wait_for_output(client, job_id, "sleeping 600")

    response = client.post(f"/job/{job_id}/stop")
    assert response.status_code == 200, response.text
    job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)

    assert job["status"] == "Stopped", job
    assert ray_head.client().get_job_status(submission_id(client, job_id)) == RayJobStatus.STOPPED


def test_stop_a_job_ray_cannot_schedule(ray_client: Callable[..., TestClient], ray_head: RayHead):
    client = ray_client()
    # More memory than any node has, so Ray keeps the job PENDING. (Ray stores resources as
    # int64 ten-thousandths: 10**15 bytes would overflow.)
    too_much = 10**14
    job_id = submit(client, {**fake_job(), "resources": {"memory": too_much}})
    ref = submission_id(client, job_id)
    actor = supervisor_actor(ray_head, ref)
    assert (actor.state, actor.required_resources) == ("PENDING_CREATION", {"memory": too_much})

    assert client.post(f"/job/{job_id}/stop").status_code == 200
    job = client.get(f"/job/{job_id}").json()

    assert job["status"] == "Stopped", job
    assert any("was still PENDING" in line for line in job["stderr"]), job["stderr"]


def test_failing_ray_job_is_failed_with_its_error(ray_client: Callable[..., TestClient]):
    client = ray_client()
    job_id = submit(client, fake_job(FAKE_EXIT="3"))
    job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)

    assert job["status"] == "Failed", job
    assert job["exit_code"] == 3
    assert job["error"].startswith("exit code 3"), job["error"]
    assert "fake lm_eval done" in job["error"]


def test_restarted_server_adopts_ray_job_and_keeps_log_exactly_once(
    make_settings: Callable[..., Settings],
    ray_client: Callable[..., TestClient],
    ray_head: RayHead,
):
    # 200 kB of numbered lines with tqdm-style \r, then a pause: the first server copies
    # part of the log, the second one must continue where the file ends.
    body = fake_job(FAKE_STDERR_BYTES="200000", FAKE_SLEEP_S="3")
    with TestClient(create_app(make_settings(**ray_overrides(ray_head)))) as first:
        job_id = submit(first, body)
        wait_for_output(first, job_id, "sleeping 3")
    # The first server shut down without stopping the job (SHUTDOWN_STOPS_JOBS=false).

    second = ray_client()
    job = wait_for(second, job_id, timeout_s=JOB_TIMEOUT_S)

    assert job["status"] == "Completed", job
    assert job["exit_code"] == 0
    log = stderr_bytes(second, job_id)
    assert log == ray_head.client().get_job_logs(submission_id(second, job_id)).encode()
    # Ray reads job logs in text mode: tqdm's \r arrives as \n.
    assert log.count(pattern(200000).replace(b"\r", b"\n")) == 1
    assert log.count(b"fake lm_eval done") == 1


class Outage:
    """A TCP relay between the server and Ray's Jobs API: `cut()` closes it and every open
    connection, as a network failure or a restarting head would; `restore()` reopens it on the
    same port. Ray itself, and the jobs in it, carry on meanwhile."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self._target = (host, int(port))
        (self._port,) = _free_ports(1)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.restore()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port))
        listener.listen()
        listener.settimeout(0.1)
        self._listener = listener
        self._start(self._accept, listener)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        with self._lock:
            connections, self._sockets = self._sockets, set()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        if listener is not None:
            listener.close()
        for sock in connections:
            sock.close()

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets |= {client, upstream}
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def outage(ray_head: RayHead) -> Iterator[Outage]:
    relay = Outage(ray_head.address)
    yield relay
    relay.cut()


def test_ray_job_survives_a_ray_outage(
    ray_client: Callable[..., TestClient], ray_head: RayHead, outage: Outage
):
    client = ray_client(ray_address=outage.address)
    job_id = submit(client, fake_job(FAKE_STDERR_BYTES="50000", FAKE_SLEEP_S="3"))
    ref = submission_id(client, job_id)
    wait_for_output(client, job_id, "sleeping 3")

    outage.cut()
    ray = ray_head.client()
    eventually(lambda: ray.get_job_status(ref).is_terminal(), "end of the Ray job")
    assert client.get(f"/job/{job_id}").json()["status"] == "Running"
    outage.restore()
    job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)

    assert job["status"] == "Completed", job
    assert job["exit_code"] == 0
    assert stderr_bytes(client, job_id) == ray.get_job_logs(ref).encode()


def test_ray_job_fails_when_ray_stays_away(
    ray_client: Callable[..., TestClient], ray_head: RayHead, outage: Outage
):
    client = ray_client(ray_address=outage.address, ray_lost_after_s=2)
    job_id = submit(client, fake_job(FAKE_SLEEP_S="600"))
    ref = submission_id(client, job_id)
    wait_for_output(client, job_id, "sleeping 600")

    outage.cut()
    try:
        job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)
    finally:
        ray_head.client().stop_job(ref)

    assert job["status"] == "Failed", job
    assert job["exit_code"] is None
    assert f"lost contact with the Ray cluster at {outage.address}" in job["error"], job["error"]


def test_server_refuses_to_start_when_ray_is_unreachable(
    make_settings: Callable[..., Settings],
):
    (closed_port,) = _free_ports(1)
    settings = make_settings(executor="ray", ray_address=f"http://127.0.0.1:{closed_port}")
    with (
        pytest.raises(RuntimeError, match=f"RAY_ADDRESS=http://127.0.0.1:{closed_port}"),
        TestClient(create_app(settings)),
    ):
        pass


def test_a_secret_reaches_a_ray_job_through_its_env_file_only(
    ray_client: Callable[..., TestClient], ray_head: RayHead, tmp_path: Path
):
    import hashlib

    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    value = "sk-ray-secret-" + os.urandom(12).hex()
    (secrets_dir / "openai").write_text(value + "\n")
    client = ray_client(secrets_dir=secrets_dir)
    env_vars = {"OPENAI_API_KEY": {"secret": "openai"}, "FAKE_HASH_ENV": "OPENAI_API_KEY"}
    job_id = submit(client, {**fake_job(), "env_vars": env_vars})
    job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)
    assert job["status"] == "Completed", job
    digest = hashlib.sha256(value.encode()).hexdigest()
    # Ray combines the streams into stderr.log.
    assert f"sha256(OPENAI_API_KEY)={digest}\n" in job["stderr"]
    work_dir = Path(client.app.state.server.manager.get(job_id).work_dir)  # type: ignore[attr-defined]
    assert not (work_dir / "job-env.json").exists()
    # Never in Ray's own record of the job (entrypoint, runtime_env, metadata).
    info = ray_head.client().get_job_info(submission_id(client, job_id))
    assert value not in repr(info)

    # A job Ray never starts (PENDING, then stopped) does not leave its env file behind.
    pending = submit(client, {**fake_job(), "env_vars": env_vars, "resources": {"memory": 10**14}})
    submission_id(client, pending)
    assert (Path(client.app.state.server.manager.get(pending).work_dir) / "job-env.json").exists()  # type: ignore[attr-defined]
    assert client.post(f"/job/{pending}/stop").status_code == 200
    assert client.get(f"/job/{pending}").json()["status"] == "Stopped"
    pending_dir = Path(client.app.state.server.manager.get(pending).work_dir)  # type: ignore[attr-defined]
    assert not (pending_dir / "job-env.json").exists()
