"""The rule an uploaded task YAML is held to (pure: parsed YAML in, refusal or task out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm_eval_server.runtime import task_index
from lm_eval_server.tasks import task_rules
from lm_eval_server.tasks.task_rules import TaskRefused, check_task, check_template, parse_yaml
from lm_eval_server.tasks.uploads import UnsupportedUpload, UploadRefused, UploadTooLarge, prepare

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
metric_list:
  - metric: exact_match
"""
DATA = {"d.jsonl": "data"}


def checked(text: str, files: dict[str, str] | None = None, code: bool = False) -> str:
    return check_task(
        parse_yaml(text.encode(), "t.yaml"), DATA if files is None else files, code
    ).name


def refused(text: str, files: dict[str, str] | None = None, code: bool = False) -> str:
    with pytest.raises(TaskRefused) as info:
        checked(text, files, code)
    return str(info.value)


def test_a_data_only_task_passes() -> None:
    assert checked(BASE) == "probe"


@pytest.mark.parametrize(
    ("extra", "start"),
    [
        ("process_results: utils.process_results\n", "process_results: this field runs Python"),
        ("class: !function utils.MyTask\n", "class: this field runs Python"),
        ("custom_dataset: !function utils.load\n", "custom_dataset: this field runs Python"),
        ("process_docs: !function utils.docs\n", "process_docs: this field runs Python"),
        ("use_prompt: promptsource:x\n", "use_prompt: this field runs Python"),
        ("metadata:\n  deep: [1, !function utils.x]\n", "metadata.deep[1]: !function runs Python"),
        ("description: !!python/name:os.system\n", "t.yaml: YAML tag"),
        ("description: !include other.yaml\n", "t.yaml: YAML tag '!include'"),
        ("include: ../../arc.yaml\n", "include: an upload is one self-contained task YAML"),
        ("group: mine\n", "group: upload one task"),
        ("dataset_name: default\n", "dataset_name: the json and csv loaders take no"),
        ("unknown_field: 1\n", "unknown_field: not a field of an lm-eval task"),
        ("output_type: nonsense\n", "output_type: 'nonsense' is not one of"),
    ],
)
def test_python_and_unknown_fields_are_refused(extra: str, start: str) -> None:
    text = BASE.replace("output_type: generate_until\n", "") if "output_type" in extra else BASE
    assert refused(text + extra).startswith(start)


@pytest.mark.parametrize(
    "data_files",
    [
        "../d.jsonl",
        "/etc/passwd",
        "sub/d.jsonl",
        "'*.jsonl'",
        "d?.jsonl",
        "~/d.jsonl",
        ".d.jsonl",
        "https://example.com/d.jsonl",
        "[d.jsonl, ../x.jsonl]",
        "{test: {nested: d.jsonl}}",
    ],
)
def test_data_files_name_uploaded_files_only(data_files: str) -> None:
    text = BASE.replace("    test: d.jsonl", f"    test: {data_files}")
    assert refused(text).startswith("dataset_kwargs.data_files")


def test_data_files_match_the_loader_and_the_upload() -> None:
    csv = BASE.replace("dataset_path: json", "dataset_path: csv")
    assert refused(csv) == "dataset_kwargs.data_files: 'd.jsonl' is not read by dataset_path 'csv'"
    assert checked(csv.replace("d.jsonl", "d.csv"), {"d.csv": "data"}) == "probe"
    assert refused(BASE, {}).startswith("dataset_kwargs.data_files: 'd.jsonl' is not among")
    hub = BASE.replace("dataset_path: json", "dataset_path: allenai/ai2_arc")
    assert refused(hub).startswith("dataset_path: 'allenai/ai2_arc': an uploaded task reads")
    kwargs = BASE.replace("  data_files:", "  trust_remote_code: true\n  data_files:")
    assert refused(kwargs).startswith("dataset_kwargs: trust_remote_code not allowed")
    listed = BASE.replace("    test: d.jsonl", "    test: [d.jsonl, e.jsonl]")
    assert checked(listed, {"d.jsonl": "data", "e.jsonl": "data"}) == "probe"


@pytest.mark.parametrize(
    "template",
    [
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ question|attr('__class__') }}",
        "{{ question['__class__'] }}",
        "{{ lipsum.__globals__ }}",
        "{{ namespace }}",
        "{{ question.format(x) }}",
        "{{ a[b][c] }}",
        "{{ choices|map(attribute='__class__')|list }}",
        "{{ choices|join(attribute='x') }}",
        "{% import 'x' as y %}",
        "{% include 'other' %}",
        "{% macro m() %}{% endmacro %}",
        "{{ self }}{{ _x }}",
        "{{ f(*args) }}",
        "{{ question",
    ],
)
def test_templates_that_could_reach_python_are_refused(template: str) -> None:
    with pytest.raises(TaskRefused):
        check_template(template)


@pytest.mark.parametrize(
    "template",
    [
        "Question: {{question}}\nAnswer:",
        "{{choices.label.index(answerKey)}}",  # arc_easy
        "{{ answer.split('####')[-1].strip() }}",  # gsm8k
        "{{ choices[label] }}",
        "{{ choices['text'][0] }}",
        "{% for c in choices %}{{ loop.index }}. {{ c }}\n{% endfor %}",
        "{% if x is defined and x|length > 2 %}{{ x|lower|trim }}{% else %}-{% endif %}",
        "{{ [a, b]|join(', ') }} {{ range(3)|list }} {{ {'a': 1}.get('a') }}",
        "{{ text|regex_replace('[ ]+', ' ') }}",
        "plain text with { braces } and a regex (\\d{1,3})",
    ],
)
def test_ordinary_templates_pass(template: str) -> None:
    check_template(template)


