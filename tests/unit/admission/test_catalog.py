"""Catalog: a failed task-index build is reported, refuses submissions, and is retried."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.admission.catalog import (
    Catalog,
    IndexState,
    NameSuggester,
    TaskIndexUnavailable,
)


async def wait_state(catalog: Catalog, state: IndexState, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while catalog.state is not state:
        assert time.monotonic() < deadline, catalog.status()
        await asyncio.sleep(0.05)


def test_a_failed_build_is_retried_and_recovers(tmp_path: Path, index_dir: Path) -> None:
    target = tmp_path / "index"
    target.mkdir()
    blocker = target / "task_index"
    blocker.write_text("a file where the cache directory goes\n")

    async def scenario() -> None:
        catalog = Catalog(target, build_index=True, retry_first_s=1.0)
        catalog.start()
        try:
            await wait_state(catalog, IndexState.failed)
            status = catalog.status()
            assert "FileExistsError" in str(status["error"]) and status["attempts"] == 1
            with pytest.raises(TaskIndexUnavailable) as refused:
                catalog.unknown_tasks(["demo_mc"], [])
            assert "could not be built" in str(refused.value)
            assert refused.value.retry_after_s >= 1
            # The operator clears the way with an index built by hand; the next attempt
            # takes it, and names are checked again.
            blocker.unlink()
            shutil.copytree(index_dir / "task_index", blocker)
            await wait_state(catalog, IndexState.ready)
            assert catalog.build_attempts == 2 and catalog.index_error is None
            unknown = catalog.unknown_tasks(["arc_easy", "arc_esay"], [])
            assert unknown is not None and unknown.names == ["arc_esay"]
            suggestions = await asyncio.to_thread(unknown.suggestions)
            assert "arc_easy" in suggestions["arc_esay"]
        finally:
            await catalog.close()

    asyncio.run(scenario())


def test_suggestions_come_from_a_bounded_candidate_set() -> None:
    names = {f"mmlu_subject_{i}" for i in range(5000)} | {"hellaswag", "arc_easy", "arc_easy_cot"}
    suggester = NameSuggester(names)
    assert suggester.suggest("helaswag")[0] == "hellaswag"
    assert suggester.suggest("arc_esay")[:2] == ["arc_easy", "arc_easy_cot"]
    assert suggester.suggest("x" * 10_000) == []
    # Names from the request's include_path are candidates too.
    assert suggester.suggest("my_tsk", extra={"my_task"}) == ["my_task"]


def test_an_unknown_task_message_lists_a_bounded_number_of_names() -> None:
    from lm_eval_server.admission.catalog import UnknownTasks
    from lm_eval_server.admission.validation import MAX_NAMES_LISTED, UnknownTaskNames

    names = [f"zz_unknown_{i}" for i in range(1000)]

    def no_suggester() -> Any:
        raise AssertionError("the short message needs no suggestions")

    message = str(UnknownTaskNames(UnknownTasks(names, frozenset(), no_suggester)))
    assert "'zz_unknown_0'" in message and f"'zz_unknown_{MAX_NAMES_LISTED - 1}'" in message
    assert f"'zz_unknown_{MAX_NAMES_LISTED}'" not in message
    assert f"and {1000 - MAX_NAMES_LISTED} more" in message
    assert len(message) < 3000
