"""lm-eval's own argparse parser -> the JSON request model, and a request -> an argv list.

The schema is derived at startup from the parser's actions (their nargs, const, type and
choices), so an option added to lm-eval appears in the API without a code change, and a value
reaches lm-eval with the meaning the request gave it. Everything here is pure apart from
`load_parser`, which imports lm-eval's CLI module (tens of milliseconds, no torch, no task
index).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    WithJsonSchema,
    create_model,
    model_validator,
)

from lm_eval_server.admission import lm_eval_checks
from lm_eval_server.admission.gate_rules import Gate

# Options whose values are key=value lists in lm-eval releases that typed them as plain
# strings (newer ones use MergeDictAction, which is what is recognised first).
KEY_VALUE_DESTS = frozenset(
    {
        "model_args",
        "gen_kwargs",
        "metadata",
        "wandb_args",
        "wandb_config_args",
        "hf_hub_log_args",
        "trackio_args",
    }
)
LIST_DESTS = frozenset({"tasks"})
# The server's own fields; they never reach lm-eval's argv.
SERVER_FIELDS = ("env_vars", "lm_eval_path", "timeout_s", "resources", "callback_url", "gate")
SKIPPED_DESTS = frozenset({"help", "command", "func"})
# A job may run for at most this long (timeout_s); more is a typo, not a plan.
MAX_TIMEOUT_S = 30 * 24 * 3600.0
# callback_url's length bound (checked by the request model and by webhooks).
MAX_CALLBACK_URL_CHARS = 2048


class OptionKind(StrEnum):
    flag = "flag"  # nargs=0 (store_true): present or absent
    list = "list"  # nargs="+" item lists (tasks)
    key_value = "key_value"  # k=v,k2=v2, several k=v items, or a JSON object
    optional_value = "optional_value"  # nargs="?" with a const: bare flag or a value
    value = "value"


class ValueType(StrEnum):
    """What JSON a value option takes, from its action's `type`."""

    int = "int"
    float = "float"
    str = "str"  # type=str or none: any scalar, rendered as text
    custom = "custom"  # a type function: whatever renders to text it accepts


@dataclass(frozen=True)
class OptionSpec:
    dest: str
    flag: str
    kind: OptionKind
    value_type: type
    help: str
    json_value: bool  # key_value option whose parser accepts a JSON object
    converter: ValueType = ValueType.str
    comma_list: bool = False  # list option whose action splits items on commas (SplitArgs)
    # For optional_value options: the CLI text lm-eval parses to a false value that survives
    # EvaluatorConfig.from_cli, or None when false can only be said by leaving the option out.
    false_token: str | None = None
    choices: tuple[str, ...] | None = None
    examples: tuple[str, ...] | None = None
    deprecated: bool = False
    lm_default: Any = field(default=None, compare=False)
    has_lm_default: bool = False


class ArgvError(ValueError):
    """lm-eval's parser rejected the argv built from a request, or a value cannot be written
    as an argv at all."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgvError(message)


def load_parser() -> argparse.ArgumentParser:
    """The parser of lm-eval's `run` command (HarnessCLI), or `setup_parser()` up to 0.4.9."""
    try:
        from lm_eval._cli.harness import HarnessCLI
    except ImportError:
        from lm_eval.__main__ import setup_parser  # type: ignore[attr-defined]

        return setup_parser()
    cli = HarnessCLI()
    return cli._subparsers.choices["run"]


def _long_flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _value_type(action: argparse.Action) -> type:
    if action.type in (int, float):
        return action.type  # type: ignore[return-value]
    return str


def _converter(action: argparse.Action) -> ValueType:
    if action.type is int:
        return ValueType.int
    if action.type is float:
        return ValueType.float
    if action.type in (None, str) or getattr(action.type, "__objclass__", None) is str:
        return ValueType.str  # str or a str method such as str.upper
    return ValueType.custom


def _convert(action: argparse.Action, text: str) -> tuple[bool, Any]:
    """(True, value) as the parser would convert `text` for `action`, or (False, None)."""
    if action.type is None:
        return True, text
    try:
        return True, action.type(text)  # type: ignore[misc, operator]
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False, None


def _false_token(action: argparse.Action) -> str | None:
    # A value that parses to something false and that from_cli keeps (`v or v == 0`), so
    # that it also overrides a config file; "false" is what a person would type.
    ok, value = _convert(action, "false")
    if ok and not value and value == 0:
        return "false"
    return None


