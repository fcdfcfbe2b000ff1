"""lm-eval's per-sample log (`samples_<task>_<date>.jsonl`), a page at a time.

lm-eval 0.4.13 writes one line per (document, filter): `doc_id`, `doc`, `target`, `arguments`
(`{"gen_args_0": {"arg_0": prompt, "arg_1": ...}}`), `resps`, `filtered_resps`, `filter`,
`metrics` (the metric names, in the task's `metric_list` order) and each metric's value under
its own name.

A file can be large (gigabytes for a big task with long documents), so it is never read whole:
`build_index` streams it once, keeping each line's byte offset, filter and verdict, and
`read_page` seeks to the lines one page needs. Both do file I/O and belong in a worker thread.
The job wrote the file: both open it with `jobdir.open_file` (a symlink or FIFO in its place is
refused), and an index holds at most MAX_INDEX_LINES lines (jobdir.FileTooLarge beyond).

The verdict rule (`verdict`): a sample's primary metric is the first of its `metrics` that is in
`CORRECTNESS_METRICS`; the sample is correct when that value is true or exactly 1, wrong when
it is false or exactly 0, and undecided (None) otherwise: no such metric, partial credit
(0 < value < 1), or a value that is not a number (BLEU's and perplexity's pairs).
"""

from __future__ import annotations

import json
import math
import os
import re
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.runtime import jobdir

# Per-sample metrics that score one answer as right (1) or wrong (0), in lm-eval's names. An
# allowlist: a metric not listed here (f1, bleu, perplexity, a task's own score) says nothing
# about "wrong" unless a later version of this list learns it.
CORRECTNESS_METRICS = frozenset(
    {
        "acc",
        "acc_norm",
        "acc_mutual_info",
        "acc_bytes",
        "exact_match",
        "em",
        "accuracy",
        "prompt_level_strict_acc",
        "prompt_level_loose_acc",
        "pass@1",
    }
)

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 500
# A line longer than this is indexed but not parsed or served in JSON (its raw text stays
# available as JSONL): it bounds the memory one line can take while indexing or paging.
MAX_LINE_BYTES = 16 * 1024 * 1024
# A page stops early (after at least one sample) once its lines hold this many bytes.
MAX_PAGE_BYTES = 32 * 1024 * 1024
# Lines one index holds (~21 bytes each): far more than any task's documents times filters.
MAX_INDEX_LINES = 20_000_000

_RIGHT, _WRONG, _UNDECIDED = 1, 0, 2
_OVERSIZE_FILTER = -1


def primary_metric(sample: dict[str, Any]) -> str | None:
    names = sample.get("metrics")
    if not isinstance(names, list):
        return None
    return next((n for n in names if isinstance(n, str) and n in CORRECTNESS_METRICS), None)


def verdict(sample: dict[str, Any]) -> bool | None:
    """True (right), False (wrong) or None (undecided) for one sample; see the module doc."""
    name = primary_metric(sample)
    if name is None:
        return None
    value = sample.get(name)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        if value == 1:
            return True
        if value == 0:
            return False
    return None


def sample_view(sample: dict[str, Any]) -> dict[str, Any]:
    """One line of lm-eval's samples file as the API shows it: the only place a sample
    becomes part of a response (`read_page` then passes it through the redactor)."""
    names = sample.get("metrics")
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    return {
        "doc_id": sample.get("doc_id"),
        "filter": sample.get("filter"),
        "doc": sample.get("doc"),
        "target": sample.get("target"),
        "prompt": _prompt(sample.get("arguments")),
        "arguments": sample.get("arguments"),
        "responses": sample.get("filtered_resps"),
        "raw_responses": sample.get("resps"),
        "metrics": {name: sample.get(name) for name in names},
        "primary_metric": primary_metric(sample),
        "correct": verdict(sample),
        "multiple_choice": multiple_choice(sample),
    }


def _number(value: Any) -> float | None:
    # lm-eval writes a response's numbers as text ("-16.2"); NaN reads as null.
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


