"""Tests for lm_eval_server.runtime.task_index: include_path scanning, cache key, cache files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lm_eval_server.runtime import task_index

REPO = Path(__file__).resolve().parents[3]


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_task_tree(root: Path) -> Path:
    """A directory exercising the corners of lm-eval's TaskIndex naming rules."""
    write(root, "a/plain.yaml", "task: plain\ntag: single_tag\n")
    write(root, "a/listtag.yaml", "task: listtag\ntag: [tag_one, tag_two]\n")
    write(root, "a/func.yaml", "task: func\nprocess_docs: !function utils.process\n")
    write(root, "a/unknown_tag.yaml", "task: odd\nextra: !custom {x: 1}\n")
    write(root, "b/_template.yaml", "output_type: multiple_choice\ntag: from_include\n")
    write(root, "b/child.yaml", "include: _template.yaml\ntask: child\n")
    write(root, "b/named_by_include.yaml", "include: _named.yaml\n")
    write(root, "b/_named.yaml", "task: named_in_include\n")
    # A group's task: list names members (existing or inline), never new names;
    # a group's own tag is not registered either.
    write(
        root,
        "c/group.yaml",
        "group: my_group\ntag: group_tag\ntask:\n  - plain\n  - task: inline_member\n"
        "  - group: inline_subgroup\n    task: [plain]\n",
    )
    write(root, "c/pytask.yaml", "task: py_task\nclass: !function task.MyTask\n")
    # Duplicate task: lm-eval keeps the first by path order and skips the rest,
    # including the tags the duplicate would have registered.
    write(root, "d/1_first.yaml", "task: dup\n")
    write(root, "d/2_second.yaml", "task: dup\ntag: tag_of_skipped_dup\n")
    # A task whose name collides with an earlier tag is skipped too.
    write(root, "d/3_tag_collision.yaml", "task: single_tag\ntag: tag_of_collision\n")
    # Skipped files.
    write(root, "e/not_a_dict.yaml", "- just\n- a list\n")
    write(root, "e/broken.yaml", "task: [unclosed\n")
    write(root, "e/no_kind.yaml", "dataset_path: foo\n")
    write(root, "e/cycle.yaml", "include: cycle.yaml\ntask: cyclic\n")
    write(root, "e/list_name.yaml", "task: [a, b]\n")
    write(root, "e/int_name.yaml", "task: 123\n")
    write(root, "e/other_ext.yml", "task: yml_is_ignored\n")
    write(root, "e/__pycache__/cached.yaml", "task: in_pycache\n")
    write(root, "e/.ipynb_checkpoints/ckpt.yaml", "task: in_checkpoints\n")
    # A tag lm-eval cannot make a set of drops the whole file...
    write(root, "f/bad_tag.yaml", "task: bad_tag_task\ntag: [a_tag, {not: hashable}]\n")
    write(root, "f/int_tag.yaml", "task: int_tag_task\ntag: 5\n")
    write(root, "f/bad_group_tag.yaml", "group: bad_group\ntag: 5\ntask: [plain]\n")
    # ...but a dict tag passes that step and fails after the task is registered.
    write(root, "f/dict_tag.yaml", "task: dict_tag_task\ntag: {k: v}\n")
    return root


EXPECTED_TREE_NAMES = {
    "plain",
    "single_tag",
    "listtag",
    "tag_one",
    "tag_two",
    "func",
    "odd",
    "child",
    "from_include",
    "named_in_include",
    "my_group",
    "py_task",
    "dup",
    "dict_tag_task",
}


# ----------------------------------------------------------------- scan_include_path


def test_scan_include_path_names(tmp_path: Path) -> None:
    assert task_index.scan_include_path(make_task_tree(tmp_path)) == EXPECTED_TREE_NAMES


def test_scan_include_path_accepts_str_and_missing_dir(tmp_path: Path) -> None:
    make_task_tree(tmp_path)
    assert task_index.scan_include_path(str(tmp_path)) == EXPECTED_TREE_NAMES
    assert task_index.scan_include_path(tmp_path / "does-not-exist") == set()


def test_scan_include_path_examples() -> None:
    assert task_index.scan_include_path(REPO / "examples" / "tasks") == {"demo_mc"}


