"""A receipt from a job's files (outputs/receipts.py): the job's facts file, the results file
and the samples' doc_hash digests, each read as untrusted data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lm_eval_server.outputs import receipts
from lm_eval_server.runtime import jobdir

RESULTS = {
    "results": {"t": {"acc,none": 0.5}, "u": {"acc,none": 1.0}},
    "versions": {"t": 1.0, "u": "2"},
    "n-shot": {"t": 0, "u": 3},
    "task_hashes": {"t": "abc"},
    "config": {
        "model_args": "pretrained=x,api_key=sk-1",
        "random_seed": 0,
        "numpy_seed": 1234,
        "torch_seed": True,  # not an int seed: left out
        "fewshot_seed": "7",
    },
    "lm_eval_version": "0.4.13",
    "transformers_version": "4.1",
}


def test_versions_and_names_come_from_the_jobs_facts_else_from_its_results() -> None:
    facts = {
        "versions": {"lm_eval": "0.4.13", "torch": None, "transformers": 5, "python": "3.11"},
        "env_names": ["PATH", "HOME", 3, "HOME"],
    }
    versions, source, names = receipts.facts_from(facts, RESULTS)
    assert source == "job" and names == ["HOME", "PATH"]
    assert versions == {
        "lm_eval": "0.4.13",
        "torch": None,
        "transformers": None,  # not a string: not trusted
        "datasets": None,
        "python": "3.11",
    }
    versions, source, names = receipts.facts_from(None, RESULTS)
    assert (source, names) == ("results", None)
    assert versions == {
        "lm_eval": "0.4.13",
        "torch": None,
        "transformers": "4.1",
        "datasets": None,
    }
    assert receipts.facts_from({"versions": "x"}, None)[1] is None


def test_the_digest_ignores_order_and_repeats() -> None:
    a = receipts.doc_hash_digest(["b", "a", "a"])
    assert a == receipts.doc_hash_digest(["a", "b"])
    assert a == hashlib.sha256(b"a\nb").hexdigest()
    assert a != receipts.doc_hash_digest(["a", "c"])


def test_tasks_and_seeds() -> None:
    entries = receipts.task_entries(RESULTS, {"t": ("d1", 10), "extra": ("d2", 2)})
    assert entries == {
        "extra": {
            "version": None,
            "task_hash": None,
            "n_shot": None,
            "doc_hash_digest": "d2",
            "documents": 2,
        },
        "t": {
            "version": 1.0,
            "task_hash": "abc",
            "n_shot": 0,
            "doc_hash_digest": "d1",
            "documents": 10,
        },
        "u": {
            "version": "2",
            "task_hash": None,
            "n_shot": 3,
            "doc_hash_digest": None,
            "documents": None,
        },
    }
    assert receipts.seeds_from(RESULTS) == {
        "random_seed": 0,
        "numpy_seed": 1234,
        "torch_seed": None,
        "fewshot_seed": None,
    }
    assert receipts.seeds_from(None) == dict.fromkeys(receipts.SEED_KEYS)


def job_dir(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "job"
    out = work / "results" / "stub"
    out.mkdir(parents=True)
    date = "2026-01-01T00-00-00.1"
    results_file = out / f"results_{date}.json"
    results_file.write_text(json.dumps(RESULTS))
    lines = [{"doc_id": i, "doc_hash": f"h{i % 3}", "filter": f} for i in range(6) for f in "ab"]
    (out / f"samples_t_{date}.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + "not json\n"
    )
    return work, results_file


def test_build_reads_the_job_directory(tmp_path: Path) -> None:
    work, results_file = job_dir(tmp_path)
    facts = {"versions": {"lm_eval": "9"}, "env_names": ["HOME"]}
    (work / jobdir.JOB_FACTS).write_text(json.dumps(facts))
    receipt = receipts.build_receipt(
        work_dir=work,
        output_path=work / "results",
        results_file=results_file,
        base={"job_id": 1},
        request_env_names=["X"],
    )
    assert receipt["job_id"] == 1
    assert receipt["env_names"] == ["HOME"] and receipt["env_names_source"] == "job"
    assert receipt["versions"]["lm_eval"] == "9" and receipt["versions_source"] == "job"
    t = receipt["tasks"]["t"]
    assert t["documents"] == 6 and t["doc_hash_digest"] == receipts.doc_hash_digest(
        ["h0", "h1", "h2"]
    )
    assert receipt["lm_eval_model_args"] == "pretrained=x,api_key=sk-1"  # masked when served
    assert receipt["results_file"] == str(results_file)


def test_a_planted_or_oversized_facts_file_is_ignored(tmp_path: Path) -> None:
    work, results_file = job_dir(tmp_path)
    elsewhere = tmp_path / "facts.json"
    elsewhere.write_text(json.dumps({"versions": {"lm_eval": "planted"}, "env_names": ["Z"]}))
    (work / jobdir.JOB_FACTS).symlink_to(elsewhere)
    assert receipts.read_facts(work) is None
    (work / jobdir.JOB_FACTS).unlink()
    (work / jobdir.JOB_FACTS).write_text(" " * (receipts.MAX_FACTS_BYTES + 1))
    assert receipts.read_facts(work) is None
    receipt = receipts.build_receipt(
        work_dir=work,
        output_path=work / "results",
        results_file=results_file,
        base={},
        request_env_names=["B", "A"],
    )
    assert receipt["env_names"] == ["A", "B"] and receipt["env_names_source"] == "request"
    assert receipt["versions_source"] == "results"


def test_a_job_without_results(tmp_path: Path) -> None:
    receipt = receipts.build_receipt(
        work_dir=tmp_path, output_path=tmp_path, results_file=None, base={}, request_env_names=[]
    )
    assert receipt["tasks"] == {} and receipt["versions_source"] is None
    assert receipt["seeds"] == dict.fromkeys(receipts.SEED_KEYS)
