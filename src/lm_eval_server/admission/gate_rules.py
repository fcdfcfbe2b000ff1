"""The shape of a regression gate: `gate` on POST /job and the body of POST /gate.

A gate names a baseline job and rules over metrics; each rule has exactly one kind:

- `min` / `max`: the candidate's value must be at least / at most this;
- `max_drop`: the candidate may be worse than the baseline by at most this much ("worse" by
  the metric's direction, lm-eval's `higher_is_better`);
- `no_significant_drop: true`: the candidate may not be significantly worse than the baseline
  (the paired test where both logged samples; see outputs/compare.py), at the rule's `alpha`.

`task` and `filter` narrow a rule; without them it applies to every task (and filter) that
reports the metric. What the rules mean is evaluated in outputs/gates.py; this module only
says what a well-formed gate is, so a malformed one is a 422 at submission.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_GATE_RULES = 100
MAX_NAME_CHARS = 200
RULE_KINDS = ("min", "max", "max_drop", "no_significant_drop")
RELATIVE_KINDS = frozenset({"max_drop", "no_significant_drop"})


class GateRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="The task (or group) the rule applies to; default: every task with the metric.",
    )
    metric: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="lm-eval's metric name, e.g. acc."
    )
    filter: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="lm-eval's filter name (e.g. none, strict-match); default: every filter.",
    )
    # Numbers and ids are strict (a JSON number; true or "1" is a typo, not a threshold).
    min: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="Least value allowed."
    )
    max: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="Greatest value allowed."
    )
    max_drop: float | None = Field(
        None,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="How much worse than the baseline the candidate may be (metric units).",
    )
    no_significant_drop: Literal[True] | None = Field(
        None, description="true: fail when the candidate is significantly worse."
    )
    alpha: float | None = Field(
        None,
        gt=0,
        lt=1,
        strict=True,
        description="no_significant_drop's level (default 0.05).",
    )

    @field_validator("no_significant_drop", mode="before")
    @classmethod
    def _json_true(cls, value: object) -> object:
        # A Literal compares by ==, so 1 would pass for true; only the JSON boolean does.
        if value is not None and value is not True:
            raise ValueError("no_significant_drop takes true (the JSON boolean) or nothing")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> GateRule:
        given = [kind for kind in RULE_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            have = ", ".join(given) if given else "none"
            raise ValueError(
                "a gate rule needs exactly one of min, max, max_drop, no_significant_drop "
                f"(this one has {have}), e.g. "
                '{"task": "arc_easy", "metric": "acc", "min": 0.6}'
            )
        if self.alpha is not None and self.no_significant_drop is None:
            raise ValueError("alpha applies to no_significant_drop rules only")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in RULE_KINDS if getattr(self, kind) is not None)


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseline: int | None = Field(
        None,
        ge=1,
        strict=True,
        le=2**62,
        description="The job the candidate is compared with; needed by max_drop and "
        "no_significant_drop rules. Must be visible to the caller.",
    )
    rules: list[GateRule] = Field(min_length=1, max_length=MAX_GATE_RULES)

    @model_validator(mode="after")
    def _baseline_when_needed(self) -> Gate:
        if self.baseline is None and any(r.kind in RELATIVE_KINDS for r in self.rules):
            raise ValueError(
                "max_drop and no_significant_drop rules compare with a baseline: add "
                '"baseline": <job id> to the gate'
            )
        return self


class GateRequest(Gate):
    """POST /gate: the rules, evaluated for two finished jobs."""

    candidate: int = Field(ge=1, le=2**62, strict=True, description="The job the rules judge.")
