"""The task index cache is data: parsed and type-checked, never unpickled or executed.

Issue 20: a job replaced the pickled cache with its own pickle and the next job of another owner
ran it. These tests write such files where the cache lives and check that every reader treats
them as a corrupt cache (the launcher then re-indexes with lm-eval) and runs nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.runtime import launcher, task_index
from tests.unit.runtime.test_task_index import write

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def builtin(tmp_path: Path) -> Path:
    root = tmp_path / "builtin"
    write(root, "x/x.yaml", "task: x_task\ntag: [x_tag, other]\nnum_fewshot: 3\nratio: 0.5\n")
    write(root, "y/y.yaml", "group: y_group\ntask: [x_task, {task: z_task, num_fewshot: 0}]\n")
    write(root, "z/z.yaml", "task: z_task\noutput_type: generate_until\nmetadata: {v: null}\n")
    write(root, "p/p.yaml", "task: p_task\nclass: !function p.Cls\n")
    return root


def built(builtin: Path) -> dict[str, Any]:
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([builtin])


def test_round_trip_gives_lm_evals_entries(builtin: Path) -> None:
    index = built(builtin)
    payload = task_index.encode_index(index, builtin)
    decoded = task_index.decode_index(payload, builtin)
    assert list(decoded.items()) == list(index.items())  # same entries, same order
    # Paths are stored relative to the built-in dir, and come back as lm-eval's Paths.
    assert {row[2] for row in json.loads(payload)} == {
        "p/p.yaml",
        "x/x.yaml",
        "y/y.yaml",
        None,
        "z/z.yaml",
    }
    assert decoded["x_task"].yaml_path == builtin / "x" / "x.yaml"
    assert type(decoded["x_task"].yaml_path) is type(index["x_task"].yaml_path)
    # Private copies: mutating one does not reach the next.
    decoded["x_task"].cfg["task"] = "mutated"
    decoded["x_tag"].tags.add("mutated")
    assert task_index.decode_index(payload, builtin) == index


def test_the_cache_file_is_two_lines_of_json(builtin: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    task_index.build(data, builtin_dir=builtin)
    header, body, rest = task_index.cache_paths(data).index.read_bytes().split(b"\n")
    assert rest == b""
    assert json.loads(header) == {
        "format": task_index.FORMAT_VERSION,
        "key": task_index.cache_key(builtin),
        "lm_eval_version": task_index.lm_eval_version(),
        "builtin_dir": str(builtin),
        "entries": 6,
    }
    rows = json.loads(body)
    assert ["x_tag", "TAG", None, None, ["x_task"]] in rows
    assert rows[0][:3] == ["p_task", "PY_TASK", "p/p.yaml"]


def test_a_legacy_pickle_is_removed_and_never_read(builtin: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    legacy = data / task_index.CACHE_SUBDIR / "builtin_index.pickle"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(pickle.dumps({"format": 2}))
    task_index.build(data, builtin_dir=builtin)
    assert not legacy.exists()


class Boom:
    """Unpickling this writes a marker file: proof that a reader ran the attacker's code."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.marker).write_text, ("pwned",))


def planted_pickles(marker: Path, key: str) -> list[bytes]:
    Boom.marker = str(marker)
    evil = pickle.dumps(Boom())
    header = pickle.dumps({"format": task_index.FORMAT_VERSION, "key": key})
    json_header = json.dumps({"format": task_index.FORMAT_VERSION, "key": key}).encode()
    return [
        evil,  # the attack: a pickle where the cache was
        header + evil,  # the old file's layout: a valid pickled header, then the payload
        json_header + b"\n" + evil + b"\n",  # a valid JSON header, a pickle as the body
    ]


