"""Loads one uploaded task YAML with lm-eval's own task machinery, in a child process.

`python -m lm_eval_server.tasks.task_check TASK_YAML [--allow-code]` prints one JSON line:
`{"ok": true, "task": NAME, "output_type": ..., "docs": N}` when lm-eval builds the task and
reads its documents, or `{"ok": false, "error": "..."}` with lm-eval's error. The server runs
it (uploads.py) with the job environment and a timeout; it never imports this module.

Before lm-eval sees the task, metric and aggregation names must be ones lm-eval registers:
for any other name lm-eval asks HF `evaluate`, which loads a script (ALLOW_REMOTE_CODE lifts
this). Templates render in Jinja's sandbox, as in a job (`launcher.sandbox_templates`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _registered_metrics(config: dict[str, Any]) -> str | None:
    import lm_eval.api.metrics  # noqa: F401 - registers the metrics
    from lm_eval.api import registry

    for entry in config.get("metric_list") or []:
        if not isinstance(entry, dict):
            continue
        metric = entry.get("metric")
        if isinstance(metric, str) and metric not in registry.metric_registry:
            return (
                f"metric_list: {metric!r} is not a metric lm-eval registers (lm-eval would "
                "load it as an HF evaluate script); registered metrics include "
                f"{', '.join(sorted(registry.metric_registry)[:30])}"
            )
        aggregation = entry.get("aggregation")
        if isinstance(aggregation, str) and aggregation not in registry.aggregation_registry:
            return (
                f"metric_list: aggregation {aggregation!r} is not one lm-eval registers "
                f"({', '.join(sorted(registry.aggregation_registry))})"
            )
    return None


def check(yaml_path: Path, allow_code: bool) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    from lm_eval_server.runtime import launcher

    # lm-eval renders the first document's prompt fields while it builds the task: in Jinja's
    # sandbox, as in a job, or not at all.
    if (problem := launcher.sandbox_templates()) is not None:
        return {"ok": False, "error": f"task templates cannot be sandboxed here: {problem}"}

    # As lm-eval reads a task given by path in --tasks (EvaluatorConfig.process_tasks).
    config = load_yaml(str(yaml_path), resolve_func=True)
    if not allow_code and (problem := _registered_metrics(config)):
        return {"ok": False, "error": problem}
    manager = TaskManager(include_defaults=False)
    tasks = get_task_dict([config], manager)
    name = config.get("task")
    task = tasks.get(name)
    if task is None:
        return {"ok": False, "error": f"lm-eval built {sorted(map(str, tasks))}, not {name!r}"}
    docs = task.eval_docs
    count = len(docs) if hasattr(docs, "__len__") else sum(1 for _ in docs)
    if count == 0:
        return {"ok": False, "error": "the task's evaluation split holds no documents"}
    return {
        "ok": True,
        "task": name,
        "output_type": task.OUTPUT_TYPE,
        "docs": count,
    }


def limit(cpu_s: int | None, memory_mb: int | None, file_mb: int | None) -> None:
    """Caps this process before it reads the upload: a template or data that loops, allocates
    or writes without end is stopped by the kernel (SIGXCPU, MemoryError, EFBIG)."""
    import resource

    # RLIMIT_CPU's hard limit a second above the soft one: the soft limit sends SIGXCPU (which
    # the server names as TASK_CHECK_CPU_S), the hard one SIGKILL should that be ignored.
    for kind, value, slack in (
        (resource.RLIMIT_CPU, cpu_s, 1),
        (resource.RLIMIT_AS, None if memory_mb is None else memory_mb << 20, 0),
        (resource.RLIMIT_FSIZE, None if file_mb is None else file_mb << 20, 0),
    ):
        if value is not None:
            resource.setrlimit(kind, (value, value + slack))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_server.tasks.task_check")
    parser.add_argument("yaml", type=Path)
    parser.add_argument("--allow-code", action="store_true")
    parser.add_argument("--cpu-s", type=int)
    parser.add_argument("--memory-mb", type=int)
    parser.add_argument("--file-mb", type=int)
    args = parser.parse_args(argv)
    limit(args.cpu_s, args.memory_mb, args.file_mb)
    try:
        result = check(args.yaml, args.allow_code)
    except BaseException as exc:  # lm-eval's error, whatever it is, is the answer
        text = " ".join(str(exc).split()) or "(no message)"
        result = {"ok": False, "error": f"{type(exc).__name__}: {text}"[:2000]}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
