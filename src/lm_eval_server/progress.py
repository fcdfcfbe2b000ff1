"""Parsing lm-eval's stderr: tqdm inference bars and terminal-style lines. Pure, no I/O.

tqdm redraws a bar with `\\r`, log lines end with `\\n`; both end a "record". The inference
bars are "Requesting API" (API models) and the undescribed bars that follow the log lines
"Running loglikelihood requests" (and generate_until, loglikelihood_rolling) of local models.
Other bars ("Building contexts", dataset generation, ...) are not inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BAR = re.compile(
    r"(?:(?P<desc>[^\r\n|]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*"
    r"(?P<done>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>\d+(?::\d+)+)<(?P<remaining>\?|\d+(?::\d+)+)"
    r"(?:,\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>[^\]\s]*))?\]"
)
_PHASE_LINE = re.compile(r"Running (loglikelihood_rolling|loglikelihood|generate_until) requests")
_CONTEXT_LINE = re.compile(r"Building contexts")
_PHASES = ("loglikelihood_rolling", "loglikelihood", "generate_until")
API_PHASE = "api requests"


@dataclass(frozen=True)
class Progress:
    phase: str
    done: int
    total: int
    rate_per_s: float | None
    eta_s: float | None

    @property
    def pct(self) -> int:
        if self.total <= 0:
            return 0
        return min(100, (100 * self.done) // self.total)


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


class ProgressTracker:
    """Feeds on a job's stderr in chunks of any size; `progress` is the latest inference bar."""

    def __init__(self) -> None:
        self._pending = ""
        self._phase: str | None = None
        self.progress: Progress | None = None

    def feed(self, text: str) -> None:
        records = re.split(r"[\r\n]", self._pending + text)
        self._pending = records.pop()
        for record in records:
            self._consume(record)
        # A bar's latest redraw may still be unterminated; read it without consuming it.
        if self._pending:
            self._consume(self._pending, final=False)

    def skip(self, text: str) -> None:
        """Consumes `text` looking only for phase markers, not bars: the cheap path for floods.

        Whatever follows `text` must be passed to `feed`.
        """
        text = self._pending + text
        # str.rfind, not a regex: this runs over every byte of a flood of output.
        found: dict[str | None, int] = {
            phase: text.rfind(f"Running {phase} requests") for phase in _PHASES
        }
        found[None] = text.rfind("Building contexts")
        phase, where = max(found.items(), key=lambda item: item[1])
        if where >= 0:
            self._phase = phase
        self._pending = ""

    def _consume(self, record: str, *, final: bool = True) -> None:
        bar = parse_bar(record)
        if bar is None:
            if not final:
                return
            if phase := _PHASE_LINE.search(record):
                self._phase = phase.group(1)
            elif _CONTEXT_LINE.search(record):
                self._phase = None
            return
        phase = self._bar_phase(bar.desc)
        if phase is None:
            return
        self.progress = Progress(phase, bar.done, bar.total, bar.rate_per_s, bar.eta_s)

    def _bar_phase(self, desc: str) -> str | None:
        if desc.startswith("Requesting API"):
            return API_PHASE
        if phase := _PHASE_LINE.search(desc):
            return phase.group(1)
        if not desc:
            return self._phase
        return None


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
