"""The request -> argv boundary through the HTTP API: values judged as lm-eval parses them,
config files validated like requests, one path rule, and lm-eval's run-time checks at
submission. Each refusal is checked for its evidence: no job queued, nothing written outside
the allowed roots, a listener that received nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.completions_server import running_stub_server
from tests.support.jobs import DUMMY_JOB, EXAMPLES_TASKS, FAKE_LM_EVAL, submit, wait_for

FAKE = {**DUMMY_JOB, "lm_eval_path": FAKE_LM_EVAL}


def refused(client: Any, body: dict[str, Any] | bytes, *needles: str) -> str:
    if isinstance(body, bytes):
        response = client.post("/job", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/job", json=body)
    assert response.status_code == 422, response.text
    detail = str(response.json()["detail"])
    for needle in needles:
        assert needle in detail, detail
    return detail


def job_count(client: Any) -> int:
    return int(client.get("/jobs").json()["total"])


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory outside ALLOWED_PATHS holding a task whose code would leave a marker."""
    path = tmp_path_factory.mktemp("outside")
    (path / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(path / 'MARKER')!r}).write_text('ran')\n"
        "def load(**kwargs):\n    return {}\n"
    )
    (path / "evil.yaml").write_text("task: evil\ncustom_dataset: !function evil.load\n")
    before = sorted(p.name for p in path.iterdir())
    yield path
    assert sorted(p.name for p in path.iterdir()) == before, "something wrote outside"
    assert not (path / "MARKER").exists()


def test_remote_code_judged_on_parsed_values(make_client: Any, tmp_path: Path) -> None:
    client = make_client()
    variants: list[dict[str, Any]] = [
        {"trust_remote_code": True},
        {"model_args": {"trust_remote_code": 1}},
        {"model_args": "pretrained=x,trust_remote_code=1"},
        {"model_args": "pretrained=x trust_remote_code=yes"},
        {"model_args": "trust_remote_code=1.0"},
        {"model_args": "trust_remote_code=TRUE"},
        {"model_args": {"trust_remote_code": "False"}},  # a non-empty string is true
        {"model_args": ["pretrained=x", "trust_remote_code=on"]},
        {"model_args": {"kwargs": {"trust_remote_code": True}}},
        {"metadata": {"trust_remote_code": True}},
        {"metadata": "trust_remote_code=1"},
        {"model_args": '{"trust_remote_code": [0]}'},
    ]
    for variant in variants:
        refused(client, {**FAKE, **variant}, "ALLOW_REMOTE_CODE")
    # False as lm-eval parses it is fine.
    for variant in (
        {"model_args": "trust_remote_code=False"},
        {"model_args": {"trust_remote_code": 0}},
        {"model_args": "trust_remote_code=0"},
    ):
        submit(client, {**FAKE, **variant})
    assert job_count(client) == 3


def test_unsafe_code_has_its_own_setting(make_client: Any) -> None:
    remote_only = make_client(allow_remote_code=True)
    refused(remote_only, {**FAKE, "confirm_run_unsafe_code": True}, "ALLOW_UNSAFE_CODE")
    assert job_count(remote_only) == 0
    unsafe = make_client(allow_unsafe_code=True)
    submit(unsafe, {**FAKE, "confirm_run_unsafe_code": True})
    refused(unsafe, {**FAKE, "trust_remote_code": True}, "ALLOW_REMOTE_CODE")


def test_config_file_is_validated_like_a_request(
    make_client: Any, tmp_path: Path, outside: Path
) -> None:
    client = make_client()
    base = f"model: dummy\ntasks: demo_mc\ninclude_path: {EXAMPLES_TASKS}\n"
    smuggled = {
        "include_path": (f"model: dummy\ntasks: evil\ninclude_path: {outside}\n", "ALLOWED_PATHS"),
        "trust_remote_code": (base + "trust_remote_code: true\n", "ALLOW_REMOTE_CODE"),
        "model_args": (base + "model_args: pretrained=x,trust_remote_code=1\n", "REMOTE"),
        "use_cache": (base + f"use_cache: {outside}/cache\n", "ALLOWED_PATHS"),
        "output_path": (base + f"output_path: {outside}/out\n", "ALLOWED_PATHS"),
        "tasks": (f"model: dummy\ntasks: {outside}/evil.yaml\n", "ALLOWED_PATHS"),
        "samples": (base + f"samples: {outside}/s.json\n", "ALLOWED_PATHS"),
        "unsafe": (base + "confirm_run_unsafe_code: true\n", "ALLOW_UNSAFE_CODE"),
        "unknown key": (base + "no_such_option: 1\n", "unexpected keyword"),
        "not a mapping": ("- a\n", "mapping"),
    }
    for name, (text, needle) in smuggled.items():
        config = tmp_path / f"{name.replace(' ', '_')}.yaml"
        config.write_text(text)
        refused(client, {"config": str(config)}, needle)
    refused(client, {"config": str(tmp_path / "missing.yaml")}, "Config file not found")
    (tmp_path / "flag.yaml").write_text(base + "log_samples: true\n")
    refused(client, {"config": str(tmp_path / "flag.yaml"), "log_samples": False}, "log_samples")
    time.sleep(0.3)
    assert job_count(client) == 0


