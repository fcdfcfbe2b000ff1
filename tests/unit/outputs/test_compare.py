"""compare.py and accept.py: the significance rule, the tables, job lists, negotiation."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from lm_eval_server.api import accept
from lm_eval_server.errors import InvalidRequest
from lm_eval_server.outputs import compare


def results(**tasks: dict[str, Any]) -> dict[str, Any]:
    return {"results": tasks}


def test_rows_deltas_and_significance() -> None:
    runs = [
        (1, results(t={"acc,none": 0.5, "acc_stderr,none": 0.03, "f1,none": 0.4})),
        (2, results(t={"acc,none": 0.6, "acc_stderr,none": 0.04, "f1,none": 0.5})),
        (3, results(t={"acc,none": 0.55, "acc_stderr,none": "N/A"}, u={"em,none": 1.0})),
    ]
    data = compare.compare(runs)
    assert data["jobs"] == [1, 2, 3]
    acc, f1, em = data["rows"]
    assert (acc["task"], acc["metric"], acc["filter"]) == ("t", "acc", "none")
    assert acc["deltas"][0] == 0.0 and math.isclose(acc["deltas"][1], 0.1)
    # 0.1 > 1.96 * 0.05 = 0.098: significant. "N/A" stderr: cannot tell.
    assert acc["significant"] == [False, True, None]
    assert acc["stderrs"] == [0.03, 0.04, "N/A"]
    # No stderr at all: cannot tell; a missing value: no delta.
    assert f1["significant"] == [False, None, None]
    assert f1["values"] == [0.4, 0.5, None] and f1["deltas"][2] is None
    # A row only a later job has.
    assert em["values"] == [None, None, 1.0]
    assert em["deltas"] == [None, None, None] and em["significant"] == [None, None, None]


@pytest.mark.parametrize(
    ("delta", "se", "expected"),
    [
        (0.0980, (0.03, 0.04), False),
        (-0.0981, (0.03, 0.04), True),
        (0.01, (0.0, 0.0), True),
        (0.0, (0.0, 0.0), False),
        (0.5, (None, 0.1), None),
        (0.5, (0.1, "N/A"), None),
        (0.5, (0.1, True), None),
        (None, (0.1, 0.1), None),
    ],
)
def test_significance_rule(delta: float | None, se: tuple[Any, Any], expected: Any) -> None:
    assert compare.significance(delta, *se) is expected


def test_nan_reads_as_missing() -> None:
    data = compare.compare(
        [(1, results(t={"acc,none": float("nan")})), (2, results(t={"acc,none": 0.5}))]
    )
    assert data["rows"][0]["values"] == [None, 0.5]


def test_markdown_escapes_pipes_and_csv_quotes() -> None:
    data = compare.compare(
        [
            (1, results(**{"a|b": {"acc,x,y": 0.5, "acc_stderr,x,y": 0.1}})),
            (2, results(**{"a|b": {"acc,x,y": 0.7, "acc_stderr,x,y": 0.1}})),
        ]
    )
    md = compare.to_markdown(data).splitlines()
    # No samples: the unpaired z-test, p = erfc(0.2 / sqrt(0.02) / sqrt(2)) = erfc(1) = 0.157.
    assert md[2] == (
        "| a\\|b | acc | x,y | 0.5000 ± 0.1000 | 0.7000 ± 0.1000 | +0.2000 | 0.16 (unpaired z) |"
    )
    csv_lines = compare.to_csv(data).splitlines()
    assert csv_lines[0] == (
        "task,metric,filter,value_1,stderr_1,value_2,stderr_2,delta_2,significant_2,"
        "test_2,p_value_2,n_paired_2,regressed_2,improved_2"
    )
    assert csv_lines[1].startswith('a|b,acc,"x,y",0.5,0.1,0.7,0.1,')
    *_, significant, test, p_value, n_paired, regressed, improved = csv_lines[1].split(",")
    assert (significant, test, n_paired, regressed, improved) == ("false", "unpaired_z", "", "", "")
    assert math.isclose(float(p_value), math.erfc(1.0), rel_tol=1e-12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1", "at least 2"),
        ("1,1", "job 1 is listed twice"),
        ("01,1", "job 1 is listed twice"),
        ("1,a", "'a' is not a job id"),
        ("1,+2", "'+2' is not a job id"),
        ("1,²", "'²' is not a job id"),
        ("1,2.0", "'2.0' is not a job id"),
        (",".join(map(str, range(21))), "at most 20"),
        ("1," + "9" * 19, "is not a job id"),
    ],
)
def test_job_lists(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        compare.parse_job_ids(text)


def test_job_list_keeps_order() -> None:
    assert compare.parse_job_ids(" 3, 1 ,2") == [3, 1, 2]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "a/x"),
        ("", "a/x"),
        ("*/*", "a/x"),
        ("b/y", "b/y"),
        ("b/y;q=0.5, a/x;q=0.4", "b/y"),
        ("b/*", "b/y"),
        ("a/*;q=0, */*", "b/y"),
        ("c/z", None),
        ("b/y;q=nan, a/x;q=0.1", "a/x"),
        ("b/y;q=bogus", None),
        ("B/Y", "b/y"),
        ("garbage", None),
    ],
)
def test_accept(header: str | None, expected: str | None) -> None:
    assert accept.preferred(header, ["a/x", "b/y"]) == expected