def test_the_templates_of_lm_evals_own_popular_tasks_pass() -> None:
    """Built-in tasks that need no Python are accepted as uploads would be, templates and all
    (13090 of lm-eval 0.4.13's 13093 task configs pass the template rule)."""
    tasks = task_index.builtin_tasks_dir()
    checked_templates = 0
    for relative in (
        "arc/arc_easy.yaml",
        "gsm8k/gsm8k.yaml",
        "hellaswag/hellaswag.yaml",
        "lambada/lambada_openai.yaml",
        "super_glue/boolq/default.yaml",
        "winogrande/default.yaml",
        "piqa/piqa.yaml",
    ):
        path = tasks / relative
        # lm-eval 0.4.13 ships each of these: a missing one means the pin moved, not a pass.
        assert path.exists(), f"{relative} is not among lm-eval's tasks any more"
        config = task_index.load_config(path)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "description"):
            value = config.get(key)
            if isinstance(value, str):
                check_template(value)
                checked_templates += 1
    assert checked_templates >= 7


def test_remote_code_allows_functions_of_uploaded_files_only() -> None:
    text = BASE + "process_docs: !function utils.docs\n"
    files = {**DATA, "utils.py": "code"}
    assert checked(text, files, code=True) == "probe"
    assert refused(text, DATA, code=True).startswith("process_docs: !function 'utils.docs': upload")
    escape = BASE + "process_docs: !function ../../utils.docs\n"
    assert "module.function" in refused(escape, files, code=True)
    # Confinement holds whatever the operator allows.
    assert refused(BASE + "include: ../x.yaml\n", files, code=True).startswith("include:")
    outside = BASE.replace("test: d.jsonl", "test: /etc/passwd")
    assert refused(outside, files, code=True).startswith("dataset_kwargs.data_files")


def test_task_names_and_file_names() -> None:
    assert refused(BASE.replace("task: probe", "task: ../x")).startswith("task: the YAML must")
    assert refused(BASE.replace("task: probe", "task: x.yaml")).startswith("task: 'x.yaml' ends")
    assert refused(BASE.replace("task: probe", "task: [a]")).startswith("task: the YAML must")
    assert task_rules.check_file_name("d.jsonl", False) == "data"
    assert task_rules.check_file_name("t.yml", False) == "yaml"
    for bad in ("../t.yaml", "a/t.yaml", ".t.yaml", "", "t .yaml", "x" * 101):
        with pytest.raises(TaskRefused, match="use a plain file name"):
            task_rules.check_file_name(bad, False)
    with pytest.raises(task_rules.UnsupportedFile, match="unsupported file type"):
        task_rules.check_file_name("t.zip", False)
    with pytest.raises(TaskRefused, match="Python files are refused"):
        task_rules.check_file_name("t.py", False)
    assert task_rules.check_file_name("t.py", True) == "code"


def test_malformed_and_odd_yaml() -> None:
    with pytest.raises(TaskRefused, match=r"t\.yaml is not valid YAML"):
        parse_yaml(b"task: [x\n", "t.yaml")
    with pytest.raises(TaskRefused, match="a task YAML is a mapping"):
        parse_yaml(b"- a\n- b\n", "t.yaml")
    with pytest.raises(TaskRefused, match="not UTF-8"):
        parse_yaml(b"\xff\xfe", "t.yaml")
    with pytest.raises(TaskRefused, match="at most"):
        parse_yaml(b"#" * (task_rules.MAX_YAML_BYTES + 1), "t.yaml")
    # Aliases make a small file a large graph: the walk is bounded.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        prev = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    text = BASE + "metadata:\n  " + bomb.replace("\n", "\n  ")
    assert "more than" in refused(text)


def test_prepare_counts_names_and_sizes() -> None:
    yaml_file = ("t.yaml", BASE.encode())
    data = ("d.jsonl", b"{}\n")
    checked_task, stored = prepare([yaml_file, data], False, 16, 10_000)
    assert checked_task.name == "probe" and stored == {"d.jsonl": b"{}\n"}
    with pytest.raises(UploadRefused, match="exactly one task YAML"):
        prepare([data], False, 16, 10_000)
    with pytest.raises(UploadRefused, match="sent twice"):
        prepare([yaml_file, data, data], False, 16, 10_000)
    with pytest.raises(UploadRefused, match=r"at most 2 \(MAX_UPLOAD_FILES\)"):
        prepare([yaml_file, data, ("e.jsonl", b"")], False, 2, 10_000)
    with pytest.raises(UploadTooLarge, match=r"at most 100 \(MAX_UPLOAD_BYTES\)"):
        prepare([yaml_file, data], False, 16, 100)
    with pytest.raises(UnsupportedUpload):
        prepare([yaml_file, data, ("x.exe", b"")], False, 16, 10_000)
    with pytest.raises(UploadRefused, match=r"may not be named probe\.yaml or upload\.json"):
        prepare([("t.yml", BASE.encode()), data, ("upload.json", b"")], False, 16, 10_000)


def test_data_files_are_stored_as_absolute_paths_in_the_task_dir(tmp_path: Path) -> None:
    config = parse_yaml(BASE.encode(), "t.yaml")
    stored = task_rules.data_files_in(config, tmp_path)
    assert stored["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "d.jsonl")}}
    assert config["dataset_kwargs"] == {"data_files": {"test": "d.jsonl"}}  # not mutated
    dumped = task_rules.dump_yaml({**stored, "process_docs": task_rules.FunctionRef("u.f")})
    assert "process_docs: !function 'u.f'" in dumped or "process_docs: !function u.f" in dumped
