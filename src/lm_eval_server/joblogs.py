"""Bounded reads of a job's log files (stdout.log / stderr.log and their rotated `.1`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lm_eval_server import jobdir
from lm_eval_server.progress import terminal_lines

# GET /job/{id} reads at most this much from the end of a log to find its last lines.
TAIL_READ_BYTES = 4 * 1024 * 1024
CHUNK = 1 << 16


def segments(path: Path) -> list[Path]:
    """The log's files, oldest first."""
    rotated = Path(jobdir.rotated_segment(path))
    return [p for p in (rotated, path) if p.exists()]


def bytes_cut(path: Path) -> int:
    try:
        return int(Path(jobdir.cut_record(path)).read_text() or 0)
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
        with open(segment, "rb") as f:
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
            with open(segment, "rb") as f:
                left = end if (end is not None and segment == path) else None
                while chunk := f.read(CHUNK if left is None else min(CHUNK, left)):
                    yield chunk
                    if left is not None:
                        left -= len(chunk)
        return
    data, _ = read_tail_bytes(path, TAIL_READ_BYTES, end)
    lines = data.splitlines(keepends=True)
    yield b"".join(lines[-max_lines:]) if max_lines > 0 else b""


def current_size(path: Path) -> tuple[int | None, int]:
    try:
        st = path.stat()
    except OSError:
        return None, 0
    return st.st_ino, st.st_size


class LogFollower:
    """Reads what was appended to a log since the last call, across rotations."""

    def __init__(self, path: Path, inode: int | None = None, offset: int = 0) -> None:
        self._path = path
        self._inode = inode
        self._offset = offset

    def read_new(self, max_bytes: int = 8 * 1024 * 1024) -> bytes:
        try:
            f = open(self._path, "rb")  # noqa: SIM115 - closed below
        except OSError:
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
        try:
            st = self._path.stat()
        except OSError:
            return 0
        if self._inode is not None and st.st_ino != self._inode:
            return st.st_size
        return max(0, st.st_size - self._offset)

    def skip_to_end(self, keep: int) -> None:
        """Jump ahead so that only the last `keep` bytes of the current file remain unread."""
        try:
            st = self._path.stat()
        except OSError:
            return
        self._inode = st.st_ino
        self._offset = max(self._offset if st.st_ino == self._inode else 0, st.st_size - keep)

    def _read_rotated(self) -> bytes:
        rotated = jobdir.rotated_segment(self._path)
        try:
            with open(rotated, "rb") as f:
                if os.fstat(f.fileno()).st_ino != self._inode:
                    return b""
                f.seek(self._offset)
                return f.read()
        except OSError:
            return b""

    def _read_from(self, f, max_bytes: int) -> bytes:  # type: ignore[no-untyped-def]
        f.seek(self._offset)
        data = f.read(max_bytes)
        self._offset += len(data)
        return data
