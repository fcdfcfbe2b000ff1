"""lm-eval's own argparse parser -> the JSON request model, and a request -> an argv list.

The schema is derived at startup, so an option added to lm-eval appears in the API without a
code change. Everything here is pure apart from `load_parser`, which imports lm-eval's CLI
module (tens of milliseconds, no torch, no task index).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

# Options whose values are key=value lists in every lm-eval release (older releases typed them
# as plain strings, newer ones use MergeDictAction).
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
SERVER_FIELDS = ("env_vars", "lm_eval_path", "timeout_s", "resources")
SKIPPED_DESTS = frozenset({"help", "command", "func"})


class OptionKind(StrEnum):
    flag = "flag"  # store_true
    list = "list"  # nargs="+" item lists (tasks)
    key_value = "key_value"  # k=v,k2=v2 or a JSON object
    optional_value = "optional_value"  # nargs="?" with a const: bare flag or a value
    value = "value"


@dataclass(frozen=True)
class OptionSpec:
    dest: str
    flag: str
    kind: OptionKind
    value_type: type
    help: str
    json_value: bool  # key_value option whose parser accepts a JSON object


class ArgvError(ValueError):
    """lm-eval's parser rejected the argv built from a request."""


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


def describe_options(parser: argparse.ArgumentParser) -> list[OptionSpec]:
    """One spec per option of `parser`, in the parser's order."""
    specs: list[OptionSpec] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in SKIPPED_DESTS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        json_value = False
        if isinstance(action, argparse._StoreTrueAction):
            kind = OptionKind.flag
        elif action.dest in KEY_VALUE_DESTS or type(action).__name__ == "MergeDictAction":
            kind = OptionKind.key_value
            json_value = type(action).__name__ == "MergeDictAction"
        elif action.dest in LIST_DESTS or action.nargs in ("+", "*"):
            kind = OptionKind.list
        elif action.nargs == "?" and action.const is not None:
            kind = OptionKind.optional_value
        else:
            kind = OptionKind.value
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        specs.append(
            OptionSpec(
                dest=action.dest,
                flag=_long_flag(action),
                kind=kind,
                value_type=_value_type(action),
                help=" ".join(help_text.split()),
                json_value=json_value,
            )
        )
    return specs


def _field_annotation(spec: OptionSpec) -> Any:
    match spec.kind:
        case OptionKind.flag:
            return bool | None
        case OptionKind.list:
            return str | list[str] | None
        case OptionKind.key_value:
            return str | dict[str, Any] | None
        case OptionKind.optional_value:
            return bool | str | None
        case _:
            if spec.value_type is int:
                return int | None
            if spec.value_type is float:
                return float | None
            return str | None


class Resources(BaseModel):
    """Per-job resources for the Ray executor (ignored by the local executor)."""

    model_config = ConfigDict(extra="forbid")
    num_gpus: float | None = Field(None, ge=0, description="Ray entrypoint_num_gpus.")
    num_cpus: float | None = Field(None, ge=0, description="Ray entrypoint_num_cpus.")
    memory: int | None = Field(None, ge=0, le=2**49, description="Ray entrypoint_memory, in bytes.")


def build_request_model(specs: list[OptionSpec]) -> type[BaseModel]:
    """The pydantic model of a job request: one optional field per lm-eval option."""
    fields: dict[str, Any] = {}
    for spec in specs:
        fields[spec.dest] = (
            _field_annotation(spec),
            Field(None, description=f"`{spec.flag}`: {spec.help}" if spec.help else spec.flag),
        )
    fields["env_vars"] = (
        dict[str, str] | None,
        Field(None, description="Environment variables added to the job's environment."),
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
        Field(None, gt=0, description="Stop the job and mark it Failed after this many seconds."),
    )
    fields["resources"] = (
        Resources | None,
        Field(None, description="Ray executor only: resources reserved for the job."),
    )
    return create_model(  # type: ignore[call-overload, no-any-return]
        "JobRequest",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )


def _key_value_string(value: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items())


def _scalar(value: Any) -> str:
    # JSON numbers arrive as floats for float options; 10 reads better than 10.0 in `argument`.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _option(flag: str, value: str) -> list[str]:
    # A value that starts with "-" would be read by argparse as the next option.
    return [f"{flag}={value}"] if value.startswith("-") else [flag, value]


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
                items = value.split(",") if isinstance(value, str) else value
                items = [item.strip() for item in items if item.strip()]
                if items:
                    argv += _option(spec.flag, ",".join(items))
            case OptionKind.key_value:
                if isinstance(value, dict):
                    if not value:
                        continue
                    text = json.dumps(value) if spec.json_value else _key_value_string(value)
                    argv += _option(spec.flag, text)
                elif value != "":
                    argv += _option(spec.flag, value)
            case OptionKind.optional_value:
                if value is True:
                    argv.append(spec.flag)
                elif value is not False:
                    argv += _option(spec.flag, value)
            case _:
                argv += _option(spec.flag, _scalar(value))
    return argv


def make_raising(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` raise ArgvError instead of printing usage and exiting.

    Done once, on the server's own parser instance, so that parsing stays free of shared
    mutable state when requests are validated in parallel threads.
    """
    parser.error = _RaisingParser.error.__get__(parser)  # type: ignore[method-assign]
    return parser


def parse_argv(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with lm-eval's parser (made raising by `make_raising`)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # an action that exits by itself, such as --help
        raise ArgvError(f"lm-eval's parser exited ({exc.code})") from exc
    except (ValueError, TypeError, AssertionError) as exc:
        raise ArgvError(str(exc) or type(exc).__name__) from exc


def task_list(values: dict[str, Any]) -> list[str]:
    tasks = values.get("tasks")
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else tasks
    return [t.strip() for t in items if t.strip()]
