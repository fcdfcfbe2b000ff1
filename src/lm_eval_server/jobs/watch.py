"""What the server reads from a running job's output: its progress and, when it fails, why.

Both read the job's stderr log (see `jobdir`), in a worker thread: a job may write hundreds of
megabytes, and the event loop must keep answering requests meanwhile.
"""

from __future__ import annotations

import asyncio
import codecs
from pathlib import Path

from lm_eval_server.outputs import joblogs
from lm_eval_server.outputs.progress import Progress, ProgressTracker
from lm_eval_server.runtime import jobdir

# Above this much new stderr per tick, only the end is parsed for bars (markers are still
# found in all of it), so a chatty job cannot make the server spend its CPU on regexes.
FULL_PARSE_BYTES = 64 * 1024
# Beyond this much unread stderr, the reader jumps ahead instead of parsing everything.
MAX_BACKLOG_BYTES = 8 * 1024 * 1024
# Lines of stderr searched for the traceback that explains a failure.
FAILURE_TAIL_LINES = 400


class ProgressWatcher:
    """Follows one job's stderr and turns it into whole-job progress."""

    def __init__(self, work_dir: Path) -> None:
        self._follower = joblogs.LogFollower(Path(jobdir.stderr_log(work_dir)))
        self._tracker = ProgressTracker()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def progress(self) -> Progress:
        return self._tracker.progress

    async def poll(self) -> Progress:
        """Progress after what the job wrote since the last poll."""
        return await asyncio.to_thread(self._read_new_output)

    def _read_new_output(self) -> Progress:
        if self._follower.backlog() > MAX_BACKLOG_BYTES:
            # A flood of output: only its end can hold the current bar; don't re-read the rest.
            self._follower.skip_to_end(keep=FULL_PARSE_BYTES * 4)
            self._decoder.reset()
            self._tracker.lost_output()
        while data := self._follower.read_new():
            text = self._decoder.decode(data)
            if len(text) > FULL_PARSE_BYTES:
                self._tracker.skip(text[:-FULL_PARSE_BYTES])
                text = text[-FULL_PARSE_BYTES:]
            self._tracker.feed(text)
        return self._tracker.progress


def failure_reason(work_dir: Path, code: int | None) -> str:
    """The exit code and the lines of stderr that explain it: the last Python traceback (its
    head and its end, if long), or else the last lines. Reads the log: call it in a thread."""
    tail = joblogs.tail_lines(Path(jobdir.stderr_log(work_dir)), FAILURE_TAIL_LINES)
    lines = [line.rstrip("\n") for line in tail.lines]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        block = lines[starts[-1] :]
        if len(block) > 40:
            block = [block[0], "  ...", *block[-30:]]
    else:
        block = lines[-15:]
    head = f"exit code {code}" if code is not None else "no exit code was recorded"
    return "\n".join([head, *block]).strip()
