"""Issue 20's template chain, end to end: refused at upload by the rule, and rendered in Jinja's
sandbox, without reaching `os`, in a real lm_eval job and in the upload check.

The chain: item access with keys from the data falls back to attribute access (`loop[k1]` with
k1 = "__init__", then "__globals__", then "sys"), `{% set %}` names each step, and
`sys.modules.os.makedirs(marker, ...)` proves it reached `os`. Without the launcher
(USE_LAUNCHER false: plain `python -m lm_eval`), the same job does create the marker: the
payload works.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.support.jobs import submit, wait_for

MARKER = "reached_os_marker"
CHAIN = (
    "{% for x in xs %}{% set a = loop[k1] %}{% set g = a[k2] %}{% set s = g[k3] %}"
    "{% set o = s.modules.os %}{{ o.makedirs(marker, exist_ok=True) }}{% endfor %}Q:"
)
# The same chain ending in a call the rule's method list allows: only the flow rule stops it.
CHAIN_GET = CHAIN.replace("o.makedirs(marker, exist_ok=True)", "o.environ.get('OPENAI_API_KEY')")
DOC = {"xs": [1], "k1": "__init__", "k2": "__globals__", "k3": "sys", "marker": MARKER}


def task_yaml(name: str, data_file: str, template: str = CHAIN) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_text: {json.dumps(template)}\n"
        'doc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
        "metric_list:\n  - metric: exact_match\n"
    )


def data() -> str:
    return "".join(json.dumps({**DOC, "answer": a}) + "\n" for a in ("lol", "no"))


def include_path_task(root: Path) -> Path:
    tasks = root / "chain_tasks"
    tasks.mkdir()
    (tasks / "chain.jsonl").write_text(data())
    (tasks / "chain.yaml").write_text(task_yaml("template_chain", str(tasks / "chain.jsonl")))
    return tasks


def run(client: TestClient, tasks: Path) -> tuple[dict[str, Any], Path]:
    body = {"model": "dummy", "tasks": "template_chain", "include_path": str(tasks)}
    job = wait_for(client, submit(client, body), timeout_s=240)
    work_dir = Path(client.app.state.server.settings.jobs_dir) / str(job["job_id"])  # type: ignore[attr-defined]
    return job, work_dir


def test_the_chain_renders_in_the_sandbox_in_a_real_job(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    tasks = include_path_task(tmp_path)
    client = make_client(allow_remote_code=True)
    job, work_dir = run(client, tasks)
    assert job["status"] == "Failed", job
    log = client.get(f"/job/{job['job_id']}/logs", params={"stream": "stderr"}).text
    assert "SecurityError" in log and "__init__" in log, log[-3000:]
    assert not (work_dir / MARKER).exists()
    assert not list(tmp_path.rglob(MARKER))


def test_without_the_launcher_the_same_job_reaches_os(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """The control: plain lm-eval renders the chain unsandboxed, and it runs os.makedirs."""
    tasks = include_path_task(tmp_path)
    client = make_client(allow_remote_code=True, use_launcher=False)
    job, work_dir = run(client, tasks)
    log = client.get(f"/job/{job['job_id']}/logs", params={"stream": "stderr"}).text
    assert job["status"] == "Completed", (job, log[-3000:])
    assert (work_dir / MARKER).is_dir()


def upload(client: TestClient, template: str = CHAIN, **kw: Any) -> Any:
    files = [
        ("files", ("chain.yaml", task_yaml("template_chain", "chain.jsonl", template).encode())),
        ("files", ("chain.jsonl", data().encode())),
    ]
    return client.post("/tasks", files=files, **kw)


def test_the_rule_refuses_the_chain_at_upload(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    response = upload(client, CHAIN_GET)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith(
        "doc_to_text: the template uses item access on a value that is not plain data"
    ), detail
    assert upload(client).status_code == 422  # os.makedirs: also not a method it allows


def test_with_remote_code_the_upload_check_renders_it_in_the_sandbox(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """ALLOW_REMOTE_CODE lifts the rule; lm-eval's check still renders the first document,
    in the sandbox: the upload is refused with the SecurityError, and os was not reached."""
    client = make_client(allow_remote_code=True)
    response = upload(client)
    assert response.status_code == 422, response.text
    assert "SecurityError" in response.json()["detail"], response.text
    data_dir = Path(client.app.state.server.settings.data_dir)  # type: ignore[attr-defined]
    assert not list(data_dir.rglob(MARKER))
    assert not list(Path.cwd().glob(MARKER))
