"""Parsing lm-eval's stderr into whole-job progress. Pure, no I/O, imports nothing of ours.

tqdm redraws a bar with `\\r`, log lines end with `\\n`; both end a "record" (Ray delivers
each redraw as a line of its own: same records). lm-eval 0.4.13 prints, in order:

- `Initializing <model> model, with arguments: ...` (evaluator.py): "loading model". Task
  datasets load after the model, before the next marker, so this phase covers both.
- `Building contexts for <task> on rank <r>...` (api/task.py build_all_requests), then an
  undescribed bar whose total is the task's number of docs: "building requests".
  `<task>: Using gen_kwargs: ...` (evaluator.py) names the generate_until tasks; with
  LMEVAL_LOG_LEVEL=DEBUG, `Task: <task>; number of requests on this rank: <n>` gives the
  exact count per task.
- `Running <type> requests` (evaluator.py), once per request type, then the type's bar: an
  undescribed bar (dummy, local models' rolling), a bar described `Running <type> requests`
  (hf, vllm) or `Requesting API` bars (API models; with num_concurrent > 1 they count batches).
- `Saving results aggregated` (loggers/evaluation_tracker.py): "writing results".

The server's response cache prints `... response_cache: <type>: H of N requests answered from
the response cache` before the model is called; the type's bar then counts the N - H others,
and H is added to the type's done and total.

Before any of these the job is "starting" (interpreter, imports, lm-eval's task index).

The whole job's total counts requests of every type. A type's count is exact once its bar
has drawn; a type that has not started yet is estimated from its tasks' doc counts (exact with
the DEBUG line, and for generate_until with one repeat; a lower bound for multiple choice,
which sends one request per choice). As estimates become counts the total can grow, so the
reported percentage is the highest one computed so far: it never goes down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

STARTING = "starting"
LOADING_MODEL = "loading model"
BUILDING_REQUESTS = "building requests"
WRITING_RESULTS = "writing results"
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
# Inference bars seen before any `Running <type> requests` line (not lm-eval's CLI).
API_PHASE = "api requests"
_INFERENCE = frozenset({*REQUEST_TYPES, API_PHASE})
# lm-eval's phases only move forward; request types all share one rank.
_RANK = {STARTING: 0, LOADING_MODEL: 1, BUILDING_REQUESTS: 2, WRITING_RESULTS: 4}
_INFERENCE_RANK = 3

_BAR = re.compile(
    r"(?:(?P<desc>[^\r\n|]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*"
    r"(?P<done>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>\d+(?::\d+)+)<(?P<remaining>\?|\d+(?::\d+)+)"
    r"(?:,\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>[^\]\s]*))?\]"
)
_TYPES = "loglikelihood_rolling|loglikelihood|generate_until"
_RUN_LINE = re.compile(rf"\bRunning ({_TYPES}) requests\s*$")
_RUN_DESC = re.compile(rf"^Running ({_TYPES}) requests$")
_INIT_LINE = re.compile(r"\bInitializing \S+ model, with arguments")
_BUILD_LINE = re.compile(r"\bBuilding contexts for (\S+) on rank (\d+)\.\.\.")
_GEN_LINE = re.compile(r"(?:^|\]\s)(\S+): Using gen_kwargs:")
_COUNT_LINE = re.compile(r"\bTask: (\S+); number of requests on this rank: (\d+)")
_SAVE_LINE = re.compile(r"\b(?:Saving|skipping saving) results aggregated")
# The server's response cache (runtime/response_cache.py), before the model is called: the
# type's bar then counts only the requests the model computes.
_CACHED = "requests answered from the response cache"
_CACHE_LINE = re.compile(rf"\bresponse_cache: ({_TYPES}): (\d+) of \d+ {_CACHED}")
# `skip` finds marker lines in a flood with str.find, then checks the candidate in place
# (C speed both), so a flood of near-misses ("Running 3 shards") costs no parsing.
_SKIP_MARKERS = tuple(
    (literal, re.compile(re.escape(literal) + rest))
    for literal, rest in (
        ("Running ", rf"(?:{_TYPES}) requests"),
        ("Initializing ", r"\S+ model, with arguments"),
        ("Building contexts for ", r"\S+ on rank \d+\.\.\."),
        (": Using gen_kwargs:", ""),
        ("; number of requests on this rank: ", r"\d+"),
        ("results aggregated", ""),
        (_CACHED, ""),
    )
)
# How many bars `skip` reads back from the end of a segment: enough to see the latest
# redraw of each bar kind that may be drawn in one phase (plain, described, API).
_SKIP_BARS = 4
_MAX_RECORD = 4096
_SEPARATOR = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class PhaseCount:
    """One phase and its count: requests for a request type, docs for building requests,
    none (total None) for the phases that only take time."""

    phase: str
    done: int = 0
    total: int | None = None


@dataclass(frozen=True)
class Progress:
    """The whole job: `done`/`total` count requests of every type, `pct` never decreases."""

    phase: str
    done: int
    total: int
    pct: int
    rate_per_s: float | None = None
    eta_s: float | None = None
    phases: tuple[PhaseCount, ...] = ()


STARTING_PROGRESS = Progress(STARTING, 0, 0, 0, phases=(PhaseCount(STARTING),))


@dataclass(frozen=True)
class BarMatch:
    desc: str
    done: int
    total: int
    rate_per_s: float | None
    eta_s: float | None


def _clock_to_s(text: str) -> float | None:
    if "?" in text:
        return None
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def parse_bar(record: str) -> BarMatch | None:
    """A tqdm bar in `record`, or None."""
    if "%|" not in record:  # most records are log lines: no regex for them
        return None
    match = _BAR.search(record)
    if match is None:
        return None
    rate: float | None = None
    rate_text, unit = match["rate"], match["unit"] or ""
    if rate_text and rate_text != "?":
        value = float(rate_text)
        if unit.startswith("s/"):
            rate = 1.0 / value if value > 0 else None
        else:
            rate = value
    return BarMatch(
        desc=(match["desc"] or "").strip(),
        done=int(match["done"]),
        total=int(match["total"]),
        rate_per_s=rate,
        eta_s=_clock_to_s(match["remaining"]),
    )


def _rank(phase: str) -> int:
    return _RANK.get(phase, _INFERENCE_RANK)


@dataclass
class _Phase:
    name: str
    done: int = 0
    total: int | None = None
    # The first inference bar kind drawn in a phase counts it; another kind is a nested bar
    # (e.g. API models' loglikelihood_rolling draws `Requesting API` bars per document
    # inside the undescribed bar over documents).
    kind: str | None = None
    rate_per_s: float | None = None
    cached: int = 0  # requests of this type answered from the server's response cache


@dataclass
class _Tasks:
    """What the building phase told about each task."""

    docs: dict[str, int] = field(default_factory=dict)
    built: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # DEBUG line, exact
    generate: set[str] = field(default_factory=set)
    building: str | None = None


class ProgressTracker:
    """Feeds on a job's stderr in chunks of any size (cut anywhere); `progress` is the job's."""

    def __init__(self) -> None:
        self._pending = ""
        self._phases: list[_Phase] = [_Phase(STARTING)]
        self._tasks = _Tasks()
        self._pct = 0
        self.progress: Progress = STARTING_PROGRESS

    @property
    def _current(self) -> _Phase:
        return self._phases[-1]

    def feed(self, text: str) -> None:
        records = _SEPARATOR.split(self._pending + text)
        self._pending = records.pop()
        for record in records:
            self._consume(record)
        # A bar's latest redraw may still be unterminated; read it without consuming it
        # (a bar is only matched whole, up to its closing `]`).
        if self._pending:
            self._consume(self._pending, final=False)
        self._update()

    def skip(self, text: str) -> None:
        """Consumes `text` reading only marker lines and the last bars before and after each:
        the cheap path for floods of output. Whatever follows `text` must go to `feed`."""
        text = self._pending + text
        end = max(text.rfind("\r"), text.rfind("\n")) + 1
        body, self._pending = text[:end], text[end:]
        starts: set[int] = set()
        for literal, pattern in _SKIP_MARKERS:
            at = body.find(literal)
            while at >= 0:
                if pattern.match(body, at):
                    starts.add(_record_start(body, at, 0))
                    at = _record_end(body, at)
                else:
                    at += len(literal)
                at = body.find(literal, at)
        previous = 0
        for start in sorted(starts):
            if start < previous:
                continue  # two markers in one record
            self._last_bars(body, previous, start)
            stop = _record_end(body, start)
            self._consume(body[start:stop])
            previous = stop
        self._last_bars(body, previous, len(body))
        self._update()

    def lost_output(self) -> None:
        """Output was dropped unread: a record cut there cannot be completed."""
        self._pending = ""

    def _last_bars(self, body: str, lo: int, hi: int) -> None:
        records: list[str] = []
        at = body.rfind("%|", lo, hi)
        while at >= 0 and len(records) < _SKIP_BARS:
            start = _record_start(body, at, lo)
            records.append(body[start : _record_end(body, at)])
            at = body.rfind("%|", lo, start)
        for record in reversed(records):
            self._consume(record)

    def _consume(self, record: str, *, final: bool = True) -> None:
        bar = parse_bar(record)
        if bar is not None:
            self._on_bar(bar)
        elif final:
            self._on_line(record)

    def _on_line(self, record: str) -> None:
        if "Running " in record and (match := _RUN_LINE.search(record)):
            self._enter(match[1])
        elif "Building contexts for " in record and (match := _BUILD_LINE.search(record)):
            self._enter(BUILDING_REQUESTS)
            # Only rank 0 draws bars; other ranks' docs are theirs to count.
            self._tasks.building = match[1] if match[2] == "0" else None
        elif "Initializing " in record and _INIT_LINE.search(record):
            self._enter(LOADING_MODEL)
        elif "Using gen_kwargs:" in record and (match := _GEN_LINE.search(record)):
            self._tasks.generate.add(match[1])
        elif "number of requests" in record and (match := _COUNT_LINE.search(record)):
            self._tasks.requests[match[1]] = int(match[2])
        elif "results aggregated" in record and _SAVE_LINE.search(record):
            self._enter(WRITING_RESULTS)
        elif _CACHED in record and (match := _CACHE_LINE.search(record)):
            self._enter(match[1])
            phase = self._current
            if phase.name == match[1]:
                hits = int(match[2])
                phase.cached += hits
                phase.done += hits
                phase.total = (phase.total or 0) + hits

    def _enter(self, name: str) -> None:
        current = self._current
        if name == current.name or _rank(name) < _rank(current.name):
            return
        for index, phase in enumerate(self._phases):
            if phase.name == name and name in _INFERENCE:
                # A request type seen again continues its own count.
                self._phases.append(self._phases.pop(index))
                return
        self._phases.append(_Phase(name))

    def _on_bar(self, bar: BarMatch) -> None:
        current = self._current
        if current.name == BUILDING_REQUESTS:
            task = self._tasks.building
            if not bar.desc and task is not None:
                self._tasks.docs[task] = bar.total
                self._tasks.built[task] = bar.done
            return
        kind = _inference_kind(bar.desc)
        if kind is None:
            return
        if described := _RUN_DESC.match(bar.desc):
            self._enter(described[1])
        elif kind == "api" and _rank(current.name) < _INFERENCE_RANK:
            self._enter(API_PHASE)
        phase = self._current
        if phase.name not in _INFERENCE:
            return
        # A bar described `Running <type> requests` names its type: it always counts.
        if phase.kind is None or kind == "described":
            phase.kind = kind
        if kind != phase.kind:
            return
        phase.done, phase.total = bar.done + phase.cached, bar.total + phase.cached
        phase.rate_per_s = bar.rate_per_s

    def _pending_requests(self) -> int:
        """Requests of the request types whose bar has not drawn yet, from their tasks."""
        counted = {p.name for p in self._phases if p.total is not None}
        if API_PHASE in counted:
            return 0  # no `Running` lines: nothing tells which tasks it covers
        tasks = self._tasks
        generate_counted = "generate_until" in counted
        others_counted = bool(counted & {"loglikelihood", "loglikelihood_rolling"})
        pending = 0
        for task in tasks.docs.keys() | tasks.requests.keys():
            if generate_counted if task in tasks.generate else others_counted:
                continue
            pending += tasks.requests.get(task, tasks.docs.get(task, 0))
        return pending

    def _update(self) -> None:
        inference = [p for p in self._phases if p.name in _INFERENCE]
        done = sum(min(p.done, p.total or 0) for p in inference)
        total = sum(p.total or 0 for p in inference) + self._pending_requests()
        if total > 0:
            self._pct = max(self._pct, min(100, 100 * done // total))
        current = self._current
        rate = current.rate_per_s if current.name in _INFERENCE else None
        eta = (total - done) / rate if rate else None
        self.progress = Progress(
            phase=current.name,
            done=done,
            total=total,
            pct=self._pct,
            rate_per_s=rate,
            eta_s=round(eta, 1) if eta is not None else None,
            phases=tuple(self._counts(p) for p in self._phases),
        )

    def _counts(self, phase: _Phase) -> PhaseCount:
        if phase.name == BUILDING_REQUESTS:
            docs = self._tasks.docs
            return PhaseCount(phase.name, sum(self._tasks.built.values()), sum(docs.values()))
        return PhaseCount(phase.name, phase.done, phase.total)


def _inference_kind(desc: str) -> str | None:
    if not desc:
        return "plain"
    if desc.startswith("Requesting API"):
        return "api"
    if _RUN_DESC.match(desc):
        return "described"
    return None


def _record_start(text: str, at: int, lo: int) -> int:
    # Bounded, so a flood without one of the two separators stays linear; the records
    # looked for (marker lines, bars) are short.
    lo = max(lo, at - _MAX_RECORD)
    return max(lo, text.rfind("\r", lo, at) + 1, text.rfind("\n", lo, at) + 1)


def _record_end(text: str, at: int) -> int:
    found = _SEPARATOR.search(text, at)
    return found.start() if found else len(text)


def terminal_lines(text: str) -> list[str]:
    """The lines a terminal would show: each `\\r` redraw replaces the line it is on.

    As in the original server's README, a finished line keeps its `\\n`; a line still being
    drawn (the live progress bar) has none.
    """
    if not text:
        return []
    lines = text.split("\n")
    last = lines.pop()
    out = [_last_redraw(line) + "\n" for line in lines]
    if last:
        out.append(_last_redraw(last))
    return out


def _last_redraw(line: str) -> str:
    redraws = [part for part in line.split("\r") if part]
    return redraws[-1] if redraws else ""
