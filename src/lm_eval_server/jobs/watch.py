"""What the server reads from a running job's output: its progress and, when it fails, why.

Both read the job's stderr log (see `jobdir`), in a worker thread: a job may write hundreds of
megabytes, and the event loop must keep answering requests meanwhile.
"""

from __future__ import annotations

import asyncio
import codecs
import re
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


# A tqdm bar as it is redrawn ("Requesting API:  0%|     | 0/4 [00:01<?, ?it/s]"): it says
# how far the job got, never why it failed, and tqdm redraws it after the traceback.
_TQDM_BAR = re.compile(r"^[^\n]*\d+%\|[^|]*\|\s*\d+(?:\.\d+)?[kM]?/\S+\s*\[[^\]]*\]\s*$")
# What an API model was told by the model server, as lm-eval's api_models logs it before it
# retries (the traceback then ends in a bare HTTPError: "404 Client Error: Not Found").
_SERVER_SAID = re.compile(
    r"(?:API request failed with error message|Response text): (.*?)\.? Retrying\.\.\."
)
MAX_SERVER_REASON_CHARS = 500


def _is_progress_line(line: str) -> bool:
    return bool(_TQDM_BAR.match(line.rsplit("\r", 1)[-1])) or not line.replace("\r", "").strip()


def server_reason(lines: list[str]) -> str | None:
    """The last reason a model server gave lm-eval for refusing a request, or None."""
    for line in reversed(lines):
        if found := _SERVER_SAID.findall(line):
            reason = found[-1].strip()
            if len(reason) > MAX_SERVER_REASON_CHARS:
                reason = reason[:MAX_SERVER_REASON_CHARS] + "..."
            return reason
    return None


def summarize_failure(lines: list[str], code: int | None) -> str:
    """The exit code and the lines of stderr that explain it (pure): the last Python traceback
    (its head and its end, if long), or else the last lines; progress bars left out, and the
    model server's own reason last when lm-eval logged one."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        block = [line for line in lines[starts[-1] :] if not _is_progress_line(line)]
        if len(block) > 40:
            block = [block[0], "  ...", *block[-30:]]
    else:
        block = [line for line in lines if not _is_progress_line(line)][-15:]
    head = f"exit code {code}" if code is not None else "no exit code was recorded"
    if reason := server_reason(lines):
        block.append(f"The model server answered: {reason}")
    return "\n".join([head, *block]).strip()


def failure_reason(work_dir: Path, code: int | None) -> str:
    """summarize_failure over the end of the job's stderr. Reads the log: call it in a thread."""
    tail = joblogs.tail_lines(Path(jobdir.stderr_log(work_dir)), FAILURE_TAIL_LINES)
    return summarize_failure([line.rstrip("\n") for line in tail.lines], code)
