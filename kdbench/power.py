"""How large a gap the table can detect, and how many seeds a gap of interest needs.

``table --power [--gap G]``: for every comparison of the table's significance family (each
method vs the Student, each row vs the column's best), the smallest true difference of means
that the same test would detect with probability ``TARGET_POWER`` at the table's n, and the
seeds per cell that a gap G needs.

The computation is the exact power of the table's test under normal errors, through the
noncentral t distribution (``scipy.stats.nct``; Cohen 1988, *Statistical Power Analysis for the
Behavioral Sciences*, 2nd ed., ch. 2). Two-sided, both rejection tails counted.

- Paired (``--paired``): over n shared seeds whose differences have std sigma_d,
  power = P(T' > t_c) + P(T' < -t_c) with T' ~ t'(n - 1, gap sqrt(n) / sigma_d) and
  t_c = t_{1 - level/2, n - 1}.
- Welch (the table's default test): Welch's test uses the Welch-Satterthwaite df *estimated*
  from the two sample variances, and that df is random. The common shortcut, the formula
  above with the df at the true variances (2(n - 1) for equal n), overstates the power at a
  few seeds: at 5 + 5 seeds a nominal 0.80 is 0.78 at alpha 0.05 and 0.73 at alpha/9 (in
  simulation and by the integral below; tests/test_power.py). The exact power at a common
  sigma: write the pooled sum of squares S = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / sigma^2 ~
  chi2(nu), nu = n_a + n_b - 2, and its share B = (n_a-1) s_a^2 / (sigma^2 S) ~
  Beta((n_a-1)/2, (n_b-1)/2); S and B are independent (Lukacs 1955). Welch's df depends on B
  only, and given B, Welch's T is k(B) times a noncentral t'(nu, ncp) with ncp =
  gap / (sigma sqrt(1/n_a + 1/n_b)) and k(B) = sqrt((1/n_a + 1/n_b) / (nu h(B))),
  h(B) = B / ((n_a-1) n_a) + (1-B) / ((n_b-1) n_b). So
      power = E_B[ P(|t'(nu, ncp)| > t_{1-level/2, df_W(B)} / k(B)) ],
  a one-dimensional integral, taken by 64-point Gauss-Legendre quadrature over B's quantiles.
  For n_a = n_b, k = 1, and at many seeds df_W -> nu: the two-sample t of the textbooks
  (d = 1 -> 17 per group, d = 0.5 -> 64 at alpha 0.05, power 0.8: Cohen 1988, Table 2.4.1),
  which Welch's test also reaches at those n.

sigma is not known; it is estimated from the table's own spread, pooled per column (setting):
- Welch: the within-cell sample variances of every non-Teacher cell of the column with two or
  more values, weighted by their degrees of freedom, s_p^2 = sum (n_i - 1) s_i^2 / sum (n_i - 1).
  Pooling over the column's cells instead of using each pair's two variances gives a steadier
  estimate (4 df per cell at 5 seeds), and one setting's recipe sets the seed-to-seed spread of
  all its methods to a similar size.
- Paired: the variances of the per-seed differences of the column's tested pairs, pooled the
  same way (n_shared - 1 df each).
The estimate is itself noisy at a few seeds: the numbers are a planning guide, not a bound.

The Holm family enters through the level: Holm's procedure compares the smallest p-value with
alpha/m, the most stringent of its steps, so a test at level alpha/m (m = the table's number of
tests) detects the gap with the stated power whatever its rank in the family. That is
conservative: comparisons tested at later Holm steps need less. Seeds needed assume the family
keeps its size m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from kdbench.aggregate import PAIRED, TEACHER, Summary

# Cohen 1988, §2.4: power 0.80 is the conventional target (a 4:1 ratio of beta to alpha).
TARGET_POWER = 0.8
# Seeds needed above this are reported as "more than MOST_SEEDS" (no experiment runs them).
MOST_SEEDS = 10_000


def lower_tail(critical: np.ndarray | float, df: np.ndarray | float,
               ncp: float) -> np.ndarray:
    """P(T' < -critical) for T' ~ t'(df, ncp), ncp >= 0.

    scipy's nct.cdf returns NaN far out in this tail for some (df, ncp) (e.g. df 8, ncp 8,
    where the probability is below 1e-15); the same probability is nct.sf(critical, df, -ncp)
    by symmetry, which returns a number there (0 where it underflows).
    """
    tail = np.asarray(stats.nct.cdf(-np.asarray(critical), df, ncp), dtype=float)
    if np.isnan(tail).any():
        tail = np.where(np.isnan(tail), stats.nct.sf(critical, df, -ncp), tail)
    return tail


def two_sided_power(df: float, ncp: float, level: float) -> float:
    """P(|T'| > t_{1-level/2, df}) for T' noncentral t with ``df`` and ``ncp``."""
    critical = stats.t.ppf(1 - level / 2, df)
    return float(stats.nct.sf(critical, df, ncp) + lower_tail(critical, df, ncp))


# Gauss-Legendre nodes and weights mapped to probabilities in (0, 1): E[f(B)] is
# sum_i w_i f(F^-1(p_i)) with F the Beta CDF; the quantile transform keeps the integrand smooth
# where Beta's density is infinite (n = 2: Beta(1/2, .)).
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(64)
_PROBABILITIES, _PROBABILITY_WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2


def welch_power(gap: float, sigma: float, n_a: int, n_b: int, level: float) -> float:
    """Exact power of the two-sided Welch test for a true difference ``gap`` when both cells
    have standard deviation ``sigma`` (the integral of the module docstring)."""
    if n_a < 2 or n_b < 2 or not sigma > 0:
        return math.nan
    nu = n_a + n_b - 2
    share = stats.beta.ppf(_PROBABILITIES, (n_a - 1) / 2, (n_b - 1) / 2)
    # s_a^2 / n_a and s_b^2 / n_b in units of sigma^2 S.
    var_a = share / ((n_a - 1) * n_a)
    var_b = (1 - share) / ((n_b - 1) * n_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
    scale = np.sqrt((1 / n_a + 1 / n_b) / (nu * (var_a + var_b)))
    critical = stats.t.ppf(1 - level / 2, df) / scale
    ncp = gap / (sigma * math.sqrt(1 / n_a + 1 / n_b))
    tails = stats.nct.sf(critical, nu, ncp) + lower_tail(critical, nu, ncp)
    return float(np.sum(_PROBABILITY_WEIGHTS * tails))


def paired_power(gap: float, sigma_diff: float, n: int, level: float) -> float:
    """Power of the two-sided paired t-test over ``n`` pairs whose differences have sigma_diff."""
    if n < 2 or not sigma_diff > 0:
        return math.nan
    return two_sided_power(n - 1, gap * math.sqrt(n) / sigma_diff, level)


def smallest_detectable_gap(power_at: Callable[[float], float], scale: float,
                            target: float = TARGET_POWER) -> float:
    """The gap at which ``power_at`` reaches ``target`` (power rises with the gap).

    ``scale`` (the spread) brackets the root: power_at(0) = level < target, and the bracket
    grows until the power passes the target.
    """
    if not math.isfinite(power_at(scale)):
        return math.nan
    high = scale
    while power_at(high) < target:
        high *= 2
        if high > 1e6 * scale:  # n = 2 at a tiny level: the t tails make it unreachable
            return math.inf
    return float(optimize.brentq(lambda gap: power_at(gap) - target, 0.0, high, xtol=1e-10))


def seeds_needed(power_for_n: Callable[[int], float], target: float = TARGET_POWER,
                 most: int = MOST_SEEDS) -> int | None:
    """The smallest n >= 2 with ``power_for_n(n) >= target``; None if above ``most``.

    Power rises with n, so the answer is found by doubling and then bisecting.
    """
    if power_for_n(2) >= target:
        return 2
    low, high = 2, 4
    while power_for_n(high) < target:
        low, high = high, high * 2
        if low > most:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        if power_for_n(middle) >= target:
            high = middle
        else:
            low = middle
    return high if high <= most else None


def pooled_sd(stds: Sequence[float], dfs: Sequence[int]) -> tuple[float, int]:
    """(sqrt(sum df_i s_i^2 / sum df_i), sum df_i) over the entries with df_i >= 1."""
    pairs = [(s, d) for s, d in zip(stds, dfs) if d >= 1 and math.isfinite(s)]
    total = sum(d for _, d in pairs)
    if total == 0:
        return math.nan, 0
    return math.sqrt(sum(d * s * s for s, d in pairs) / total), total


@dataclass(frozen=True)
class PowerAnalysis:
    """One row per comparison; ``how`` says in words how the spread was pooled and the level."""

    frame: pd.DataFrame
    target: float
    gap: float | None
    test: str
    alpha: float
    family_size: int
    level: float
    how: str


POWER_COLUMNS = ["setting", "comparison", "row_a", "row_b", "kinds", "n_a", "n_b",
                 "pooled_sd", "pooled_df", "level", "observed_difference",
                 "detectable_gap", "power_at_gap", "seeds_needed_for_gap"]


# The table's comparisons share n, level and (per setting) sigma: compute each answer once,
# in units of sigma (power depends on gap / sigma only).
@lru_cache(maxsize=None)
def _detectable(paired: bool, n_a: int, n_b: int, level: float, target: float) -> float:
    if paired:
        return smallest_detectable_gap(lambda g: paired_power(g, 1.0, n_a, level), 1.0, target)
    return smallest_detectable_gap(lambda g: welch_power(g, 1.0, n_a, n_b, level), 1.0, target)


@lru_cache(maxsize=None)
def _seeds(paired: bool, effect: float, level: float, target: float) -> int | None:
    if paired:
        return seeds_needed(lambda n: paired_power(effect, 1.0, n, level), target)
    return seeds_needed(lambda n: welch_power(effect, 1.0, n, n, level), target)


def power_analysis(summary: Summary, gap: float | None = None,
                   target: float = TARGET_POWER) -> PowerAnalysis:
    """The detectable gap and, for ``gap``, the power now and the seeds needed, per comparison."""
    paired = summary.test == PAIRED
    family = max(1, summary.n_tests)
    level = summary.alpha / family
    spreads = _column_spreads(summary, paired)
    cells = summary.cells.set_index(["setting", "row"])
    rows = []
    for _, comparison in summary.comparisons.iterrows():
        setting, row_a, row_b = comparison["setting"], comparison["row_a"], comparison["row_b"]
        sigma, df = spreads.get(setting, (math.nan, 0))
        if paired:
            n_a = n_b = int(comparison["n_pairs"])
        else:
            n_a, n_b = int(cells.loc[(setting, row_a), "n"]), int(cells.loc[(setting, row_b), "n"])
        estimable = sigma > 0 and min(n_a, n_b) >= 2
        detectable = sigma * _detectable(paired, n_a, n_b, level, target) if estimable else math.nan
        if gap is not None and estimable:
            power_now = (paired_power(gap, sigma, n_a, level) if paired
                         else welch_power(gap, sigma, n_a, n_b, level))
        else:
            power_now = math.nan
        rows.append({
            "setting": setting,
            "comparison": (f"{summary.titles[row_a]} vs {summary.titles[row_b]}"
                           + (" (best)" if comparison["kinds"] == "vs best" else "")),
            "row_a": row_a,
            "row_b": row_b,
            "kinds": comparison["kinds"],
            "n_a": n_a,
            "n_b": n_b,
            "pooled_sd": sigma,
            "pooled_df": df,
            "level": level,
            "observed_difference": float(cells.loc[(setting, row_a), "mean"]
                                         - cells.loc[(setting, row_b), "mean"]),
            "detectable_gap": detectable,
            "power_at_gap": power_now,
            "seeds_needed_for_gap": (_seeds(paired, gap / sigma, level, target)
                                     if gap is not None and sigma > 0 else None),
        })
    frame = pd.DataFrame(rows, columns=POWER_COLUMNS)
    spread = ("the std of the per-seed differences of the column's tested pairs, pooled over "
              "those pairs (weighted by n - 1)" if paired else
              "the within-cell sample variances of the column's non-Teacher cells, pooled "
              "(weighted by n - 1)")
    test = "paired t-test" if paired else "Welch's t-test"
    how = (f"Two-sided {test} at power {target:g}, through the noncentral t distribution"
           f"{' (exact for Welch: integrated over the random Welch df)' if not paired else ''}. "
           f"Spread per setting: {spread}. Level: alpha/m = {summary.alpha:g}/{family} = "
           f"{level:.4g}, the most stringent step of Holm's procedure over the table's "
           f"{family} test{'s' if family != 1 else ''}, so the gap is detected whatever its "
           "rank in the family (conservative). Seeds needed: per cell"
           f"{' (pairs of shared seeds)' if paired else ', equal in both cells'}, the family "
           "keeping its size.")
    return PowerAnalysis(frame=frame, target=target, gap=gap, test=summary.test,
                         alpha=summary.alpha, family_size=family, level=level, how=how)


def _column_spreads(summary: Summary, paired: bool) -> dict[str, tuple[float, int]]:
    """Per setting: (pooled sd, its degrees of freedom), as the module docstring describes."""
    spreads: dict[str, tuple[float, int]] = {}
    if not paired:
        cells = summary.cells[(summary.cells["method"] != TEACHER) & (summary.cells["n"] >= 2)]
        for setting, column in cells.groupby("setting"):
            spreads[str(setting)] = pooled_sd(list(column["std"]), [n - 1 for n in column["n"]])
        return spreads
    done = summary.runs[(summary.runs["status"] == "done") & summary.runs["value"].notna()]
    for setting, pairs in summary.comparisons.groupby("setting"):
        in_setting = done[done["setting"] == setting]
        stds, dfs = [], []
        for _, pair in pairs.iterrows():
            a = in_setting[in_setting["row"] == pair["row_a"]].set_index("seed")["value"]
            b = in_setting[in_setting["row"] == pair["row_b"]].set_index("seed")["value"]
            shared = a.index.intersection(b.index)
            if len(shared) >= 2:
                stds.append(float(np.std(a[shared].to_numpy() - b[shared].to_numpy(), ddof=1)))
                dfs.append(len(shared) - 1)
        spreads[str(setting)] = pooled_sd(stds, dfs)
    return spreads
