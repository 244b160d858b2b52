"""power.py: detectable gaps and seeds needed, against textbook values and simulation.

Textbook: the two-sided two-sample t-test at alpha 0.05 and power 0.8 needs 17 per group for
d = 1 and 64 for d = 0.5 (Cohen 1988, Table 2.4.1). Simulation: synthetic normal draws,
tested with scipy's own Welch / paired t-tests, reject at the rate the formulas predict. The
simulations use fixed seeds and enough draws that the binomial error (about 0.006 at 4000
draws and p = 0.8) is far below the differences they have to catch (0.03-0.07).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kdbench.aggregate import summarize
from kdbench.power import (paired_power, pooled_sd, power_analysis, seeds_needed,
                           smallest_detectable_gap, welch_power)
from kdbench.report import add_table_arguments, table_command
from kdbench.store import load_records

from test_aggregate import A, write_records

COMMITTED = Path(__file__).resolve().parents[1] / "tables" / "records"


def simulated_power(n_a: int, n_b: int, gap: float, level: float, paired: bool = False,
                    draws: int = 4000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    if paired:
        differences = rng.normal(gap, 1.0, (draws, n_a))
        p = stats.ttest_1samp(differences, 0.0, axis=1).pvalue
    else:
        a = rng.normal(gap, 1.0, (draws, n_a))
        b = rng.normal(0.0, 1.0, (draws, n_b))
        p = stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue
    return float((p < level).mean())


def test_textbook_seeds_per_group() -> None:
    for effect, expected in ((1.0, 17), (0.5, 64)):
        needed = seeds_needed(lambda n: welch_power(effect, 1.0, n, n, 0.05))
        assert needed == expected
        # The answer is the *smallest* n: one seed fewer falls short.
        assert welch_power(effect, 1.0, expected - 1, expected - 1, 0.05) < 0.8
    # Power depends on gap / sigma only: 2 points at sigma 2 is d = 1 again.
    assert seeds_needed(lambda n: welch_power(2.0, 2.0, n, n, 0.05)) == 17


def test_seeds_needed_equals_a_linear_search() -> None:
    for effect, level in ((0.3, 0.05), (1.7, 0.01), (0.9, 0.05 / 12)):
        def power(n: int) -> float:
            return welch_power(effect, 1.0, n, n, level)
        linear = next(n for n in range(2, 2000) if power(n) >= 0.8)
        assert seeds_needed(power) == linear
    assert seeds_needed(lambda n: 0.0, most=100) is None  # unreachable: no number


def test_detectable_gap_inverts_the_power() -> None:
    gap = smallest_detectable_gap(lambda g: welch_power(g, 0.7, 5, 5, 0.05 / 9), 0.7)
    assert welch_power(gap, 0.7, 5, 5, 0.05 / 9) == pytest.approx(0.8, abs=1e-8)
    # The paired test on differences of std 1 at n pairs is the one-sample t: ncp = gap sqrt(n).
    gap = smallest_detectable_gap(lambda g: paired_power(g, 1.0, 6, 0.05), 1.0)
    critical = stats.t.ppf(0.975, 5)
    by_hand = (stats.nct.sf(critical, 5, gap * math.sqrt(6))
               + stats.nct.cdf(-critical, 5, gap * math.sqrt(6)))
    assert by_hand == pytest.approx(0.8, abs=1e-8)


@pytest.mark.parametrize("n_a, n_b, level", [(5, 5, 0.05), (5, 5, 0.05 / 9), (3, 6, 0.05),
                                             (2, 5, 0.05), (8, 8, 0.01)])
def test_welch_power_matches_a_simulation(n_a: int, n_b: int, level: float) -> None:
    gap = smallest_detectable_gap(lambda g: welch_power(g, 1.0, n_a, n_b, level), 1.0)
    assert simulated_power(n_a, n_b, gap, level) == pytest.approx(0.8, abs=0.025)


def test_the_fixed_df_shortcut_would_fail_the_simulation() -> None:
    """What the exact integral buys: the textbook formula with df = 2(n - 1) promises 0.80 at
    5 + 5 seeds and level 0.05/9, where Welch's test rejects in about 73 % of draws."""
    level = 0.05 / 9
    critical = stats.t.ppf(1 - level / 2, 8)

    def shortcut(g: float) -> float:
        ncp = g / math.sqrt(2 / 5)
        return stats.nct.sf(critical, 8, ncp) + stats.nct.cdf(-critical, 8, ncp)

    gap = smallest_detectable_gap(shortcut, 1.0)
    simulated = simulated_power(5, 5, gap, level)
    assert simulated < 0.77  # the shortcut overstates the power
    assert welch_power(gap, 1.0, 5, 5, level) == pytest.approx(simulated, abs=0.025)


@pytest.mark.parametrize("n, level", [(4, 0.05), (5, 0.05 / 9)])
def test_paired_power_matches_a_simulation(n: int, level: float) -> None:
    gap = smallest_detectable_gap(lambda g: paired_power(g, 1.0, n, level), 1.0)
    assert simulated_power(n, n, gap, level, paired=True) == pytest.approx(0.8, abs=0.025)