def test_a_planted_pickle_is_a_corrupt_cache_and_never_runs(
    builtin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lm_eval.tasks._index import log

    data = tmp_path / "data"
    key = task_index.cache_key(builtin)
    marker = tmp_path / "marker"
    index_file = task_index.cache_paths(data).index
    index_file.parent.mkdir(parents=True)
    for blob in planted_pickles(marker, key):
        index_file.write_bytes(blob)
        try:
            payload = task_index.read_index_payload(data, key)
        except task_index.CacheUnavailable:
            continue
        # Past the header: the launcher's decode refuses it and lm-eval indexes instead.
        source = launcher.BuiltinIndexSource(builtin, launcher_original(), payload)
        hooked = launcher.make_build(launcher_original(), source, log)
        assert hooked([builtin]) == built(builtin)
        assert "cached task index unreadable" in capsys.readouterr().err
    assert not marker.exists()


def launcher_original() -> Any:
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build


def good_rows(builtin: Path) -> list[list[Any]]:
    return json.loads(task_index.encode_index(built(builtin), builtin))


def with_row(rows: list[list[Any]], name: str, field: int, value: Any) -> bytes:
    out = [list(r) for r in rows]
    for row in out:
        if row[0] == name:
            row[field] = value
    return json.dumps(out).encode()


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        # The path: lm-eval re-reads this YAML with !function resolved (imports utils.py).
        pytest.param("x_task", 2, "../../attacker/job/task.yaml", id="path-dotdot"),
        pytest.param("x_task", 2, "x/../../../evil.yaml", id="path-dotdot-inside"),
        pytest.param("x_task", 2, "/data/jobs/7/task.yaml", id="path-absolute"),
        pytest.param("x_task", 2, "x//x.yaml", id="path-empty-part"),
        pytest.param("x_task", 2, "x/./x.yaml", id="path-dot-part"),
        pytest.param("x_task", 2, "x/utils.py", id="path-not-yaml"),
        pytest.param("x_task", 2, "x/x\u0000.yaml", id="path-nul"),
        pytest.param("x_task", 2, None, id="task-without-path"),
        pytest.param("x_task", 2, 7, id="path-int"),
        pytest.param("x_task", 2, ["x/x.yaml"], id="path-list"),
        pytest.param("x_tag", 2, "x/x.yaml", id="tag-with-path"),
        pytest.param("x_tag", 3, {"task": "x"}, id="tag-with-cfg"),
        pytest.param("x_task", 3, None, id="task-without-cfg"),
        pytest.param("x_task", 3, ["task", "x"], id="cfg-list"),
        pytest.param("x_task", 3, "task: x", id="cfg-str"),
        pytest.param("x_task", 1, "UNKNOWN", id="kind-unknown"),
        pytest.param("x_task", 1, "__reduce__", id="kind-other"),
        pytest.param("x_task", 1, 1, id="kind-int"),
        pytest.param("x_task", 1, ["TASK"], id="kind-list"),
        pytest.param("x_task", 0, 5, id="name-int"),
        pytest.param("x_task", 0, None, id="name-null"),
        pytest.param("x_task", 0, "y_group", id="name-duplicate"),
        pytest.param("x_task", 4, "x_tag", id="tags-str"),
        pytest.param("x_task", 4, [1], id="tags-int"),
        pytest.param("x_task", 4, [["x"]], id="tags-nested"),
        pytest.param("x_task", 4, None, id="tags-null"),
    ],
)
def test_every_field_is_type_checked(builtin: Path, name: str, field: int, value: Any) -> None:
    payload = with_row(good_rows(builtin), name, field, value)
    with pytest.raises(task_index.CacheUnavailable):
        task_index.decode_index(payload, builtin)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{}", id="object"),
        pytest.param(b'"rows"', id="string"),
        pytest.param(b"[1]", id="row-int"),
        pytest.param(b'[["a", "TASK", "a.yaml", {}]]', id="row-short"),
        pytest.param(b'[["a", "TASK", "a.yaml", {}, [], 1]]', id="row-long"),
        pytest.param(b'[{"name": "a"}]', id="row-object"),
        pytest.param(b'[["a", "TASK", "a.yaml", {"n": NaN}, []]]', id="nan"),
        pytest.param(b'[["a", "TASK", "a.yaml", {"n": Infinity}, []]]', id="infinity"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep"),
    ],
)
def test_malformed_bodies_are_a_corrupt_cache(builtin: Path, payload: bytes) -> None:
    with pytest.raises(task_index.CacheUnavailable):
        task_index.decode_index(payload, builtin)


def test_an_index_json_cannot_hold_is_not_cached(builtin: Path, tmp_path: Path) -> None:
    index = built(builtin)
    index["x_task"].cfg["pair"] = (1, 2)  # a tuple would read back as a list
    with pytest.raises(task_index.CacheUnavailable, match="reads back different"):
        task_index.encode_index(index, builtin)
    index = built(builtin)
    index["x_task"].cfg[3] = "int key"  # an int key would read back as a string
    with pytest.raises(task_index.CacheUnavailable):
        task_index.encode_index(index, builtin)
    index = built(builtin)
    index["x_task"].yaml_path = tmp_path / "elsewhere" / "x.yaml"
    with pytest.raises(task_index.CacheUnavailable, match="not a YAML in"):
        task_index.encode_index(index, builtin)
    with pytest.raises(task_index.CacheUnavailable):
        task_index.write_cache(tmp_path / "data", "k", index, builtin_dir=builtin)
    assert not task_index.cache_paths(tmp_path / "data").index.exists()


