"""Loads a task's local JSONL file, so tests run offline from any working directory.

Copy of examples/tasks/_load.py with an optional ``limit``: lm_eval imports `!function`
modules by file path next to the YAML, so sharing one module across directories would
need sys.path tricks; a few duplicated lines are simpler.
"""

from pathlib import Path
from typing import Any

import datasets


def load(**kwargs: Any) -> datasets.DatasetDict:
    # lm_eval passes the task's `metadata` entries as kwargs too, so ignore unknown keys.
    path = Path(__file__).parent / kwargs["data_file"]
    split = datasets.load_dataset("json", data_files=str(path), split="train")
    limit = kwargs.get("limit")
    if limit is not None:
        split = split.select(range(int(limit)))
    return datasets.DatasetDict({"test": split})
