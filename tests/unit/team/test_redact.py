"""redact.py: the two redaction rules and the chunked stream redactor."""

from __future__ import annotations

import json

import pytest

from lm_eval_server.team.redact import (
    MASK,
    MIN_LEARNED_CHARS,
    Redactor,
    assignment_values,
    is_sensitive_key,
    redact_assignments,
    redact_json,
    redact_text,
)

SECRET = "sk-test-4f9a8b7c6d5e4f3a2b1c"


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "apiKey",
        "OPENAI_API_KEY",
        "apikey",
        "token",
        "hf_token",
        "auth_token",
        "access_token",
        "use_auth_token",
        "password",
        "db-password",
        "client_secret",
        "Authorization",
        "x-api-key",
        "private_key",
    ],
)
def test_credential_keys(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "tokenizer",
        "tokenizer_backend",
        "max_tokens",
        "add_bos_token",
        "custom_prefix_token_id",
        "eot_token_id",
        "tokenizer_pad_token",
        "base_url",
        "pretrained",
        "model",
        "max_gen_toks",
        "num_concurrent",
    ],
)
def test_ordinary_keys(key: str) -> None:
    assert not is_sensitive_key(key)


def test_assignments_in_model_args_and_argument() -> None:
    argument = (
        "python -m lm_eval --model local-completions --model_args "
        "'model=stub,api_key=abc,base_url=http://h:1/v1/completions?key=zz9,"
        "tokenizer_backend=None' --gen_kwargs token=t0k3n --hf_token=q"
    )
    assert redact_assignments(argument) == (
        "python -m lm_eval --model local-completions --model_args "
        "'model=stub,api_key=***,base_url=http://h:1/v1/completions?key=***,"
        "tokenizer_backend=None' --gen_kwargs token=*** --hf_token=***"
    )
    assert assignment_values(argument) == ["abc", "zz9", "t0k3n", "q"]


def test_assignments_in_json_repr_urls_and_headers() -> None:
    text = (
        '{"api_key": "a\\"b", "model": "m"} '
        "{'password': 'pw', 'pretrained': 'gpt2'} "
        "http://user:hunter22@host/x Authorization: Bearer abcdefgh"
    )
    assert redact_assignments(text) == (
        '{"api_key": "***", "model": "m"} '
        "{'password': '***', 'pretrained': 'gpt2'} "
        "http://user:***@host/x Authorization: Bearer ***"
    )


def test_json_masks_credential_keys_and_known_values_everywhere() -> None:
    results = {
        "config": {
            "model_args": "model=stub,api_key=abc,base_url=http://h",
            "model_args_dict": {"header": {"Authorization": "Bearer xyz"}, "use_auth_token": True},
        },
        "results": {"t": {"acc,none": 0.5, "alias": f"printed {SECRET}"}},
        SECRET: [SECRET, 1, None],
    }
    assert redact_json(results, [SECRET]) == {
        "config": {
            "model_args": "model=stub,api_key=***,base_url=http://h",
            "model_args_dict": {"header": {"Authorization": MASK}, "use_auth_token": True},
        },
        "results": {"t": {"acc,none": 0.5, "alias": "printed ***"}},
        MASK: [MASK, 1, None],
    }


def test_known_values_in_the_forms_programs_print() -> None:
    value = 'p@ss "w/ord" é\\'
    forms = [
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        "p%40ss%20%22w%2Ford%22%20%C3%A9%5C",
    ]
    for form in forms:
        assert redact_text(f"<{form}>", [value]) == "<***>", form


def test_longest_value_wins_and_lines_of_a_multiline_value() -> None:
    assert redact_text("abcdefgh-ij abcdefgh", ["abcdefgh", "abcdefgh-ij"]) == "*** ***"
    pem = "-----BEGIN KEY-----\nAAAABBBBCCCC\n-----END KEY-----"
    assert redact_text("key line: AAAABBBBCCCC\n", [pem]) == "key line: ***\n"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 64])
def test_stream_finds_values_split_across_chunks(size: int) -> None:
    redactor = Redactor()
    redactor.add_secrets([SECRET, "short1", SECRET + "-longer"])
    text = (
        f"a {SECRET} b {SECRET}-longer c sk-test-4f9 d short1{SECRET}"
        f"{json.dumps(SECRET)} {SECRET[:-1]}\n"
    ).encode()
    stream = redactor.stream()
    out = b"".join(stream.wrap(text[i : i + size] for i in range(0, len(text), size)))
    assert out == (
        b'a *** b *** c sk-test-4f9 d ***\x2a\x2a\x2a"***" ' + SECRET[:-1].encode() + b"\n"
    )
    assert SECRET.encode() not in out


def test_stream_holds_back_only_a_possible_start() -> None:
    redactor = Redactor()
    redactor.add_secrets([SECRET])
    stream = redactor.stream()
    assert stream.feed(b"line one\n") == b"line one\n"  # nothing held: the follower sees it
    assert stream.feed(b"x sk-te") == b"x "
    assert stream.feed(b"st-4f9a8b7c6d5e4f3a2b1c!") == b"***!"
    assert stream.feed(b"sk-") == b""
    assert stream.flush() == b"sk-"


def test_learned_values_need_a_minimum_length_and_are_capped() -> None:
    redactor = Redactor(max_learned=2)
    redactor.learn(["EMPTY", "none", "a" * MIN_LEARNED_CHARS])
    assert redactor.text("EMPTY none aaaaaaaa") == "EMPTY none ***"
    generation = redactor.generation
    redactor.learn(["b" * 9, "c" * 10])
    assert redactor.generation > generation
    assert redactor.values_only("aaaaaaaa bbbbbbbbb cccccccccc") == "aaaaaaaa *** ***"
    redactor.add_secrets(["x"])  # secrets: any length, never dropped
    assert redactor.values_only("x") == MASK


def test_an_empty_redactor_changes_nothing() -> None:
    redactor = Redactor()
    assert not redactor
    assert redactor.values_only("api_key=abc") == "api_key=abc"
    assert redactor.text("api_key=abc") == "api_key=***"
    assert b"".join(redactor.stream().wrap([b"abc", b"def"])) == b"abcdef"


def test_values_nested_in_each_other_neither_recurse_nor_lose_the_longest() -> None:
    redactor = Redactor()
    redactor.add_secrets(["a" * n for n in range(8, 1200)])  # each a prefix of the next
    assert redactor.values_only("<" + "a" * 1199 + "|" + "a" * 1300 + ">") == "<***|******>"
    stream = redactor.stream()
    data = b"x" + b"a" * 1199 + b"y"
    assert b"".join(stream.wrap(data[i : i + 100] for i in range(0, len(data), 100))) == b"x***y"


def test_long_learned_values_are_left_to_the_key_rule() -> None:
    redactor = Redactor()
    long_value = "k" * 300
    redactor.learn([long_value])
    assert not redactor
    assert redactor.text(f"api_key={long_value}") == "api_key=***"
