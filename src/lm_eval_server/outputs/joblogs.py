"""Bounded reads of a job's log files (stdout.log / stderr.log and their rotated `.1`).

The job can write its own directory: a log may have been replaced by a symlink (to `jobs.db`,
another job's log), a FIFO or a device. Every open goes through `jobdir.open_file`, so such a
file reads as missing (an empty log), never as the file it points to, and never blocks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lm_eval_server.outputs.progress import terminal_lines
from lm_eval_server.runtime import jobdir

# GET /job/{id} reads at most this much from the end of a log to find its last lines.
TAIL_READ_BYTES = 4 * 1024 * 1024
CHUNK = 1 << 16
# A follower finishing a rotated segment reads at most this much of it.
ROTATED_READ_BYTES = 64 * 1024 * 1024


def _open(path: Path | str) -> BinaryIO | None:
    """The log file opened for reading, or None if it is missing or not a regular file."""
    try:
        return os.fdopen(jobdir.open_file(path), "rb")
    except OSError:
        return None


def _regular_stat(path: Path | str) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def segments(path: Path) -> list[Path]:
    """The log's files, oldest first (regular files only: a symlink is no log)."""
    rotated = Path(jobdir.rotated_segment(path))
    return [p for p in (rotated, path) if _regular_stat(p) is not None]


def bytes_cut(path: Path) -> int:
    try:
        data = jobdir.read_file(jobdir.cut_record(path), jobdir.SMALL_RECORD_BYTES)
        return max(0, int(data or 0))
    except (OSError, ValueError):
        return 0


def read_tail_bytes(path: Path, max_bytes: int, end: int | None = None) -> tuple[bytes, bool]:
    """Up to `max_bytes` from the end of the log (or from `end` of its current file); True when
    earlier bytes exist."""
    parts: list[bytes] = []
    remaining = max_bytes
    earlier = bytes_cut(path) > 0
    segs = segments(path)
    for index, segment in enumerate(reversed(segs)):
        f = _open(segment)
        if f is None:
            continue
        with f:
            size = f.seek(0, os.SEEK_END)
            if end is not None and segment == path:
                size = min(size, end)
            take = min(size, remaining)
            f.seek(size - take)
            parts.append(f.read(take))
            remaining -= take
        if take < size:
            earlier = True
            break
        if remaining <= 0:
            earlier = earlier or index < len(segs) - 1
            break
    return b"".join(reversed(parts)), earlier


@dataclass(frozen=True)
class Tail:
    lines: list[str]
    truncated: bool


def tail_lines(path: Path, max_lines: int) -> Tail:
    # Start small and read further back only when the lines are long: most tails are a few KB.
    want = 64 * 1024
    while True:
        data, earlier = read_tail_bytes(path, want)
        lines = terminal_lines(data.decode("utf-8", errors="replace"))
        if earlier and lines:
            lines = lines[1:]  # the first line read is probably partial
        if len(lines) >= max_lines or not earlier or want >= TAIL_READ_BYTES:
            break
        want *= 4
    if len(lines) > max_lines:
        return Tail(lines[-max_lines:], True)
    return Tail(lines, earlier)


def tail_text(path: Path, max_lines: int | None, end: int | None = None) -> Iterator[bytes]:
    """The whole log (or its last `max_lines` raw lines) as byte chunks, up to `end` of the
    current file when given."""
    if max_lines is None:
        if dropped := bytes_cut(path):
            yield (
                f"[lm-eval-server: the first {dropped} bytes of this log were dropped to keep "
                "it under MAX_LOG_BYTES]\n"
            ).encode()
        for segment in segments(path):
            f = _open(segment)
            if f is None:
                continue
            with f:
                # Up to the size when the request came (a job growing its log sparsely
                # while it is read cannot make the stream endless).
                size = os.fstat(f.fileno()).st_size
                left = min(end, size) if (end is not None and segment == path) else size
                while chunk := f.read(min(CHUNK, left)):
                    yield chunk
                    left -= len(chunk)
        return
    data, _ = read_tail_bytes(path, TAIL_READ_BYTES, end)
    lines = data.splitlines(keepends=True)
    yield b"".join(lines[-max_lines:]) if max_lines > 0 else b""


def current_size(path: Path) -> tuple[int | None, int]:
    st = _regular_stat(path)
    if st is None:
        return None, 0
    return st.st_ino, st.st_size


class LogFollower:
    """Reads what was appended to a log since the last call, across rotations."""

    def __init__(self, path: Path, inode: int | None = None, offset: int = 0) -> None:
        self._path = path
        self._inode = inode
        self._offset = offset

    def read_new(self, max_bytes: int = 8 * 1024 * 1024) -> bytes:
        f = _open(self._path)
        if f is None:
            return b""
        with f:
            st = os.fstat(f.fileno())
            if self._inode is not None and st.st_ino != self._inode:
                # Rotated: finish the old segment (now `.1`) then start the new file.
                tail = self._read_rotated()
                self._inode, self._offset = st.st_ino, 0
                return tail + self._read_from(f, max_bytes)
            self._inode = st.st_ino
            if st.st_size < self._offset:
                self._offset = 0
            return self._read_from(f, max_bytes)

    def backlog(self) -> int:
        """Bytes written to the current file and not read yet."""
        st = _regular_stat(self._path)
        if st is None:
            return 0
        if self._inode is not None and st.st_ino != self._inode:
            return st.st_size
        return max(0, st.st_size - self._offset)

    def skip_to_end(self, keep: int) -> None:
        """Jump ahead so that only the last `keep` bytes of the current file remain unread."""
        st = _regular_stat(self._path)
        if st is None:
            return
        self._inode = st.st_ino
        self._offset = max(self._offset if st.st_ino == self._inode else 0, st.st_size - keep)

    def _read_rotated(self) -> bytes:
        f = _open(jobdir.rotated_segment(self._path))
        if f is None:
            return b""
        with f:
            if os.fstat(f.fileno()).st_ino != self._inode:
                return b""
            f.seek(self._offset)
            return f.read(ROTATED_READ_BYTES)

    def _read_from(self, f, max_bytes: int) -> bytes:  # type: ignore[no-untyped-def]
        f.seek(self._offset)
        data = f.read(max_bytes)
        self._offset += len(data)
        return data


def stream_tail(work_dir: Path, stream: str, n: int) -> Tail:
    """The last `n` lines of a job's stdout or stderr log."""
    return tail_lines(Path(jobdir.log_path(work_dir, stream)), n)
