"""Bounds on the text of a request's lm-eval options (lm_eval_cli), with lm-eval's real parser.

Issue 20's reproduction was one `model_args` of 900 KB of `a=1,a=1,...`: lm-eval's parser logged
a warning per repeated key (225,000 writes to stderr) on the event loop. These tests hold the
caps, the splitting they count by (lm-eval's own, differentially), and the parse's failures
that used to escape as 500s. The end-to-end half is tests/e2e/test_request_text_bounds.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import pytest
from lm_eval._cli.utils import split_top_level

from lm_eval_server.admission import lm_eval_cli
from lm_eval_server.admission.lm_eval_cli import (
    MAX_KEY_CHARS,
    MAX_KEY_VALUE_ENTRIES,
    MAX_OPTION_BYTES,
    MAX_OPTIONS_BYTES,
    MAX_TEXT_VALUE_CHARS,
    MAX_VALUE_DEPTH,
    ArgvError,
    OptionSpec,
    OptionTooLarge,
)

KEY_VALUE_FIELDS = ("model_args", "gen_kwargs", "metadata", "wandb_args", "hf_hub_log_args")


@pytest.fixture(scope="module")
def real() -> tuple[argparse.ArgumentParser, list[OptionSpec]]:
    parser = lm_eval_cli.make_raising(lm_eval_cli.load_parser())
    return parser, lm_eval_cli.describe_options(parser)


def spec_of(specs: list[OptionSpec], dest: str) -> OptionSpec:
    return next(s for s in specs if s.dest == dest)


def bounds(specs: list[OptionSpec], **values: Any) -> int:
    """What validation runs before lm-eval's parser sees the request."""
    total = lm_eval_cli.check_option_sizes(values, specs)
    lm_eval_cli.check_key_value_options(values, specs)
    return total


def too_large(specs: list[OptionSpec], **values: Any) -> str:
    with pytest.raises(OptionTooLarge) as info:
        bounds(specs, **values)
    return str(info.value)


# ------------------------------------------------------------------ the reproduction


@pytest.mark.parametrize("dest", KEY_VALUE_FIELDS)
def test_the_900_kb_reproduction_is_refused_naming_the_field_and_the_limit(
    real: tuple[argparse.ArgumentParser, list[OptionSpec]], dest: str
) -> None:
    _, specs = real
    text = ",".join(["a=1"] * 225_000)  # 900 KB, under MAX_BODY_BYTES
    message = too_large(specs, **{dest: text})
    assert message.startswith(f"{dest}: {len(text)} bytes of text")
    assert f"at most {MAX_OPTION_BYTES}" in message and "config file" in message
    # The same as a list of words and as an object.
    assert dest in too_large(specs, **{dest: text.split(",")[:20_000]})
    assert dest in too_large(specs, **{dest: {f"k{i}": "v" * 40 for i in range(2000)}})


def test_lm_evals_parser_logs_nothing_per_repeated_key_in_the_server(
    real: tuple[argparse.ArgumentParser, list[OptionSpec]], caplog: pytest.LogCaptureFixture
) -> None:
    parser, specs = real
    # The cause of the 34 s: one "Overwriting key" record per entry, each written to stderr.
    assert logging.getLogger(lm_eval_cli.PARSER_LOGGER).getEffectiveLevel() == logging.ERROR
    argv = lm_eval_cli.request_to_argv(
        {"model": "dummy", "model_args": ",".join(["a=1"] * MAX_KEY_VALUE_ENTRIES)}, specs
    )
    with caplog.at_level(logging.DEBUG):
        namespace = lm_eval_cli.parse_argv(parser, argv)
    assert namespace.model_args == {"a": 1}  # lm-eval's meaning is unchanged: the last wins
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")]


# ------------------------------------------------------------------ each cap


