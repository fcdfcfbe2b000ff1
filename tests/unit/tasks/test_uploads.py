"""TaskUploads' directory reading and staging clean-up (no lm-eval process involved)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lm_eval_server.config import Settings
from lm_eval_server.tasks.uploads import TaskUploads
from lm_eval_server.team.principals import Principal


def test_names_read_the_owner_directory_only(tmp_path: Path) -> None:
    uploads = TaskUploads(Settings(data_dir=tmp_path, task_index=False))
    for owner, name in (("alice", "t1"), ("alice", "t2"), ("bob", "t3")):
        task = uploads.owner_dir(owner) / name
        task.mkdir(parents=True)
        (task / f"{name}.yaml").write_text("task: x\n")
    (uploads.owner_dir("alice") / "no_yaml").mkdir()
    (uploads.owner_dir("alice") / ".hidden").mkdir()
    (uploads.owner_dir("alice") / "t9").symlink_to(uploads.owner_dir("bob") / "t3")
    assert sorted(uploads.names("alice")) == ["t1", "t2"]
    assert uploads.names("nobody") == {}
    assert [t.name for t in uploads.list(Principal("alice"))] == ["t1", "t2"]
    everyone = uploads.list(Principal("root", admin=True))
    assert [(t.owner, t.name) for t in everyone] == [
        ("alice", "t1"),
        ("alice", "t2"),
        ("bob", "t3"),
    ]


def test_clean_staging_removes_only_old_leftovers(tmp_path: Path) -> None:
    uploads = TaskUploads(Settings(data_dir=tmp_path, task_index=False))
    staging = uploads.root / ".staging"
    old, fresh = staging / "alice.t.0001", staging / "alice.t.0002"
    for directory in (old, fresh):
        directory.mkdir(parents=True)
        (directory / "d.jsonl").write_text("{}\n")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    uploads.clean_staging()
    assert not old.exists() and fresh.exists()


def test_an_owner_that_is_not_a_principal_name_never_becomes_a_path(tmp_path: Path) -> None:
    import asyncio

    import pytest

    from lm_eval_server.tasks.uploads import UploadedTaskNotFound

    uploads = TaskUploads(Settings(data_dir=tmp_path / "data", task_index=False))
    victim = tmp_path / "victim" / "t1"
    victim.mkdir(parents=True)
    (victim / "t1.yaml").write_text("task: t1\n")
    admin = Principal("root", admin=True)
    for owner in ("../..", "../../victim", "a/b", "a\0b", ""):
        with pytest.raises(UploadedTaskNotFound):
            uploads.get("t1", admin, owner)
        with pytest.raises(UploadedTaskNotFound):
            asyncio.run(uploads.delete("t1", admin, owner))
        assert uploads.names(owner) == {}
    assert (victim / "t1.yaml").exists()


def _add(uploads: TaskUploads, owner: str, name: str) -> None:
    """An upload as _commit makes it: the whole directory renamed into the owner's."""
    staging = uploads.root / ".staging" / f"{owner}.{name}"
    staging.mkdir(parents=True)
    (staging / f"{name}.yaml").write_text("task: x\n")
    uploads.owner_dir(owner).mkdir(parents=True, exist_ok=True)
    staging.rename(uploads.owner_dir(owner) / name)


def test_names_come_from_a_cache_that_follows_every_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = TaskUploads(Settings(data_dir=tmp_path, task_index=False))
    scans: list[str] = []
    real_scan = uploads._scan

    def counting_scan(owner: str) -> dict[str, Path]:
        scans.append(owner)
        return real_scan(owner)

    monkeypatch.setattr(uploads, "_scan", counting_scan)
    assert uploads.names("alice") == {}
    assert uploads.names("alice") == {}
    assert scans == ["alice"]  # unchanged (no directory yet): not scanned again
    # Renames into and out of the owner's directory, as another server process sharing
    # DATA_DIR makes them, are seen at the next lookup.
    _add(uploads, "alice", "t1")
    assert sorted(uploads.names("alice")) == ["t1"]
    assert sorted(uploads.names("alice")) == ["t1"]
    _add(uploads, "alice", "t2")
    assert sorted(uploads.names("alice")) == ["t1", "t2"]
    (uploads.owner_dir("alice") / "t1").rename(uploads.root / ".staging" / "gone")
    assert sorted(uploads.names("alice")) == ["t2"]
    assert scans == ["alice"] * 4
    # A caller changing the answer it was given does not change the cache.
    uploads.names("alice").clear()
    assert sorted(uploads.names("alice")) == ["t2"]
    # This process's own changes drop the entry at once, whatever the clock's resolution.
    uploads._changed("alice")
    uploads.names("alice")
    assert scans == ["alice"] * 5
