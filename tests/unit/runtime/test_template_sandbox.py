"""Task templates render in Jinja's sandbox (issue 20, item 3).

The launcher swaps `lm_eval.utils.env` for an ImmutableSandboxedEnvironment. These tests check
the hook point's shape, that the launcher fails closed when it cannot sandbox, that the issue's
template chain reaches `os` unsandboxed and not in the sandbox, and that lm-eval's own tasks
render the same in the sandbox: a sample of the built-in task YAMLs of every task family,
rendered against a synthetic document with both environments.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import jinja2.meta
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from lm_eval_server.runtime import launcher, task_index

REPO = Path(__file__).resolve().parents[3]

# The chain: item access with keys from the data falls back to attribute access
# (`loop["__init__"]`, then `["__globals__"]`), and `{% set %}` makes each step a plain name.
CHAIN = (
    "{% for x in xs %}{% set a = loop[k1] %}{% set g = a[k2] %}{% set s = g[k3] %}"
    "{% set o = s.modules.os %}{{ o.getpid() }}{% endfor %}"
)
CHAIN_DOC = {"xs": [1], "k1": "__init__", "k2": "__globals__", "k3": "sys"}


def plain_env() -> jinja2.Environment:
    """lm-eval's own environment, as lm_eval.utils builds it."""
    import lm_eval.utils

    env = lm_eval.utils.env
    if isinstance(env, ImmutableSandboxedEnvironment):  # this process ran the launcher's hook
        pytest.skip("lm_eval.utils.env is sandboxed in this process already")
    return env


# ----------------------------------------------------------------- the hook point


def test_jinja_hook_point_has_expected_shape() -> None:
    import lm_eval.utils

    assert launcher.check_jinja_hook_point(lm_eval.utils) is None


def _apply_env(template: str, doc: dict) -> str:
    return env.from_string(template).render(**doc)  # type: ignore[name-defined]  # noqa: F821


def _apply_other(template: str, doc: dict) -> str:
    return jinja2.Template(template).render(**doc)


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (SimpleNamespace(apply_template=_apply_env), "is not a jinja2.Environment"),
        (
            SimpleNamespace(env=ImmutableSandboxedEnvironment(), apply_template=_apply_env),
            "is not a jinja2.Environment",
        ),
        (SimpleNamespace(env=jinja2.Environment()), "no longer renders with"),
        (
            SimpleNamespace(env=jinja2.Environment(), apply_template=_apply_other),
            "no longer renders with",
        ),
        (
            SimpleNamespace(
                env=jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]),
                apply_template=_apply_env,
            ),
            "extensions",
        ),
    ],
)
def test_other_shapes_are_refused(module: Any, reason: str) -> None:
    # apply_template's globals must be the module's own: give each fake its own namespace.
    if hasattr(module, "apply_template"):
        fn = module.apply_template
        module.apply_template = type(fn)(fn.__code__, vars(module), fn.__name__)
    got = launcher.check_jinja_hook_point(module)  # type: ignore[arg-type]
    assert got is not None and reason in got


def test_the_sandboxed_copy_keeps_lm_evals_settings() -> None:
    env = plain_env()
    sandbox = launcher.sandboxed_copy(env)
    assert isinstance(sandbox, ImmutableSandboxedEnvironment)
    assert sandbox.keep_trailing_newline is True
    assert sandbox.undefined is jinja2.StrictUndefined
    assert sandbox.loader is env.loader
    assert sandbox.filters["regex_replace"] is env.filters["regex_replace"]
    assert sandbox.globals["range"] is not range  # the sandbox's bounded range stays
    doc = {"q": "a_b", "choices": ["x", "y"], "answer": 1}
    template = "{{ q|regex_replace('_', ' ') }}: {{ choices[answer] }}\n"
    assert sandbox.from_string(template).render(**doc) == "a b: y\n"
    with pytest.raises(jinja2.UndefinedError):
        sandbox.from_string("{{ missing }}").render()


def test_the_chain_reaches_os_unsandboxed_and_not_in_the_sandbox() -> None:
    import os

    env = plain_env()
    # Without the sandbox the template calls os.getpid(): it reached os.
    assert env.from_string(CHAIN).render(**CHAIN_DOC) == str(os.getpid())
    with pytest.raises(SecurityError, match="__init__"):
        launcher.sandboxed_copy(env).from_string(CHAIN).render(**CHAIN_DOC)


LAUNCH = """
import sys
from lm_eval_server.runtime import launcher
{setup}
try:
    launcher.run_lm_eval(["validate", "--tasks", "no_such_task_anywhere"])
except SystemExit as exc:
    import lm_eval.utils
    print("env:", type(getattr(lm_eval.utils, "env", None)).__name__)
    raise
"""


