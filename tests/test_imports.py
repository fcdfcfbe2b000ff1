"""The server process stays light: no torch, no Ray (unless EXECUTOR=ray), no task machinery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from fastapi.testclient import TestClient
from lm_eval_server.app import create_app
from lm_eval_server.config import Settings
app = create_app(Settings(data_dir=sys.argv[1], task_index=False, allowed_hosts=["testserver"]))
with TestClient(app) as client:
    client.get("/jobs")
    client.get("/openapi.json")
    client.post("/job", json={"model": "dummy", "tasks": "x", "no_such_field": 1})
heavy = ["torch", "transformers", "ray", "lm_eval.tasks", "lm_eval.evaluator", "datasets"]
print(json.dumps({m: m in sys.modules for m in heavy}))
"""


def test_server_does_not_import_heavy_modules(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == dict.fromkeys(loaded, False)
