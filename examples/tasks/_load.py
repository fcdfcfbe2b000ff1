"""Loads a task's local JSONL file, so examples run offline from any working directory."""

from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    path = Path(__file__).parent / kwargs["data_file"]
    return datasets.DatasetDict(
        {"test": datasets.load_dataset("json", data_files=str(path), split="train")}
    )