def launch(setup: str) -> subprocess.CompletedProcess[str]:
    code = LAUNCH.format(setup=setup)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_run_lm_eval_sandboxes_templates_before_lm_eval_runs() -> None:
    proc = launch("")
    assert "env: ImmutableSandboxedEnvironment" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode != launcher.EXIT_NO_TEMPLATE_SANDBOX


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("import lm_eval.utils; lm_eval.utils.env = object()", id="env-replaced"),
        pytest.param("import lm_eval.utils; del lm_eval.utils.env", id="env-gone"),
        pytest.param(
            "import lm_eval.utils; lm_eval.utils.apply_template = lambda t, d: t",
            id="apply-template-changed",
        ),
    ],
)
def test_the_launcher_fails_closed_when_the_hook_point_changed(setup: str) -> None:
    proc = launch(setup)
    assert proc.returncode == launcher.EXIT_NO_TEMPLATE_SANDBOX, proc.stderr[-2000:]
    assert "refusing to run: task templates cannot be rendered in Jinja's sandbox" in proc.stderr
    assert "env: ImmutableSandboxedEnvironment" not in proc.stdout


# ----------------------------------------------------------------- lm-eval's own tasks

# Task fields lm-eval 0.4.13 renders with apply_template (lm_eval/api/task.py), and those of
# fewshot_config it renders the same way.
TEMPLATE_FIELDS = (
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "gen_prefix",
    "doc_to_image",
    "doc_to_audio",
    "doc_to_decontamination_query",
)
FEWSHOT_TEMPLATE_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice", "gen_prefix")
# YAMLs sampled per task family (top-level directory of lm_eval/tasks), evenly over its files.
PER_FAMILY = 20


class Anything(str):
    """A document value that answers every use a template makes of one.

    It is the key's name as a string (so string methods, filters and concatenation work on
    real `str` code), and also: indexable by anything and iterable (four items, each another
    Anything), with attributes (`choices.text`), `keys/values/items/get` like a dict, and a
    number (0) for `|int`, `|float` and as a list index. Everything it returns is plain data
    or another Anything: it adds no path to Python internals that a real document would not
    have, and it is not a list or dict, so a template that changes a value in place does so on
    its own literals, as with real data.
    """

    def __getitem__(self, key: Any) -> Anything:  # type: ignore[override]
        return Anything(f"{self}[{key}]")

    def __getattr__(self, name: str) -> Anything:
        if name.startswith("_"):
            raise AttributeError(name)
        return Anything(f"{self}.{name}")

    def __iter__(self) -> Iterator[Anything]:  # type: ignore[override]
        return iter([Anything(f"{self}[{i}]") for i in range(4)])

    def __len__(self) -> int:
        return 4

    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0

    def __float__(self) -> float:
        return 0.0

    def __add__(self, other: Any) -> Any:  # type: ignore[override]
        return other if isinstance(other, int | float) else Anything(str.__add__(self, other))

    def __radd__(self, other: Any) -> Any:
        return other if isinstance(other, int | float) else Anything(other + str(self))

    def __sub__(self, other: Any) -> Any:
        return 0 - other

    def __rsub__(self, other: Any) -> Any:
        return other

    def index(self, *args: Any) -> int:  # type: ignore[override]
        return 0

    def keys(self) -> list[Anything]:
        return list(self)

    def values(self) -> list[Anything]:
        return list(self)

    def items(self) -> list[tuple[Anything, Anything]]:
        return [(k, Anything(f"{self}[{k}]")) for k in self]

    def get(self, key: Any, default: Any = None) -> Anything:
        return self[key]


def synthetic_doc(env: jinja2.Environment, source: str) -> dict[str, Any]:
    """A document holding every name the template reads (render(**doc) passes only real keys,
    so 'a dict that answers any key' means one with each of them)."""
    names = jinja2.meta.find_undeclared_variables(env.parse(source))
    return {name: Anything(name) for name in sorted(names)}


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    pass


@dataclass(frozen=True)
class _Function:
    target: str


