"""The benchmarks run end to end at tiny sizes and produce every figure, so they cannot rot.

No timing is asserted: `bench/run.py --quick` shares one server per setting and runs the
end-to-end jobs side by side, so its figures mean nothing; `bench/run.py` measures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pstats
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.jobs import ROOT

BENCH = ROOT / "bench" / "run.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_quick_bench_produces_every_figure(tmp_path: Path, index_dir: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out), "--index-dir", str(index_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["errors"] == []
    assert results["mode"] == "quick"
    assert list(results["figures"]) == load_bench().FIGURE_NAMES
    for name, figure in results["figures"].items():
        assert len(figure["values"]) == 1, name
        assert math.isfinite(figure["median"]) and figure["median"] >= 0, (name, figure)
        assert (figure["target"] is None) == (figure["met"] is None), name
    # The printed table names every figure too.
    for name in results["figures"]:
        assert name in proc.stdout


def test_only_and_bad_names(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "nope", "--out", str(tmp_path / "r")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown benchmark" in proc.stderr


FLOODS = ROOT / "bench" / "floods.py"


def test_quick_floods_bench_measures_every_flood(tmp_path: Path, index_dir: Path) -> None:
    out = tmp_path / "floods.json"
    proc = subprocess.run(
        [sys.executable, str(FLOODS), "--quick", "--out", str(out), "--index-dir", str(index_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    rows = {row["flood"]: row for row in results["floods"]}
    assert list(rows) == [
        "none",
        "unknown_tasks_300",
        "unknown_fields_80k",
        "include_over_cap",
        "include_under_cap",
        "task_names_1mb",
        "nested_1mb",
    ]
    for name, row in rows.items():
        assert row["health_samples"] >= 1, name
        assert math.isfinite(row["health_p99_ms"]) and row["health_p99_ms"] >= 0, name
        if name != "none":
            # Every flood request was answered, and refused (nothing queued: floods.py checks).
            assert row["requests"] >= 1 and row["status"] == [422], (name, row)
        assert name in proc.stdout


SANDBOX_BENCH = ROOT / "bench" / "sandbox.py"


def test_quick_sandbox_bench_measures_both_modes(tmp_path: Path, index_dir: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (.ci/run installs it)")
    out = tmp_path / "sandbox.json"
    argv = [sys.executable, str(SANDBOX_BENCH), "--quick", "--out", str(out)]
    proc = subprocess.run(
        [*argv, "--index-dir", str(index_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert list(results["figures"]) == ["dispatch_p50", "dispatch_p99", "lm_eval_p50"]
    for name, row in results["figures"].items():
        for side in ("bwrap", "off"):
            assert math.isfinite(row[side]) and row[side] > 0, (name, row)
        assert name in proc.stdout


RESUME_BENCH = ROOT / "bench" / "resume_cache.py"


def test_quick_resume_cache_bench_measures_a_repeat_and_a_resume(
    tmp_path: Path, index_dir: Path
) -> None:
    out = tmp_path / "resume_cache.json"
    argv = [sys.executable, str(RESUME_BENCH), "--quick", "--out", str(out)]
    proc = subprocess.run(
        [*argv, "--index-dir", str(index_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert list(results["figures"]) == ["completions_repeat", "completions_resume"]
    repeat, resume = results["figures"].values()
    docs = results["docs"]
    # The counts, not the times, are what a quick run can vouch for.
    assert (repeat["hits"], repeat["misses"]) == (docs, 0)
    assert resume["hits"] + resume["misses"] == docs and resume["hits"] >= docs // 2 - 1
    assert results["runs"]["completions"]["model_requests"]["first"] == docs
    for name, row in results["figures"].items():
        assert math.isfinite(row["model_ratio"]) and row["fresh_model_s"] > 0, (name, row)
        assert name in proc.stdout


HOT_PATHS = ROOT / "bench" / "hot_paths.py"
IN_PROCESS = ROOT / "bench" / "in_process.py"


def test_quick_hot_paths_bench_prints_every_figure_beside_the_floor(
    tmp_path: Path, index_dir: Path
) -> None:
    out = tmp_path / "hot_paths.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(HOT_PATHS),
            "--quick",
            "--out",
            str(out),
            "--index-dir",
            str(index_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    figures = results["figures"]
    for name in ("post_ratio", "health_ratio", "docs_ratio"):
        assert math.isfinite(figures[name]) and figures[name] > 0, (name, figures[name])
    for name in ("list_all_p50_ms", "list_page_p50_ms", "get_job_p50_ms", "floor_bytes_p50_ms"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["drain_jobs_per_s"] > 0 and figures["drain_off_jobs_per_s"] > 0
    # The listing ran over finished and queued jobs both.
    by_status = results["raw"]["listed"]["by_status"]
    assert by_status.get("Stopped", 0) >= 1 and by_status.get("Queued", 0) >= 1, by_status
    assert isinstance(results["loadavg_before"], list) and len(results["loadavg_before"]) == 3
    for label in ("POST /job", "GET /health (trivial route)", "GET /jobs, all, p50"):
        assert label in proc.stdout


def test_in_process_bench_times_both_routes_beside_the_floor(
    tmp_path: Path, index_dir: Path
) -> None:
    profile = tmp_path / "post.prof"
    argv = [sys.executable, str(IN_PROCESS), "--n", "200", "--rounds", "1"]
    proc = subprocess.run(
        [*argv, "--index-dir", str(index_dir), "--profile", str(profile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = {line.split("server")[0].strip(): line for line in proc.stdout.splitlines()}
    for label in ("POST /job", "GET /health"):
        ratio = float(lines[label].rsplit("ratio", 1)[1])
        assert math.isfinite(ratio) and ratio > 0, lines[label]
    # The profile holds the server's own submission path.
    stats = pstats.Stats(str(profile))
    assert any(name == "submit" for (_, _, name) in stats.stats)  # type: ignore[attr-defined]
