"""The raw JSON body of POST /job, screened before FastAPI and pydantic see it.

`json.loads` builds the whole document before anything can be checked: 80,000 unknown fields
took ~70 ms to parse and two more seconds for pydantic's error list and its JSON encoding, all
on the event loop. This parser walks the body itself (json's C scanner does the strings) and
stops at the first bound it crosses, so its cost is bounded by the limits, not by the body:

- the body is one JSON object whose keys are the request's fields: unknown fields end the
  parse after the first few, named with close matches;
- nesting depth (MAX_BODY_DEPTH) and the count of JSON values (MAX_BODY_VALUES) are capped;
  `tasks` has its own cap (MAX_TASKS_PER_REQUEST), checked as its items are read;
- every string must be valid Unicode without NUL: a lone UTF-16 surrogate ("\\ud800") parses
  in Python but cannot be encoded again (the job's argv, the store, the JSON answers), and no
  argv or environment can carry a NUL;
- numbers must be finite and integers fit in 64 bits (`NaN`, `Infinity`, `1e400` and
  100-digit integers are refused: lm-eval would get "inf" or a value no option means);

Everything refused is a `BodyRefused` with a message a person can act on (422, or 415 for a
body that is not JSON).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

from lm_eval_server.admission.catalog import TaskRequestRefused, check_task_count, close_matches

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# One non-blank name of a comma-separated task list (task_list() strips and drops blanks).
_TASK_NAME = re.compile(r"[^,\s][^,]*")
# Unknown fields named in a refusal (the parse stops there).
MAX_NAMED_FIELDS = 5
# Characters of a refused key or value quoted back in a message.
QUOTE_CHARS = 60
INT64_MAX = 2**63 - 1


class BodyRefused(ValueError):
    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class BodyLimits:
    max_depth: int = 16
    max_values: int = 2000
    max_tasks: int = 1000


def quote(text: str) -> str:
    """`text` shortened and escaped for a message (repr escapes lone surrogates)."""
    short = text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."
    return repr(short)


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def screen_job_body(
    raw: bytes, content_type: str | None, fields: Collection[str], limits: BodyLimits
) -> dict[str, Any]:
    """The body as a dict, if it is a JSON object within every bound; else BodyRefused."""
    if not is_json_media_type(content_type):
        raise BodyRefused(
            "POST /job takes a JSON object: send it with 'Content-Type: application/json'",
            status_code=415,
        )
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise BodyRefused(
            f"The body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    return _Parser(text, fields, limits).body()


class _Parser:
    def __init__(self, text: str, fields: Collection[str], limits: BodyLimits) -> None:
        self.text = text
        self.pos = 0
        self.fields = fields
        self.limits = limits
        self.values = 0
        self.field = ""  # the top-level field being read, for messages

    # -------------------------------------------------------------- helpers

    def where(self) -> str:
        return f"in {self.field}" if self.field else "in the body"

    def syntax(self, expected: str) -> BodyRefused:
        got = self.text[self.pos : self.pos + 20]
        found = f"found {got!r}" if got else "the body ends"
        line = self.text.count("\n", 0, self.pos) + 1
        return BodyRefused(
            f"The body is not valid JSON: expected {expected} at line {line}, character "
            f"{self.pos + 1} ({found})"
        )

    def skip_ws(self) -> None:
        self.pos = _WS.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def expect(self, char: str, expected: str) -> None:
        self.skip_ws()
        if self.text.startswith(char, self.pos):
            self.pos += 1
        else:
            raise self.syntax(expected)

    def count_value(self) -> None:
        self.values += 1
        if self.values > self.limits.max_values:
            raise BodyRefused(
                f"The body holds more than {self.limits.max_values} JSON values (keys, items, "
                f"numbers, strings); the limit is MAX_BODY_VALUES (it ran out {self.where()})"
            )

    # -------------------------------------------------------------- grammar

    def body(self) -> dict[str, Any]:
        self.skip_ws()
        if not self.text.startswith("{", self.pos):
            raise BodyRefused(
                "The body must be a JSON object of lm-eval options, e.g. "
                '{"model": "hf", "tasks": "hellaswag"}'
            )
        self.pos += 1
        result: dict[str, Any] = {}
        unknown: list[str] = []
        self.skip_ws()
        if self.text.startswith("}", self.pos):
            self.pos += 1
        else:
            while True:
                self.skip_ws()
                key = self.key(result)
                self.expect(":", "':' after a key")
                self.skip_ws()
                if key in self.fields:
                    self.field = key
                    result[key] = self.tasks() if key == "tasks" else self.value(2)
                    self.field = ""
                else:
                    unknown.append(key)
                    if len(unknown) >= MAX_NAMED_FIELDS:
                        break  # enough to name: the rest is not read
                    self.field = f"unknown field {quote(key)}"
                    self.value(2)
                    self.field = ""
                self.skip_ws()
                if self.text.startswith(",", self.pos):
                    self.pos += 1
                    continue
                self.expect("}", "',' or '}' in the object")
                break
        if unknown:
            raise BodyRefused(self.unknown_fields(unknown))
        self.skip_ws()
        if self.pos != len(self.text):
            raise self.syntax("the end of the body after the JSON object")
        return result

    def unknown_fields(self, names: list[str]) -> str:
        known = set(self.fields)
        parts = []
        for name in names:
            hints = close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            parts.append(f"{quote(name)}{hint}")
        more = " and maybe more" if len(names) >= MAX_NAMED_FIELDS else ""
        return (
            f"Unknown field(s): {'; '.join(parts)}{more}. A job takes lm-eval's options "
            "(`lm_eval run --help`, or the JobRequest schema at /openapi.json) plus env_vars, "
            "lm_eval_path, timeout_s, resources and callback_url"
        )

    def key(self, obj: dict[str, Any]) -> str:
        if not self.text.startswith('"', self.pos):
            raise self.syntax("a key in double quotes")
        self.count_value()
        # A repeated key: the last one wins, as in json.loads (what FastAPI then parses).
        return self.string()

    def string(self) -> str:
        try:
            value, self.pos = scanstring(self.text, self.pos + 1, True)
        except json.JSONDecodeError as exc:
            raise BodyRefused(f"The body is not valid JSON: {exc}") from None
        if "\x00" in value:
            raise BodyRefused(
                f"A string {self.where()} contains a NUL character (\\u0000), which no command "
                "line or environment variable can carry"
            )
        if not value.isascii() and _SURROGATE.search(value):
            raise BodyRefused(
                f"A string {self.where()} contains a lone UTF-16 surrogate such as \\ud800, "
                "which is not a Unicode character; send the text as UTF-8, or escape a "
                "character outside the BMP as a surrogate pair"
            )
        return value

    def value(self, depth: int, counted: bool = True) -> Any:
        if counted:
            self.count_value()
        text, pos = self.text, self.pos
        char = text[pos : pos + 1]
        if char == '"':
            return self.string()
        if char == "{":
            return self.object(depth)
        if char == "[":
            return self.array(depth)
        for literal, result in (("true", True), ("false", False), ("null", None)):
            if text.startswith(literal, pos):
                self.pos += len(literal)
                return result
        number = _NUMBER.match(text, pos)
        if number is not None:
            self.pos = number.end()
            return self.number(number)
        for constant in ("NaN", "Infinity", "-Infinity"):
            if text.startswith(constant, pos):
                raise BodyRefused(
                    f"{constant} {self.where()} is not a finite number; send a JSON number"
                )
        raise self.syntax("a JSON value")

    def number(self, match: re.Match[str]) -> int | float:
        integer, fraction, exponent = match.groups()
        if fraction or exponent:
            value = float(match.group())
            if not math.isfinite(value):
                raise BodyRefused(
                    f"The number {quote(match.group())} {self.where()} is not finite "
                    "(too large for a 64-bit float)"
                )
            return value
        if len(integer) > 20 or abs(value := int(integer)) > INT64_MAX:
            raise BodyRefused(
                f"The integer {quote(integer)} {self.where()} does not fit in 64 bits"
            )
        return value

    def nest(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise BodyRefused(
                f"The body nests objects and arrays more than {self.limits.max_depth} levels "
                f"deep {self.where()} (MAX_BODY_DEPTH)"
            )

    def object(self, depth: int) -> dict[str, Any]:
        self.nest(depth)
        self.pos += 1
        result: dict[str, Any] = {}
        self.skip_ws()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return result
        while True:
            self.skip_ws()
            key = self.key(result)
            self.expect(":", "':' after a key")
            self.skip_ws()
            result[key] = self.value(depth + 1)
            self.skip_ws()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            self.expect("}", "',' or '}' in an object")
            return result

    def array(self, depth: int, max_items: int | None = None) -> list[Any]:
        """An array; with `max_items` (tasks) its items count against that, not MAX_BODY_VALUES."""
        self.nest(depth)
        self.pos += 1
        result: list[Any] = []
        self.skip_ws()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return result
        while True:
            self.skip_ws()
            result.append(self.value(depth + 1, counted=max_items is None))
            if max_items is not None and len(result) > max_items:
                check_task_count(len(result), max_items)
            self.skip_ws()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            self.expect("]", "',' or ']' in an array")
            return result

    def tasks(self) -> Any:
        """`tasks`, with MAX_TASKS_PER_REQUEST applied while it is read (as lm-eval splits it:
        commas separate names in a string and in each item of a list)."""
        limit = self.limits.max_tasks
        try:
            if self.text.startswith("[", self.pos):
                self.count_value()
                value: Any = self.array(2, limit)
                items = [v for v in value if isinstance(v, str)]
            else:
                value = self.value(2)
                items = [value] if isinstance(value, str) else []
            count = 0
            for item in items:
                # Non-blank comma-separated parts, counted no further than the limit.
                for _ in _TASK_NAME.finditer(item):
                    count += 1
                    if count > limit:
                        break
            check_task_count(count, limit)
        except TaskRequestRefused as exc:
            raise BodyRefused(str(exc)) from None
        return value
