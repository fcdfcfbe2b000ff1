"""paired.py: McNemar's exact test, the paired t-test, the unpaired z-test, against direct
computations."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from lm_eval_server.outputs import paired


def direct_mcnemar(b: int, c: int) -> float:
    n = b + c
    tail = sum(Fraction(math.comb(n, k), 2**n) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


@pytest.mark.parametrize(
    ("b", "c"),
    [
        (0, 0),
        (0, 1),
        (1, 1),
        (15, 0),
        (0, 15),
        (15, 10),
        (3, 17),
        (40, 0),
        (250, 300),
        (2500, 2400),
    ],
)
def test_mcnemar_equals_the_binomial_sum(b: int, c: int) -> None:
    assert abs(paired.mcnemar_p(b, c) - direct_mcnemar(b, c)) <= 1e-9
    assert paired.mcnemar_p(b, c) == paired.mcnemar_p(c, b)


def test_the_issues_example() -> None:
    # Wrong on the same 65 documents, and on 15 more: 15 discordant pairs, all one way.
    base = [0.0] * 65 + [1.0] * 135
    other = [0.0] * 80 + [1.0] * 120
    result = paired.paired(base, other)
    assert result.test == "mcnemar" and result.n_paired == 200
    assert (result.regressed, result.improved) == (15, 0)
    assert result.p_value == 2 / 2**15  # ~6.1e-5
    assert math.isclose(result.mean_difference or 0, -0.075)


def test_log_space_past_the_exact_limit_agrees_with_exact_sums() -> None:
    b, c = 2700, 2500  # n = 5200 > EXACT_LIMIT: log-space terms
    assert b + c > paired.EXACT_LIMIT
    assert math.isclose(paired.mcnemar_p(b, c), direct_mcnemar(b, c), rel_tol=1e-9)
    # A huge, lopsided table underflows to 0 instead of raising.
    assert paired.mcnemar_p(0, 200_000) == 0.0
    assert paired.mcnemar_p(100_000, 100_000) == 1.0


def t_p_by_integration(t: float, df: int) -> float:
    """P(|T| >= |t|) by Simpson's rule over Student's density (an independent computation)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    steps = 20_000
    h = abs(t) / steps
    inner = density(0) + density(abs(t))
    inner += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 1 - 2 * inner * h / 3


@pytest.mark.parametrize(("t", "df"), [(0.5, 3), (2.0, 10), (2.5, 30), (-1.7, 199), (4.0, 7)])
def test_t_distribution_tail(t: float, df: int) -> None:
    assert abs(paired.t_two_sided_p(t, df) - t_p_by_integration(t, df)) <= 1e-9


def test_paired_t_on_partial_credit() -> None:
    rng = random.Random(7)
    base = [rng.random() for _ in range(50)]
    other = [min(1.0, x + 0.05 + rng.gauss(0, 0.1)) for x in base]
    result = paired.paired(base, other)
    assert result.test == "paired_t" and result.n_paired == 50 and result.regressed is None
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    mean = sum(diffs) / 50
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 49)
    t = mean / (sd / math.sqrt(50))
    assert result.p_value is not None
    assert abs(result.p_value - t_p_by_integration(t, 49)) <= 1e-9
    # Constant differences: certain; none at all: nothing to see; one pair: cannot tell.
    assert paired.paired_t([0.2, 0.4], [0.3, 0.5]).p_value == 0.0
    assert paired.paired_t([0.2, 0.4], [0.2, 0.4]).p_value == 1.0
    assert paired.paired_t([0.2], [0.5]).p_value is None


def test_unpaired_z() -> None:
    assert paired.unpaired_z(0.1, 0.03, 0.04) == math.erfc(0.1 / 0.05 / math.sqrt(2))
    assert paired.unpaired_z(0.01, 0.0, 0.0) == 0.0
    assert paired.unpaired_z(0.0, 0.0, 0.0) == 1.0
    assert paired.unpaired_z(None, 0.1, 0.1) is None
    assert paired.unpaired_z(0.1, None, 0.1) is None