def _choices(action: argparse.Action) -> tuple[str, ...] | None:
    return tuple(str(c) for c in action.choices) if action.choices is not None else None


def _metavar_values(action: argparse.Action) -> tuple[str, ...] | None:
    # lm-eval spells some closed sets only in the metavar ("true|refresh|delete") and checks
    # them in the type function: shown as examples (the parser, not the schema, judges).
    metavar = action.metavar
    if isinstance(metavar, str) and "|" in metavar and " " not in metavar:
        options = tuple(metavar.split("|"))
        if all(_convert(action, option)[0] for option in options):
            return options
    return None


def _has_lm_default(action: argparse.Action) -> tuple[bool, Any]:
    if action.default not in (None, argparse.SUPPRESS) and action.nargs != 0:
        return True, action.default
    return lm_eval_checks.known_default(action.dest)


def describe_options(parser: argparse.ArgumentParser) -> list[OptionSpec]:
    """One spec per option of `parser`, in the parser's order."""
    specs: list[OptionSpec] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in SKIPPED_DESTS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        json_value = False
        comma_list = False
        false_token = None
        if action.nargs == 0:
            kind = OptionKind.flag
        elif action.dest in KEY_VALUE_DESTS or type(action).__name__ == "MergeDictAction":
            kind = OptionKind.key_value
            json_value = type(action).__name__ == "MergeDictAction"
        elif action.dest in LIST_DESTS or action.nargs in ("+", "*"):
            kind = OptionKind.list
            comma_list = type(action).__name__ == "SplitArgs"
        elif action.nargs == "?" and action.const is not None:
            kind = OptionKind.optional_value
            false_token = _false_token(action)
        else:
            kind = OptionKind.value
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        has_default, default = _has_lm_default(action)
        specs.append(
            OptionSpec(
                dest=action.dest,
                flag=_long_flag(action),
                kind=kind,
                value_type=_value_type(action),
                help=" ".join(help_text.split()),
                json_value=json_value,
                converter=_converter(action),
                comma_list=comma_list,
                false_token=false_token,
                choices=_choices(action),
                examples=_metavar_values(action),
                deprecated="(deprecated)" in help_text.lower(),
                lm_default=default,
                has_lm_default=has_default,
            )
        )
    return specs


Scalar = str | int | float


def _declared_annotation(spec: OptionSpec) -> Any:
    """The JSON a field declares (its schema): what the option's kind and type take."""
    enum: Any = Literal[spec.choices] if spec.choices else None  # type: ignore[valid-type]
    match spec.kind:
        case OptionKind.flag:
            return bool | None
        case OptionKind.list:
            return str | list[str] | None
        case OptionKind.key_value:
            return dict[str, Any] | str | list[str] | None
        case OptionKind.optional_value:
            return bool | (enum if enum is not None else str) | None
    if enum is not None:
        return enum | None
    match spec.converter:
        case ValueType.int:
            return int | None
        case ValueType.float:
            return float | None
        case ValueType.str:
            return str | int | float | None
        case _:
            return Scalar | list[Scalar | None] | dict[str, Any] | None


def _field_annotation(spec: OptionSpec) -> Any:
    """What a field accepts: its declared JSON, and also a JSON boolean wherever the option
    takes text. Pydantic's lax mode would turn `true` into 1 for a number option before
    anything else looks at it (`"num_fewshot": true` ran 1-shot); accepted as a boolean, it
    is rendered as the text a person would type (`true`, bools_as_text) and lm-eval's parser
    judges that: a number option refuses it, a text option gets the word. The schema stays
    the declared one, so clients (the dashboard's form) see the option's real kind."""
    declared = _declared_annotation(spec)
    if spec.kind is OptionKind.flag:
        return declared  # a flag is a boolean; other JSON is read by truthiness
    schema = WithJsonSchema(TypeAdapter(declared).json_schema())
    if spec.kind is OptionKind.optional_value:
        # A bare flag (true), false, or a value: a number is that value's text, not a bool.
        return Annotated[StrictBool | declared | int | float, schema]
    if spec.kind is OptionKind.value and spec.converter is ValueType.custom and not spec.choices:
        return Annotated[
            StrictBool | Scalar | list[StrictBool | Scalar | None] | dict[str, Any] | None,
            schema,
        ]
    return Annotated[StrictBool | declared, schema]