def test_sizes_count_utf8_bytes_and_all_options_together(
    real: tuple[argparse.ArgumentParser, list[OptionSpec]],
) -> None:
    _, specs = real
    assert bounds(specs, system_instruction="x" * MAX_OPTION_BYTES) == MAX_OPTION_BYTES
    # Every option counts, not only key=value ones: a word longer than Linux's 128 KiB argv
    # limit could never reach the job (it used to be accepted, then fail with E2BIG).
    assert "system_instruction" in too_large(specs, system_instruction="x" * 900_000)
    # Three bytes each in UTF-8: the cap is in bytes, as the command line carries them.
    assert "model_args" in too_large(specs, model_args="a=" + "€" * (MAX_OPTION_BYTES // 3))
    assert bounds(specs, model_args="a='" + "€" * 300 + "'") == 2 + 2 + 900
    half = "x" * (MAX_OPTION_BYTES - 10)
    assert bounds(specs, system_instruction=half, device=half) <= MAX_OPTIONS_BYTES
    message = too_large(specs, system_instruction=half, device=half, model="y" * 100)
    assert f"a request carries at most {MAX_OPTIONS_BYTES}" in message


@pytest.mark.parametrize("dest", KEY_VALUE_FIELDS)
def test_entries_keys_values_and_depth_are_capped_in_every_form(
    real: tuple[argparse.ArgumentParser, list[OptionSpec]], dest: str
) -> None:
    _, specs = real
    entries = [f"k{i}=1" for i in range(MAX_KEY_VALUE_ENTRIES)]
    bounds(specs, **{dest: ",".join(entries)})
    bounds(specs, **{dest: entries})  # as words
    bounds(specs, **{dest: " ".join(entries)})
    bounds(specs, **{dest: {f"k{i}": 1 for i in range(MAX_KEY_VALUE_ENTRIES)}})
    more = [*entries, "one=more"]
    for form in (
        ",".join(more),
        more,
        " ".join(more),
        json.dumps(dict(e.split("=") for e in more)),
    ):
        message = too_large(specs, **{dest: form})
        assert message.startswith(f"{dest}: more than {MAX_KEY_VALUE_ENTRIES} key=value")
    # Commas inside quotes and brackets do not separate entries (lm-eval's split_top_level).
    bounds(specs, **{dest: "until=[" + ",".join(["'x'"] * 250) + "],note='" + "a," * 500 + "'"})

    key = "k" * (MAX_KEY_CHARS + 1)
    for form in (f"{key}=1", {key: 1}, json.dumps({key: 1})):
        assert f"a key has at most {MAX_KEY_CHARS}" in too_large(specs, **{dest: form})
    bounds(specs, **{dest: f"{'k' * MAX_KEY_CHARS}=1"})

    # A value in key=value text is read with ast.literal_eval; as JSON it may be longer.
    value = "x" * (MAX_TEXT_VALUE_CHARS + 1)
    message = too_large(specs, **{dest: f"a={value}"})
    assert f"at most {MAX_TEXT_VALUE_CHARS}" in message and "JSON object" in message
    bounds(specs, **{dest: f"a={value[:-1]}"})
    bounds(specs, **{dest: {"a": value}})
    bounds(specs, **{dest: json.dumps({"a": value})})

    deep, ok = "[" * (MAX_VALUE_DEPTH + 1), "[" * MAX_VALUE_DEPTH
    closing = "]" * (MAX_VALUE_DEPTH + 1)
    for form in (
        f"a={deep}1{closing}",
        json.dumps({"a": json.loads(f"{deep}1{closing}")}),
        {"a": json.loads(f"{deep}1{closing}")},
    ):
        assert f"more than {MAX_VALUE_DEPTH} levels deep" in too_large(specs, **{dest: form})
    bounds(specs, **{dest: f"a={ok}1{closing[1:]}"})
    bounds(specs, **{dest: {"a": json.loads(f"{ok}1{closing[1:]}")}})
    # JSON text nested past json.loads' own limit is refused, not a RecursionError.
    assert "levels deep" in too_large(specs, **{dest: '{"a": ' + "[" * 60_000})


# ------------------------------------------------------------------ counted as lm-eval splits

SPLIT_CORPUS = [
    "a=1,b=2",
    "a=1,,b=2,",
    ",a=1",
    "stop=['a,b', \"c,d\"],x=1",
    "chat_template_args={'a': [1, 2], 'b': (3, 4)},y=2",
    "note='it''s, odd',z=3",
    "unbalanced=[1,2,x=3",
    "closing=]],a=1,b=[(,)]",
    'quote="never closed, a=1',
    "",
    "plain",
]


@pytest.mark.parametrize("text", SPLIT_CORPUS)
def test_entries_are_counted_as_lm_evals_split_top_level_splits(text: str) -> None:
    parts = lm_eval_cli.top_level_items(text, MAX_KEY_VALUE_ENTRIES)
    assert [part for part, _ in parts] == split_top_level(text)


def test_the_count_stops_after_the_limit() -> None:
    parts = lm_eval_cli.top_level_items("a=1," * 100_000, 10)
    assert len(parts) == 11


@pytest.mark.parametrize(
    "text",
    ["a=1 b=2", "  a=1\tb=2\n", "a\u00a0b c\u2003d", "", " ", "pretrained=x,dtype=float32"],
)
def test_split_words_without_quotes_or_brackets_is_str_split(text: str) -> None:
    assert lm_eval_cli.split_words(text) == text.split()
    # The loop gives the same words: one quote far away sends the text through it.
    assert lm_eval_cli.split_words(text + " q='x'") == [*text.split(), "q='x'"]


# ------------------------------------------------------------------ what the parse may raise


@pytest.mark.parametrize(
    "argv",
    [
        ["--model_args", "a=" + "1+" * 4000 + "1"],  # RecursionError in ast construction
        ["--gen_kwargs", "a=" + "-" * 8000 + "1"],  # the Python parser's stack: MemoryError
        ["--model_args", '{"a": ' + "[" * 100_000],  # json.loads: RecursionError
        ["--samples", "[" * 100_000],
    ],
)
def test_a_value_too_deep_for_lm_evals_parser_is_an_argv_error(
    real: tuple[argparse.ArgumentParser, list[OptionSpec]], argv: list[str]
) -> None:
    parser, _ = real
    with pytest.raises(ArgvError, match="nests too deeply for lm-eval's parser"):
        lm_eval_cli.parse_argv(parser, ["--model", "dummy", *argv])


def test_parser_messages_are_shortened(
    real: tuple[argparse.ArgumentParser, list[OptionSpec]],
) -> None:
    parser, _ = real
    with pytest.raises(ArgvError) as info:
        lm_eval_cli.parse_argv(parser, ["--seed", ",".join(["x"] * 20_000)])
    assert len(str(info.value)) < lm_eval_cli.MAX_MESSAGE_CHARS + 50
    assert str(info.value).endswith("(shortened)")


def test_an_argv_word_beyond_linuxs_limit_is_refused() -> None:
    lm_eval_cli.check_argv_words(["--tasks", "t" * lm_eval_cli.MAX_ARGV_WORD_BYTES])
    with pytest.raises(OptionTooLarge, match="MAX_ARG_STRLEN"):
        lm_eval_cli.check_argv_words(["--tasks", "t" * (lm_eval_cli.MAX_ARGV_WORD_BYTES + 1)])
    with pytest.raises(OptionTooLarge, match="MAX_ARG_STRLEN"):
        lm_eval_cli.check_argv_words(["--tasks", "€" * 50_000])
