"""The layers of the code, as docs/development.md draws them: which module may import which.

Read from the source with `ast`, so an import inside a function or under TYPE_CHECKING counts
as much as one at the top: each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path

import lm_eval_server

PACKAGE = "lm_eval_server"
SRC = Path(lm_eval_server.__file__).parent


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return name.split(".")[0] == PACKAGE and SRC.joinpath(*name.split(".")[1:]).is_dir()


def _imports(path: Path) -> set[str]:
    """What the module at `path` imports: module names, with `from PACKAGE import sub` read as
    `PACKAGE.sub`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if _is_package(base):
                found.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                found.add(base)
    return found


MODULES: dict[str, set[str]] = {
    _module_name(path): _imports(path) for path in sorted(SRC.rglob("*.py"))
}


def _ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _under(prefix: str) -> Callable[[str], bool]:
    return lambda target: target == prefix or target.startswith(prefix + ".")


def _stdlib(target: str) -> bool:
    return target.split(".")[0] in sys.stdlib_module_names


def _violations(subjects: list[str], forbidden: Callable[[str], bool]) -> dict[str, list[str]]:
    assert subjects, "the rule names no module: the layout changed under it"
    bad = {m: sorted(t for t in MODULES[m] if forbidden(t)) for m in subjects}
    return {m: targets for m, targets in bad.items() if targets}


def _modules_under(prefix: str) -> list[str]:
    return [m for m in MODULES if m.startswith(prefix + ".")]


def test_the_import_reader_sees_both_import_forms() -> None:
    """The rules below are only as good as this reader: check it on modules we know."""
    assert f"{PACKAGE}.jobdir" in MODULES[f"{PACKAGE}.supervise"]
    assert f"{PACKAGE}.executors.base" in MODULES[f"{PACKAGE}.executors.local"]
    assert f"{PACKAGE}.executors.warm_protocol" in MODULES[f"{PACKAGE}.executors.warm_pool"]
    assert "asyncio" in MODULES[f"{PACKAGE}.executors.warm_pool"]


def test_routes_import_no_executor_and_no_store() -> None:
    forbidden = _under(f"{PACKAGE}.executors")
    store = _under(f"{PACKAGE}.store")
    bad = _violations(_modules_under(f"{PACKAGE}.api"), lambda t: forbidden(t) or store(t))
    assert bad == {}


def test_progress_imports_nothing_of_ours() -> None:
    assert _violations([f"{PACKAGE}.progress"], _ours) == {}


def test_executors_import_nothing_from_routes_or_the_manager() -> None:
    api, manager = _under(f"{PACKAGE}.api"), _under(f"{PACKAGE}.manager")
    bad = _violations(_modules_under(f"{PACKAGE}.executors"), lambda t: api(t) or manager(t))
    assert bad == {}


def test_jobdir_imports_only_the_standard_library() -> None:
    assert _violations([f"{PACKAGE}.jobdir"], lambda t: not _stdlib(t)) == {}


def test_supervise_imports_only_the_standard_library_and_jobdir() -> None:
    # `jobdir` bare: started as `python -I -S supervise.py`, it imports its sibling file.
    allowed = {f"{PACKAGE}.jobdir", "jobdir"}
    bad = _violations([f"{PACKAGE}.supervise"], lambda t: not _stdlib(t) and t not in allowed)
    assert bad == {}


def test_webhook_rules_are_pure_and_routes_do_not_send() -> None:
    # webhooks.py: the URL rule, payload and signature, importable by validation without the
    # HTTP client; webhook_sender.py owns the sending, and no route or the manager imports it
    # but for the types the routes' state holds.
    allowed = {f"{PACKAGE}.results", f"{PACKAGE}.urls", f"{PACKAGE}.lm_eval_cli"}
    bad = _violations([f"{PACKAGE}.webhooks"], lambda t: not _stdlib(t) and t not in allowed)
    assert bad == {}
    sender = _under(f"{PACKAGE}.webhook_sender")
    assert _violations([f"{PACKAGE}.manager", f"{PACKAGE}.runner"], sender) == {}