_Loader.add_constructor("!function", lambda loader, node: _Function(node.value))
_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def load_config(path: Path, seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A YAML with its includes merged, as lm-eval's load_yaml does; `!function` kept apart."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"include cycle at {path}")
    cfg = yaml.load(path.read_bytes(), Loader=_Loader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a mapping")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_cfg = load_config(path.parent / inc, seen | {path})
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    merged.update(cfg)
    return merged


def sample_yamls(root: Path) -> dict[str, list[Path]]:
    """Family -> up to PER_FAMILY of its task YAMLs, evenly spread over the sorted list."""
    families: dict[str, list[Path]] = {}
    for family in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"):
        files = sorted(family.rglob("*.yaml"))
        if not files:
            continue
        step = max(1, len(files) / PER_FAMILY)
        families[family.name] = [files[int(i * step)] for i in range(min(PER_FAMILY, len(files)))]
    return families


def templates_of(cfg: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, template) of each templated field that holds a string (not a !function, list
    or mapping, which lm-eval does not render)."""
    for field in TEMPLATE_FIELDS:
        if isinstance(cfg.get(field), str):
            yield field, cfg[field]
    fewshot = cfg.get("fewshot_config")
    if isinstance(fewshot, dict):
        for field in FEWSHOT_TEMPLATE_FIELDS:
            if isinstance(fewshot.get(field), str):
                yield f"fewshot_config.{field}", fewshot[field]


def render(env: jinja2.Environment, source: str, doc: dict[str, Any]) -> tuple[str, str]:
    """("ok", text) or ("error", exception type) for one render."""
    try:
        return "ok", env.from_string(source).render(**doc)
    except Exception as err:
        return "error", type(err).__name__


@dataclass
class Outcome:
    where: str  # family/file.yaml:field
    plain: tuple[str, str]
    sandboxed: tuple[str, str]


def render_sample() -> tuple[dict[str, list[Path]], list[Outcome]]:
    plain = plain_env()
    sandbox = launcher.sandboxed_copy(plain)
    root = task_index.builtin_tasks_dir()
    families = sample_yamls(root)
    outcomes: list[Outcome] = []
    done: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {}
    for paths in families.values():
        for path in paths:
            try:
                cfg = load_config(path)
            except Exception:
                continue  # lm-eval skips a YAML it cannot load too
            for field, source in templates_of(cfg):
                if source not in done:
                    try:
                        doc = synthetic_doc(plain, source)
                    except jinja2.TemplateSyntaxError:
                        doc = {}
                    done[source] = (render(plain, source, doc), render(sandbox, source, doc))
                where = f"{path.relative_to(root)}:{field}"
                outcomes.append(Outcome(where, *done[source]))
    return families, outcomes


def test_lm_evals_own_templates_render_the_same_in_the_sandbox() -> None:
    families, outcomes = render_sample()
    same = [o for o in outcomes if o.plain == o.sandboxed]
    differ = [o for o in outcomes if o.plain != o.sandboxed]
    rendered = [o for o in same if o.plain[0] == "ok"]
    yamls = sum(len(p) for p in families.values())
    report = [
        f"{len(families)} task families, {yamls} YAMLs sampled, {len(outcomes)} templated "
        f"fields: {len(same)} render the same with and without the sandbox "
        f"({len(rendered)} of them render, {len(same) - len(rendered)} fail alike on the "
        f"synthetic document), {len(differ)} differ:",
        *(f"  {o.where}: plain {o.plain[0]} / sandboxed {o.sandboxed}" for o in differ),
    ]
    print("\n".join(report))
    assert len(families) >= 200, "the sample must cover every task family"
    assert len(outcomes) >= 2000
    assert len(rendered) >= 0.8 * len(outcomes), "the synthetic document must exercise them"
    assert len(same) >= 0.99 * len(outcomes), "\n".join(report)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("{% set seen = [] %}{% set _ = seen.append(a) %}{{ seen }}", id="append"),
        pytest.param("{% set d = {} %}{% set _ = d.update({'k': a}) %}{{ d }}", id="update"),
        pytest.param("{{ a.__class__ }}", id="dunder-attribute"),
        pytest.param("{{ range(200000)|length }}", id="huge-range"),
        pytest.param("{{ '{0.__class__}'.format(a) }}", id="format-attribute"),
    ],
)
def test_the_comparison_sees_what_the_sandbox_changes(source: str) -> None:
    """What a task could lose in the sandbox: changing a list or dict in place, attributes
    starting with `_`, ranges past 100,000 items. None of lm-eval's own templates does this
    (the sample above finds no difference); an uploaded one that does fails in the sandbox."""
    plain = plain_env()
    doc = synthetic_doc(plain, source)
    got_plain = render(plain, source, doc)
    got_sandboxed = render(launcher.sandboxed_copy(plain), source, doc)
    assert got_plain[0] == "ok"
    assert got_sandboxed == ("error", "SecurityError") or got_sandboxed[0] == "error"
