"""Fidelity on real backends: a job's results equal, value for value, those of the same options
run with `python -m lm_eval` directly.

Backends: a tiny GPT-2 built here (`hf`, torch on CPU; skipped when torch is not installed),
`dummy` (seeded), and the test stub for `local-completions` (with a locally trained HF
tokenizer) and `local-chat-completions` (with `apply_chat_template`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.completions_server import running_stub_server
from tests.support.jobs import (
    EXAMPLES_TASKS,
    ROOT,
    TEST_TASKS,
    group_members,
    process_alive,
    submit,
)
from tests.support.tiny_model import build_model, build_tokenizer

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (install the hf extra: uv sync --extra hf)"
)

# Parts of lm-eval's results JSON that differ between two runs of the same evaluation, and why.
# Everything else (scores, stderr, configs, task hashes, model and seed settings, versions,
# tokenizer facts, n-samples) must match exactly.
VOLATILE_KEYS = {
    "date": "wall-clock start time of the run",
    "start_time": "wall-clock time (perf counter) when the evaluation began",
    "end_time": "wall-clock time (perf counter) when the evaluation ended",
    "total_evaluation_time_seconds": "duration of the run",
    "git_hash": "hash of the repository around the process's working directory",
    "upper_git_hash": "same, for the parent repository",
    "pretty_env_info": "environment report (CPU flags, library builds), not the evaluation",
}


def normalise(results: dict[str, Any]) -> dict[str, Any]:
    """`results` without the VOLATILE_KEYS (top level only: nothing nested is dropped)."""
    return {k: v for k, v in results.items() if k not in VOLATILE_KEYS}


def results_file(output_path: Path) -> dict[str, Any]:
    files = sorted(output_path.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def to_argv(body: dict[str, Any]) -> list[str]:
    """What a person would type for `body` (only the option kinds these tests use)."""
    argv: list[str] = []
    for key, value in body.items():
        if value is True:
            argv.append(f"--{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def start_cli(body: dict[str, Any], output_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "lm_eval", *to_argv(body), "--output_path", str(output_path)]
    log = open(output_path.parent / "cli.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def finish_cli(proc: subprocess.Popen[bytes], output_path: Path) -> dict[str, Any]:
    code = proc.wait(timeout=600)
    assert code == 0, (output_path.parent / "cli.log").read_text()[-4000:]
    return results_file(output_path)


def wait_sampling(client: Any, job_id: int, timeout_s: float = 600) -> tuple[dict, list[float]]:
    """The finished job, and every `inference_progress_pct` seen while it ran."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/job/{job_id}").json()
        if job.get("inference_progress_pct") is not None:
            seen.append(job["inference_progress_pct"])
        if job["status"] in ("Completed", "Failed", "Stopped"):
            return job, seen
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def assert_same_as_cli(
    client: Any, body: dict[str, Any], tmp_path: Path
) -> tuple[dict[str, Any], dict[str, Any], list[float]]:
    """Runs `body` through the API and the CLI at once; returns (server results, job, pcts)."""
    cli_out = tmp_path / "cli" / "out"
    cli_out.parent.mkdir(parents=True)
    proc = start_cli(body, cli_out)
    try:
        job_id = submit(client, body)
        job, seen = wait_sampling(client, job_id)
    finally:
        cli = finish_cli(proc, cli_out)
    assert job["status"] == "Completed", job.get("error")
    served = client.get(f"/job/{job_id}/results").json()["results"]
    assert normalise(served) == normalise(cli)
    return served, job, seen


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo_mc (loglikelihood) and the arith_gen tasks (generation) in one include_path."""
    path = tmp_path_factory.mktemp("tasks")
    for name in ("_load.py", "arith_gen.yaml", "arith_gen.jsonl", "arith_gen_tiny.yaml"):
        shutil.copy(TEST_TASKS / name, path / name)
    for name in ("demo_mc.yaml", "demo_mc.jsonl"):
        shutil.copy(EXAMPLES_TASKS / name, path / name)
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the local models live: an ALLOWED_PATHS directory of the servers that run them
    (a job's sandbox shows it only those, and validation refuses a model path outside)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_tokenizer(models_dir: Path) -> Path:
    (models_dir / "tiny-tokenizer").mkdir()
    return build_tokenizer(models_dir / "tiny-tokenizer")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    if not HAS_TORCH:
        pytest.skip("torch is not installed (install the hf extra: uv sync --extra hf)")
    (models_dir / "tiny-gpt2").mkdir()
    return build_model(models_dir / "tiny-gpt2")


@pytest.fixture
def backend_client(make_client: Any, tmp_path: Path, task_dir: Path, models_dir: Path) -> Any:
    allowed = [tmp_path, task_dir, models_dir, ROOT / "tests" / "data"]
    return make_client(allowed_paths=[str(p) for p in allowed])


@pytest.fixture
def stub() -> Iterator[Any]:
    with running_stub_server() as server:
        yield server


# ---------------------------------------------------------------------------------- hf


@needs_torch
def test_hf_tiny_model_matches_cli(
    backend_client: Any, tiny_model: Path, task_dir: Path, tmp_path: Path
) -> None:
    body = {
        "model": "hf",
        "model_args": f"pretrained={tiny_model},dtype=float32",
        "device": "cpu",
        "tasks": "demo_mc,arith_gen_tiny",
        "include_path": str(task_dir),
    }
    served, job, seen = assert_same_as_cli(backend_client, body, tmp_path)
    assert served["results"]["demo_mc"]["sample_len"] == 20
    assert served["results"]["arith_gen_tiny"]["sample_len"] == 20
    assert served["n-samples"]["demo_mc"]["effective"] == 20
    assert served["config"]["model"] == "hf" and served["config"]["device"] == "cpu"
    assert served["config"]["model_num_parameters"] > 0
    # The progress rule: never down, and complete at the end.
    steps = [str(p) for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]]
    assert seen == sorted(seen), "progress went down: " + " ".join(steps)
    assert job["inference_progress_pct"] == 100


@needs_torch
def test_stop_while_torch_computes_leaves_no_process(
    backend_client: Any, tiny_model: Path, task_dir: Path
) -> None:
    # 200 generations of up to 256 tokens: minutes of torch work, far longer than the test.
    job_id = submit(
        backend_client,
        {
            "model": "hf",
            "model_args": f"pretrained={tiny_model},dtype=float32",
            "device": "cpu",
            "tasks": "arith_gen",
            "include_path": str(task_dir),
            "gen_kwargs": "max_gen_toks=256",
        },
    )
    deadline = time.monotonic() + 300
    while True:
        job = backend_client.get(f"/job/{job_id}").json()
        assert job["status"] == "Running" or job["status"] == "Queued", job
        if any("Running generate_until requests" in line for line in job["stderr"]):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    pid = backend_client.app.state.server.manager.get(job_id).pid
    assert pid and group_members(pid)
    assert backend_client.post(f"/job/{job_id}/stop").status_code == 200
    job = backend_client.get(f"/job/{job_id}").json()
    assert job["status"] == "Stopped"
    assert group_members(pid) == []
    assert not process_alive(pid)


# ------------------------------------------------------------------------------- dummy


def test_dummy_matches_cli(backend_client: Any, task_dir: Path, tmp_path: Path) -> None:
    # dummy scores with `random.random()`; lm-eval seeds `random` (--seed), so two processes
    # with the same seed give the same numbers: the whole results JSON must match.
    body = {"model": "dummy", "tasks": "demo_mc,arith_gen_tiny", "include_path": str(task_dir)}
    served, _, _ = assert_same_as_cli(backend_client, body, tmp_path)
    assert served["results"]["demo_mc"]["sample_len"] == 20
    assert served["results"]["arith_gen_tiny"]["exact_match,none"] == 0.0  # dummy says "lol"


# ----------------------------------------------------------------------- stub backends


def test_local_completions_with_hf_tokenizer_matches_cli(
    backend_client: Any, stub: Any, tiny_tokenizer: Path, task_dir: Path, tmp_path: Path
) -> None:
    # As example.json does: a `tokenizer=` model_arg (here a local directory, no download)
    # loaded by transformers in the job, without torch.
    body = {
        "model": "local-completions",
        "model_args": (
            f"model=stub,base_url={stub.base_url},tokenizer={tiny_tokenizer},"
            "tokenized_requests=False,num_concurrent=1,max_retries=1"
        ),
        "tasks": "arith_gen_tiny",
        "include_path": str(task_dir),
    }
    served, _, _ = assert_same_as_cli(backend_client, body, tmp_path)
    assert served["results"]["arith_gen_tiny"]["exact_match,none"] == 13 / 20
    assert served["tokenizer_eos_token"][0] == "<|endoftext|>"
    assert stub.prompt_count == 2 * 20  # the server's job and the CLI's


def test_local_chat_completions_with_chat_template_matches_cli(
    backend_client: Any, stub: Any, task_dir: Path, tmp_path: Path
) -> None:
    body = {
        "model": "local-chat-completions",
        "model_args": f"model=stub,base_url={stub.chat_base_url},num_concurrent=1,max_retries=1",
        "tasks": "arith_gen_tiny",
        "include_path": str(task_dir),
        "apply_chat_template": True,
        "num_fewshot": 2,
    }
    served, _, _ = assert_same_as_cli(backend_client, body, tmp_path)
    # Few-shot examples become earlier turns; the stub answers the last question.
    assert served["results"]["arith_gen_tiny"]["exact_match,none"] == 13 / 20
    assert served["n-shot"]["arith_gen_tiny"] == 2
    assert stub.request_count == 2 * 20


# --------------------------------------------------------------------- missing backends


def test_missing_backend_is_refused_with_the_install_command(
    backend_client: Any, task_dir: Path
) -> None:
    # vllm is never installed in this project's test environments (it needs a GPU).
    assert importlib.util.find_spec("vllm") is None
    body = {"model": "vllm", "model_args": "pretrained=x", "tasks": "demo_mc"}
    body["include_path"] = str(task_dir)
    response = backend_client.post("/job", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "uv sync --extra vllm" in detail and "missing: vllm" in detail
    assert backend_client.get("/jobs").json()["jobs"] == []  # nothing queued


def test_hf_accepted_exactly_when_torch_is_installed(backend_client: Any, task_dir: Path) -> None:
    body = {"model": "hf", "model_args": "pretrained=/nonexistent", "tasks": "demo_mc"}
    body["include_path"] = str(task_dir)
    response = backend_client.post("/job", json=body)
    if HAS_TORCH:
        assert response.status_code == 200, response.text
        backend_client.get("/jobs/stop")
    else:
        assert response.status_code == 422
        assert "uv sync --extra hf" in response.json()["detail"]


def test_other_interpreters_are_not_judged(backend_client: Any, task_dir: Path) -> None:
    # A job run by another program may have packages this server lacks: not refused here.
    body = {"model": "vllm", "tasks": "demo_mc", "include_path": str(task_dir)}
    from tests.support.jobs import FAKE_LM_EVAL

    response = backend_client.post("/job", json={**body, "lm_eval_path": FAKE_LM_EVAL})
    assert response.status_code == 200, response.text
    backend_client.get("/jobs/stop")
