"""Reading back a job directory's files as the job may have left them (issue 20, item 2): a
symlink, a FIFO, a device or a huge file where the exit record, a log, its cut record or the
results should be. Unit level; tests/e2e/test_readback.py plants the same through real jobs."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.outputs import joblogs, results, samples
from lm_eval_server.runtime import jobdir


def prompt(fn: Callable[[], Any], fifos: list[Path], timeout_s: float = 20.0) -> Any:
    """fn() must return without waiting on a FIFO (opened for writing if it does, to unblock)."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        for fifo in fifos:
            with open(fifo, "wb"):
                pass
        pytest.fail("blocked on a FIFO")
    if errors:
        raise errors[0]
    return out[0]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "jobs.db"
    path.parent.mkdir()
    path.write_text('{"exit_code": 0, "secret": "s3cret"}\n')
    return path


# ----------------------------------------------------------------- jobdir


def test_open_file_refuses_what_is_not_a_regular_file(tmp_path: Path, secret_file: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(secret_file)
    with pytest.raises(jobdir.UnsafeFile):
        jobdir.open_file(link)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(jobdir.UnsafeFile):
        prompt(lambda: jobdir.open_file(fifo), [fifo])
    with pytest.raises(jobdir.UnsafeFile):
        jobdir.open_file(tmp_path)
    with pytest.raises(jobdir.UnsafeFile):
        jobdir.open_file("/dev/zero")
    with pytest.raises(FileNotFoundError):
        jobdir.open_file(tmp_path / "missing")
    fd = jobdir.open_file(secret_file)
    os.close(fd)


def test_read_file_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    assert jobdir.read_file(path, 101) == b"x" * 101
    with pytest.raises(jobdir.FileTooLarge):
        jobdir.read_file(path, 100)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device", "huge", "not-int", "bool"])
def test_an_exit_record_the_job_planted_reads_as_none(
    tmp_path: Path, secret_file: Path, kind: str
) -> None:
    record = tmp_path / jobdir.EXIT_RECORD
    fifos: list[Path] = []
    if kind == "symlink":
        record.symlink_to(secret_file)  # holds a valid exit record: still not ours
    elif kind == "fifo":
        os.mkfifo(record)
        fifos.append(record)
    elif kind == "device":
        record.symlink_to("/dev/zero")
    elif kind == "huge":
        record.write_text('{"exit_code": 0, "pad": "' + "x" * 10_000 + '"}')
    elif kind == "not-int":
        record.write_text('{"exit_code": "0"}')
    else:
        record.write_text('{"exit_code": true}')
    assert prompt(lambda: jobdir.read_exit_code(tmp_path), fifos) is None


def test_write_exit_replaces_a_planted_symlink_without_following_it(
    tmp_path: Path, secret_file: Path
) -> None:
    before = secret_file.read_bytes()
    record = tmp_path / jobdir.EXIT_RECORD
    record.symlink_to(secret_file)
    # The temporary names of the old scheme, planted as symlinks to the victim file.
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (tmp_path / f"{jobdir.EXIT_RECORD}.tmp{pid}").symlink_to(secret_file)
    jobdir.write_exit(tmp_path, 3)
    assert secret_file.read_bytes() == before
    assert not record.is_symlink() and jobdir.read_exit_code(tmp_path) == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()]
    assert leftovers == [jobdir.EXIT_RECORD]


# ----------------------------------------------------------------- logs


def write_log(work_dir: Path, stream: str, text: str) -> Path:
    path = Path(jobdir.log_path(work_dir, stream))
    path.write_text(text)
    return path


def test_a_log_that_is_a_symlink_reads_as_empty(tmp_path: Path, secret_file: Path) -> None:
    log = Path(jobdir.stderr_log(tmp_path))
    log.symlink_to(secret_file)
    Path(jobdir.rotated_segment(log)).symlink_to(secret_file)
    assert joblogs.segments(log) == []
    assert joblogs.tail_lines(log, 10).lines == []
    assert b"".join(joblogs.tail_text(log, None)) == b""
    assert b"".join(joblogs.tail_text(log, 5)) == b""
    assert joblogs.current_size(log) == (None, 0)
    follower = joblogs.LogFollower(log)
    assert follower.read_new() == b"" and follower.backlog() == 0


def test_fifos_and_devices_in_a_log_s_place_do_not_block(tmp_path: Path) -> None:
    log = write_log(tmp_path, "stderr", "line one\nline two\n")
    rotated = Path(jobdir.rotated_segment(log))
    os.mkfifo(rotated)
    cut = Path(jobdir.cut_record(log))
    os.mkfifo(cut)
    fifos = [rotated, cut]
    lines = prompt(lambda: joblogs.tail_lines(log, 10).lines, fifos)
    assert [line.strip() for line in lines] == ["line one", "line two"]
    assert prompt(lambda: b"".join(joblogs.tail_text(log, None)), fifos) == (
        b"line one\nline two\n"
    )
    assert prompt(lambda: joblogs.bytes_cut(log), fifos) == 0
    cut.unlink()
    cut.symlink_to("/dev/zero")
    assert prompt(lambda: joblogs.bytes_cut(log), []) == 0
    log.unlink()
    os.mkfifo(log)
    follower = joblogs.LogFollower(log)
    assert prompt(follower.read_new, [log]) == b""
    assert prompt(lambda: joblogs.tail_lines(log, 5).lines, [log]) == []


