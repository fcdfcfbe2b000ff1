"""The upload rule's template check, against issue 20's chain and its variants.

Jinja's item access falls back to attribute access: `loop[k]` with k = "__init__" from the
data is `loop.__init__`. The old rule refused a second computed key in one expression, and
`{% set %}` made each step a plain name again. Here every way of carrying such a value to the
next step is refused; ordinary templates (and lm-eval's own) still pass.
"""

from __future__ import annotations

import itertools
import time

import pytest

from lm_eval_server.runtime import task_index
from lm_eval_server.tasks.task_rules import TaskRefused, check_template
from tests.unit.runtime.test_template_sandbox import CHAIN, load_config, templates_of

# The chain, ending in what an attacker wants: an owner's secret, through a method
# call the rule allows (`get`).
CHAIN_TO_SECRET = (
    "{% for x in xs %}{% set a = loop[k1] %}{% set g = a[k2] %}{% set s = g[k3] %}"
    "{% set o = s.modules.os %}{{ o.environ.get('OPENAI_API_KEY') }}{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        pytest.param(CHAIN, None, id="issue-chain"),
        pytest.param(CHAIN_TO_SECRET, "item access on a value that is not plain data", id="secret"),
        pytest.param("{% for x in xs %}{{ loop[k] }}{% endfor %}", "not plain data", id="loop[k]"),
        pytest.param(
            "{% for x in xs %}{% set l = loop %}{% set f = l[k] %}{{ f }}{% endfor %}",
            "not plain data",
            id="set-loop",
        ),
        pytest.param("{% for x in xs %}{{ loop.cycle }}{% endfor %}", "loop.cycle", id="loop-attr"),
        pytest.param("{% set a = x[k] %}{{ a[k2] }}", "computed key on what", id="set-step"),
        pytest.param("{% set a = x[k] %}{% set b = a %}{{ b[k2] }}", "computed key", id="alias"),
        pytest.param(
            "{% set b = a %}{% set a = x[k] %}{{ b[k2] }}", "computed key", id="bound-later"
        ),
        pytest.param(
            "{% for i in [x[k]] %}{{ i[k2] }}{% endfor %}", "computed key", id="for-over-step"
        ),
        pytest.param("{% for a, b in [[x[k], 1]] %}{{ a[k2] }}{% endfor %}", None, id="unpack"),
        pytest.param("{{ (x[k] if c else y)[k2] }}", "computed key", id="condexpr"),
        pytest.param("{{ (x[k] or y)[k2] }}", "computed key", id="or"),
        pytest.param("{{ x[k]|default(y)|first|attr }}", None, id="filter-chain"),
        pytest.param("{% set g = x|batch(2) %}{{ g[k] }}", "not plain data", id="generator"),
        pytest.param("{{ (x|items)[k] }}", "not plain data", id="items-generator"),
        pytest.param("{{ (x|e)[k] }}", "not plain data", id="markup"),
        pytest.param("{{ (x|tojson).strip() }}", "not plain data", id="markup-method"),
        pytest.param("{{ self[k] }}", "not plain data", id="self"),
        pytest.param("{{ range[k] }}{{ dict[k] }}", "not plain data", id="globals"),
        pytest.param("{{ [loop][0][k] }}", "not plain data", id="loop-in-a-list"),
        pytest.param("{{ {'a': loop}.a[k] }}", "not plain data", id="loop-in-a-dict"),
    ],
)
def test_ways_to_carry_an_attribute_to_the_next_step_are_refused(
    template: str, reason: str | None
) -> None:
    with pytest.raises(TaskRefused, match=reason):
        check_template(template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ choices[label] }}",
        "{{choices.text[choices.label.index(answerKey)]}}",
        "{{ 'ABCD'[answer] }}",
        "{{ x[k]|trim }} {{ x[k].strip() }} {{ x[k].text }} {{ x[k][0] }}",
        "{% set opts = ['A', 'B'] %}{{ opts[label] }}",
        "{% for key in keys %}{{ doc[key] }}{% endfor %}",
        "{% for pair in x|batch(2) %}{{ pair[i] }}{% endfor %}",
        "{{ (x|batch(2)|list)[i] }}",
        "{% for k, v in d.items() %}{{ k }}={{ v[i] }}{% endfor %}",
        "{% for c in choices %}{{ loop.index }}. {{ c }}{% if not loop.last %}\n{% endif %}"
        "{% endfor %}",
        "{% set n = x|length %}{{ y[n] }}",
        "{% set total = 0 %}{% for v in vals %}{% set total = total + v %}{% endfor %}{{ total }}",
    ],
)
def test_ordinary_computed_keys_pass(template: str) -> None:
    check_template(template)


def test_lm_evals_own_templates_are_judged_as_before() -> None:
    """Of lm-eval 0.4.13's 13,093 task configs, 13,090 pass (the other 3 use the `attr` filter
    or `namespace`), with the old rule and this one."""
    root = task_index.builtin_tasks_dir()
    tasks = passed = 0
    for path in sorted(root.rglob("*.yaml")):
        try:
            cfg = load_config(path)
        except Exception:
            continue
        if "task" not in cfg or "group" in cfg or "class" in cfg:
            continue
        tasks += 1
        try:
            for _, source in templates_of(cfg):
                check_template(source)
        except TaskRefused:
            continue
        passed += 1
    assert tasks > 13_000
    assert tasks - passed <= 3


def test_the_check_has_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # A chain of names bound in reverse order: each binding settles once its source does.
    names = [f"v{i}" for i in range(3000)]
    chain = "".join(f"{{% set {a} = {b} %}}" for a, b in itertools.pairwise(names))
    template = chain + f"{{% set {names[-1]} = x[k] %}}{{{{ {names[0]}[k2] }}}}"
    assert len(template) < 256 * 1024
    started = time.monotonic()
    with pytest.raises(TaskRefused, match="computed key"):
        check_template(template)
    assert time.monotonic() - started < 30  # not a speed test: a guard against quadratic work
    from lm_eval_server.tasks import task_rules

    monkeypatch.setattr(task_rules, "MAX_FLOW_STEPS", 100)
    with pytest.raises(TaskRefused, match="too large to check"):
        check_template(chain + "{{ v0 }}")
