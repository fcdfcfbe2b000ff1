"""Which documents two runs share, their per-document scores, and whether the runs are
comparable at all. `read_doc_scores` reads a samples file (file I/O: call it in a worker
thread); the rest is pure.

A document is the same in two runs when both its `doc_id` and its `doc_hash` (lm-eval's hash of
the document) match: a changed dataset behind the same task name pairs nothing it changed.
Only documents present in both runs are paired; how many were is reported (`n_paired`).

A score is usable for a paired test when every line of its (metric, filter) holds a number (or
a boolean) under the metric's name; a metric with a pair or a list per document (BLEU's and
F1's corpus-level inputs, perplexity's (loglikelihood, length)) is aggregated by lm-eval over
the whole corpus, so a per-document test would test something else: such a metric is not
usable and its rows fall back to the unpaired test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.outputs import samples

# Lines read for paired tests by one request (compare or gate), over all files: the bound on
# its memory (~100 bytes per document and metric) and time. Past it, rows fall back to the
# unpaired test with a warning.
MAX_PAIRED_LINES = 1_000_000

DocKey = tuple[Any, Any]  # (doc_id, doc_hash)
ScoreKey = tuple[str, str]  # (metric, filter)


@dataclass
class DocScores:
    """One run's per-document scores for one task."""

    scores: dict[ScoreKey, dict[DocKey, float]] = field(default_factory=dict)
    unusable: set[ScoreKey] = field(default_factory=set)

    def usable(self, key: ScoreKey) -> dict[DocKey, float] | None:
        if key in self.unusable:
            return None
        return self.scores.get(key)


class TooManyLines(Exception):
    """The request's budget of MAX_PAIRED_LINES is spent."""


@dataclass
class LineBudget:
    left: int = MAX_PAIRED_LINES

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise TooManyLines(f"more than {MAX_PAIRED_LINES} sample lines")


def read_doc_scores(path: Path, budget: LineBudget) -> DocScores:
    """Every (metric, filter)'s score per document, from one samples file."""
    found = DocScores()
    for sample in samples.iter_tails(path):
        budget.spend()
        if sample is None:
            continue
        names = sample.get("metrics")
        if not isinstance(names, list):
            continue
        filter_name = sample.get("filter")
        filter_name = filter_name if isinstance(filter_name, str) else "none"
        doc = (sample.get("doc_id"), sample.get("doc_hash"))
        if not _hashable(doc):
            continue
        for name in names:
            if not isinstance(name, str):
                continue
            key = (name, filter_name)
            value = _score(sample.get(name))
            if value is None:
                found.unusable.add(key)
                continue
            found.scores.setdefault(key, {})[doc] = value
    return found


def _hashable(doc: tuple[Any, Any]) -> bool:
    return all(v is None or isinstance(v, int | str) for v in doc)


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def pair(base: dict[DocKey, float], other: dict[DocKey, float]) -> tuple[list[float], list[float]]:
    """The two runs' scores on the documents both scored, in the base run's order."""
    xs: list[float] = []
    ys: list[float] = []
    for doc, value in base.items():
        if doc in other:
            xs.append(value)
            ys.append(other[doc])
    return xs, ys


# ---------------------------------------------------------------- comparability

# (field, what it is called in a warning)
_TASK_FIELDS = (
    ("n-shot", "num_fewshot"),
    ("versions", "task version"),
    ("task_hashes", "task hash"),
)
# lm-eval writes a task's hash only when it logs samples: a hash missing on one side says
# nothing about the task, so only two hashes that differ warn.
_ONLY_WHEN_BOTH = frozenset({"task_hashes"})
_RUN_FIELDS = (
    ("chat_template_sha", "chat template"),
    ("system_instruction_sha", "system instruction"),
    ("fewshot_as_multiturn", "fewshot_as_multiturn"),
)


def comparability_warnings(
    base_id: int, base: dict[str, Any], other_id: int, other: dict[str, Any]
) -> list[dict[str, Any]]:
    """Why two runs' numbers may not be comparable (a warning each, never a refusal): a
    different limit, few-shot count, task version or hash, chat template or system
    instruction, as their results files record them."""
    found: list[dict[str, Any]] = []

    def warn(task: str | None, name: str, a: Any, b: Any) -> None:
        where = f"task {task}: " if task else ""
        found.append(
            {
                "jobs": [base_id, other_id],
                "task": task,
                "field": name,
                "values": [a, b],
                "message": f"{where}{name} differs (job {base_id}: {_show(a)}, "
                f"job {other_id}: {_show(b)}); the scores may not be comparable",
            }
        )

    a_limit, b_limit = _config(base).get("limit"), _config(other).get("limit")
    if a_limit != b_limit:
        warn(None, "limit", a_limit, b_limit)
    for key, name in _RUN_FIELDS:
        if base.get(key) != other.get(key):
            warn(None, name, base.get(key), other.get(key))
    shared = [t for t in _tasks(base) if t in _tasks(other)]
    for key, name in _TASK_FIELDS:
        a_map, b_map = _mapping(base.get(key)), _mapping(other.get(key))
        for task in shared:
            a, b = a_map.get(task), b_map.get(task)
            if key in _ONLY_WHEN_BOTH and (a is None or b is None):
                continue
            if a != b:
                warn(task, name, a, b)
    return found


def _config(results: dict[str, Any]) -> dict[str, Any]:
    return _mapping(results.get("config"))


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tasks(results: dict[str, Any]) -> list[str]:
    return list(_mapping(results.get("results")))


def _show(value: Any) -> str:
    if value is None:
        return "none"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
