"""Differential tests: lm-eval 0.4.13's own parser and EvaluatorConfig are the judges.

For every request of tests/differential_corpus.py, and for cases generated from each action of
lm-eval's parser (so an option a future lm-eval adds is covered by itself), the argv the server
builds must parse to the same namespace as the argv a person would type, and the server must
accept exactly what lm-eval accepts (or refuse it for a reason it names). lm_eval_checks, the
server's import-free replay of `EvaluatorConfig.from_cli`, must agree with the real one value
for value.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lm_eval_server.admission import lm_eval_checks, lm_eval_cli
from lm_eval_server.admission.catalog import Catalog
from lm_eval_server.admission.lm_eval_cli import OptionKind, ValueType
from lm_eval_server.admission.validation import InvalidRequest, RequestValidator, ValidatedJob
from lm_eval_server.config import Settings
from tests.differential_corpus import CORPUS
from tests.support.jobs import EXAMPLES_TASKS, ROOT, TEST_TASKS


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp / "allowed"
        self.out = tmp / "outside"
        self.data = self.tmp / "data"
        for path in (self.tmp, self.out, self.data):
            path.mkdir(parents=True, exist_ok=True)
        self.parser = lm_eval_cli.make_raising(lm_eval_cli.load_parser())
        self.specs = lm_eval_cli.describe_options(self.parser)
        self.model = lm_eval_cli.build_request_model(self.specs)
        self.settings = Settings(
            data_dir=self.data,
            task_index=False,
            allowed_paths=[str(self.tmp), str(ROOT / "examples"), str(ROOT / "tests" / "data")],
        )
        catalog = Catalog(self.settings.task_index_dir, build_index=False)
        self.validator = RequestValidator(self.settings, self.parser, self.specs, catalog)
        self.places = {
            "{EX}": str(EXAMPLES_TASKS.resolve()),
            "{TD}": str(TEST_TASKS.resolve()),
            "{TMP}": str(self.tmp.resolve()),
            "{OUT}": str(self.out.resolve()),
            "{DATA}": str(self.data.resolve()),
        }

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            for key, place in self.places.items():
                value = value.replace(key, place)
            return value
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, dict):
            return {self.fill(k): self.fill(v) for k, v in value.items()}
        return value

    def submit(self, request: dict[str, Any]) -> ValidatedJob | str:
        """The validated job, or the 422 detail the API would answer."""
        try:
            return self.validator.validate(self.model(**request))
        except ValidationError as exc:
            return str(exc)
        except InvalidRequest as exc:
            return str(exc)

    def parse(self, argv: list[str]) -> argparse.Namespace:
        return lm_eval_cli.parse_argv(self.parser, argv)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("differential"))


def from_cli(namespace: argparse.Namespace) -> Any:
    from lm_eval.config.evaluate_config import EvaluatorConfig  # heavy: tests only

    return EvaluatorConfig.from_cli(namespace)


def with_output(argv: list[str], job: ValidatedJob, env: Env) -> list[str]:
    # The manager gives a job without output_path its own results directory.
    if job.user_output_path is None:
        return [*argv, "--output_path", str(env.tmp / "job-results")]
    return argv


def comparable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


@pytest.mark.parametrize("item", CORPUS, ids=[c["name"] for c in CORPUS])
def test_corpus(env: Env, item: dict[str, Any]) -> None:
    for name, text in item["files"].items():
        path = Path(env.fill(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(env.fill(text))
    request = env.fill(item["request"])
    argv = env.fill(item["argv"])
    expect = item["expect"]
    result = env.submit(request)

    if expect == "accept":
        assert isinstance(result, ValidatedJob), result
        server_ns = env.parse(with_output(result.lm_args, result, env))
        person_ns = env.parse(with_output(argv, result, env))
        assert vars(server_ns) == vars(person_ns)
        real = from_cli(person_ns)
        yaml_config = None
        if person_ns.config:
            yaml_config = lm_eval_checks.load_yaml_config(Path(person_ns.config))
        merged = lm_eval_checks.merge(vars(person_ns), yaml_config)
        cheap = lm_eval_checks.check(merged, Path.cwd())
        assert comparable(cheap) == comparable(asdict(real))
        return

    assert isinstance(result, str), f"{item['name']}: the server accepted it: {result}"
    if item["match"]:
        assert item["match"] in result
    if expect == "parser_refuses":
        with pytest.raises(lm_eval_cli.ArgvError):
            env.parse(argv)
    elif expect == "lm_eval_refuses":
        namespace = env.parse([*argv, "--output_path", str(env.tmp / "r")])
        with pytest.raises(Exception) as refused:  # lm-eval raises several kinds
            from_cli(namespace)
        # The 422 carries lm-eval's own message (paths aside, which it prints resolved).
        assert str(refused.value).split(":")[0] in result
    elif expect in ("refused_later", "policy"):
        # lm-eval's CLI takes it: only the run (or the server's rules) refuse it.
        from_cli(env.parse([*argv, "--output_path", str(env.tmp / "r")]))
    else:
        assert expect == "unexpressible" and argv is None


def test_corpus_is_broad() -> None:
    assert len(CORPUS) >= 60
    kinds = {c["expect"] for c in CORPUS}
    assert kinds == {
        "accept",
        "lm_eval_refuses",
        "parser_refuses",
        "refused_later",
        "policy",
        "unexpressible",
    }


# --------------------------------------------------------------------------- per action
OMIT: list[str] = []  # the person leaves the option out


def _value_for(spec: lm_eval_cli.OptionSpec, env: Env) -> list[tuple[Any, list[str]]]:
    """(JSON value, what a person types after the flag) pairs for one option."""
    if spec.dest in env.validator._path_dests:
        path = str(env.tmp / f"p_{spec.dest}")
        return [(path, [path])]
    # A JSON boolean where the option takes text is the text a person types (true, false).
    as_text = [(True, ["true"]), (False, ["false"])]
    match spec.kind:
        case OptionKind.flag:
            return [(True, []), (False, OMIT)]
        case OptionKind.list:
            return [("demo_mc", ["demo_mc"]), (["demo_mc"], ["demo_mc"]), *as_text]
        case OptionKind.key_value:
            return [
                ({"k": 1, "s": "a b"}, ['{"k": 1, "s": "a b"}']),
                ("k=1 s=x", ["k=1", "s=x"]),
                ("k=1,s=x", ["k=1,s=x"]),
                *as_text,
            ]
        case OptionKind.optional_value:
            pairs: list[tuple[Any, Any]] = [(True, [])]
            # Without a false token, false is lm-eval's default: the person leaves it out.
            pairs.append((False, [spec.false_token] if spec.false_token else OMIT))
            for example in spec.examples or ():
                pairs.append((example, [example]))
            # A number is a value's text, not a boolean.
            pairs += [(1, ["1"]), (0, ["0"])]
            return pairs
    if spec.choices:
        return [(spec.choices[0], [spec.choices[0]]), *as_text]
    match spec.converter:
        case ValueType.int:
            return [(3, ["3"]), ("3", ["3"]), *as_text]
        case ValueType.float:
            return [(0.5, ["0.5"]), (2, ["2"]), *as_text]
        case ValueType.str:
            return [("x", ["x"]), (4, ["4"]), *as_text]
    if spec.has_lm_default and spec.lm_default not in (None, {}, []):
        text = lm_eval_cli.render_value(spec.lm_default, spec.dest)
        return [(spec.lm_default, [text]), (text, [text]), *as_text]
    return [("1", ["1"]), *as_text]


def _generated(env: Env) -> list[tuple[str, dict[str, Any], list[str]]]:
    cases = []
    for spec in env.specs:
        if spec.dest in ("tasks", "model", "include_path"):
            continue
        for value, typed in _value_for(spec, env):
            request = {"model": "dummy", "tasks": "demo_mc", spec.dest: value}
            argv = ["--model", "dummy", "--tasks", "demo_mc"]
            if typed is not OMIT:
                argv += [spec.flag, *typed]
            cases.append((f"{spec.dest}={value!r}", request, argv))
    return cases


def test_every_parser_action(env: Env) -> None:
    """Each option of the installed lm-eval, in each JSON form it takes: the server's argv
    means what the person's argv means, and the server accepts it unless lm-eval refuses it
    or a server rule names why."""
    cases = _generated(env)
    assert len(cases) > 40
    config_file = env.tmp / "p_config"
    config_file.write_text("model: dummy\n")
    seen: set[str] = set()
    for name, request, argv in cases:
        seen |= request.keys()
        result = env.submit(request)
        if isinstance(result, str):
            person_ok = True
            try:
                from_cli(env.parse([*argv, "--output_path", str(env.tmp / "r")]))
            except Exception:  # any refusal by lm-eval counts
                person_ok = False
            # The server refused: lm-eval refuses too, or a named server rule applies.
            assert not person_ok or any(
                word in result
                for word in (
                    "ALLOW_REMOTE_CODE",  # policy
                    "ALLOW_UNSAFE_CODE",  # policy
                    "samples: ",  # lm-eval would index a non-mapping later
                    "batch_size: ",  # no model takes it
                    "Unknown level",  # logging refuses it
                    "limit ",  # lm-eval finds no documents (limit 0)
                    "lm-eval[",  # a logger whose package is not installed (run_checks)
                    "Unable to find package root",  # check_integrity (run_checks)
                    "EvaluationTracker",  # an unknown hf_hub_log_args key (run_checks)
                )
            ), f"{name}: {result}"
            continue
        server = vars(env.parse(with_output(result.lm_args, result, env)))
        person = vars(env.parse(with_output(argv, result, env)))
        assert server == person, name
    expected = {s.dest for s in env.specs} - {"include_path"}
    assert expected <= seen
