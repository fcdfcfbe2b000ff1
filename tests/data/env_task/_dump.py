"""Loads demo_mc's questions, then writes what the job process sees (os.environ, tempfile's
directory, cwd) to job-environ.json in its working directory."""

import json
import os
import tempfile
from pathlib import Path

import datasets

DUMP_FILE = "job-environ.json"
DATA = Path(__file__).resolve().parents[3] / "examples" / "tasks"


def load(**kwargs) -> datasets.DatasetDict:
    path = DATA / kwargs["data_file"]
    test = datasets.load_dataset("json", data_files=str(path), split="train")
    # After the load: what the job has imported by then has had its say on os.environ.
    seen = {"environ": dict(os.environ), "tempdir": tempfile.gettempdir(), "cwd": os.getcwd()}
    Path(DUMP_FILE).write_text(json.dumps(seen))
    return datasets.DatasetDict({"test": test})
