"""`paths.inside` answers as `PurePath.is_relative_to` does (it replaced it on the hot path),
and a job's write targets never include what its own directory links to."""

from __future__ import annotations

import itertools
from pathlib import Path, PurePosixPath

from lm_eval_server.admission import paths
from lm_eval_server.jobs.launch import write_targets

TEXTS = [
    "/",
    "//",
    "/a",
    "/a/",
    "/a/b",
    "/a/b/c",
    "/ab",
    "/ab/c",
    "/a/bc",
    "//a",
    "//a/b",
    "///a",
    "/a//b",
    "/a/./b",
    "/b/a",
    "/data/jobs",
    "/data/jobs/12",
    "/data/jobs12",
    "/data/job",
]


def test_inside_agrees_with_is_relative_to_on_every_pair() -> None:
    for path_text, root_text in itertools.product(TEXTS, repeat=2):
        path, root = PurePosixPath(path_text), PurePosixPath(root_text)
        assert paths.inside(path, root) == path.is_relative_to(root), (path_text, root_text)


def test_a_link_in_the_job_directory_is_not_a_write_target(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    elsewhere = root / "someone-else"
    elsewhere.mkdir(parents=True)
    work_dir = root / "jobs" / "7"
    work_dir.mkdir(parents=True)
    (work_dir / "results").symlink_to(elsewhere)
    # The default output directory, named inside the job's own directory, links out: still
    # not a target (the sandbox would otherwise mount `elsewhere` writable).
    assert write_targets([], str(work_dir / "results"), work_dir, [root]) == []
    # A request's own output directory elsewhere in ALLOWED_PATHS is one, resolved.
    own = root / "mine"
    own.mkdir()
    assert write_targets([], str(own), work_dir, [root]) == [own.resolve()]
    # A path that climbs out of the job's directory with '..' is judged resolved.
    climbing = work_dir / ".." / ".." / "mine"
    assert write_targets([], str(climbing), work_dir, [root]) == [own.resolve()]