def bool_text(value: bool) -> str:
    """A JSON boolean as a person would type it on the command line."""
    return "true" if value else "false"


def bools_as_text(values: dict[str, Any], specs: list[OptionSpec]) -> dict[str, Any]:
    """`values` with every JSON boolean given to an option that takes text (value, list and
    key=value options, and a value option's list items) replaced by its text, as a person
    would type `--num_fewshot true`; flags and optional-value options keep theirs (true and
    false mean something there). Pure; a new dict."""
    out = dict(values)
    for spec in specs:
        value = out.get(spec.dest)
        if spec.kind in (OptionKind.flag, OptionKind.optional_value):
            continue
        if isinstance(value, bool):
            out[spec.dest] = bool_text(value)
        elif isinstance(value, list) and spec.kind is OptionKind.value:
            out[spec.dest] = [bool_text(v) if isinstance(v, bool) else v for v in value]
    return out


class Resources(BaseModel):
    """Per-job resources: num_gpus for both executors, the rest for Ray only. Exact JSON types
    (strict): `true` or `"1"` is not a number of GPUs, and `memory` is a whole number of bytes."""

    model_config = ConfigDict(extra="forbid", strict=True)
    num_gpus: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="GPUs for the job. Local executor: whole devices from the server's GPUS; "
        "the job waits until they are free. EXECUTOR=ray: entrypoint_num_gpus (fractions "
        "allowed).",
    )
    num_cpus: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Ray entrypoint_num_cpus."
    )
    memory: int | None = Field(None, ge=0, le=2**49, description="Ray entrypoint_memory, in bytes.")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # extra="forbid" alone says "Extra inputs are not permitted", not what is permitted.
        if isinstance(data, dict) and (unknown := [k for k in data if k not in cls.model_fields]):
            named = ", ".join(repr(str(k)[:60]) for k in unknown[:5])
            raise ValueError(
                f"unknown key(s) {named}; resources takes only {', '.join(cls.model_fields)}"
            )
        return data


class SecretRef(BaseModel):
    """An env_vars value read from the server's SECRETS_DIR when the job starts."""

    model_config = ConfigDict(extra="forbid")
    secret: str = Field(
        max_length=128, description="The name of a secret (a file in the server's SECRETS_DIR)."
    )


def _description(spec: OptionSpec) -> str:
    text = f"`{spec.flag}`: {spec.help}" if spec.help else spec.flag
    if spec.has_lm_default and spec.lm_default is not None:
        text += f" (lm-eval's default: {json.dumps(spec.lm_default)}; sent only if given)"
    return text


def build_request_model(specs: list[OptionSpec]) -> type[BaseModel]:
    """The pydantic model of a job request: one optional field per lm-eval option."""
    fields: dict[str, Any] = {}
    for spec in specs:
        extra: dict[str, Any] = {}
        if spec.has_lm_default and spec.lm_default is not None:
            # Informational: the field's own default stays null, so nothing extra is sent.
            extra["default"] = spec.lm_default
        if spec.deprecated:
            extra["deprecated"] = True
        if spec.examples:
            extra["examples"] = list(spec.examples)
        fields[spec.dest] = (
            _field_annotation(spec),
            Field(None, description=_description(spec), json_schema_extra=extra or None),
        )
    fields["gate"] = (
        Gate | None,
        Field(
            None,
            description="A regression gate, evaluated when the job ends: "
            '{"baseline": <job id>, "rules": [{"task", "metric", "min"}, {"metric", '
            '"max_drop"}, {"metric", "no_significant_drop": true}]}; GET /job shows the '
            "verdict (docs/gates.md).",
        ),
    )
    fields["max_attempts"] = (
        int | None,
        Field(
            None,
            ge=1,
            strict=True,  # a JSON integer: true or "2" is a typo, not a count
            description="Runs the job may make by itself: a failed, killed or lost run is "
            "retried with backoff until one succeeds (default 1; at most the server's "
            "MAX_ATTEMPTS). A stop is never retried.",
        ),
    )
    fields["env_vars"] = (
        dict[str, str | SecretRef] | None,
        Field(
            None,
            description="Environment variables added to the job's environment: a value, or "
            '{"secret": "<name>"} for a secret of the server\'s SECRETS_DIR (read when the '
            "job starts, never stored or shown).",
        ),
    )
    fields["lm_eval_path"] = (
        str | None,
        Field(
            None,
            description="The lm-eval command to run (one of the server's LM_EVAL_PATHS); "
            "default: the bundled lm-eval.",
        ),
    )
    fields["timeout_s"] = (
        float | None,
        Field(
            None,
            gt=0,
            le=MAX_TIMEOUT_S,
            allow_inf_nan=False,
            strict=True,  # a number of seconds: `true` is not 1 s
            description="Stop the job and mark it Failed after this many seconds "
            f"(at most {MAX_TIMEOUT_S:.0f}, 30 days).",
        ),
    )
    fields["resources"] = (
        Resources | None,
        Field(
            None,
            description="Resources reserved for the job: num_gpus (GPU slots locally, Ray "
            "otherwise); num_cpus and memory with EXECUTOR=ray only.",
        ),
    )
    fields["callback_url"] = (
        str | None,
        Field(
            None,
            max_length=MAX_CALLBACK_URL_CHARS,
            description="When the job ends, the server POSTs a signed JSON webhook here "
            "(http/https, under one of the server's WEBHOOK_URL_PREFIXES).",
        ),
    )
    fields["response_cache"] = (
        StrictBool | None,
        Field(
            None,
            description="false: this job neither reads nor writes the server's response "
            "cache (RESPONSE_CACHE); default true where the server has one.",
        ),
    )
    return create_model(  # type: ignore[call-overload, no-any-return]
        "JobRequest",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )


def _key_value_string(value: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items())


def _scalar(value: Any, dest: str) -> str:
    if isinstance(value, bool):
        return bool_text(value)
    if value is None:
        return "None"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgvError(f"{dest}: {value} is not a finite number")
        # JSON numbers arrive as floats for float options; 10 reads better than 10.0.
        if value.is_integer():
            return str(int(value))
    return str(value)


def render_value(value: Any, dest: str) -> str:
    """The CLI text for a value option: a list as lm-eval's comma lists (`0,None,8,52`), an
    object as JSON text, a number as a person would type it."""
    if isinstance(value, list):
        return ",".join(_scalar(item, dest) for item in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return _scalar(value, dest)


def _option(flag: str, value: str) -> list[str]:
    # A value that starts with "-" would be read by argparse as the next option.
    return [f"{flag}={value}"] if value.startswith("-") else [flag, value]


def split_words(text: str) -> list[str]:
    """Split on whitespace outside quotes and brackets, keeping quotes (as a person types
    `--model_args pretrained=x 'stop=["a b"]'`, each word stays as lm-eval's parser takes it)."""
    if _GROUPING.search(text) is None:
        return text.split()  # the same split, in C, when nothing groups
    words: list[str] = []
    buf: list[str] = []
    depth = 0
    quote: str | None = None
    for char in text:
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth = max(depth - 1, 0)
        elif char.isspace() and depth == 0:
            if buf:
                words.append("".join(buf))
                buf = []
            continue
        buf.append(char)
    if buf:
        words.append("".join(buf))
    return words


def task_items(value: str | list[str] | None) -> list[str]:
    """Task entries as lm-eval sees them: a string is split as a shell would split it, then
    every entry on commas (lm-eval's SplitArgs)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ArgvError(
                f"tasks: {exc} in {value!r}; write tasks as a JSON list of names or paths"
            ) from None
    else:
        words = list(value)
    return [t.strip() for word in words for t in word.split(",") if t.strip()]


def _key_value_items(spec: OptionSpec, value: Any) -> list[str]:
    if isinstance(value, dict):
        if not value:
            return []
        return [json.dumps(value) if spec.json_value else _key_value_string(value)]
    if isinstance(value, list):
        return [str(item) for item in value if str(item).strip()]
    text = value.strip()
    if not text:
        return []
    if not spec.json_value:
        return [text]
    if text.startswith("{"):
        return [text]  # a JSON object is one word; lm-eval's parser judges it
    return split_words(text)


def _several(flag: str, items: list[str]) -> list[str]:
    if len(items) == 1:
        return _option(flag, items[0])
    for item in items:
        if item.startswith("-"):
            # argparse would read it as another option (e.g. `-b 8` becoming batch_size).
            raise ArgvError(
                f"{flag}: {item!r} starts with '-'; argparse would read it as an option. "
                "Pass the value as a JSON object instead"
            )
    return [flag, *items]


def request_to_argv(values: dict[str, Any], specs: list[OptionSpec]) -> list[str]:
    """lm-eval arguments (without the program) for a request's lm-eval fields."""
    argv: list[str] = []
    for spec in specs:
        value = values.get(spec.dest)
        if value is None:
            continue
        match spec.kind:
            case OptionKind.flag:
                if value:
                    argv.append(spec.flag)
            case OptionKind.list:
                items = task_items(value) if spec.comma_list else _list_items(value)
                if spec.comma_list and items:
                    argv += _option(spec.flag, ",".join(items))
                elif items:
                    argv += _several(spec.flag, items)
            case OptionKind.key_value:
                items = _key_value_items(spec, value)
                if items:
                    argv += _several(spec.flag, items)
            case OptionKind.optional_value:
                if value is True:
                    argv.append(spec.flag)
                elif value is False:
                    # Without a false token, false is lm-eval's default when left out; the
                    # validator checks a config file does not say otherwise.
                    if spec.false_token is not None:
                        argv += [spec.flag, spec.false_token]
                else:
                    argv += _option(spec.flag, render_value(value, spec.dest))
            case _:
                argv += _option(spec.flag, render_value(value, spec.dest))
    return argv


def _list_items(value: str | list[str]) -> list[str]:
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ArgvError(f"{exc} in {value!r}; write the items as a JSON list") from None
    return [item for item in value if item.strip()]


# lm-eval's parser logs through this logger as it parses: a warning for every repeated key of a
# key=value option ("Overwriting key 'a'"), notes on filled-in seeds. In the server each record
# was a formatted write to stderr on the event loop: a 900 KB `a=1,a=1,...` made 225,000 of them,
# nine tenths of its parse. The job's own lm-eval still logs them, in the job's log.
PARSER_LOGGER = "lm_eval._cli.utils"


def make_raising(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` raise ArgvError instead of printing usage and exiting, and quiet the
    warnings lm-eval's parser logs (PARSER_LOGGER) in this process.

    Done once, on the server's own parser instance, so that parsing stays free of shared
    mutable state when requests are validated in parallel threads.
    """
    parser.error = _RaisingParser.error.__get__(parser)  # type: ignore[method-assign]
    logging.getLogger(PARSER_LOGGER).setLevel(logging.ERROR)
    return parser


# Characters of lm-eval's parser's message kept in an error (argparse quotes the whole value).
MAX_MESSAGE_CHARS = 1000


def parse_argv(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with lm-eval's parser (made raising by `make_raising`)."""
    failure = ""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # an action that exits by itself, such as --help
        raise ArgvError(f"lm-eval's parser exited ({exc.code})") from exc
    except (RecursionError, MemoryError) as exc:
        # lm-eval reads key=value values with ast.literal_eval and JSON with json.loads:
        # `a=1+1+...+1` is a RecursionError, `a=----...1` the Python parser's stack overflow
        # (a MemoryError), `[[[...]]]` JSON a RecursionError. The job's lm-eval would fail alike.
        failure = type(exc).__name__  # refused below, outside the handler (a long traceback)
    except (ValueError, TypeError, AssertionError) as exc:
        message = str(exc) or type(exc).__name__
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "... (shortened)"
        raise ArgvError(message) from exc
    raise ArgvError(f"a value nests too deeply for lm-eval's parser to read ({failure})")


# ------------------------------------------------------------------ bounds on option text
#
# What one request's options may make lm-eval's parser (and the checks after it) read. Fixed
# limits, not settings: one command-line word holds at most 128 KiB on Linux (MAX_ARG_STRLEN),
# so a longer option could never reach a job, and lm-eval's options carry a few hundred bytes
# in practice. Within them the whole parse of a request takes milliseconds (bench/floods.py).

# UTF-8 bytes of one option's text, as the command line carries it (all its items together),
# and of all of a request's lm-eval options together.
MAX_OPTION_BYTES = 64 * 1024
MAX_OPTIONS_BYTES = 128 * 1024
# Entries of one key=value option (model_args, gen_kwargs, metadata, wandb_args, ...).
MAX_KEY_VALUE_ENTRIES = 256
# Characters of one key.
MAX_KEY_CHARS = 256
# Characters of one value written as key=value text: lm-eval reads it with ast.literal_eval,
# whose C parse holds the GIL for its whole run, whatever thread it runs in: at 4 KiB, 9 ms for
# a tuple of 1,300 tuples or `1+1+...`, 18 ms for an f-string; at 1 KiB under 5 ms. The event
# loop waits that long each time it takes the GIL back (several times per request): a flood of
# 4 KiB values doubled /health's p99. A JSON object's values go through json.loads instead
# (about 1 ms for 64 KiB): MAX_OPTION_BYTES bounds them.
MAX_TEXT_VALUE_CHARS = 1024
# Brackets nested in one value (a JSON object's values included): the checks after the parse
# walk the values, and a deeper one is nobody's option.
MAX_VALUE_DEPTH = 16
# Options whose text adds up to more than this are parsed in a worker thread (offload).
THREAD_PARSE_BYTES = 2 * 1024
# Linux's MAX_ARG_STRLEN (32 pages) less the terminating NUL: one argv word can be no longer.
MAX_ARGV_WORD_BYTES = 128 * 1024 - 1

# Characters that group (quotes, brackets): split_words needs its loop only when one occurs.
_GROUPING = re.compile(r"[\"'()\[\]{}]")
# What lm-eval's split_top_level looks at: commas, quotes, brackets.
_TOP_LEVEL = re.compile(r"[,\"'()\[\]{}]")
_OPEN, _CLOSE = "[({", "])}"
QUOTE_CHARS = 60


class OptionTooLarge(ArgvError):
    """An option's text is beyond a bound of this module; the message names the option, the
    bound and what to do instead."""


def _quote(text: str) -> str:
    return repr(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "...")


def _utf8_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def text_bytes(value: Any) -> int:
    """The UTF-8 bytes of `value` as a request option's text (a list: its items and a separator
    each; an object: its JSON)."""
    if isinstance(value, str):
        return _utf8_bytes(value)
    if isinstance(value, list):
        return sum(text_bytes(item) + 1 for item in value)
    if isinstance(value, dict):
        return _utf8_bytes(json.dumps(value, ensure_ascii=False, default=str))
    return len(str(value))


def check_option_sizes(values: dict[str, Any], specs: list[OptionSpec]) -> int:
    """The bytes of text the request's lm-eval options hold together; OptionTooLarge for one
    above MAX_OPTION_BYTES, or all of them above MAX_OPTIONS_BYTES. Costs a length per string
    (nothing is split or parsed), so it runs before anything that does."""
    total = 0
    for spec in specs:
        value = values.get(spec.dest)
        if value is None:
            continue
        if isinstance(value, str) and len(value) > MAX_OPTION_BYTES:
            size = len(value)  # at least this many bytes; counting them all would cost more
        else:
            size = text_bytes(value)
        if size > MAX_OPTION_BYTES:
            raise OptionTooLarge(
                f"{spec.dest}: {size} bytes of text; one option carries at most "
                f"{MAX_OPTION_BYTES} (a fixed limit: lm-eval reads it from one command-line "
                "word, which Linux caps at 128 KiB). Put larger options in a config file "
                "(the `config` option), where lm-eval reads them as YAML"
            )
        total += size
    if total > MAX_OPTIONS_BYTES:
        raise OptionTooLarge(
            f"the lm-eval options hold {total} bytes of text together; a request carries at "
            f"most {MAX_OPTIONS_BYTES} (a fixed limit). Put larger options in a config file "
            "(the `config` option), where lm-eval reads them as YAML"
        )
    return total


def top_level_items(text: str, limit: int) -> list[tuple[str, int]]:
    """lm-eval's `split_top_level`: the non-empty parts of `text` between commas outside quotes
    and brackets, each with the deepest bracket nesting inside it. Stops after `limit` + 1
    parts. Only the commas, quotes and brackets are visited (a regex finds them)."""
    parts: list[tuple[str, int]] = []
    start = depth = deepest = 0
    quote: str | None = None
    for match in _TOP_LEVEL.finditer(text):
        char = match.group()
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSE:
            depth = max(depth - 1, 0)
        elif depth == 0:  # a top-level comma
            if match.start() > start:
                parts.append((text[start : match.start()], deepest))
                if len(parts) > limit:
                    return parts
            start, deepest = match.end(), 0
    if len(text) > start:
        parts.append((text[start:], deepest))
    return parts


def _depth_beyond(value: Any, limit: int) -> bool:
    """True if lists and objects nest more than `limit` levels inside `value`."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            item
            for container in level
            if isinstance(container, dict | list)
            for item in (container.values() if isinstance(container, dict) else container)
        ]
        if not any(isinstance(item, dict | list) for item in level):
            return False
    return True


def _check_entries(dest: str, count: int) -> None:
    if count > MAX_KEY_VALUE_ENTRIES:
        raise OptionTooLarge(
            f"{dest}: more than {MAX_KEY_VALUE_ENTRIES} key=value entries; one option takes at "
            f"most {MAX_KEY_VALUE_ENTRIES} (a fixed limit; lm-eval's models take a few dozen)"
        )


def _check_key(dest: str, key: str) -> None:
    if len(key) > MAX_KEY_CHARS:
        raise OptionTooLarge(
            f"{dest}: the key {_quote(key)} has {len(key)} characters; a key has at most "
            f"{MAX_KEY_CHARS} (a fixed limit)"
        )


def _too_deep(dest: str, key: str) -> OptionTooLarge:
    return OptionTooLarge(
        f"{dest}: the value of {_quote(key)} nests lists or objects more than "
        f"{MAX_VALUE_DEPTH} levels deep (a fixed limit)"
    )


def _check_json_object(dest: str, obj: dict[Any, Any]) -> None:
    _check_entries(dest, len(obj))
    for key, item in obj.items():
        _check_key(dest, str(key))
        if isinstance(item, dict | list) and _depth_beyond(item, MAX_VALUE_DEPTH - 1):
            raise _too_deep(dest, str(key))


def check_key_value_text(spec: OptionSpec, value: Any) -> None:
    """A key=value option's entries, keys and values within this module's bounds, counted as
    lm-eval's parser will split them (a JSON object, or key=value items split on commas outside
    quotes and brackets); OptionTooLarge otherwise. Call it after check_option_sizes: it
    visits the text, at most MAX_OPTION_BYTES of it."""
    dest = spec.dest
    if isinstance(value, dict):
        _check_json_object(dest, value)
        return
    words = _key_value_items(spec, value)
    if spec.json_value and words and words[0].lstrip().startswith("{"):
        # lm-eval's MergeDictAction takes a first word that is a JSON object as the whole value.
        try:
            parsed = json.loads(words[0])
        except RecursionError:
            raise _too_deep(dest, "{...}") from None
        except json.JSONDecodeError:
            parsed = None  # lm-eval's parser refuses it with its own message
        if isinstance(parsed, dict):
            _check_json_object(dest, parsed)
            return
    count = 0
    for word in words:
        for part, depth in top_level_items(word, MAX_KEY_VALUE_ENTRIES - count):
            count += 1
            _check_entries(dest, count)
            key, sep, text = part.partition("=")
            if not sep:
                continue  # lm-eval's parser refuses it: "expected `key=value`"
            _check_key(dest, key)
            if len(text) > MAX_TEXT_VALUE_CHARS:
                raise OptionTooLarge(
                    f"{dest}: the value of {_quote(key)} has {len(text)} characters; a value "
                    f"written as key=value text has at most {MAX_TEXT_VALUE_CHARS} (a fixed "
                    "limit: lm-eval reads it as a Python literal). Send the option as a JSON "
                    "object for a longer value"
                )
            if depth > MAX_VALUE_DEPTH:
                raise _too_deep(dest, key)


def check_key_value_options(values: dict[str, Any], specs: list[OptionSpec]) -> None:
    """check_key_value_text for every key=value option of the request."""
    for spec in specs:
        value = values.get(spec.dest)
        if value is not None and spec.kind is OptionKind.key_value:
            check_key_value_text(spec, value)


def check_argv_words(argv: list[str]) -> None:
    """Every word fits in one command-line argument (MAX_ARGV_WORD_BYTES), so a job with this
    argv can start; else OptionTooLarge (e.g. task paths made absolute past the limit)."""
    for word in argv:
        if len(word) > MAX_ARGV_WORD_BYTES // 4 and (size := _utf8_bytes(word)) > (
            MAX_ARGV_WORD_BYTES
        ):
            raise OptionTooLarge(
                f"the command-line word {_quote(word)} has {size} bytes; Linux caps one at "
                f"{MAX_ARGV_WORD_BYTES} (MAX_ARG_STRLEN), so the job could never start. Put "
                "larger options in a config file (the `config` option)"
            )


def task_list(values: dict[str, Any]) -> list[str]:
    try:
        return task_items(values.get("tasks"))
    except ArgvError:
        return []
