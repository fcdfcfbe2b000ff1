"""Task discovery and uploaded tasks, end to end through the HTTP API with the real lm_eval.

The known-answer task: lm-eval's `dummy` model answers every generate_until request with
"lol", so a task whose targets are "lol" for 3 of its 5 documents scores exactly 0.6 on
exact_match.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.jobs import submit, wait_for
from tests.support.server import ServerProcess

ALICE = {"Authorization": "Bearer KA"}
BOB = {"Authorization": "Bearer KB"}
ADMIN = {"Authorization": "Bearer KROOT"}
KEYS = {"API_KEYS": "alice:KA,bob:KB", "ADMIN_KEYS": "root:KROOT"}

ANSWERS = ["lol", "no", "lol", "lol", "nope"]  # 3 of 5 are what `dummy` says: 0.6
DATA = "".join(
    json.dumps({"question": f"Say something {i}", "answer": a}) + "\n"
    for i, a in enumerate(ANSWERS)
)


def task_yaml(name: str = "say_lol", **extra: str) -> str:
    fields = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": "\n  data_files:\n    test: say.jsonl",
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": '"Q: {{ question.strip() }}\\nA:"',
        "doc_to_target": '"{{answer}}"',
        "generation_kwargs": '\n  until: ["\\n"]\n  max_gen_toks: 4',
        "metric_list": "\n  - metric: exact_match\n    aggregation: mean"
        "\n    higher_is_better: true",
        **extra,
    }
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)


def files(yaml_text: str, *others: tuple[str, str | bytes]) -> list[tuple[str, Any]]:
    sent = [("files", ("say.yaml", yaml_text.encode(), "application/x-yaml"))]
    sent += [("files", (n, c if isinstance(c, bytes) else c.encode())) for n, c in others]
    return sent


def upload(client: Any, yaml_text: str, *others: tuple[str, str | bytes], **kw: Any) -> Any:
    return client.post("/tasks", files=files(yaml_text, *others or (("say.jsonl", DATA),)), **kw)


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys=["alice:KA", "bob:KB"], admin_keys=["root:KROOT"])


def test_uploaded_task_runs_with_real_lm_eval_and_scores_the_known_answer(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers(**KEYS)
    with server.client() as http:
        created = upload(http, task_yaml(), headers=ALICE)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["name"] == "say_lol" and body["owner"] == "alice"
        assert body["source"] == "upload" and body["output_type"] == "generate_until"
        assert body["docs"] == 5  # lm-eval read the five documents when it checked the upload
        assert body["files"] == [{"name": "say.jsonl", "bytes": len(DATA.encode())}]
        stored = server.data_dir / "tasks" / "alice" / "say_lol"
        assert sorted(p.name for p in stored.iterdir()) == [
            "say.jsonl",
            "say_lol.yaml",
            "upload.json",
        ]

        alice = {**ALICE}
        job_id = submit(http, {"model": "dummy", "tasks": "say_lol"}, headers=alice)
        http.headers.update(alice)
        job = wait_for(http, job_id, timeout_s=240)
        assert job["status"] == "Completed", job
        results = http.get(f"/job/{job_id}/results").json()
        assert results["results"]["results"]["say_lol"]["exact_match,none"] == 0.6
        [metric] = [m for m in results["metrics"] if m["metric"] == "exact_match"]
        assert metric["task"] == "say_lol" and metric["value"] == 0.6
        # lm-eval read the stored YAML: the record keeps the name, the command the path.
        assert job["tasks"] == ["say_lol"]
        assert f"--tasks {stored / 'say_lol.yaml'}" in job["argument"]

        # Bob neither sees nor runs nor deletes alice's task.
        assert http.get("/tasks/say_lol", headers=BOB).status_code == 404
        listed = http.get("/tasks", params={"source": "upload"}, headers=BOB).json()
        assert listed == {"tasks": [], "total": 0}
        refused = http.post("/job", json={"model": "dummy", "tasks": "say_lol"}, headers=BOB)
        assert refused.status_code == 422
        assert "Unknown task(s): 'say_lol'" in refused.json()["detail"]
        assert http.delete("/tasks/say_lol", headers=BOB).status_code == 404
        # Nor reaches her files by path.
        by_path = http.post(
            "/job",
            json={"model": "dummy", "tasks": str(stored / "say_lol.yaml")},
            headers=BOB,
        )
        assert by_path.status_code == 422
        assert "uploaded tasks (DATA_DIR/tasks)" in by_path.json()["detail"]
        include = http.post(
            "/job",
            json={"model": "dummy", "tasks": "say_lol", "include_path": str(stored)},
            headers=BOB,
        )
        assert include.status_code == 422
        assert include.json()["detail"].startswith(
            f"include_path: {stored} is inside the server's uploaded tasks (DATA_DIR/tasks)"
        )

        # The admin sees every owner's uploads.
        everyone = http.get("/tasks", params={"source": "upload"}, headers=ADMIN).json()
        assert [(t["name"], t["owner"]) for t in everyone["tasks"]] == [("say_lol", "alice")]

        # Bob may upload a task of the same name: his own, with his own data.
        bob_data = json.dumps({"question": "q", "answer": "lol"}) + "\n"
        mine = upload(http, task_yaml(), ("say.jsonl", bob_data), headers=BOB)
        assert mine.status_code == 201 and mine.json()["docs"] == 1
        assert http.get("/tasks/say_lol", headers=ALICE).json()["docs"] == 5

        # Alice deletes hers; then it is gone for her and her jobs, Bob's stays.
        deleted = http.delete("/tasks/say_lol", headers=ALICE)
        assert deleted.json() == {
            "message": "Uploaded task say_lol deleted.",
            "name": "say_lol",
            "owner": "alice",
        }
        assert not stored.exists()
        assert http.get("/tasks/say_lol", headers=ALICE).status_code == 404
        gone = http.post("/job", json={"model": "dummy", "tasks": "say_lol"}, headers=ALICE)
        assert gone.status_code == 422
        assert http.get("/tasks/say_lol", headers=BOB).json()["owner"] == "bob"

        # Uploads and deletes are in the audit trail.
        trail = http.get("/audit", params={"action": "task_upload"}, headers=ADMIN).json()
        assert [(e["principal"], e["target"], e["outcome"]) for e in trail["entries"]] == [
            ("bob", "bob/say_lol", "stored: 1 documents"),
            ("alice", "alice/say_lol", "stored: 5 documents"),
        ]
        trail = http.get("/audit", params={"action": "task_delete"}, headers=ADMIN).json()
        assert [(e["principal"], e["target"]) for e in trail["entries"]] == [
            ("alice", "alice/say_lol")
        ]


def test_upload_too_large_gets_413_naming_max_upload_bytes(
    servers: Callable[..., ServerProcess],
) -> None:
    # Larger than MAX_BODY_BYTES is fine for an upload, up to MAX_UPLOAD_BYTES.
    server = servers(MAX_BODY_BYTES="2048", MAX_UPLOAD_BYTES="20000")
    big_row = json.dumps({"question": "x" * 100, "answer": "lol"}) + "\n"
    with server.client() as http:
        ok = upload(http, task_yaml(), ("say.jsonl", big_row * 40))  # ~5 KB
        assert ok.status_code == 201, ok.text
        assert ok.json()["docs"] == 40
        too_big = upload(http, task_yaml(), ("say.jsonl", big_row * 200))  # ~25 KB
        assert too_big.status_code == 413
        assert too_big.json() == {
            "detail": "Request body is larger than the server's limit of 20000 bytes "
            "(MAX_UPLOAD_BYTES)"
        }
        # Every other route keeps MAX_BODY_BYTES.
        job = http.post("/job", json={"model": "dummy", "tasks": "x" * 3000})
        assert job.status_code == 413 and "MAX_BODY_BYTES" in job.json()["detail"]


REFUSALS = [
    pytest.param(
        task_yaml(process_results="!function utils.process_results"),
        [("say.jsonl", DATA)],
        422,
        "process_results: this field runs Python, which this server refuses in uploaded "
        "tasks (the operator can allow it with ALLOW_REMOTE_CODE=true)",
        id="python-field",
    ),
    pytest.param(
        task_yaml(doc_to_text="!function utils.doc_to_text"),
        [("say.jsonl", DATA)],
        422,
        "doc_to_text: !function runs Python, which this server refuses in uploaded tasks "
        "(the operator can allow it with ALLOW_REMOTE_CODE=true)",
        id="function-tag",
    ),
    pytest.param(
        task_yaml(doc_to_text="\"{{ cycler.__init__.__globals__.os.popen('id').read() }}\""),
        [("say.jsonl", DATA)],
        422,
        "doc_to_text: the template uses ",
        id="jinja-escape",
    ),
    pytest.param(
        task_yaml(dataset_kwargs="\n  data_files:\n    test: ../../../etc/passwd"),
        [("say.jsonl", DATA)],
        422,
        "dataset_kwargs.data_files: '../../../etc/passwd': name an uploaded file by its plain "
        "name (no directories, no globs, no absolute paths)",
        id="data-files-escape",
    ),
    pytest.param(
        task_yaml(dataset_kwargs="\n  data_files:\n    test: other.jsonl"),
        [("say.jsonl", DATA)],
        422,
        "dataset_kwargs.data_files: 'other.jsonl' is not among the uploaded data files "
        "(say.jsonl); upload it in the same request",
        id="data-file-missing",
    ),
    pytest.param(
        task_yaml(include="../../lm_eval/tasks/arc/arc_easy.yaml"),
        [("say.jsonl", DATA)],
        422,
        "include: an upload is one self-contained task YAML",
        id="include",
    ),
    pytest.param(
        task_yaml(dataset_path="allenai/ai2_arc"),
        [("say.jsonl", DATA)],
        422,
        "dataset_path: 'allenai/ai2_arc': an uploaded task reads its own files with a local "
        "loader, one of csv, json",
        id="hub-dataset",
    ),
    pytest.param(
        task_yaml(),
        [("say.jsonl", DATA), ("run.sh", "echo hi")],
        415,
        "file 'run.sh': unsupported file type; an upload holds a task YAML (.yaml, .yml) and "
        "its data files (.jsonl, .json, .csv)",
        id="wrong-type",
    ),
    pytest.param(
        task_yaml(),
        [("say.jsonl", DATA), ("utils.py", "import os")],
        422,
        "file 'utils.py': Python files are refused by this server",
        id="python-file",
    ),
    pytest.param(
        "task: say_lol\ndoc_to_text: [unclosed\n",
        [("say.jsonl", DATA)],
        422,
        "say.yaml is not valid YAML: ",
        id="malformed-yaml",
    ),
    pytest.param(
        task_yaml(name="arc_easy"),
        [("say.jsonl", DATA)],
        409,
        "task 'arc_easy' is one of lm-eval's own tasks, groups or tags; give the uploaded "
        "task another name (task: in the YAML)",
        id="builtin-name",
    ),
    pytest.param(
        task_yaml(),
        [("say.jsonl", "this is not json\n")],
        422,
        "lm-eval could not load the task: ",
        id="lm-eval-load-error",
    ),
    pytest.param(
        task_yaml(metric_list="\n  - metric: my_metric_script.py"),
        [("say.jsonl", DATA)],
        422,
        "lm-eval could not load the task: metric_list: 'my_metric_script.py' is not a metric "
        "lm-eval registers",
        id="unregistered-metric",
    ),
    pytest.param(
        task_yaml(output_type="generate_untill"),
        [("say.jsonl", DATA)],
        422,
        "output_type: 'generate_untill' is not one of loglikelihood, loglikelihood_rolling, "
        "multiple_choice, generate_until",
        id="bad-output-type",
    ),
]


@pytest.mark.parametrize(("yaml_text", "others", "status", "detail"), REFUSALS)
def test_upload_refusals_say_why(
    keyed: TestClient,
    yaml_text: str,
    others: list[tuple[str, str]],
    status: int,
    detail: str,
) -> None:
    response = upload(keyed, yaml_text, *others, headers=ALICE)
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(detail), response.json()
    # Nothing was stored, nothing is listed.
    assert keyed.get("/tasks", params={"source": "upload"}, headers=ALICE).json()["total"] == 0


def test_file_names_count_and_shape_of_an_upload(keyed: TestClient, make_settings: Any) -> None:
    def detail(sent: list[tuple[str, Any]]) -> tuple[int, str]:
        response = keyed.post("/tasks", files=sent, headers=ALICE)
        return response.status_code, response.json()["detail"]

    data = ("files", ("say.jsonl", DATA.encode()))
    status, text = detail([("files", ("../say.yaml", task_yaml().encode())), data])
    assert status == 422 and text.startswith("file name '../say.yaml': use a plain file name")
    status, text = detail([data])
    assert (status, text) == (
        422,
        "an upload holds exactly one task YAML (.yaml or .yml); got 0",
    )
    two = [("files", ("a.yaml", b"task: a\n")), ("files", ("b.yaml", b"task: b\n")), data]
    assert detail(two) == (
        422,
        "an upload holds exactly one task YAML (.yaml or .yml); got 2: a.yaml, b.yaml",
    )
    many = [("files", ("say.yaml", task_yaml().encode()))] + [
        ("files", (f"d{i}.jsonl", b"{}\n")) for i in range(16)
    ]
    assert detail(many) == (422, "17 files sent; an upload holds at most 16 (MAX_UPLOAD_FILES)")
    response = keyed.post("/tasks", data={"x": "1"}, headers=ALICE)
    assert response.status_code == 422  # no `files` field at all


def test_reupload_replaces_and_jobs_see_the_new_data(keyed: TestClient) -> None:
    first = upload(keyed, task_yaml(), headers=ALICE)
    assert first.status_code == 201 and first.json()["replaced"] is False
    # ISO 8601 in UTC, as a job's created_at (not epoch seconds).
    created = datetime.fromisoformat(first.json()["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600
    detail = keyed.get("/tasks/say_lol", headers=ALICE).json()
    assert detail["created_at"] == first.json()["created_at"]
    again = upload(keyed, task_yaml(), ("say.jsonl", DATA + DATA), headers=ALICE)
    assert again.status_code == 201
    assert again.json()["replaced"] is True and again.json()["docs"] == 10
    assert keyed.get("/tasks/say_lol", headers=ALICE).json()["docs"] == 10
    # Run by exact name: a pattern does not reach an upload; a typo is told the name.
    pattern = keyed.post("/job", json={"model": "dummy", "tasks": "say_l*"}, headers=ALICE)
    assert pattern.status_code == 422
    assert pattern.json()["detail"].startswith("Unknown task(s): 'say_l*'")
    typo = keyed.post("/job", json={"model": "dummy", "tasks": "say_loll"}, headers=ALICE)
    assert typo.json()["detail"].startswith("Unknown task(s): 'say_loll' (did you mean: say_lol")


def test_listing_search_kind_and_paging(keyed: TestClient) -> None:
    assert upload(keyed, task_yaml(name="my_arc_probe"), headers=ALICE).status_code == 201

    def listed(headers: dict[str, str] = ALICE, **params: Any) -> dict[str, Any]:
        response = keyed.get("/tasks", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    found = listed(search="ARC_EASY", limit=500)
    names = [t["name"] for t in found["tasks"]]
    assert all("arc_easy" in n.lower() for n in names)
    # Names that start with the search first, each part in name order.
    starts = [n for n in names if n.startswith("arc_easy")]
    assert names == sorted(starts) + sorted(n for n in names if n not in starts)
    assert names[0] == "arc_easy"
    assert found["total"] == len(names)
    arc = next(t for t in found["tasks"] if t["name"] == "arc_easy")
    assert arc == {
        "name": "arc_easy",
        "kind": "task",
        "output_type": "multiple_choice",
        "source": "lm-eval",
        "owner": None,
    }

    mine = listed(search="arc_probe")
    assert mine == {
        "tasks": [
            {
                "name": "my_arc_probe",
                "kind": "task",
                "output_type": "generate_until",
                "source": "upload",
                "owner": "alice",
            }
        ],
        "total": 1,
    }
    assert listed(BOB, search="arc_probe") == {"tasks": [], "total": 0}

    groups = listed(kind="group", search="mmlu", limit=500)
    assert groups["tasks"] and {t["kind"] for t in groups["tasks"]} == {"group"}
    assert "mmlu" in [t["name"] for t in groups["tasks"]]
    assert all(t["output_type"] is None for t in groups["tasks"])
    tags = listed(kind="tag", search="ai2_arc")
    assert [t["name"] for t in tags["tasks"]] == ["ai2_arc"]
    assert listed(kind="group", search="arc_probe")["total"] == 0  # uploads are tasks

    # Pages of the same query tile the whole list, in one order.
    whole = listed(search="arc", limit=500)
    pages = [listed(search="arc", limit=7, offset=o)["tasks"] for o in range(0, 21, 7)]
    assert [t for page in pages for t in page] == whole["tasks"][:21]
    assert listed(limit=0)["tasks"] == [] and listed(limit=0)["total"] > 10_000

    # Bounded: past the limits is a 422 naming the parameter.
    too_many = keyed.get("/tasks", params={"limit": 501}, headers=ALICE)
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == [
        "query",
        "limit",
    ]
    assert keyed.get("/tasks", params={"kind": "model"}, headers=ALICE).status_code == 422


def test_task_detail_of_builtin_and_models(keyed: TestClient) -> None:
    detail = keyed.get("/tasks/arc_easy", headers=ALICE).json()
    assert detail["source"] == "lm-eval" and detail["kind"] == "task"
    assert detail["config"]["dataset_path"] == "allenai/ai2_arc"
    assert detail["config"]["doc_to_text"] == "Question: {{question}}\nAnswer:"
    group = keyed.get("/tasks/mmlu", headers=ALICE).json()
    assert group["kind"] == "group" and group["config"]["group"] == "mmlu"
    missing = keyed.get("/tasks/no_such_task_xyz", headers=ALICE)
    assert missing.status_code == 404
    assert "neither one of lm-eval's tasks" in missing.json()["detail"]

    models = {m["name"]: m for m in keyed.get("/models", headers=ALICE).json()["models"]}
    assert models["dummy"] == {
        "name": "dummy",
        "backend": "dummy",
        "requires": [],
        "extra": None,
        "installed": True,
        "install": None,
    }
    assert models["local-completions"]["installed"] is True
    hf = models["hf"]
    assert hf["requires"] == ["torch", "transformers", "accelerate"] and hf["extra"] == "hf"
    try:
        import torch  # noqa: F401
    except ImportError:
        assert hf["installed"] is False and "uv sync --extra hf" in hf["install"]
    else:
        assert hf["installed"] is True


def test_listing_waits_for_the_index_with_503(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    # An empty index dir: the index builds in the background; /tasks answers 503 meanwhile.
    client = make_client(index_dir=tmp_path / "fresh-index")
    response = client.get("/tasks")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "task index is still being built" in response.json()["detail"]
    upload_now = upload(client, task_yaml())
    assert upload_now.status_code == 503


def test_uploaded_task_with_remote_code_allowed(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(allow_remote_code=True)
    utils = "def docs(dataset):\n    return dataset.filter(lambda d: d['answer'] == 'lol')\n"
    response = upload(
        client,
        task_yaml(process_docs="!function utils.docs"),
        ("say.jsonl", DATA),
        ("utils.py", utils),
    )
    assert response.status_code == 201, response.text
    assert response.json()["docs"] == 3  # the function ran in lm-eval's check
    escape = upload(
        client,
        task_yaml(process_docs="!function ../../utils.docs"),
        ("say.jsonl", DATA),
        ("utils.py", utils),
    )
    assert escape.status_code == 422
    assert "name a function of an uploaded file as module.function" in escape.json()["detail"]