_GREEDY = {"True": True, "False": False}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _target_index(target: Any, texts: list[str], pick: int, correct: bool | None) -> int | None:
    """Which choice is right. lm-eval writes `target` as text: a choice's index ("1") when the
    task's doc_to_target gives one, else the choice's own text. Where both readings fit, the
    sample's 0/1 metric (right when the pick is the target) decides."""
    text = str(target).strip() if isinstance(target, str | int) else None
    if text is None or isinstance(target, bool):
        return None
    readings = []
    if text.isdigit() and int(text) < len(texts):
        readings.append(int(text))
    readings += [i for i, choice in enumerate(texts) if choice.strip() == text]
    readings = list(dict.fromkeys(readings))
    if len(readings) > 1 and correct is not None:
        fitting = [i for i in readings if (i == pick) == correct]
        readings = fitting or readings
    return readings[0] if readings else None


def multiple_choice(sample: dict[str, Any]) -> dict[str, Any] | None:
    """A loglikelihood multiple-choice sample read as a person reads it: each choice with its
    log-likelihood, the model's pick (the highest, as lm-eval's `acc` picks; `pick_norm` by
    log-likelihood per character, as `acc_norm`), and the right choice. None for any other
    sample: one request per choice (`gen_args_<i>` with a context and a continuation), each
    answered by a (log-likelihood, is-greedy) pair."""
    arguments, responses = sample.get("arguments"), sample.get("filtered_resps")
    if not isinstance(arguments, dict) or not isinstance(responses, list):
        return None
    if len(arguments) < 2 or len(arguments) != len(responses):
        return None
    texts: list[str] = []
    for i in range(len(arguments)):
        request = arguments.get(f"gen_args_{i}")
        if not isinstance(request, dict) or not isinstance(request.get("arg_1"), str):
            return None
        texts.append(request["arg_1"])
    scores: list[float] = []
    greedy: list[bool | None] = []
    for response in responses:
        if not isinstance(response, list) or len(response) != 2:
            return None
        score = _number(response[0])
        if score is None:
            return None
        scores.append(score)
        greedy.append(_GREEDY.get(str(response[1])))
    pick = _argmax(scores)
    names = sample.get("metrics")
    names = names if isinstance(names, list) else []
    norm = [score / max(len(text), 1) for score, text in zip(scores, texts, strict=True)]
    # acc is 1 exactly when the pick is the target: it settles an ambiguous target.
    correct = verdict({"metrics": ["acc"], "acc": sample.get("acc")}) if "acc" in names else None
    return {
        "choices": [
            {"text": text, "loglikelihood": score, "greedy": flag}
            for text, score, flag in zip(texts, scores, greedy, strict=True)
        ],
        "pick": pick,
        "pick_norm": _argmax(norm) if "acc_norm" in names else None,
        "target": _target_index(sample.get("target"), texts, pick, correct),
    }


def unreadable_view(reason: str) -> dict[str, Any]:
    """Stands in for a line the JSON view cannot show, so positions and counts stay true."""
    return {
        "doc_id": None,
        "filter": None,
        "doc": None,
        "target": None,
        "prompt": None,
        "arguments": None,
        "responses": None,
        "raw_responses": None,
        "metrics": {},
        "primary_metric": None,
        "correct": None,
        "multiple_choice": None,
        "error": f"{reason}; read it from the raw file (format=jsonl)",
    }


def _prompt(arguments: Any) -> str | None:
    """The first request's first argument: the prompt for generate_until and loglikelihood."""
    if not isinstance(arguments, dict):
        return None
    first = arguments.get("gen_args_0")
    if isinstance(first, dict) and isinstance(first.get("arg_0"), str):
        return first["arg_0"]
    return None


@dataclass
class SampleIndex:
    """Where each line of a samples file starts, its filter and its verdict."""

    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("q"))
    filter_ids: array = field(default_factory=lambda: array("i"))
    verdicts: bytearray = field(default_factory=bytearray)
    filters: list[str] = field(default_factory=list)

    def page(
        self, filter_name: str | None, incorrect: bool, offset: int, limit: int
    ) -> tuple[int, list[int]]:
        """(how many lines pass both filters, the line numbers of the page [offset, +limit))."""
        wanted: int | None = None
        if filter_name is not None:
            if filter_name not in self.filters:
                return 0, []
            wanted = self.filters.index(filter_name)
        total = 0
        page: list[int] = []
        filter_ids, verdicts = self.filter_ids, self.verdicts
        for i in range(len(self.offsets)):
            if wanted is not None and filter_ids[i] != wanted:
                continue
            if incorrect and verdicts[i] != _WRONG:
                continue
            if offset <= total < offset + limit:
                page.append(i)
            total += 1
        return total, page