def test_task_paths_are_confined(make_client: Any, tmp_path: Path, outside: Path) -> None:
    client = make_client()
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "link.yaml").symlink_to(outside / "evil.yaml")
    (tmp_path / "linkdir").symlink_to(outside)
    for tasks in (
        str(outside),  # a directory outside
        f"{outside}/*.yaml",  # a glob outside
        f"{tmp_path}/../{outside.name}/*.yaml",  # a glob climbing out
        f"{tasks_dir}/*.yaml",  # a glob inside whose match is a symlink out
        str(tasks_dir),  # a directory inside holding that symlink
        f"{tmp_path}/linkdir/*.yaml",  # a glob through a symlinked directory
        f"{tmp_path}/*/evil.yaml",  # a glob whose match goes through that directory
        f"{outside}/evil.yaml",
    ):
        refused(client, {"model": "dummy", "tasks": tasks}, "ALLOWED_PATHS")
    refused(client, {"model": "dummy", "tasks": f"{EXAMPLES_TASKS}/demo_mc.yml"}, ".yaml")
    refused(client, {"model": "dummy", "tasks": f"{tmp_path}/none/*.yaml"}, "matches no")
    # Also with the task index off: the path rule does not depend on it.
    no_index = make_client(task_index=False)
    refused(no_index, {"model": "dummy", "tasks": f"{outside}/*.yaml"}, "ALLOWED_PATHS")
    refused(no_index, {"model": "dummy", "tasks": str(outside)}, "ALLOWED_PATHS")
    time.sleep(0.3)
    assert job_count(client) == 0 and job_count(no_index) == 0


def test_output_path_stays_out_of_server_files(make_client: Any, tmp_path: Path) -> None:
    client = make_client()
    first = submit(client, FAKE)
    wait_for(client, first)
    data = tmp_path / "data"
    job_dir = data / "jobs" / str(first)
    before = sorted(p.name for p in job_dir.iterdir())
    for path, needle in (
        (job_dir, "another job"),
        (job_dir / "results", "another job"),
        (data / "jobs" / "99", "another job"),
        (data / "jobs.db", "server's own files"),
        (data / "jobs.db-wal", "server's own files"),
        # The warm workers' HOME: a result written there could configure what they import.
        (data / "warm" / "home" / ".config" / "fsspec", "server's own files"),
        (data / "cache" / "huggingface", "server's own files"),
        # Uploaded tasks: a job writing there could change what another owner's task reads.
        (data / "tasks" / "alice" / "t", "uploaded tasks"),
    ):
        refused(client, {**FAKE, "output_path": str(path)}, needle)
    # lm-eval files results under output_path/<model name>: `..` would climb out of it, and
    # a name like `jobs` would land in the server's jobs directory.
    refused(
        client,
        {**FAKE, "model_args": "pretrained=..", "output_path": str(tmp_path / "o")},
        "outside output_path",
    )
    refused(
        client,
        {**FAKE, "model_args": {"model": "jobs"}, "output_path": str(data)},
        "another job",
    )
    assert sorted(p.name for p in job_dir.iterdir()) == before
    assert job_count(client) == 1


def test_model_url_prefixes(make_client: Any) -> None:
    with running_stub_server() as stub:
        port = stub.server_address[1]
        client = make_client(model_url_prefixes=[f"http://127.0.0.1:{port}/v1"])
        base = {**FAKE, "model": "local-completions"}
        for url in (
            f"http://127.0.0.1:{port}@evil.example/v1/completions",
            f"http://evil.example/v1?x=http://127.0.0.1:{port}/v1",
            f"http://127.0.0.1:{port}/v1evil/completions",
            f"http://127.0.0.1:{port + 1}/v1/completions",
            f"https://127.0.0.1:{port}/v1/completions",
            f"http://127.0.0.1:{port}/v1/../admin",
            f"http://127.0.0.1:{port}\\@evil.example/v1",
            "file:///etc/passwd",
        ):
            refused(client, {**base, "model_args": {"base_url": url}}, "base_url")
            refused(client, {**base, "metadata": f"base_url={url}"}, "base_url")
        for url in (
            f"http://127.0.0.1:{port}/v1/completions",
            f"HTTP://127.0.0.1:{port}/v1/completions",
            f"http://127.0.0.1:{port}/v1",
        ):
            submit(client, {**base, "model_args": {"base_url": url}})
        assert stub.request_count == 0
        assert job_count(client) == 3