def test_scan_include_path_does_not_import_lm_eval(tmp_path: Path) -> None:
    make_task_tree(tmp_path)
    code = (
        "import sys; from lm_eval_server.runtime.task_index import scan_include_path; "
        f"n = scan_include_path({str(tmp_path)!r}); "
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'; print(len(n))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(EXPECTED_TREE_NAMES))


def test_scan_include_path_agrees_with_lm_eval(tmp_path: Path) -> None:
    from lm_eval.tasks._index import TaskIndex

    root = make_task_tree(tmp_path)
    lm_eval_names = {k for k in TaskIndex.build([root]) if isinstance(k, str)}
    # By design the scan also accepts tags lm-eval's loader rejects ("!custom"),
    # so the server never refuses a name lm-eval would accept.
    assert task_index.scan_include_path(root) == lm_eval_names | {"odd"}


def test_yaml_files_match_lm_eval_traversal(tmp_path: Path) -> None:
    root = make_task_tree(tmp_path / "tree")
    write(root, "__pycache__/hidden.yaml", "task: cached\n")
    write(root, "c/.dot.yaml", "task: dotted\n")
    (root / "c" / "dir.yaml").mkdir()
    (root / "link").symlink_to(root / "a", target_is_directory=True)  # not followed
    glob = sorted(
        p.as_posix()
        for p in root.glob("**/*.yaml")
        if not any(part in {"__pycache__", ".ipynb_checkpoints"} for part in p.parts)
    )
    assert [f.path for f in task_index.yaml_files(root)] == glob


def test_scan_walks_and_reads_no_more_than_the_cap(tmp_path: Path) -> None:
    root = make_task_tree(tmp_path)
    # Every entry is looked at once, but nothing inside an ignored directory.
    ignored = {"__pycache__", ".ipynb_checkpoints"}
    entries = sum(1 for p in root.rglob("*") if not ignored & set(p.relative_to(root).parts[:-1]))
    assert task_index.scan_include_path(root, max_entries=entries) == EXPECTED_TREE_NAMES
    with pytest.raises(task_index.ScanLimitExceeded):
        task_index.yaml_files(root, max_entries=entries - 1)
    # Reads count includes: one file included by 30 others is read 30 times.
    wide = tmp_path / "wide"
    write(wide, "_base.yaml", "output_type: multiple_choice\n")
    for i in range(30):
        write(wide, f"t{i}.yaml", f"include: _base.yaml\ntask: t{i}\n")
    files = task_index.yaml_files(wide, max_entries=40)
    with pytest.raises(task_index.ScanLimitExceeded):
        task_index.names_in(files, max_reads=40)
    assert len(task_index.names_in(files, max_reads=61)) == 30


def test_scan_skips_fifos_devices_and_huge_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")  # opening it for reading would block forever
    write(tmp_path, "via_pipe.yaml", "include: pipe.yaml\ntask: via_pipe\n")
    write(tmp_path, "via_zero.yaml", "include: /dev/zero\ntask: via_zero\n")
    big = write(tmp_path, "big.yaml", "task: big\n")
    with big.open("a") as fh:
        fh.write("# padding\n" * (task_index.MAX_YAML_BYTES // 10 + 1))
    write(tmp_path, "fine.yaml", "task: fine\n")
    result: list[set[str]] = []
    worker = threading.Thread(target=lambda: result.append(task_index.scan_include_path(tmp_path)))
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the thread before failing
        with open(tmp_path / "pipe.yaml", "w"):
            pass
        pytest.fail("the scan blocked on a FIFO")
    assert result == [{"fine"}]


# ----------------------------------------------------------------- cache key


@pytest.fixture
def fake_builtin(tmp_path: Path) -> Path:
    root = tmp_path / "builtin"
    write(root, "x/x.yaml", "task: x_task\ntag: x_tag\n")
    write(root, "y/y.yaml", "group: y_group\ntask: [x_task]\n")
    write(root, "z/z.yaml", "task: z_task\noutput_type: generate_until\n")
    return root


def test_cache_key_is_stable(fake_builtin: Path) -> None:
    assert task_index.cache_key(fake_builtin) == task_index.cache_key(fake_builtin)
    assert len(task_index.cache_key(fake_builtin)) == 32


def test_cache_key_default_is_lm_evals_tasks_dir() -> None:
    builtin = task_index.builtin_tasks_dir()
    assert (builtin / "_index.py").is_file()
    assert task_index.cache_key() == task_index.cache_key(builtin)


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r: bump_mtime(r / "x/x.yaml"), id="touched"),
        pytest.param(lambda r: (r / "x/x.yaml").write_text("task: renamed\n"), id="edited"),
        pytest.param(lambda r: write(r, "new/n.yaml", "task: n\n"), id="added"),
        pytest.param(lambda r: (r / "z/z.yaml").unlink(), id="removed"),
    ],
)
def test_cache_key_changes_with_yaml_files(fake_builtin: Path, change) -> None:
    before = task_index.cache_key(fake_builtin)
    change(fake_builtin)
    assert task_index.cache_key(fake_builtin) != before


def test_cache_key_ignores_pycache_and_non_yaml(fake_builtin: Path) -> None:
    before = task_index.cache_key(fake_builtin)
    # Importing a task's utils.py writes __pycache__ (bumping the dir mtime):
    # that must not invalidate the cache.
    write(fake_builtin, "x/__pycache__/utils.cpython-311.pyc", "bytecode")
    write(fake_builtin, "x/__pycache__/stray.yaml", "task: ignored\n")
    write(fake_builtin, "x/utils.py", "def f(): pass\n")
    bump_mtime(fake_builtin / "x")
    assert task_index.cache_key(fake_builtin) == before


