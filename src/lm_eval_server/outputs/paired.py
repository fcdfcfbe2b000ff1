"""Paired significance tests for two runs scored on the same documents. Pure, stdlib only.

Two runs of one task score the same documents, so their per-document scores are paired: a
document one model gets wrong is likely hard for the other too. An unpaired test treats the
two means as independent and, by adding both variances, misses differences that the pairs
show plainly. These tests use the pairs:

- `mcnemar`: McNemar's exact test for 0/1 scores. Only the discordant pairs carry information:
  b documents the baseline got right and the candidate wrong (`regressed`), c the other way
  (`improved`). Under "no difference" each discordant pair is a fair coin, so the two-sided
  p-value is min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]), summed exactly (integers up to
  EXACT_LIMIT discordant pairs, log-space terms beyond, which cost O(n) floats).
- `paired_t`: Student's paired t-test on the per-document differences of any other numeric
  score (partial credit, F1 per sample, ...); the t distribution's tail comes from the
  regularized incomplete beta function (continued fraction), so no SciPy is needed.
- `unpaired_z`: the fallback when per-document scores are missing: |d| / sqrt(se1^2 + se2^2)
  against the normal distribution, from the stderrs lm-eval reported.

Every test costs O(number of pairs) and reads nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Discordant pairs summed as exact integers up to here; a longer sum of big integers would cost
# O(n^2) bit operations, so log-space terms take over (relative error ~1e-13).
EXACT_LIMIT = 5000


@dataclass(frozen=True)
class PairedResult:
    test: str  # "mcnemar" | "paired_t" | "unpaired_z"
    p_value: float | None
    n_paired: int | None
    # McNemar only: documents the candidate got wrong that the baseline got right, and back.
    regressed: int | None = None
    improved: int | None = None
    # The mean per-document difference (candidate - baseline) over the pairs.
    mean_difference: float | None = None


def is_binary(values: Sequence[float]) -> bool:
    return all(v == 0 or v == 1 for v in values)


def mcnemar_p(regressed: int, improved: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts."""
    n = regressed + improved
    k = min(regressed, improved)
    if n == 0:
        return 1.0
    if n <= EXACT_LIMIT:
        term = 1
        total = 1
        for i in range(1, k + 1):
            term = term * (n - i + 1) // i  # C(n, i), exact
            total += term
        # int / int is correctly rounded in Python, however large both are.
        return min(1.0, 2 * total / 2**n)
    log_half_n = n * math.log(0.5)
    logs = [_log_comb(n, i) + log_half_n for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * math.fsum(math.exp(x - top) for x in logs)
    return min(1.0, 2 * tail)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def mcnemar(base: Sequence[float], other: Sequence[float]) -> PairedResult:
    regressed = sum(1 for a, b in zip(base, other, strict=True) if a == 1 and b == 0)
    improved = sum(1 for a, b in zip(base, other, strict=True) if a == 0 and b == 1)
    n = len(base)
    return PairedResult(
        test="mcnemar",
        p_value=mcnemar_p(regressed, improved),
        n_paired=n,
        regressed=regressed,
        improved=improved,
        mean_difference=(improved - regressed) / n if n else None,
    )


def paired_t(base: Sequence[float], other: Sequence[float]) -> PairedResult:
    """Student's paired t-test, two-sided; p is None with fewer than 2 pairs."""
    n = len(base)
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    if n == 0:
        return PairedResult("paired_t", None, 0)
    mean = math.fsum(diffs) / n
    if n < 2:
        return PairedResult("paired_t", None, n, mean_difference=mean)
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    if var == 0:
        # Every pair differs by the same amount: no doubt at all, either way.
        return PairedResult("paired_t", 1.0 if mean == 0 else 0.0, n, mean_difference=mean)
    t = mean / math.sqrt(var / n)
    return PairedResult("paired_t", t_two_sided_p(t, n - 1), n, mean_difference=mean)


def paired(base: Sequence[float], other: Sequence[float]) -> PairedResult:
    """McNemar for 0/1 scores, the paired t-test for anything else."""
    if is_binary(base) and is_binary(other):
        return mcnemar(base, other)
    return paired_t(base, other)


def unpaired_z(delta: float | None, se_base: float | None, se_other: float | None) -> float | None:
    """Two-sided p of |delta| / sqrt(se1^2 + se2^2) under the normal distribution."""
    if delta is None or se_base is None or se_other is None:
        return None
    spread = math.sqrt(se_base * se_base + se_other * se_other)
    if spread == 0:
        return 1.0 if delta == 0 else 0.0
    return math.erfc(abs(delta) / spread / math.sqrt(2))


# ---------------------------------------------------------------- Student's t distribution


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    return min(1.0, max(0.0, regularized_beta(x, df / 2, 0.5)))


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by the continued fraction (modified Lentz), as in Numerical Recipes 6.4."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c = 1.0
    d = 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return h
