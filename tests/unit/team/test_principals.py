"""Named API keys: how API_KEYS, API_KEYS_FILE and ADMIN_KEYS entries become principals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lm_eval_server.config import Settings
from lm_eval_server.team.principals import (
    DEFAULT_PRINCIPAL,
    OPEN_SERVER,
    Principal,
    key_table,
    parse_entry,
)


def table(**env: object) -> dict[bytes, Principal]:
    return Settings(**env).key_table()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("alice:KA", ("alice", "KA")),
        ("  bob:KB  ", ("bob", "KB")),
        ("KEY-ONLY", (DEFAULT_PRINCIPAL, "KEY-ONLY")),
        # A key may hold ':'; only a valid name before the first one makes a name.
        ("alice:K:with:colons", ("alice", "K:with:colons")),
        ("ab/c:def", (DEFAULT_PRINCIPAL, "ab/c:def")),
        ("-x:def", (DEFAULT_PRINCIPAL, "-x:def")),
        ("a+b:def", (DEFAULT_PRINCIPAL, "a+b:def")),
        ("ci.bot@team-1:k", ("ci.bot@team-1", "k")),
        ("default:KD", (DEFAULT_PRINCIPAL, "KD")),
    ],
)
def test_entries(entry: str, expected: tuple[str, str]) -> None:
    assert parse_entry(entry, "API_KEYS") == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("alice:", "API_KEYS: the entry for 'alice' has no key after ':'"),
        (":KA", "API_KEYS: an entry starts with ':'"),
        ("   ", "API_KEYS: an empty entry"),
        # The usual typos of `name:key`: a space around the ':' leaves a key nobody can send.
        ("alice: KA", "the key of 'alice' holds a space"),
        ("alice :KA", "the key of 'default' holds a space"),
        ("alice:Kä", "outside visible ASCII"),
    ],
)
def test_bad_entries_name_the_setting_not_the_key(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_entry(entry, "API_KEYS")
    assert "KA" not in str(info.value)


def test_settings_split_entries_and_mark_admins() -> None:
    keys = table(api_keys="alice:KA,bob:KB,BARE", admin_keys="root:KR")
    assert keys == {
        b"KA": Principal("alice"),
        b"KB": Principal("bob"),
        b"BARE": Principal(DEFAULT_PRINCIPAL),
        b"KR": Principal("root", admin=True),
    }


def test_one_key_for_two_principals_is_a_startup_error_that_hides_the_key() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_keys="alice:SHARED-SECRET,bob:SHARED-SECRET")  # type: ignore[arg-type]
    text = str(info.value)
    assert "one key is given to both 'alice' and 'bob'" in text
    assert "SHARED-SECRET" not in text  # settings errors never echo values
    with pytest.raises(ValidationError, match=r"'alice' and 'alice' \(admin\)"):
        Settings(api_keys="alice:K1", admin_keys="alice:K1")  # type: ignore[arg-type]
    # The same entry twice is one principal, not a conflict; one name may hold several keys.
    assert table(api_keys="alice:K1,alice:K1,alice:K2") == {
        b"K1": Principal("alice"),
        b"K2": Principal("alice"),
    }


def test_a_bad_entry_stops_startup_without_echoing_any_key() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_keys="alice:GOOD-KEY", admin_keys="root:")  # type: ignore[arg-type]
    assert "ADMIN_KEYS: the entry for 'root' has no key after ':'" in str(info.value)
    assert "GOOD-KEY" not in str(info.value)


def test_admin_keys_alone_turn_authentication_on() -> None:
    settings = Settings(admin_keys="root:KR")  # type: ignore[arg-type]
    assert settings.auth_enabled
    assert settings.key_table() == {b"KR": Principal("root", admin=True)}
    assert not Settings().auth_enabled and Settings().key_table() == {}


def test_key_file_lines_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        "# team keys\n"
        "\n"
        "alice:KA\r\n"
        "   # an indented comment\n"
        "  carol:KC:with:colons  \n"
        "BARE-FROM-FILE\n"
        "a,b:comma-is-not-a-separator-here\n"
    )
    keys = table(api_keys="bob:KB", api_keys_file=path, admin_keys="root:KR")
    assert keys == {
        b"KB": Principal("bob"),
        b"KA": Principal("alice"),
        b"KC:with:colons": Principal("carol"),
        b"BARE-FROM-FILE": Principal(DEFAULT_PRINCIPAL),
        b"a,b:comma-is-not-a-separator-here": Principal(DEFAULT_PRINCIPAL),
        b"KR": Principal("root", admin=True),
    }


def test_key_file_conflicts_with_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("bob:KA\n")
    with pytest.raises(ValidationError, match="both 'alice' and 'bob'"):
        Settings(api_keys="alice:KA", api_keys_file=path)  # type: ignore[arg-type]
    path.write_text("carol:\n")
    with pytest.raises(ValidationError, match="the entry for 'carol' has no key"):
        Settings(api_keys_file=path)  # type: ignore[arg-type]


def test_who_sees_what() -> None:
    alice, root = Principal("alice"), Principal("root", admin=True)
    assert alice.can_see("alice") and not alice.can_see("bob")
    assert not alice.can_see(DEFAULT_PRINCIPAL)
    assert root.can_see("alice") and root.can_see("bob")
    assert OPEN_SERVER.admin and OPEN_SERVER.name == DEFAULT_PRINCIPAL
    assert key_table([], []) == {}
