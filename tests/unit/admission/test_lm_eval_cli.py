"""Schema derivation from lm-eval's parser, argv building, and lm-eval's own parsing of it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from lm_eval_server.admission import lm_eval_cli
from lm_eval_server.admission.lm_eval_cli import OptionKind

ROOT = Path(__file__).resolve().parents[3]

# The original README's long field list, with its trailing comma removed.
README_FIELDS = {
    "model": "hf",
    "tasks": "string",
    "model_args": "",
    "num_fewshot": 0,
    "batch_size": "1",
    "max_batch_size": 0,
    "device": "string",
    "output_path": "string",
    "limit": 0,
    "use_cache": "string",
    "cache_requests": "string",
    "check_integrity": False,
    "write_out": False,
    "log_samples": False,
    "system_instruction": "string",
    "apply_chat_template": False,
    "fewshot_as_multiturn": False,
    "show_config": False,
    "include_path": "string",
    "gen_kwargs": "string",
    "verbosity": "INFO",
    "wandb_args": "",
    "hf_hub_log_args": "",
    "predict_only": False,
    "seed": "0,1234,1234,1234",
    "trust_remote_code": False,
}


class _MergeDictAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        setattr(namespace, self.dest, values)


# Named like lm-eval's own action, which is how the schema recognises key=value options.
_MergeDictAction.__name__ = "MergeDictAction"


def fixture_parser(extra_option: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=str, help="Model name")
    parser.add_argument("--tasks", nargs="+", help="Task names")
    parser.add_argument("--model_args", nargs="+", action=_MergeDictAction, help="k=v pairs")
    parser.add_argument("--limit", type=float, help="Limit")
    parser.add_argument("--num_fewshot", type=int, help="Shots")
    parser.add_argument("--log_samples", action="store_true", help="Log samples")
    parser.add_argument("--apply_chat_template", nargs="?", const=True, type=str, help="Tmpl")
    if extra_option:
        parser.add_argument("--brand_new_knob", type=int, help="Added in a future lm-eval")
    return parser


@pytest.fixture(scope="module")
def real() -> tuple[argparse.ArgumentParser, list[lm_eval_cli.OptionSpec], type]:
    parser = lm_eval_cli.make_raising(lm_eval_cli.load_parser())
    specs = lm_eval_cli.describe_options(parser)
    return parser, specs, lm_eval_cli.build_request_model(specs)


def test_new_parser_option_appears_in_schema_without_code_change() -> None:
    before = lm_eval_cli.build_request_model(lm_eval_cli.describe_options(fixture_parser(False)))
    after = lm_eval_cli.build_request_model(lm_eval_cli.describe_options(fixture_parser(True)))
    assert "brand_new_knob" not in before.model_json_schema()["properties"]
    prop = after.model_json_schema()["properties"]["brand_new_knob"]
    assert "Added in a future lm-eval" in prop["description"]
    assert {"type": "integer"} in prop["anyOf"]
    body = after(brand_new_knob=3)
    specs = lm_eval_cli.describe_options(fixture_parser(True))
    assert lm_eval_cli.request_to_argv(body.model_dump(exclude_none=True), specs) == [
        "--brand_new_knob",
        "3",
    ]


def test_option_kinds_from_fixture_parser() -> None:
    kinds = {s.dest: s.kind for s in lm_eval_cli.describe_options(fixture_parser(False))}
    assert kinds == {
        "model": OptionKind.value,
        "tasks": OptionKind.list,
        "model_args": OptionKind.key_value,
        "limit": OptionKind.value,
        "num_fewshot": OptionKind.value,
        "log_samples": OptionKind.flag,
        "apply_chat_template": OptionKind.optional_value,
    }


def test_real_parser_types_and_descriptions(real) -> None:  # type: ignore[no-untyped-def]
    _, specs, model = real
    kinds = {s.dest: s.kind for s in specs}
    for flag in ("log_samples", "write_out", "predict_only", "trust_remote_code"):
        assert kinds[flag] is OptionKind.flag
    for dest in ("model_args", "gen_kwargs", "metadata", "wandb_args", "hf_hub_log_args"):
        assert kinds[dest] is OptionKind.key_value
    assert kinds["tasks"] is OptionKind.list
    for dest in ("apply_chat_template", "fewshot_as_multiturn", "cache_requests"):
        assert kinds[dest] is OptionKind.optional_value
    props = model.model_json_schema()["properties"]
    assert {"type": "boolean"} in props["log_samples"]["anyOf"]
    assert {"type": "object", "additionalProperties": True} in props["model_args"]["anyOf"] or any(
        p.get("type") == "object" for p in props["model_args"]["anyOf"]
    )
    assert any(p.get("type") == "array" for p in props["tasks"]["anyOf"])
    assert "Model arguments" in props["model_args"]["description"]
    assert "env_vars" in props and "lm_eval_path" in props


def test_unknown_field_is_rejected(real) -> None:  # type: ignore[no-untyped-def]
    _, _, model = real
    with pytest.raises(ValidationError, match="no_such_option"):
        model(model="dummy", tasks="x", no_such_option=1)


def test_readme_field_list_and_example_json_are_accepted(real) -> None:  # type: ignore[no-untyped-def]
    parser, specs, model = real
    # The README's list shows each field's type with a placeholder ("string"); the schema takes
    # it as is, and lm-eval's parser takes it once placeholders hold real values of that type
    # (lm-eval 0.4.13 checks gen_kwargs is key=value and cache_requests one of true|refresh|delete).
    model(**README_FIELDS)
    realistic = {
        **README_FIELDS,
        "gen_kwargs": "temperature=0",
        "tasks": "mmlu",
        "cache_requests": "true",
    }
    for body in (realistic, json.loads((ROOT / "example.json").read_text())):
        request = model(**body)
        values = request.model_dump(exclude_none=True)
        for server_field in lm_eval_cli.SERVER_FIELDS:
            values.pop(server_field, None)
        argv = lm_eval_cli.request_to_argv(values, specs)
        namespace = lm_eval_cli.parse_argv(parser, argv)
        assert namespace.model == body["model"]
        assert namespace.tasks == [body["tasks"]]


def test_argv_forms(real) -> None:  # type: ignore[no-untyped-def]
    parser, specs, _ = real
    values = {
        "model": "dummy",
        "tasks": ["a", "b"],
        "model_args": {"pretrained": "gpt2", "dtype": "float32"},
        "gen_kwargs": "temperature=0,top_p=0.9",
        "log_samples": True,
        "write_out": False,
        "apply_chat_template": True,
        "fewshot_as_multiturn": "false",
        "limit": 10.0,
        "system_instruction": "-starts with a dash",
    }
    argv = lm_eval_cli.request_to_argv(values, specs)
    assert argv[argv.index("--tasks") + 1] == "a,b"
    assert json.loads(argv[argv.index("--model_args") + 1]) == values["model_args"]
    assert "--log_samples" in argv and "--write_out" not in argv
    assert argv[argv.index("--limit") + 1] == "10"
    assert "--system_instruction=-starts with a dash" in argv
    ns = lm_eval_cli.parse_argv(parser, argv)
    assert ns.tasks == ["a", "b"]
    assert ns.model_args == {"pretrained": "gpt2", "dtype": "float32"}
    assert ns.gen_kwargs == {"temperature": 0, "top_p": 0.9}
    assert ns.apply_chat_template is True
    assert ns.fewshot_as_multiturn is False
    assert ns.system_instruction == "-starts with a dash"


def test_string_forms_match_the_readme(real) -> None:  # type: ignore[no-untyped-def]
    parser, specs, _ = real
    argv = lm_eval_cli.request_to_argv(
        {"tasks": "mmlu,arc_easy", "model_args": "k=v,k2=v2", "model": "hf"}, specs
    )
    ns = lm_eval_cli.parse_argv(parser, argv)
    assert ns.tasks == ["mmlu", "arc_easy"]
    assert ns.model_args == {"k": "v", "k2": "v2"}


def test_parser_errors_become_argv_errors(real) -> None:  # type: ignore[no-untyped-def]
    parser, _, _ = real
    with pytest.raises(lm_eval_cli.ArgvError, match=r"cache_requests|invalid"):
        lm_eval_cli.parse_argv(parser, ["--tasks", "x", "--cache_requests", "sometimes"])
    with pytest.raises(lm_eval_cli.ArgvError, match=r"seed|integer"):
        lm_eval_cli.parse_argv(parser, ["--tasks", "x", "--seed", "a,b"])


def test_releases_up_to_0_4_9_use_setup_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    legacy = types.ModuleType("lm_eval.__main__")
    legacy.setup_parser = lambda: fixture_parser(True)  # type: ignore[attr-defined]
    # No HarnessCLI (as before 0.4.10): importing it fails, and __main__ has setup_parser.
    monkeypatch.setitem(sys.modules, "lm_eval._cli.harness", None)
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", legacy)
    parser = lm_eval_cli.load_parser()
    dests = {s.dest for s in lm_eval_cli.describe_options(parser)}
    assert "brand_new_knob" in dests and "tasks" in dests


def test_false_tokens_follow_each_actions_type(real) -> None:  # type: ignore[no-untyped-def]
    _, specs, _ = real
    tokens = {s.dest: s.false_token for s in specs if s.kind is OptionKind.optional_value}
    # fewshot_as_multiturn's type turns "false" into False; apply_chat_template's (str) keeps
    # a template named "false", and cache_requests' refuses it: both say false by omission.
    assert tokens == {
        "fewshot_as_multiturn": "false",
        "apply_chat_template": None,
        "cache_requests": None,
    }


def test_schema_shows_lm_eval_defaults_deprecation_and_examples(real) -> None:  # type: ignore[no-untyped-def]
    _, _, model = real
    props = model.model_json_schema()["properties"]
    assert props["batch_size"]["default"] == 1
    assert props["seed"]["default"] == [0, 1234, 1234, 1234]
    assert props["model"]["default"] == "hf"
    assert props["verbosity"]["deprecated"] is True
    assert "deprecated" not in props["limit"]
    assert props["cache_requests"]["examples"] == ["true", "refresh", "delete"]
    # Informational only: an empty request carries none of them.
    assert model(tasks="x").model_dump(exclude_none=True) == {"tasks": "x"}
    timeout = props["timeout_s"]["anyOf"][0]
    assert timeout["exclusiveMinimum"] == 0 and timeout["maximum"] == lm_eval_cli.MAX_TIMEOUT_S


def test_choices_become_enums() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fast", "slow"], help="Mode")
    model = lm_eval_cli.build_request_model(lm_eval_cli.describe_options(parser))
    assert model.model_json_schema()["properties"]["mode"]["anyOf"][0]["enum"] == ["fast", "slow"]
    with pytest.raises(ValidationError):
        model(mode="medium")


def test_evaluator_defaults_read_without_import_match_the_dataclass() -> None:
    from dataclasses import asdict

    from lm_eval.config.evaluate_config import DICT_KEYS, EvaluatorConfig

    from lm_eval_server.admission import lm_eval_checks

    fields = lm_eval_checks.evaluator_fields()
    assert fields is not None
    assert fields.defaults == asdict(EvaluatorConfig())
    assert fields.dict_keys == frozenset(DICT_KEYS)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a=1 b=2", ["a=1", "b=2"]),
        ("a=1,b=2", ["a=1,b=2"]),
        ("stop=['a b'] x=1", ["stop=['a b']", "x=1"]),
        ('until=["\\n\\n", " "]', ['until=["\\n\\n", " "]']),
        ("  a=1   ", ["a=1"]),
        ("note='a b' c=d", ["note='a b'", "c=d"]),
    ],
)
def test_split_words_keeps_quotes_and_brackets(text: str, words: list[str]) -> None:
    assert lm_eval_cli.split_words(text) == words


def test_values_become_cli_text() -> None:
    render = lm_eval_cli.render_value
    assert render(8, "batch_size") == "8"
    assert render(8.0, "batch_size") == "8"
    assert render([0, None, 8, 52], "seed") == "0,None,8,52"
    assert render({"arc_easy": [0, 1]}, "samples") == '{"arc_easy": [0, 1]}'
    # A JSON boolean is the text a person types; lm-eval's parser then judges it.
    assert render(True, "num_fewshot") == "true"
    assert render([1, False], "seed") == "1,false"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(lm_eval_cli.ArgvError):
            render(bad, "x")


def test_booleans_reach_the_parser_as_text_and_the_schema_keeps_the_kind(real) -> None:  # type: ignore[no-untyped-def]
    """Pydantic's lax mode once turned `true` into 1 for number options (a 1-shot run for
    `"num_fewshot": true`): the model keeps the boolean, bools_as_text writes it as text, the
    schema still says what the option takes."""
    parser, specs, model = real
    request = model(
        num_fewshot=True, limit=False, device=True, seed=[1, True], apply_chat_template=1
    )
    values = lm_eval_cli.bools_as_text(request.model_dump(exclude_none=True), specs)
    assert values["num_fewshot"] == "true" and values["limit"] == "false"
    assert values["device"] == "true" and values["seed"] == [1, "true"]
    assert values["apply_chat_template"] == 1  # a value's text, not a bare flag
    argv = lm_eval_cli.request_to_argv({"device": values["device"]}, specs)
    assert vars(lm_eval_cli.parse_argv(parser, argv))["device"] == "true"
    with pytest.raises(lm_eval_cli.ArgvError, match=r"invalid (int|float) value"):
        lm_eval_cli.parse_argv(parser, lm_eval_cli.request_to_argv(values, specs))
    schema = model.model_json_schema()["properties"]
    assert {s.get("type") for s in schema["num_fewshot"]["anyOf"]} == {"integer", "null"}
    assert "boolean" not in json.dumps(schema["device"])
    assert {s.get("type") for s in schema["apply_chat_template"]["anyOf"]} == {
        "boolean",
        "string",
        "null",
    }


def test_items_that_look_like_options_are_refused(real) -> None:  # type: ignore[no-untyped-def]
    _, specs, _ = real
    with pytest.raises(lm_eval_cli.ArgvError, match="starts with '-'"):
        lm_eval_cli.request_to_argv({"model_args": "a=1 -b 8"}, specs)
    # A single value starting with '-' is safe in the `--flag=value` form.
    assert lm_eval_cli.request_to_argv({"model_args": "-x=1"}, specs) == ["--model_args=-x=1"]
