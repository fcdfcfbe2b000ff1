"""Tests for the completions stub and the arith_gen task, including a real lm_eval CLI run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.completions_server import (
    CORRECT_PER_CYCLE,
    CYCLE,
    answer_for,
    is_answered_correctly,
    model_args_for,
    running_completions_server,
    running_stub_server,
    wrong_ids_for_model,
    wrong_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO_ROOT / "tests" / "data" / "tasks"
STUB_SCRIPT = REPO_ROOT / "tests" / "support" / "completions_server.py"


def _docs() -> list[dict[str, Any]]:
    lines = (TASKS_DIR / "arith_gen.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _prompt(doc: dict[str, Any]) -> str:
    # Mirrors doc_to_text in arith_gen.yaml; test_task_yaml_matches_prompt keeps them in sync.
    return f"Question {doc['id']}: What is {doc['a']} + {doc['b']}?\nAnswer:"


def test_task_yaml_matches_prompt() -> None:
    text = (TASKS_DIR / "arith_gen.yaml").read_text(encoding="utf-8")
    assert 'doc_to_text: "Question {{id}}: What is {{a}} + {{b}}?\\nAnswer:"' in text


def test_dataset_shape() -> None:
    docs = _docs()
    assert [d["id"] for d in docs] == list(range(200))
    assert all(d["answer"] == str(int(d["a"]) + int(d["b"])) for d in docs)


def test_rule_gives_135_of_200() -> None:
    assert sum(is_answered_correctly(i) for i in range(200)) == 135
    assert sum(is_answered_correctly(i) for i in range(CYCLE)) == CORRECT_PER_CYCLE
    # arith_gen_tiny is the first 20 docs.
    assert sum(is_answered_correctly(i) for i in range(20)) == 13


def test_answer_for_rule() -> None:
    assert answer_for("Question 0: What is 2 + 3?\nAnswer:") == "5\n"
    assert answer_for("Question 2: What is 2 + 3?\nAnswer:") == "6\n"  # id 2 is a miss
    # Few-shot style prompts: the last question is the one answered.
    two = "Question 2: What is 1 + 1?\nAnswer: 2\n\nQuestion 0: What is 4 + 4?\nAnswer:"
    assert answer_for(two) == "8\n"
    assert answer_for("What is 10 + 20?") == "30\n"
    assert answer_for("no arithmetic here") == "\n"


def test_batched_completions_over_the_whole_task() -> None:
    docs = _docs()
    with running_stub_server() as server, httpx.Client() as client:
        resp = client.post(
            server.base_url,
            json={"model": "stub", "prompt": [_prompt(d) for d in docs], "stop": ["\n"]},
        )
        resp.raise_for_status()
        body = resp.json()
        assert server.request_count == 1
        assert server.prompt_count == 200
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(200))
    correct = 0
    for doc, choice in zip(docs, choices, strict=True):
        expected_ok = is_answered_correctly(int(doc["id"]))
        assert (choice["text"] == doc["answer"]) is expected_ok
        correct += choice["text"] == doc["answer"]
    assert correct == 135


def test_single_prompt_stop_and_chat() -> None:
    with running_stub_server() as server, httpx.Client() as client:
        single = client.post(server.base_url, json={"prompt": "Question 0: What is 1 + 2?"})
        # Without a stop sequence the raw completion, trailing newline included, comes back.
        assert single.json()["choices"] == [
            {"index": 0, "text": "3\n", "logprobs": None, "finish_reason": "stop"}
        ]
        chat = client.post(
            server.chat_base_url,
            json={
                "messages": [{"role": "user", "content": "Question 2: What is 1 + 2?"}],
                "stop": ["\n"],
            },
        )
        assert chat.json()["choices"][0]["message"]["content"] == "4"
        logprobs = client.post(server.base_url, json={"prompt": "x", "echo": True, "logprobs": 1})
        assert logprobs.status_code == 400
        assert client.post(server.base_url.replace("completions", "nope")).status_code == 404
        stats = client.get(server.base_url.replace("/v1/completions", "/stats")).json()
        assert stats == {"requests": 2, "prompts": 2}
        assert server.request_count == 2


def test_running_completions_server_yields_url() -> None:
    with running_completions_server() as url, httpx.Client() as client:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1/completions", url)
        assert client.get(url.replace("/v1/completions", "/health")).json() == {"ok": True}


@pytest.mark.parametrize(
    "argv",
    [
        [str(STUB_SCRIPT)],
        ["-m", "tests.support.completions_server"],
    ],
    ids=["by-path", "as-module"],
)
def test_main_entry_serves_until_killed(argv: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, *argv, "--port", "0", "--delay-s", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1/completions", url)
        resp = httpx.post(url, json={"prompt": "Question 0: What is 20 + 22?", "stop": ["\n"]})
        assert resp.json()["choices"][0]["text"] == "42"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_model_args_for() -> None:
    args = model_args_for("http://127.0.0.1:1/v1/completions")
    assert args == (
        "model=stub,base_url=http://127.0.0.1:1/v1/completions,tokenizer_backend=None,"
        "tokenized_requests=False,num_concurrent=1,max_retries=1,eos_string=</s>"
    )


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_lm_eval_cli_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        # Keep the datasets cache of the local JSON out of the user's home directory.
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
    }
    out_dir = tmp_path / "out"
    # A few ms per request spreads the 220 requests over ~1-2 s, so tqdm (which redraws at
    # most every 0.1 s) is guaranteed to emit intermediate frames, without slowing the test much.
    with running_completions_server(delay_s=0.003) as url:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "local-completions",
                "--model_args",
                model_args_for(url),
                "--tasks",
                "arith_gen,arith_gen_tiny",
                "--include_path",
                str(TASKS_DIR),
                "--output_path",
                str(out_dir),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=170,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]

    result_files = sorted((out_dir / "stub").glob("results_*.json"))
    assert len(result_files) == 1, list(out_dir.rglob("*"))
    results = json.loads(result_files[0].read_text(encoding="utf-8"))["results"]
    assert results["arith_gen"]["exact_match,none"] == 135 / 200
    assert results["arith_gen_tiny"]["exact_match,none"] == 13 / 20

    # tqdm redraws in place with carriage returns; both tasks share one bar per request type.
    frames = re.findall(r"Requesting API:\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)", proc.stderr)
    assert frames, proc.stderr[-4000:]
    assert ("100", "220", "220") in frames
    assert any(0 < int(done) < int(total) for _, done, total in frames)


def test_chat_answers_the_last_question_of_a_multiturn_chat() -> None:
    # lm-eval's few-shot-as-multiturn chats: examples as earlier user/assistant turns.
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "Question 0: What is 1 + 1?\nAnswer:"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Question 2: What is 20 + 22?\nAnswer:"},
    ]
    with running_stub_server() as server, httpx.Client() as client:
        first = client.post(server.chat_base_url, json={"messages": messages, "stop": ["\n"]})
        again = client.post(server.chat_base_url, json={"messages": messages, "stop": ["\n"]})
        no_stop = client.post(server.chat_base_url, json={"messages": messages[:2]})
        assert server.request_count == 3 and server.prompt_count == 3
    body = first.json()
    assert first.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "43"}, "finish_reason": "stop"}
    ]  # id 2 is one of the stub's misses: 42 + 1
    # Deterministic: the same chat gets the same answer, apart from the response id and time.
    assert again.json()["choices"] == body["choices"]
    assert no_stop.json()["choices"][0]["message"]["content"] == "2\n"


@pytest.mark.parametrize(
    "payload",
    [{}, {"messages": "Question 0: What is 1 + 1?"}, {"messages": {"role": "user"}}],
    ids=["no-messages", "string", "object"],
)
def test_chat_refuses_requests_without_a_message_list(payload: dict[str, Any]) -> None:
    with running_stub_server() as server, httpx.Client() as client:
        response = client.post(server.chat_base_url, json=payload)
        assert server.request_count == 0
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "messages must be a list"


def test_chat_ignores_non_text_content_parts() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "user", "content": "Question 0: What is 3 + 4?"},
        "not a message",
    ]
    with running_stub_server() as server, httpx.Client() as client:
        response = client.post(server.chat_base_url, json={"messages": messages, "stop": "\n"})
    assert response.json()["choices"][0]["message"]["content"] == "7"


def test_a_wrong_model_misses_exactly_its_ids() -> None:
    name = wrong_model((0, 3), (10, 12))
    assert name == "wrong_0-3_10-12"
    assert wrong_ids_for_model(name) == {0, 1, 2, 10, 11}
    assert wrong_ids_for_model("wrong") == frozenset()  # right on everything
    assert wrong_ids_for_model("stub") is None and wrong_ids_for_model(None) is None
    assert answer_for("Question 2: What is 1 + 1?\nAnswer:", model=name) == "3\n"
    assert answer_for("Question 5: What is 1 + 1?\nAnswer:", model=name) == "2\n"
    # The model name wins over the server's correct_per_cycle rule (id 2 is its miss).
    assert answer_for("Question 2: What is 1 + 1?\nAnswer:", model="wrong") == "2\n"