def test_pooled_sd_weights_by_degrees_of_freedom() -> None:
    # (4 * 1 + 2 * 4) / 6 = 2; the n = 1 cell (df 0) carries no information.
    assert pooled_sd([1.0, 2.0, math.nan], [4, 2, 0]) == (pytest.approx(math.sqrt(2)), 6)
    assert math.isnan(pooled_sd([math.nan], [0])[0])


def test_power_analysis_of_a_table(tmp_path: Path) -> None:
    root = write_records(tmp_path, {A: {"vanilla": [73.1, 73.3, 72.9, 73.4, 73.0],
                                        "kd": [74.9, 75.2, 74.7, 75.0, 74.8],
                                        "at": [73.6, 74.3, 73.2, 74.1, 73.9]}}, {A: 75.6})
    summary = summarize(load_records(root))
    analysis = power_analysis(summary, gap=0.5)
    frame = analysis.frame.set_index("comparison")
    # kd is the best: at vs Student, kd vs Student, at vs kd (best); 3 tests, level alpha/3.
    assert sorted(frame.index) == ["at vs Student", "at vs kd (best)", "kd vs Student"]
    assert analysis.level == pytest.approx(0.05 / 3)
    variances = [np.var(v, ddof=1) for v in ([73.1, 73.3, 72.9, 73.4, 73.0],
                                             [74.9, 75.2, 74.7, 75.0, 74.8],
                                             [73.6, 74.3, 73.2, 74.1, 73.9])]
    sigma = math.sqrt(sum(variances) / 3)  # equal n: the plain mean of the variances
    line = frame.loc["kd vs Student"]
    assert line["pooled_sd"] == pytest.approx(sigma)
    assert line["observed_difference"] == pytest.approx(74.92 - 73.14)
    assert welch_power(line["detectable_gap"], sigma, 5, 5, 0.05 / 3) == pytest.approx(0.8,
                                                                                       abs=1e-6)
    needed = line["seeds_needed_for_gap"]
    assert welch_power(0.5, sigma, needed, needed, 0.05 / 3) >= 0.8
    assert welch_power(0.5, sigma, needed - 1, needed - 1, 0.05 / 3) < 0.8
    assert "pooled" in analysis.how and "0.05/3" in analysis.how


def test_paired_power_pools_the_differences(tmp_path: Path) -> None:
    student = [73.1, 73.3, 72.9, 73.4, 73.0]
    kd = [74.9, 75.2, 74.7, 75.0, 74.8]
    root = write_records(tmp_path, {A: {"vanilla": student, "kd": kd}})
    analysis = power_analysis(summarize(load_records(root), paired=True), gap=0.5)
    line = analysis.frame.iloc[0]
    differences = np.subtract(kd, student)
    assert line["pooled_sd"] == pytest.approx(np.std(differences, ddof=1))
    assert line["level"] == pytest.approx(0.05)  # one test: alpha itself
    assert paired_power(line["detectable_gap"], line["pooled_sd"], 5, 0.05) == pytest.approx(
        0.8, abs=1e-6)
    assert "per-seed differences" in analysis.how


def test_table_power_gap_on_the_committed_records(capsys: pytest.CaptureFixture) -> None:
    """The issue's "done when": `table --power --gap 0.5` on the committed records prints the
    detectable gap and the seeds needed per comparison. Expected values recomputed here from
    the record files with pandas and the textbook search."""
    parser = argparse.ArgumentParser()
    add_table_arguments(parser)
    args = parser.parse_args(["--results", str(COMMITTED), "--settings", "fashion_mnist/quick",
                              "--power", "--gap", "0.5"])
    assert table_command(args, ["kdbench", "table"]) == 0
    text = capsys.readouterr().out
    records = [r for r in load_records(COMMITTED) if r["spec"]["setting"] == "fashion_mnist/quick"]
    values = pd.DataFrame([{"method": r["spec"]["method"], "value": r["metrics"]["top1_last"]}
                           for r in records if r["spec"]["role"] == "student"])
    groups = values.groupby("method")["value"]
    sigma = math.sqrt(((groups.count() - 1) * groups.var()).sum() / (groups.count() - 1).sum())
    tests = 2 * (values["method"].nunique() - 1) - 1  # vs Student and vs best, best once
    level = 0.05 / tests
    needed = next(n for n in range(2, 500) if welch_power(0.5, sigma, n, n, level) >= 0.8)
    gap = smallest_detectable_gap(lambda g: welch_power(g, sigma, 5, 5, level), sigma)
    lines = [line for line in text.splitlines() if line.startswith("| fashion_mnist/quick")]
    assert len(lines) == tests
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[3] == f"{sigma:.2f}" and cells[5] == f"{gap:.2f}"
        assert cells[7] == str(needed)
    assert f"alpha/m = 0.05/{tests}" in text
