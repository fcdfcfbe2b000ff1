"""YAML a request sends or names, loaded within bounds (yaml_bounds), and its two users: the
upload rule's `parse_yaml` and the `config` file check.

Issue 20: a task YAML nested 5,000 deep answered 500 (RecursionError). Every bomb here must be
refused with a message, having cost no more than the bound: depth, values with aliases counted
where they are used (billion laughs, merge-key doubling), numbers. Within the bounds the loader
gives exactly `yaml.safe_load`'s result, checked on lm-eval's own task YAMLs.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from lm_eval_server.admission import lm_eval_checks
from lm_eval_server.runtime import task_index
from lm_eval_server.tasks import task_rules, yaml_bounds
from lm_eval_server.tasks.task_rules import TaskRefused, parse_yaml
from lm_eval_server.tasks.yaml_bounds import MAX_DEPTH, MAX_VALUES, YamlRefused, YamlTooLarge

BASE = """\
task: probe
dataset_path: json
dataset_kwargs:
  data_files:
    test: d.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{ question.strip() }}"
doc_to_target: answer
"""


def laughs(levels: int = 12) -> str:
    text = "l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        text += f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


def merge_doubling(levels: int = 40) -> str:
    # Each mapping merges the previous one twice: the constructor's copy of the merged pairs
    # doubles per line (2^40 pairs; without a bound this never finishes).
    text = "m0: &m0 {k0: 1, k1: 2}\n"
    for i in range(1, levels):
        text += f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], z{i}: 1}}\n"
    return text


def nested_flow(depth: int) -> str:
    return "x: " + "[" * depth + "]" * depth + "\n"


def nested_block(depth: int) -> str:
    lines = [" " * i + f"k{i}:" for i in range(depth)]
    return "\n".join(lines) + " 1\n"


BOMBS = {
    "flow 5,000 deep": (nested_flow(5000), "nests more than 32 levels deep"),
    "mapping 5,000 deep": ("x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "levels deep"),
    "block 600 deep": (nested_block(600), "levels deep"),
    "billion laughs": (laughs(), f"more than {MAX_VALUES} values"),
    "merge-key doubling": (merge_doubling(), f"more than {MAX_VALUES} values"),
    "many keys": ("".join(f"k{i}: 1\n" for i in range(MAX_VALUES // 2 + 1)), "values"),
    "an alias inside its own anchor": ("x: &r [1, *r]\n", "used inside its own anchor"),
    "an alias makes it deep": (
        "deep: &d " + "[" * 30 + "]" * 30 + "\nuse: [[[[*d]]]]\n",
        "levels deep",
    ),
    "5,000-digit integer": ("n: 1" + "0" * 5000 + "\n", "a number of 5001 characters"),
    "sexagesimal integer": ("n: 1" + ":1" * 60_000 + "\n", "a number of"),
    "sexagesimal float": ("n: 1" + ":1" * 60_000 + ".5\n", "a number of"),
    "a date that is not one": ("d: 2001-13-01\n", "a value cannot be read: month must be"),
    "an explicit int that is not one": ("n: !!int abc\n", "a value cannot be read"),
    "an explicit timestamp that is not one": ("t: !!timestamp x\n", "a value cannot be read"),
}


@pytest.mark.parametrize("text,needle", BOMBS.values(), ids=BOMBS.keys())
def test_bombs_are_refused_within_the_bound(text: str, needle: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(YamlRefused) as info:
            yaml_bounds.load(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert needle in str(info.value)
    # Refused at the node that crossed the bound, with where it is.
    assert "(line " in str(info.value) or "cannot be read" in str(info.value)
    # Memory stays in proportion to the bound, not to what the document expands to.
    assert peak < 64 * 1024 * 1024, peak


def test_the_bounds_are_exact() -> None:
    # Root at level 0: MAX_DEPTH levels below it load, one more does not.
    assert yaml_bounds.load(nested_flow(MAX_DEPTH)) == yaml.safe_load(nested_flow(MAX_DEPTH))
    with pytest.raises(YamlTooLarge, match="levels deep"):
        yaml_bounds.load(nested_flow(MAX_DEPTH + 1))
    # The upload rule's walk (task_rules.MAX_DEPTH) allows what the loader allows.
    config = parse_yaml((BASE + nested_flow(MAX_DEPTH).replace("x:", "metadata:")).encode(), "t")
    task_rules.check_task(config, {"d.jsonl": "data"}, False)
    # MAX_VALUES nodes load (the root mapping, its keys and values), one more does not.
    pairs = (MAX_VALUES - 1) // 2
    text = "".join(f"k{i}: {i}\n" for i in range(pairs))
    assert len(yaml_bounds.load(text)) == pairs
    with pytest.raises(YamlTooLarge, match="values"):
        yaml_bounds.load(text + "one: more\n")
    # An alias counts as what it names, each time it is used.
    ten = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"  # 10 nodes
    uses = (MAX_VALUES - 3) // 10  # the root, "a" and "b" keys... then the uses
    ok = ten + "b: [" + ", ".join(["*a"] * (uses - 1)) + "]\n"
    assert len(yaml_bounds.load(ok)["b"]) == uses - 1
    with pytest.raises(YamlTooLarge, match="an alias counts"):
        yaml_bounds.load(ten + "b: [" + ", ".join(["*a"] * (uses + 2)) + "]\n")
    assert yaml_bounds.load("n: " + "9" * 100 + "\n") == {"n": int("9" * 100)}


ORDINARY = [
    BASE,
    "a: &x {b: 1, c: [1, 2.5, true, null, '3']}\nd: *x\ne: {<<: *x, f: 2}\n",
    "t: 2001-12-14t21:59:43.10-05:00\nd: 2002-12-14\nb: !!binary aGVsbG8=\ns: !!set {a, b}\n",
    "o: !!omap [a: 1, b: 2]\np: !!pairs [a: 1, a: 2]\nn: [0x1f, 0o17, 1_000, 1:30, .inf, -.NaN]\n",
    "multi: |\n  line one\n  line two\nfolded: >\n  one\n  two\n",
    "",
    "- 1\n- [2, [3, [4]]]\n",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_within_the_bounds_the_result_is_safe_loads(text: str) -> None:
    expected = yaml.safe_load(text)
    got = yaml_bounds.load(text)
    if expected != expected:  # NaN somewhere: compare the text form
        assert repr(got) == repr(expected)
    else:
        assert repr(got) == repr(expected) or got == expected


@pytest.mark.parametrize(
    "bounded,base",
    [
        (yaml_bounds.BoundedSafeLoader, yaml.SafeLoader),  # `config` files, as lm-eval's
        # Uploads: libyaml's parser, as lm-eval's task loader (CSafeLoader when PyYAML has it).
        (yaml_bounds.BoundedCSafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)),
    ],
)
def test_lm_evals_own_task_yamls_load_as_with_the_base_loader(bounded: Any, base: Any) -> None:
    files = sorted(task_index.builtin_tasks_dir().rglob("*.yaml"))
    sample = files[:: max(1, len(files) // 400)]
    compared = 0
    for path in sample:
        text = path.read_text()
        try:
            expected = yaml.load(text, Loader=base)
        except yaml.YAMLError:
            continue  # `!function` tags: the base refuses them, so does the bounded loader
        assert yaml_bounds.load(text, bounded) == expected, path
        assert yaml_bounds.measure(text, bounded) > 0
        compared += 1
    assert compared > 200, compared


@pytest.mark.parametrize("text,needle", BOMBS.values(), ids=BOMBS.keys())
def test_the_libyaml_variant_refuses_the_same_bombs(text: str, needle: str) -> None:
    with pytest.raises(YamlRefused) as info:
        yaml_bounds.load(text, yaml_bounds.BoundedCSafeLoader)
    assert needle in str(info.value)


@pytest.mark.parametrize("loader", [yaml_bounds.BoundedSafeLoader, yaml_bounds.BoundedCSafeLoader])
def test_a_refused_bomb_keeps_nothing_alive(loader: Any) -> None:
    # Counted from the parser's events, each garbage once counted: the 20,000 nodes of the
    # document are never alive at once (composing them kept ~100,000 objects alive, enough to
    # set off a full collection, which stops every thread, every few requests of a flood).
    text = BOMBS["many keys"][0]
    tracemalloc.start()
    try:
        with pytest.raises(YamlTooLarge):
            yaml_bounds.load(text, loader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    tracemalloc.start()
    try:
        yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        _, unbounded = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert unbounded > 4 * peak, (unbounded, peak)  # what composing it costs


# ------------------------------------------------------------------ uploads: parse_yaml


@pytest.mark.parametrize("text,needle", BOMBS.values(), ids=BOMBS.keys())
def test_upload_bombs_are_a_task_refusal_naming_the_file(text: str, needle: str) -> None:
    body = BASE + "metadata:\n  " + text.replace("\n", "\n  ") + "\n"
    with pytest.raises(TaskRefused) as info:
        task_rules.check_task(parse_yaml(body.encode(), "t.yaml"), {"d.jsonl": "data"}, False)
    assert str(info.value).startswith("t.yaml: "), info.value
    assert needle in str(info.value)


def test_the_upload_rule_is_unchanged_within_the_bounds() -> None:
    # A !function tag is still the rule's refusal (not a bound's), and plain YAML still loads.
    with pytest.raises(TaskRefused, match="doc_to_text: !function runs Python"):
        task_rules.check_task(
            parse_yaml(BASE.replace('"{{ question.strip() }}"', "!function u.f").encode(), "t"),
            {"d.jsonl": "data"},
            False,
        )
    config = parse_yaml(BASE.encode(), "t.yaml")
    assert config == yaml.safe_load(BASE)
    with pytest.raises(TaskRefused, match="YAML tag"):
        parse_yaml((BASE + "x: !!python/object:os.system {}\n").encode(), "t.yaml")


def test_template_nesting_is_counted_before_jinja_parses() -> None:
    limit = task_rules.MAX_TEMPLATE_DEPTH
    task_rules.check_template("{{ " + "(" * limit + "q" + ")" * limit + " }}")
    task_rules.check_template("{% if a %}" * limit + "x" + "{% endif %}" * limit)
    with pytest.raises(TaskRefused, match="more than 64 levels"):
        task_rules.check_template("{{ " + "[" * (limit + 1) + "]" * (limit + 1) + " }}")
    with pytest.raises(TaskRefused, match="more than 64 levels"):
        task_rules.check_template("{% for x in y %}" * (limit + 1) + "{% endfor %}" * (limit + 1))
    # Brackets in plain text or a raw block are not Jinja's.
    task_rules.check_template("((((" * 100 + "{{ q }}" + "{% raw %}" + "{{{" * 100 + "{% endraw %}")


@pytest.mark.parametrize(
    "template",
    [
        "{{ " + "(" * 3000 + "q" + ")" * 3000 + " }}",
        "{% if a %}" * 2000 + "x" + "{% endif %}" * 2000,
        "{{ " + "[" * 3000 + "]" * 3000 + " }}",
    ],
)
def test_a_template_nested_past_jinjas_recursion_is_refused(template: str) -> None:
    with pytest.raises(TaskRefused, match="nests brackets or blocks more than 64 levels"):
        task_rules.check_template(template)


# ------------------------------------------------------------------ `config` files


def test_config_files_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    for text, needle in BOMBS.values():
        path.write_text("model: dummy\nmetadata:\n  " + text.replace("\n", "\n  ") + "\n")
        with pytest.raises(lm_eval_checks.LmEvalCheckError) as info:
            lm_eval_checks.load_yaml_config(path)
        assert str(info.value).startswith(f"config file {path}: "), info.value
        assert needle in str(info.value)
    path.write_text("# padding\n" * (lm_eval_checks.MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(lm_eval_checks.LmEvalCheckError, match="reads at most 262144"):
        lm_eval_checks.load_yaml_config(path)
    ordinary = "model: hf\nmodel_args:\n  pretrained: x\n  dtype: &t float32\ngen_kwargs: {a: *t}\n"
    path.write_text(ordinary)
    assert lm_eval_checks.load_yaml_config(path) == yaml.safe_load(ordinary)


def test_samples_files_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "samples.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(lm_eval_checks.LmEvalCheckError, match="nests too deeply"):
        lm_eval_checks.check({"samples": str(path), "batch_size": 1}, tmp_path)
    path.write_text(" " * (lm_eval_checks.MAX_SAMPLES_BYTES + 1))
    with pytest.raises(lm_eval_checks.LmEvalCheckError, match="reads at most"):
        lm_eval_checks.check({"samples": str(path), "batch_size": 1}, tmp_path)
    with pytest.raises(lm_eval_checks.LmEvalCheckError, match="nests too deeply"):
        lm_eval_checks.check({"samples": "[" * 100_000, "batch_size": 1}, tmp_path)