def _lines(f: Any) -> Iterable[tuple[int, int, bytes | None]]:
    """(offset, length, line or None when longer than MAX_LINE_BYTES) for each line of `f`."""
    offset = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        length = len(line)
        if length > MAX_LINE_BYTES and not line.endswith(b"\n"):
            # Skip the rest of the long line in bounded chunks.
            while True:
                rest = f.readline(MAX_LINE_BYTES)
                length += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield offset, length, None
        elif line.strip():
            yield offset, length, line
        offset += length


def _open(path: Path) -> Any:
    return os.fdopen(jobdir.open_file(path), "rb")


def build_index(path: Path, max_lines: int = MAX_INDEX_LINES) -> SampleIndex:
    index = SampleIndex()
    filter_ids: dict[str, int] = {}
    with _open(path) as f:
        for offset, length, line in _lines(f):
            if len(index.offsets) >= max_lines:
                raise jobdir.FileTooLarge(f"{path}: more than {max_lines} samples")
            filter_id, judged = _OVERSIZE_FILTER, _UNDECIDED
            sample = _tail(line) if line is not None else None
            if sample is not None:
                name = sample.get("filter")
                name = name if isinstance(name, str) else "none"
                if name not in filter_ids:
                    filter_ids[name] = len(index.filters)
                    index.filters.append(name)
                filter_id = filter_ids[name]
                v = verdict(sample)
                judged = _UNDECIDED if v is None else (_RIGHT if v else _WRONG)
            index.offsets.append(offset)
            index.lengths.append(length)
            index.filter_ids.append(filter_id)
            index.verdicts.append(judged)
    return index


def iter_tails(path: Path) -> Iterable[dict[str, Any] | None]:
    """What each line says besides its document, arguments and responses (its filter, doc
    id and hash, metric names and values), read cheaply; None for a line too long or not a
    JSON object. For paired comparisons (pairing.py)."""
    with _open(path) as f:
        for _, _, line in _lines(f):
            tail = _tail(line) if line is not None else None
            if tail is not None and line is not None and "doc_id" not in tail:
                # lm-eval writes doc_id first: read it from the start of the line, or else
                # from the whole line.
                found = _DOC_ID.match(line)
                whole = None if found else _parse(line)
                tail["doc_id"] = int(found[1]) if found else (whole or {}).get("doc_id")
            yield tail


_DOC_ID = re.compile(rb'\{"doc_id": (-?\d{1,18})[,}]')


def read_page(
    path: Path,
    index: SampleIndex,
    lines: list[int],
    max_bytes: int = MAX_PAGE_BYTES,
    redact: Callable[[Any], Any] = lambda view: view,
) -> list[dict[str, Any]]:
    """The samples at `lines` (line numbers from `index.page`), until `max_bytes` is spent;
    each view passes through `redact` (the server's redactor) before it leaves."""
    out: list[dict[str, Any]] = []
    spent = 0
    with _open(path) as f:
        for i in lines:
            length = index.lengths[i]
            if out and spent + length > max_bytes:
                break
            spent += length
            if length > MAX_LINE_BYTES:
                reason = f"this sample's line holds {length} bytes, more than {MAX_LINE_BYTES}"
                out.append(unreadable_view(reason))
                continue
            f.seek(index.offsets[i])
            sample = _parse(f.read(length))
            if sample is None:
                out.append(unreadable_view("this line is not a JSON object"))
            else:
                out.append(redact(sample_view(sample)))
    return out


_FILTER_KEY = b', "filter": '


def _tail(line: bytes) -> dict[str, Any] | None:
    """What the index needs of a line (filter, metric names and values), read cheaply.

    lm-eval writes `filter`, `metrics`, the hashes and the metric values after the document,
    the arguments and the responses, which make up nearly all of a line. Inside a JSON string
    a quote is escaped, so the last `, "filter": ` is a key: parsing from there reads a small
    object. A line that does not look like that is parsed whole.
    """
    at = line.rfind(_FILTER_KEY)
    if at != -1:
        tail = _parse(b"{" + line[at + 2 :])
        if tail is not None and isinstance(tail.get("metrics"), list):
            return tail
    return _parse(line)


# NaN and Infinity have no JSON spelling in a response: they read as null. One decoder for
# every line (json.loads with an option builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=lambda _: None)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        data = _DECODER.decode(line.decode("utf-8"))
    except ValueError:  # also UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None