def test_lm_eval_run_time_checks_at_submission(make_client: Any, tmp_path: Path) -> None:
    client = make_client()
    for body, needle in (
        ({"fewshot_as_multiturn": True}, "apply_chat_template` must be set"),
        ({"samples": {"demo_mc": [0]}, "limit": 2}, "--limit must be None"),
        ({"config": str(tmp_path / "nope.yaml")}, "Config file not found"),
        ({"verbosity": "LOUD"}, "Unknown level"),
        ({"batch_size": "banana"}, "batch_size"),
        ({"seed": [1, 2]}, "seed"),
        ({"limit": None, "samples": "not json, not a file"}, "samples"),
    ):
        refused(client, {**FAKE, **body}, needle)
    # What the CLI accepts, in JSON types.
    for body in (
        {"batch_size": 8},
        {"seed": 42},
        {"seed": [0, 1, 2, 3]},
        {"samples": {"demo_mc": [0, 1]}, "limit": None},
        {"tasks": "demo_mc demo_mc"},
        {"apply_chat_template": True, "fewshot_as_multiturn": False},
    ):
        submit(client, {**FAKE, **body})
    job = client.get("/jobs").json()["jobs"][-1]
    detail = client.get(f"/job/{job['job_id']}").json()
    assert "--fewshot_as_multiturn false" in detail["argument"]


def test_edge_inputs_get_422(make_client: Any, tmp_path: Path) -> None:
    client = make_client()
    fake = json.dumps(FAKE)[:-1]
    for raw in ("NaN", "Infinity", "-Infinity", "1e300", "0"):
        refused(client, f'{fake}, "timeout_s": {raw}}}'.encode(), "timeout_s")
    for field in ("system_instruction", "device", "model_args"):
        refused(client, f'{fake}, "{field}": "a\\ud800b"}}'.encode(), "surrogate")
    refused(client, f'{fake}, "model_args": {{"k\\udfff": 1}}}}'.encode(), "surrogate")
    refused(client, f'{fake}, "limit": NaN}}'.encode(), "finite")
    refused(client, {**FAKE, "model_args": "a=1 -b 8"}, "starts with '-'")
    long_name = f"{tmp_path}/{'x' * 5000}"
    for body in (
        {"tasks": long_name},
        {"tasks": long_name + ".yaml"},
        {"config": long_name},
        {"samples": long_name},
    ):
        refused(client, {**FAKE, **body, "limit": None}, "cannot be used")
    for body in ({"tasks": "~/x.yaml"}, {"output_path": "~/out"}, {"tasks": "~root"}):
        refused(client, {**FAKE, **body}, "'~' is not expanded")
    assert job_count(client) == 0


def test_config_snapshot_and_task_directory_run(make_client: Any, tmp_path: Path) -> None:
    """A real lm-eval run: a task directory given through a config file. The job reads the
    validated snapshot, so editing the file after submission changes nothing."""
    client = make_client()
    config = tmp_path / "run.yaml"
    config.write_text(f"model: dummy\ntasks: {EXAMPLES_TASKS}\nlimit: 2\n")
    job_id = submit(client, {"config": str(config), "log_samples": True})
    config.write_text("model: dummy\ntasks: /nonexistent\ntrust_remote_code: true\n")
    job = wait_for(client, job_id)
    assert job["status"] == "Completed", job
    snapshot = tmp_path / "data" / "jobs" / str(job_id) / "config.yaml"
    assert str(snapshot) in job["argument"] and "trust_remote_code" not in snapshot.read_text()
    results = client.get(f"/job/{job_id}/results").json()["results"]
    assert list(results["results"]) == ["demo_mc"]
    assert results["config"]["limit"] == 2


def test_task_glob_runs(make_client: Any) -> None:
    """A real lm-eval run: a glob of task YAMLs, as lm-eval's CLI takes it."""
    client = make_client()
    job_id = submit(
        client, {"model": "dummy", "tasks": f"{EXAMPLES_TASKS}/demo_*.yaml", "limit": 2}
    )
    job = wait_for(client, job_id)
    assert job["status"] == "Completed", job
    results = client.get(f"/job/{job_id}/results").json()["results"]
    assert list(results["results"]) == ["demo_mc"]


def test_local_model_paths_must_be_inside_allowed_paths(
    make_client: Any, tmp_path: Path, outside: Path
) -> None:
    """A job's sandbox shows it only ALLOWED_PATHS: a local model elsewhere is refused at
    submission, with the setting to change, instead of failing inside the job."""
    client = make_client()
    detail = refused(
        client, {**FAKE, "model_args": f"pretrained={outside},dtype=float32"}, "ALLOWED_PATHS"
    )
    assert f"pretrained={outside}" in detail
    refused(client, {**FAKE, "model_args": {"tokenizer": str(outside / "evil.yaml")}}, "tokenizer")
    inside = tmp_path / "models" / "tiny"
    inside.mkdir(parents=True)
    job_id = submit(client, {**FAKE, "model_args": f"pretrained={inside}"})
    assert wait_for(client, job_id)["status"] == "Completed"
    # A hub id, or a path that does not exist, is lm-eval's to judge.
    submit(client, {**FAKE, "model_args": "pretrained=/no/such/model"})
    assert job_count(client) == 2