def test_whole_log_reads_stop_at_the_size_when_opened(tmp_path: Path) -> None:
    log = write_log(tmp_path, "stdout", "a\n" * 10)
    chunks = joblogs.tail_text(log, None)
    first = next(chunks)
    with log.open("ab") as f:
        f.write(b"later\n")
    assert first + b"".join(chunks) == b"a\n" * 10


def test_a_follower_reads_a_bounded_rotated_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write_log(tmp_path, "stderr", "")
    follower = joblogs.LogFollower(log)
    assert follower.read_new() == b""
    with log.open("ab") as f:  # grown (sparsely, say) past the bound, then rotated
        f.write(b"x" * 1000)
    os.replace(log, jobdir.rotated_segment(log))
    log.write_text("new\n")
    monkeypatch.setattr(joblogs, "ROTATED_READ_BYTES", 100)
    assert follower.read_new() == b"x" * 100 + b"new\n"


# ----------------------------------------------------------------- results and samples


def results_tree(root: Path) -> tuple[Path, Path]:
    model = root / "model"
    model.mkdir(parents=True)
    path = model / "results_2026-01-01T00-00-00.json"
    path.write_text(json.dumps({"results": {"t": {"acc,none": 1.0}}}))
    sample = model / "samples_t_2026-01-01T00-00-00.jsonl"
    sample.write_text(json.dumps({"doc_id": 0, "filter": "none", "metrics": ["acc"]}) + "\n")
    return path, sample


def test_find_results_file_skips_symlinks_to_files_and_directories(tmp_path: Path) -> None:
    other, _ = results_tree(tmp_path / "other_job")
    root = tmp_path / "job" / "results"
    root.mkdir(parents=True)
    (root / "results_2030-01-01.json").symlink_to(other)
    (root / "linked").symlink_to(other.parent, target_is_directory=True)
    assert results.find_results_file(root, None) is None
    real, _ = results_tree(root)
    assert results.find_results_file(root, None) == real
    # A .json output_path: only regular `<stem>_*.json` files beside it.
    out = tmp_path / "flat" / "out.json"
    out.parent.mkdir()
    (out.parent / "out_2030.json").symlink_to(other)
    assert results.find_results_file(out, None) is None
    (out.parent / "out_2026.json").write_text("{}")
    assert results.find_results_file(out, None) == out.parent / "out_2026.json"
    # The root itself swapped for a symlink.
    moved = tmp_path / "job" / "moved"
    os.replace(root, moved)
    root.symlink_to(moved, target_is_directory=True)
    assert results.find_results_file(root, None) is None


def test_find_results_file_looks_at_a_bounded_number_of_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "results"
    for i in range(30):
        (root / f"d{i:02}").mkdir(parents=True)
    results_tree(root)
    monkeypatch.setattr(results, "MAX_SCAN_ENTRIES", 10)
    assert results.find_results_file(root, None) is None
    monkeypatch.setattr(results, "MAX_SCAN_ENTRIES", 100)
    assert results.find_results_file(root, None) is not None


def test_read_results_opens_from_the_root_without_following(
    tmp_path: Path, secret_file: Path
) -> None:
    root = tmp_path / "results"
    path, _ = results_tree(root)
    assert results.read_results(path, root)["results"]["t"]["acc,none"] == 1.0
    with pytest.raises(jobdir.UnsafeFile):
        results.read_results(path, tmp_path / "elsewhere")  # not inside the root
    with pytest.raises(jobdir.FileTooLarge):
        results.read_results(path, root, max_bytes=10)
    # The model directory swapped for a link to a directory holding a file of that name.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / path.name).write_text('{"secret": 1}')
    os.replace(path.parent, tmp_path / "aside")
    path.parent.symlink_to(decoy, target_is_directory=True)
    with pytest.raises(jobdir.UnsafeFile):
        results.read_results(path, root)
    assert results.samples_files(path, root) == {}
    path.parent.unlink()
    os.replace(tmp_path / "aside", path.parent)
    path.unlink()
    path.symlink_to(secret_file)
    with pytest.raises(jobdir.UnsafeFile):
        results.read_results(path, root)


def test_samples_files_and_pages_refuse_symlinks(tmp_path: Path, secret_file: Path) -> None:
    root = tmp_path / "results"
    path, sample = results_tree(root)
    assert results.samples_files(path, root) == {"t": sample}
    index = samples.build_index(sample)
    assert len(samples.read_page(sample, index, [0])) == 1
    with pytest.raises(jobdir.FileTooLarge):
        samples.build_index(sample, max_lines=0)
    sample.unlink()
    sample.symlink_to(secret_file)
    assert results.samples_files(path, root) == {}
    with pytest.raises(jobdir.UnsafeFile):
        samples.build_index(sample)
    with pytest.raises(jobdir.UnsafeFile):
        samples.read_page(sample, index, [0])
