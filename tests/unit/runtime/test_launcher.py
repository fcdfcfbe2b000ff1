"""Tests for lm_eval_server.runtime.launcher: the TaskIndex.build hook and end-to-end fidelity."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from lm_eval_server.runtime import launcher, task_index

REPO = Path(__file__).resolve().parents[3]
JOB_TIMEOUT = 300
# Fields of lm-eval's results JSON that differ between two identical runs.
VOLATILE_RESULT_FIELDS = {
    "date",  # wall-clock timestamp
    "total_evaluation_time_seconds",
    "start_time",  # not written by 0.4.13, ignored if a later version adds them
    "end_time",
    "model_name",  # the dummy model gets a random name per run...
    "model_name_sanitized",  # ...which also names the output subdirectory
}
DEBUG_ENV = {launcher.ENV_DEBUG: "1"}


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------- hook point shape


def test_hook_point_has_expected_shape() -> None:
    import lm_eval.tasks._index as index_mod
    import lm_eval.tasks.manager as manager_mod

    assert launcher.check_hook_point(index_mod, manager_mod) is None


def fake_modules(build: Any, log: Any = None, same_class: bool = True) -> tuple[Any, Any]:
    task_index_cls = type("TaskIndex", (), {"build": build})
    index_mod = SimpleNamespace(TaskIndex=task_index_cls, log=log or logging.getLogger("x"))
    manager_mod = SimpleNamespace(TaskIndex=task_index_cls if same_class else object)
    return index_mod, manager_mod


def _build_ok(paths, *, resolve_includes=True): ...
def _build_renamed(roots, *, resolve_includes=True): ...
def _build_positional(paths, resolve_includes=True): ...
def _build_extra(paths, *, resolve_includes=True, meta=None): ...


@pytest.mark.parametrize(
    ("modules", "reason"),
    [
        (fake_modules(staticmethod(_build_ok)), None),
        (fake_modules(_build_ok), "not a staticmethod"),
        (fake_modules(classmethod(_build_ok)), "not a staticmethod"),
        (fake_modules(staticmethod(_build_renamed)), "signature changed"),
        (fake_modules(staticmethod(_build_positional)), "signature changed"),
        (fake_modules(staticmethod(_build_extra)), "signature changed"),
        (fake_modules(staticmethod(_build_ok), log=print), "not a Logger"),
        (fake_modules(staticmethod(_build_ok), same_class=False), "no longer uses"),
        ((SimpleNamespace(), SimpleNamespace()), "not found"),
    ],
)
def test_check_hook_point_rejects_other_shapes(
    modules: tuple[ModuleType, ModuleType], reason: str | None
) -> None:
    got = launcher.check_hook_point(*modules)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


# ----------------------------------------------------------------- the wrapper, in-process


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    builtin = tmp_path / "builtin"
    write(builtin, "a/a.yaml", "task: a\ntag: shared_tag\n")
    write(builtin, "b/b.yaml", "task: b\ntag: shared_tag\n")
    write(builtin, "g/g.yaml", "group: g\ntask: [a, b]\n")
    include1 = tmp_path / "include1"
    write(include1, "b.yaml", "task: b\ndescription: overridden\n")
    write(include1, "c.yaml", "task: c\ntag: shared_tag\n")
    include2 = tmp_path / "include2"
    write(include2, "c.yaml", "task: c\ndescription: overridden again\n")
    return builtin, include1, include2


def original_build() -> Any:
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build


def cached_source(builtin: Path, **kwargs: Any) -> launcher.BuiltinIndexSource:
    payload = task_index.encode_index(original_build()([builtin]), builtin)
    return launcher.BuiltinIndexSource(builtin, original_build(), payload, **kwargs)


def run_both(
    paths: list[Path], source: launcher.BuiltinIndexSource, caplog: pytest.LogCaptureFixture
) -> tuple[Any, list[str], Any, list[str]]:
    from lm_eval.tasks._index import log

    original = original_build()
    hooked = launcher.make_build(original, source, log)
    caplog.clear()
    expected = original(paths)
    expected_log = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    caplog.clear()
    got = hooked(paths)
    got_log = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    return expected, expected_log, got, got_log


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(["builtin", "include1", "include2"], id="builtin-first"),
        pytest.param(["builtin"], id="builtin-only"),
        pytest.param(["include1", "builtin", "include2"], id="builtin-middle"),
        pytest.param(["builtin", "include1", "builtin"], id="builtin-twice"),
    ],
)
def test_hooked_build_merges_like_the_original(
    dirs: tuple[Path, Path, Path], order: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    builtin, include1, include2 = dirs
    by_name = {"builtin": builtin, "include1": include1, "include2": include2}
    paths = [by_name[n] for n in order]
    expected, expected_log, got, got_log = run_both(paths, cached_source(builtin), caplog)
    assert list(got.items()) == list(expected.items())  # same entries, same order
    assert got_log == expected_log  # same override warnings
    if "include1" in order:
        assert any("overrides existing task" in m for m in got_log)


def test_hooked_build_reads_include_paths_fresh(
    dirs: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    builtin, include1, _ = dirs
    source = cached_source(builtin)
    write(include1, "d.yaml", "task: d\n")
    _, _, got, _ = run_both([builtin, include1], source, caplog)
    assert "d" in got
    # ...while the built-in dir really comes from the cache: an edit is not seen.
    write(builtin, "e/e.yaml", "task: e\n")
    _, _, got, _ = run_both([builtin, include1], source, caplog)
    assert "e" not in got


def test_hooked_build_passes_through_other_calls(dirs: tuple[Path, Path, Path]) -> None:
    builtin, include1, _ = dirs
    calls: list[tuple[list[Path], bool]] = []

    def spy(paths, *, resolve_includes=True):
        calls.append((list(paths), resolve_includes))
        return {}

    source = launcher.BuiltinIndexSource(builtin, spy, task_index.encode_index({}, builtin))
    hooked = launcher.make_build(spy, source, logging.getLogger("x"))
    hooked([include1])
    hooked([builtin, include1], resolve_includes=False)  # the cache is resolve_includes=True
    assert calls == [([include1], True), ([builtin, include1], False)]


def test_each_call_gets_a_private_copy(dirs: tuple[Path, Path, Path]) -> None:
    from lm_eval.tasks._index import log

    builtin, _, _ = dirs
    hooked = launcher.make_build(original_build(), cached_source(builtin), log)
    first = hooked([builtin])
    # TaskFactory adds names to the index dict; entries are shared objects.
    first["a"].tags.add("mutated")
    first["a"].cfg["task"] = "mutated"
    first["new_name"] = first["a"]
    second = hooked([builtin])
    assert second == original_build()([builtin])


def test_missing_cache_is_built_once_and_saved(dirs: tuple[Path, Path, Path]) -> None:
    from lm_eval.tasks._index import log

    builtin, include1, _ = dirs
    calls: list[list[Path]] = []
    saved: list[tuple[Any, bytes]] = []
    real = original_build()

    def counting(paths, *, resolve_includes=True):
        calls.append(list(paths))
        return real(paths, resolve_includes=resolve_includes)

    source = launcher.BuiltinIndexSource(
        builtin, counting, None, save=lambda idx, payload: saved.append((idx, payload))
    )
    hooked = launcher.make_build(counting, source, log)
    first = hooked([builtin, include1])
    first["a"].tags.add("mutated")  # lm-eval mutating its copy must not reach the cache
    second = hooked([builtin, include1])
    assert second == real([builtin, include1])
    assert calls.count([builtin]) == 1
    assert len(saved) == 1 and task_index.decode_index(saved[0][1], builtin) == real([builtin])


def test_unreadable_payload_falls_back_to_lm_eval(
    dirs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from lm_eval.tasks._index import log

    builtin, _, _ = dirs
    source = launcher.BuiltinIndexSource(builtin, original_build(), b"garbage")
    assert launcher.make_build(original_build(), source, log)([builtin]) == original_build()(
        [builtin]
    )
    assert "cached task index unreadable" in capsys.readouterr().err


# ----------------------------------------------------------------- why plain lm-eval runs


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "LM_EVAL_SERVER_INDEX_DIR is not set"),
        ({launcher.ENV_INDEX_DIR: ""}, "LM_EVAL_SERVER_INDEX_DIR is not set"),
        (
            {launcher.ENV_INDEX_DIR: "/nonexistent", launcher.ENV_DISABLE_HOOK: "1"},
            "LM_EVAL_SERVER_DISABLE_HOOK=1",
        ),
    ],
)
def test_prepare_reasons(env: dict[str, str], reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launcher.ENV_INDEX_DIR, raising=False)
    monkeypatch.delenv(launcher.ENV_DISABLE_HOOK, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launcher.prepare() == reason


def test_prepare_reports_setup_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launcher.ENV_INDEX_DIR, "/nonexistent")
    monkeypatch.delenv(launcher.ENV_DISABLE_HOOK, raising=False)

    def boom(_data_dir: Path, *, preload: bool = False) -> str | None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(launcher, "install_hook", boom)
    assert launcher.prepare() == "hook setup failed (RuntimeError: surprise)"


# ----------------------------------------------------------------- end to end


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LM_EVAL_SERVER_")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", **extra)
    return env


def run_concurrently(jobs: dict[str, tuple[list[str], dict[str, str]]], logs: Path) -> dict:
    """Start every job at once; return {name: (returncode, stdout, stderr)}."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, (argv, env) in jobs.items():
        with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
            procs[name] = subprocess.Popen(
                [sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=err
            )
    results = {}
    for name, proc in procs.items():
        proc.wait(timeout=JOB_TIMEOUT)
        out, err = (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text()
        results[name] = (proc.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def warm_cache(index_dir: Path) -> Path:
    """The real built-in index, built once per session by the server's command (conftest)."""
    return index_dir


@pytest.mark.e2e
def test_build_command_writes_the_cache(warm_cache: Path) -> None:
    names = task_index.load_names(warm_cache)
    assert names is not None and {"arc_easy", "mmlu", "ai2_arc"} <= names
    assert "demo_mc" not in names  # include_path tasks are not built in
    # scan_include_path agrees with lm-eval on its ~14k real task YAMLs.
    assert task_index.scan_include_path(task_index.builtin_tasks_dir()) == names


def result_files(out_dir: Path) -> tuple[dict, list[dict]]:
    (results,) = out_dir.glob("*/results_*.json")
    (samples,) = out_dir.glob("*/samples_demo_mc_*.jsonl")
    data = json.loads(results.read_text())
    for field in VOLATILE_RESULT_FIELDS:
        data.pop(field, None)
    return data, [json.loads(line) for line in samples.read_text().splitlines()]


@pytest.mark.e2e
def test_fidelity_plain_vs_cached_vs_fallback(warm_cache: Path, tmp_path: Path) -> None:
    def job(name: str) -> list[str]:
        return [
            *("--model", "dummy", "--tasks", "demo_mc", "--include_path", "examples/tasks"),
            *("--output_path", str(tmp_path / name), "--log_samples"),
        ]

    cache_env = {launcher.ENV_INDEX_DIR: str(warm_cache), **DEBUG_ENV}
    runs = run_concurrently(
        {
            "plain": (["-m", "lm_eval", *job("plain")], job_env()),
            "cached": (
                ["-m", "lm_eval_server.runtime.launcher", *job("cached")],
                job_env(**cache_env),
            ),
            "fallback": (
                ["-m", "lm_eval_server.runtime.launcher", *job("fallback")],
                job_env(**cache_env, **{launcher.ENV_DISABLE_HOOK: "1"}),
            ),
        },
        tmp_path / "logs",
    )
    for name, (code, _, err) in runs.items():
        assert code == 0, f"{name} failed:\n{err[-3000:]}"

    cached_err, fallback_err = runs["cached"][2], runs["fallback"][2]
    assert launcher.CACHE_HIT_MARKER in cached_err
    assert "running plain lm-eval" not in cached_err
    assert launcher.CACHE_HIT_MARKER not in fallback_err
    assert "running plain lm-eval: LM_EVAL_SERVER_DISABLE_HOOK=1" in fallback_err

    plain = result_files(tmp_path / "plain")
    assert plain[0]["results"]["demo_mc"]["sample_len"] == 20
    assert result_files(tmp_path / "cached") == plain
    assert result_files(tmp_path / "fallback") == plain
    # The printed results table is the same too.
    assert runs["cached"][1] == runs["plain"][1] == runs["fallback"][1]


@pytest.mark.e2e
def test_launcher_builds_and_saves_a_missing_cache(tmp_path: Path) -> None:
    # (An unreadable or stale cache takes the same path; see test_task_index for
    # how read_index_payload tells them apart.)
    data = tmp_path / "data"
    validate = [
        *("-m", "lm_eval_server.runtime.launcher", "validate"),
        *("--tasks", "demo_mc,arc_easy", "--include_path", "examples/tasks"),
    ]
    env = job_env(**{launcher.ENV_INDEX_DIR: str(data)}, **DEBUG_ENV)
    runs = run_concurrently({"missing": (validate, env)}, tmp_path / "logs")
    code, out, err = runs["missing"]
    assert code == 0, err[-3000:]
    assert "All tasks found and valid" in out
    assert "builtin_index.jsonl: missing; indexing built-in tasks with lm-eval" in err
    assert "saved task index cache" in err
    assert launcher.CACHE_HIT_MARKER not in err

    payload = task_index.read_index_payload(data, task_index.cache_key())
    index = task_index.decode_index(payload, task_index.builtin_tasks_dir())
    assert index["arc_easy"].name == "arc_easy"
    assert "arc_easy" in (task_index.load_names(data) or set())