def test_an_uncacheable_index_is_built_each_time_and_not_saved(
    builtin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lm_eval.tasks._index import log

    real = launcher_original()
    calls: list[int] = []
    saved: list[Any] = []

    def odd(paths, *, resolve_includes=True):  # type: ignore[no-untyped-def]
        calls.append(1)
        index = real(paths, resolve_includes=resolve_includes)
        index["x_task"].cfg["pair"] = (1, 2)
        return index

    source = launcher.BuiltinIndexSource(builtin, odd, None, save=lambda *a: saved.append(a))
    hooked = launcher.make_build(odd, source, log)
    assert hooked([builtin])["x_task"].cfg["pair"] == (1, 2)
    assert hooked([builtin])["x_task"].cfg["pair"] == (1, 2)
    assert len(calls) == 2 and saved == []
    assert "task index not cached" in capsys.readouterr().err


# ----------------------------------------------------------------- reading the files back


def test_a_symlink_in_place_of_the_cache_is_not_followed(builtin: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = task_index.cache_key(builtin)
    task_index.build(data, builtin_dir=builtin)
    paths = task_index.cache_paths(data)
    # A valid cache elsewhere (e.g. written by a job into its own directory), linked in.
    elsewhere = tmp_path / "job" / "index.jsonl"
    elsewhere.parent.mkdir()
    os.replace(paths.index, elsewhere)
    paths.index.symlink_to(elsewhere)
    with pytest.raises(task_index.CacheUnavailable, match="unreadable"):
        task_index.read_index_payload(data, key)
    os.replace(paths.names, tmp_path / "job" / "names.json")
    paths.names.symlink_to(tmp_path / "job" / "names.json")
    assert task_index.load_names(data) is None
    assert task_index.load_info(data) is None


def test_a_fifo_in_place_of_the_cache_does_not_block(builtin: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    paths = task_index.cache_paths(data)
    paths.index.parent.mkdir(parents=True)
    os.mkfifo(paths.index)
    os.mkfifo(paths.names)
    result: list[Any] = []

    def read() -> None:
        try:
            task_index.read_index_payload(data, "k")
        except task_index.CacheUnavailable as why:
            result.append(str(why))
        result.append(task_index.load_names(data))

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # unblock the thread before failing
        for fifo in paths:
            with open(fifo, "w"):
                pass
        pytest.fail("reading the cache blocked on a FIFO")
    assert "not a regular file" in result[0] and result[1] is None


def test_reads_are_bounded(builtin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    key = task_index.cache_key(builtin)
    task_index.build(data, builtin_dir=builtin)
    size = task_index.cache_paths(data).index.stat().st_size
    monkeypatch.setattr(task_index, "MAX_INDEX_BYTES", size // 2)
    with pytest.raises(task_index.CacheUnavailable, match="larger than"):
        task_index.read_index_payload(data, key)
    # A header line without an end (a huge first line) is not parsed either.
    task_index.cache_paths(data).index.write_bytes(b"{" + b" " * (2 * 1024 * 1024))
    with pytest.raises(task_index.CacheUnavailable, match="unknown format"):
        task_index.read_index_payload(data, key)
    monkeypatch.setattr(task_index, "builtin_tasks_dir", lambda: builtin)
    names = task_index.cache_paths(data).names
    task_index.build(data, builtin_dir=builtin)
    monkeypatch.setattr(task_index, "MAX_NAMES_BYTES", names.stat().st_size - 1)
    assert task_index.load_names(data) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tasks", "x_task"),
        ("tasks", [1]),
        ("groups", None),
        ("info", []),
        ("info", {"x_task": ["task", None]}),
        ("info", {"x_task": ["evil", None, None]}),
        ("info", {"x_task": ["task", 3, None]}),
        # GET /tasks/{name} reads the YAML at info's path: a job's file, another owner's
        # upload or jobs.db must not be one.
        ("info", {"x_task": ["task", None, "/data/jobs.db"]}),
        ("info", {"x_task": ["task", None, "{builtin}/../evil.yaml"]}),
        ("info", {"x_task": ["task", None, "{builtin}/x/x.yml"]}),
    ],
)
def test_a_malformed_names_file_reads_as_missing(
    builtin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, value: Any
) -> None:
    monkeypatch.setattr(task_index, "builtin_tasks_dir", lambda: builtin)
    data = tmp_path / "data"
    task_index.build(data, builtin_dir=builtin)
    assert task_index.load_names(data) and task_index.load_info(data)
    names = task_index.cache_paths(data).names
    content = json.loads(names.read_text())
    content[field] = json.loads(json.dumps(value).replace("{builtin}", str(builtin)))
    names.write_text(json.dumps(content))
    loaded = task_index.load_names(data) if field != "info" else task_index.load_info(data)
    assert loaded is None


# ----------------------------------------------------------------- the real index, and its speed


@pytest.mark.e2e
def test_the_real_cache_decodes_to_lm_evals_index(index_dir: Path) -> None:
    """The cache the server builds for lm-eval's ~14,700 built-in tasks reads back equal to
    what lm-eval's own indexer returns, in a fresh process (as a job would)."""
    code = (
        "from pathlib import Path; import lm_eval.tasks; "
        "from lm_eval.tasks._index import TaskIndex; "
        "from lm_eval_server.runtime import task_index; "
        "b = Path(lm_eval.tasks.__file__).parent; "
        f"p = task_index.read_index_payload(Path({str(index_dir)!r}), task_index.cache_key(b)); "
        "got = task_index.decode_index(p, b); want = TaskIndex.build([b]); "
        "assert list(got.items()) == list(want.items()), 'differs'; print(len(got))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) > 10_000