def test_cache_key_depends_on_lm_eval_version(
    fake_builtin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = task_index.cache_key(fake_builtin)
    monkeypatch.setattr(task_index, "lm_eval_version", lambda: "9.9.9")
    assert task_index.cache_key(fake_builtin) != before


# ----------------------------------------------------------------- cache files


def test_cache_paths(tmp_path: Path) -> None:
    paths = task_index.cache_paths(tmp_path)
    assert paths.index == tmp_path / "task_index" / "builtin_index.jsonl"
    assert paths.names == tmp_path / "task_index" / "task_names.json"


def test_build_writes_both_files(fake_builtin: Path, tmp_path: Path) -> None:
    from lm_eval.tasks._index import TaskIndex

    data = tmp_path / "data"
    paths = task_index.build(data, builtin_dir=fake_builtin)
    key = task_index.cache_key(fake_builtin)

    names = json.loads(paths.names.read_text())
    assert names == {
        "lm_eval_version": task_index.lm_eval_version(),
        "key": key,
        "tasks": ["x_task", "z_task"],
        "groups": ["y_group"],
        "tags": ["x_tag"],
        # GET /tasks: kind, output_type (tasks that set one), the YAML (none for a tag).
        "info": {
            "x_task": ["task", None, str(fake_builtin / "x" / "x.yaml")],
            "x_tag": ["tag", None, None],
            "y_group": ["group", None, str(fake_builtin / "y" / "y.yaml")],
            "z_task": ["task", "generate_until", str(fake_builtin / "z" / "z.yaml")],
        },
    }
    assert task_index.load_info(data) is None  # keyed to the real install, not this one
    assert cached(data, key, fake_builtin) == TaskIndex.build([fake_builtin])
    assert sorted(p.name for p in paths.index.parent.iterdir()) == [
        "builtin_index.jsonl",
        "task_names.json",
    ]


def cached(data: Path, key: str, builtin: Path) -> dict:
    return task_index.decode_index(task_index.read_index_payload(data, key), builtin)


def test_read_index_payload_reasons(fake_builtin: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = task_index.cache_key(fake_builtin)
    with pytest.raises(task_index.CacheUnavailable, match="missing"):
        task_index.read_index_payload(data, key)

    task_index.build(data, builtin_dir=fake_builtin)
    with pytest.raises(task_index.CacheUnavailable, match="stale"):
        task_index.read_index_payload(data, "0" * 32)

    index_file = task_index.cache_paths(data).index
    good = index_file.read_bytes()
    for bad in (b"not json", b'{"format": -1}\n[]\n', b"\x80\x04\x95 a pickle\n"):
        index_file.write_bytes(bad)
        with pytest.raises(task_index.CacheUnavailable, match="unknown format"):
            task_index.read_index_payload(data, key)
    index_file.write_bytes(good[:-100])
    with pytest.raises(task_index.CacheUnavailable, match="truncated"):
        task_index.read_index_payload(data, key)


def test_load_names(fake_builtin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    # load_names checks against the real install's key; point it at the fake dir.
    monkeypatch.setattr(task_index, "builtin_tasks_dir", lambda: fake_builtin)
    assert task_index.load_names(data) is None  # missing

    task_index.build(data, builtin_dir=fake_builtin)
    assert task_index.load_names(data) == {"x_task", "z_task", "y_group", "x_tag"}

    write(fake_builtin, "new/n.yaml", "task: n\n")
    assert task_index.load_names(data) is None  # stale

    task_index.build(data, builtin_dir=fake_builtin)
    assert "n" in (task_index.load_names(data) or set())

    task_index.cache_paths(data).names.write_text("{not json")
    assert task_index.load_names(data) is None


def test_load_names_does_not_import_lm_eval(tmp_path: Path) -> None:
    paths = task_index.cache_paths(tmp_path)
    paths.names.parent.mkdir(parents=True)
    names = {"key": task_index.cache_key(), "tasks": ["t"], "groups": ["g"], "tags": []}
    paths.names.write_text(json.dumps(names))
    code = (
        "import sys; from pathlib import Path; "
        "from lm_eval_server.runtime.task_index import load_names; "
        f"n = load_names(Path({str(tmp_path)!r})); "
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'; print(sorted(n))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['g', 't']"


def test_concurrent_writers_leave_a_valid_cache(fake_builtin: Path, tmp_path: Path) -> None:
    from lm_eval.tasks._index import TaskIndex

    data = tmp_path / "data"
    index = TaskIndex.build([fake_builtin])
    key = task_index.cache_key(fake_builtin)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(20):
                task_index.write_cache(data, key, index, builtin_dir=fake_builtin)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(50):  # readers never see a partial file
        if task_index.cache_paths(data).index.exists():
            assert cached(data, key, fake_builtin) == index
    for t in threads:
        t.join()
    assert errors == []
    assert cached(data, key, fake_builtin) == index
    assert len(list((data / "task_index").iterdir())) == 2  # no temp files left
