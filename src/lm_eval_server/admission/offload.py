"""Checks that would block the event loop say so; the caller runs them again in a thread.

Validation is synchronous and usually takes a fraction of a millisecond, so the route runs it on
the event loop (a thread hop per request would cost a third of POST /job's throughput). The few
checks that can be slow (walking an include_path, matching glob patterns against the task
index) call `require_thread()`: on the loop it raises `OffloadRequired`, the route catches it
and runs the whole validation in a worker thread, where the same call returns at once.
Validation has no side effects, so running it twice is safe.
"""

from __future__ import annotations

import asyncio


class OffloadRequired(Exception):
    """The validation needs work that must not run on the event loop."""


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def require_thread(reason: str) -> None:
    """Raise OffloadRequired when called on the event loop's thread."""
    if on_event_loop():
        raise OffloadRequired(reason)
