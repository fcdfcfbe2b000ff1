"""Content negotiation: which of the media types a route offers the client's Accept prefers.

Pure. Each offered type gets the q of the most specific Accept entry that matches it
(`type/sub` over `type/*` over `*/*`); the highest q wins and a tie goes to the route's
first offer, so a client that sends no Accept, or `*/*`, gets the route's default.
"""

from __future__ import annotations

import math

# An Accept header with more entries than this is read only this far.
MAX_ENTRIES = 32


def preferred(accept: str | None, offered: list[str]) -> str | None:
    """The offered type the client prefers; `offered[0]` without Accept; None if none is
    acceptable (every match has q=0)."""
    if not accept:
        return offered[0]
    entries = _parse(accept)
    best: tuple[float, int] | None = None
    chosen: str | None = None
    for position, media in enumerate(offered):
        q = _quality(entries, media)
        if q <= 0:
            continue
        rank = (q, -position)
        if best is None or rank > best:
            best, chosen = rank, media
    return chosen


def _parse(accept: str) -> list[tuple[str, str, float]]:
    entries = []
    for part in accept.split(",")[:MAX_ENTRIES]:
        media, *params = (p.strip() for p in part.split(";"))
        kind, sep, sub = media.lower().partition("/")
        if not sep or not kind or not sub:
            continue
        q = 1.0
        for param in params:
            name, eq, value = param.partition("=")
            if eq and name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0) if math.isfinite(q) else 0.0
        entries.append((kind, sub, q))
    return entries


def _quality(entries: list[tuple[str, str, float]], media: str) -> float:
    kind, _, sub = media.lower().partition("/")
    found: tuple[int, float] | None = None
    for e_kind, e_sub, q in entries:
        if e_kind == kind and e_sub == sub:
            specificity = 2
        elif e_kind == kind and e_sub == "*":
            specificity = 1
        elif e_kind == "*" and e_sub == "*":
            specificity = 0
        else:
            continue
        if found is None or specificity > found[0]:
            found = (specificity, q)
    return found[1] if found else 0.0
