"""The layers of the code, as docs/development.md draws them: which package may import which.

Read from the source with `ast`, so an import inside a function or under TYPE_CHECKING counts
as much as one at the top: each is a dependency a reader has to follow. The rules are about
packages (`runtime/` imports nothing of ours outside `runtime/`), not lists of modules, so a new
module is held to its package's rule the day it is added. The map in docs/development.md is
held to the tree the same way.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import lm_eval_server

PACKAGE = "lm_eval_server"
SRC = Path(lm_eval_server.__file__).parent
DEVELOPMENT_DOC = SRC.parents[1] / "docs" / "development.md"
DOMAINS = ("api", "admission", "jobs", "runtime", "outputs", "team", "tasks", "webhooks")
# Data shipped inside the package, not code of ours: the README's demo task.
NOT_CODE = ("examples", "static")


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return name.split(".")[0] == PACKAGE and SRC.joinpath(*name.split(".")[1:]).is_dir()


def _imports(path: Path) -> set[str]:
    """What the module at `path` imports: module names, with `from PACKAGE.pkg import sub` read
    as `PACKAGE.pkg.sub`."""
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


def _code_files() -> list[Path]:
    return [
        p
        for p in sorted(SRC.rglob("*.py"))
        if p.relative_to(SRC).parts[0] not in NOT_CODE and "__pycache__" not in p.parts
    ]


MODULES: dict[str, set[str]] = {_module_name(path): _imports(path) for path in _code_files()}


def _ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _in(*packages: str) -> Callable[[str], bool]:
    prefixes = [f"{PACKAGE}.{p}" for p in packages]
    return lambda t: any(t == p or t.startswith(p + ".") for p in prefixes)


def _stdlib(target: str) -> bool:
    return target.split(".")[0] in sys.stdlib_module_names or target == "__future__"


Rule = tuple[str, Callable[[str], bool], Callable[[str], bool]]

# (why, which modules the rule holds, which imports it forbids)
RULES: list[Rule] = [
    (
        "runtime/ imports only the standard library, the programs it runs and itself",
        _in("runtime"),
        lambda t: _ours(t) and not _in("runtime")(t),
    ),
    (
        "supervise starts with `python -I -S`: built-in modules and jobdir only",
        _in("runtime.supervise"),
        # `import jobdir`: how it finds its sibling when run as a script.
        lambda t: not _stdlib(t) and t not in {f"{PACKAGE}.runtime.jobdir", "jobdir"},
    ),
    (
        "jobdir and sandbox are read by the supervisor and every executor: stdlib only",
        _in("runtime.jobdir", "runtime.sandbox"),
        lambda t: not _stdlib(t),
    ),
    (
        "job_env is imported by warm workers before any job: stdlib and jobdir only",
        _in("runtime.job_env"),
        lambda t: not _stdlib(t) and t != f"{PACKAGE}.runtime.jobdir",
    ),
    (
        "api/ never reaches the store or the runtime: it asks the manager and JobFiles",
        _in("api"),
        _in("jobs.store", "runtime"),
    ),
    (
        "outputs/ reads what a job left behind, as data: it knows no job state and no HTTP",
        _in("outputs"),
        lambda t: _in("jobs", "api", "admission", "tasks", "webhooks")(t),
    ),
    (
        "team/ is a leaf: principals, audit, secrets, redaction know nothing above them "
        "(of runtime/, only its stdlib leaves: the job environment's credential names)",
        _in("team"),
        lambda t: _ours(t) and not _in("team", "runtime.job_env", "runtime.jobdir")(t),
    ),
    (
        "admission/ is request -> ValidatedJob: no HTTP and no job state",
        _in("admission"),
        lambda t: _in("api", "jobs.manager", "jobs.store", "jobs.runner", "jobs.launch")(t),
    ),
    ("jobs/ never imports HTTP code", _in("jobs"), _in("api")),
    ("tasks/ knows neither HTTP nor the job state", _in("tasks"), _in("api", "jobs")),
    ("webhooks/ never imports HTTP code", _in("webhooks"), _in("api")),
    (
        "the domain packages never import the wiring (app) or the client (cli)",
        _in(*DOMAINS),
        lambda t: t in {f"{PACKAGE}.app", f"{PACKAGE}.cli"},
    ),
]


def violations(modules: dict[str, set[str]], rule: Rule) -> dict[str, list[str]]:
    _, subject, forbidden = rule
    bad = {m: sorted(t for t in targets if forbidden(t)) for m, targets in modules.items()}
    return {m: targets for m, targets in bad.items() if targets and subject(m)}


def test_the_import_reader_sees_both_import_forms() -> None:
    """The rules below are only as good as this reader: check it on modules we know."""
    assert f"{PACKAGE}.runtime.jobdir" in MODULES[f"{PACKAGE}.runtime.supervise"]
    assert f"{PACKAGE}.runtime.executors.base" in MODULES[f"{PACKAGE}.runtime.executors.local"]
    assert f"{PACKAGE}.jobs.manager" in MODULES[f"{PACKAGE}.app"]


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_package_rule(rule: Rule) -> None:
    why, subject, _ = rule
    assert any(subject(m) for m in MODULES), f"no module is held to: {why}"
    assert violations(MODULES, rule) == {}, why


def test_every_rule_catches_a_bad_import() -> None:
    """Each rule fails when one of its modules imports what it forbids (a planted import)."""
    planted = {
        "runtime/": (f"{PACKAGE}.runtime.launcher", f"{PACKAGE}.config"),
        "supervise": (f"{PACKAGE}.runtime.supervise", "pydantic"),
        "jobdir and sandbox": (f"{PACKAGE}.runtime.sandbox", "pydantic"),
        "job_env": (f"{PACKAGE}.runtime.job_env", f"{PACKAGE}.runtime.sandbox"),
        "api/": (f"{PACKAGE}.api.jobs", f"{PACKAGE}.jobs.store"),
        "outputs/": (f"{PACKAGE}.outputs.results", f"{PACKAGE}.jobs.models"),
        "team/": (f"{PACKAGE}.team.audit", f"{PACKAGE}.jobs.models"),
        "admission/": (f"{PACKAGE}.admission.validation", f"{PACKAGE}.jobs.manager"),
        "jobs/": (f"{PACKAGE}.jobs.manager", f"{PACKAGE}.api.deps"),
        "tasks/": (f"{PACKAGE}.tasks.uploads", f"{PACKAGE}.jobs.manager"),
        "webhooks/": (f"{PACKAGE}.webhooks.sender", f"{PACKAGE}.api.deps"),
        "the domain packages": (f"{PACKAGE}.jobs.manager", f"{PACKAGE}.app"),
    }
    assert len(planted) == len(RULES)
    for rule in RULES:
        key = next(k for k in planted if rule[0].startswith(k))
        module, target = planted[key]
        graph = {module: {target}}
        assert violations(graph, rule) == {module: [target]}, rule[0]


def test_at_most_six_top_level_modules() -> None:
    top = sorted(p.name for p in SRC.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 6, top


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for package in [SRC / d for d in DOMAINS] + [SRC / "runtime" / "executors"]:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"{package.name}/__init__.py needs its docstring"
        if package.name in DOMAINS:
            assert re.search(r"\b(May import|Imports only)\b", doc), package.name


def _module_map() -> set[str]:
    """The paths the module map of docs/development.md names, rebuilt from its indentation."""
    text = DEVELOPMENT_DOC.read_text()
    section = text.split("## Module map", 1)[1]
    block = section.split("```", 2)[1]
    found: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        entry = line.strip().split()[0]
        if not (entry.endswith(".py") or entry.endswith("/")):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + entry
        if entry.endswith("/"):
            stack.append((indent, entry))
        found.add(path)
    return found


def test_the_module_map_matches_the_tree() -> None:
    named = {p for p in _module_map() if p.endswith(".py")}
    root = SRC.parents[1]
    actual = {str(p.relative_to(root)) for p in _code_files() if p.name != "__init__.py"} | {
        "src/main.py"
    }
    assert sorted(actual - named) == [], "modules missing from docs/development.md's map"
    assert sorted(named - actual) == [], "the map names modules that do not exist"
