"""Who a caller is: named API keys, admins, and what each may see.

`API_KEYS`, `API_KEYS_FILE` and `ADMIN_KEYS` hold entries `name:key`; a bare `key` belongs to
the principal `default`. A server without any key is open: its one caller is `default`, with
an admin's view (there is nobody else to hide jobs from).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_PRINCIPAL = "default"
# A name is what `owner` shows and what ALLOWED_SECRETS and quotas match on: kept to characters
# that need no quoting in a URL, a CSV setting or a log line.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False

    def can_see(self, owner: str) -> bool:
        return self.admin or self.name == owner


OPEN_SERVER = Principal(DEFAULT_PRINCIPAL, admin=True)


# A key travels as `Authorization: Bearer <key>`: visible ASCII, no spaces. Anything else
# could never be sent as configured (a header is Latin-1 text, split on spaces), and a space
# next to ':' is the usual sign of a mistyped `name: key`.
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")


def parse_entry(entry: str, setting: str) -> tuple[str, str]:
    """`name:key` -> (name, key); a bare key -> ("default", key).

    A key may itself contain ':'. The text before the first ':' is a name only when it looks
    like one, so a bare key such as `abc/def:ghi` stays one key. Errors name the setting and
    the principal, never the key.
    """
    entry = entry.strip()
    if not entry:
        raise ValueError(f"{setting}: an empty entry")
    name, sep, key = entry.partition(":")
    if sep and NAME_PATTERN.fullmatch(name):
        if not key:
            raise ValueError(f"{setting}: the entry for {name!r} has no key after ':'")
    elif sep and not name:
        raise ValueError(
            f"{setting}: an entry starts with ':'; write `name:key`, or the key alone for "
            f"the principal {DEFAULT_PRINCIPAL!r}"
        )
    else:
        name, key = DEFAULT_PRINCIPAL, entry
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"{setting}: the key of {name!r} holds a space or a character outside visible "
            "ASCII; a key is sent as `Authorization: Bearer <key>` (for a name, use letters, "
            "digits and _.@- before the ':')"
        )
    return name, key


def key_table(
    users: Iterable[tuple[str, str]], admins: Iterable[tuple[str, str]]
) -> dict[bytes, Principal]:
    """Each key to its principal. One key naming two principals is a configuration error:
    the server could not say who is calling."""
    table: dict[bytes, Principal] = {}
    for entries, admin, setting in ((users, False, "API_KEYS"), (admins, True, "ADMIN_KEYS")):
        for name, key in entries:
            principal = Principal(name, admin)
            raw = key.encode()
            known = table.get(raw)
            if known is not None and known != principal:
                raise ValueError(
                    f"{setting}: one key is given to both {known.name!r}"
                    f"{' (admin)' if known.admin else ''} and {name!r}"
                    f"{' (admin)' if admin else ''}; give each principal its own key"
                )
            table[raw] = principal
    return table
