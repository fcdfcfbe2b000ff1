"""A job's reproduction receipt, read from what the job left behind: the versions and
environment names its launcher wrote (`job-facts.json`), lm-eval's results file (task versions
and hashes, seeds, model) and its samples files (a digest of each task's `doc_hash`es).

Everything read here was written by the job, so it is data, bounded and shape-checked: a
value of the wrong type is left out, never trusted. `build_receipt` does file I/O (a worker
thread); `facts_from`, `task_entries` and `doc_hash_digest` are pure.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lm_eval_server.outputs import results, samples
from lm_eval_server.runtime import jobdir

RECEIPT_PACKAGES = ("lm_eval", "torch", "transformers", "datasets")  # = launcher's
SEED_KEYS = ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")
# job-facts.json is a few kilobytes (four versions and the environment's names).
MAX_FACTS_BYTES = 256 * 1024
MAX_ENV_NAMES = 1000
MAX_TEXT = 512  # characters of one version string or name a receipt keeps


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def read_facts(work_dir: Path) -> dict[str, Any] | None:
    """job-facts.json of the job's directory, or None (absent, unsafe, too large, not JSON)."""
    try:
        raw = jobdir.read_file(jobdir.path(work_dir, jobdir.JOB_FACTS), MAX_FACTS_BYTES)
        parsed = json.loads(raw)
    except (OSError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def facts_from(
    facts: Mapping[str, Any] | None, results_json: Mapping[str, Any] | None
) -> tuple[dict[str, str | None], str | None, list[str] | None]:
    """(versions, where they come from, the environment's names) from the job's own facts file,
    else the versions lm-eval wrote into its results (lm-eval and transformers only)."""
    versions: dict[str, str | None] = dict.fromkeys(RECEIPT_PACKAGES)
    env_names: list[str] | None = None
    if facts is not None and isinstance(facts.get("versions"), dict):
        given = facts["versions"]
        for name in (*RECEIPT_PACKAGES, "python"):
            versions[name] = _text(given.get(name))
        names = facts.get("env_names")
        if isinstance(names, list):
            env_names = sorted({n[:MAX_TEXT] for n in names[:MAX_ENV_NAMES] if isinstance(n, str)})
        return versions, "job", env_names
    if results_json is not None:
        versions["lm_eval"] = _text(results_json.get("lm_eval_version"))
        versions["transformers"] = _text(results_json.get("transformers_version"))
        if versions["lm_eval"] or versions["transformers"]:
            return versions, "results", None
    return versions, None, None


def doc_hash_digest(doc_hashes: Iterable[str]) -> str:
    """SHA-256 over the sorted distinct doc_hashes, one per line: the same documents give the
    same digest whatever order lm-eval wrote them in and however many filters scored them."""
    joined = "\n".join(sorted(set(doc_hashes)))
    return hashlib.sha256(joined.encode()).hexdigest()


def read_doc_hashes(path: Path) -> tuple[list[str], int]:
    """(each line's doc_hash, distinct doc_ids) of a samples file, streamed, bounded like a
    sample index (samples.MAX_INDEX_LINES)."""
    hashes: list[str] = []
    doc_ids: set[Any] = set()
    with os.fdopen(jobdir.open_file(path), "rb") as f:
        for n, (_, _, line) in enumerate(samples._lines(f)):
            if n >= samples.MAX_INDEX_LINES:
                raise jobdir.FileTooLarge(f"{path}: more than {samples.MAX_INDEX_LINES} samples")
            if line is None:
                continue
            try:
                sample = json.loads(line)
            except ValueError:
                continue
            if not isinstance(sample, dict):
                continue
            doc_hash = sample.get("doc_hash")
            if isinstance(doc_hash, str):
                hashes.append(doc_hash[:MAX_TEXT])
            doc_id = sample.get("doc_id")
            if isinstance(doc_id, int | str):
                doc_ids.add(doc_id)
    return hashes, len(doc_ids)


def task_entries(
    results_json: Mapping[str, Any], digests: Mapping[str, tuple[str, int]]
) -> dict[str, dict[str, Any]]:
    """{task: {version, task_hash, n_shot, doc_hash_digest, documents}} for every task in the
    results (and every task with a samples file). task_hash is lm-eval's (written only when the
    job logged samples); the digest and the document count come from the samples file."""

    def section(name: str) -> Mapping[str, Any]:
        value = results_json.get(name)
        return value if isinstance(value, dict) else {}

    versions, hashes, n_shot = section("versions"), section("task_hashes"), section("n-shot")
    names = [t for t in section("results") if isinstance(t, str)]
    names += [t for t in digests if t not in names]
    entries: dict[str, dict[str, Any]] = {}
    for task in sorted(names):
        version = versions.get(task)
        shots = n_shot.get(task)
        digest, documents = digests.get(task, (None, None))
        entries[task] = {
            "version": version if isinstance(version, int | float | str) else None,
            "task_hash": _text(hashes.get(task)),
            "n_shot": shots if isinstance(shots, int) else None,
            "doc_hash_digest": digest,
            "documents": documents,
        }
    return entries


def seeds_from(results_json: Mapping[str, Any] | None) -> dict[str, int | None]:
    config = (results_json or {}).get("config")
    config = config if isinstance(config, dict) else {}
    seeds: dict[str, int | None] = {}
    for key in SEED_KEYS:
        value = config.get(key)
        seeds[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return seeds


def _model_args(value: Any) -> str | dict[str, Any] | None:
    """lm-eval's model_args as its results record them (a string, or a dict in newer runs)."""
    if isinstance(value, str):
        return value[: MAX_TEXT * 8]
    if isinstance(value, dict) and len(json.dumps(value, default=str)) <= MAX_TEXT * 8:
        return value
    return None


def read_outputs(
    output_path: Path, results_file: Path | None
) -> tuple[dict[str, Any] | None, dict[str, tuple[str, int]]]:
    """(the results JSON or None, {task: (doc_hash digest, documents)}) of a finished job."""
    if results_file is None:
        return None, {}
    root = results.results_root(output_path)
    try:
        results_json = results.read_results(results_file, root)
    except (OSError, ValueError):
        return None, {}
    digests: dict[str, tuple[str, int]] = {}
    for task, path in results.samples_files(results_file, root).items():
        try:
            hashes, documents = read_doc_hashes(path)
        except OSError:
            continue
        digests[task] = (doc_hash_digest(hashes), documents)
    return results_json, digests


def build_receipt(
    *,
    work_dir: Path,
    output_path: Path,
    results_file: Path | None,
    base: Mapping[str, Any],
    request_env_names: list[str],
) -> dict[str, Any]:
    """The receipt: `base` (what the server knows: job id, argv, command, model, server
    version) plus what the job left behind. File I/O: call it in a worker thread."""
    results_json, digests = read_outputs(output_path, results_file)
    versions, source, env_names = facts_from(read_facts(work_dir), results_json)
    config = (results_json or {}).get("config")
    config = config if isinstance(config, dict) else {}
    return {
        **base,
        "env_names": env_names if env_names is not None else sorted(request_env_names),
        "env_names_source": "job" if env_names is not None else "request",
        "versions": versions,
        "versions_source": source,
        "tasks": task_entries(results_json or {}, digests),
        "seeds": seeds_from(results_json),
        "lm_eval_model_args": _model_args(config.get("model_args")),
        "results_file": str(results_file) if results_file is not None else None,
    }
