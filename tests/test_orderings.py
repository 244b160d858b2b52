"""orderings.py: Kendall's tau-b of a table's ordering against the published ones.

Expected values come from the definition, counted by hand here: concordant and discordant
pairs, tau-b's tie correction, and the exact null distribution of the inversion count for
n = 4 (24 permutations), never from scipy's own routine.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from pathlib import Path

import pytest

from kdbench.aggregate import load_published
from kdbench.orderings import column_means, compare_orderings, kendall
from kdbench.report import add_table_arguments, table_command
from tests.test_aggregate import write_records


def test_one_swapped_pair_of_four_gives_tau_two_thirds_and_the_exact_p() -> None:
    ours = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    theirs = {"a": 40.0, "b": 30.0, "c": 10.0, "d": 20.0}
    tau, p, discordant, rows = kendall(ours, theirs)
    assert rows == ("a", "b", "c", "d")
    # 5 concordant pairs, 1 discordant: (5 - 1) / 6.
    assert tau == pytest.approx(2 / 3)
    # Under the null every order of 4 is equally likely; the number of inversions of a random
    # permutation of 4 is 0..6 with counts 1, 3, 5, 6, 5, 3, 1. |tau| >= 2/3 <=> 1 inversion or
    # fewer, or 5 or more: (1 + 3 + 3 + 1) / 24.
    inversions = [sum(x > y for x, y in itertools.combinations(order, 2))
                  for order in itertools.permutations(range(4))]
    assert sorted(set(inversions)) == list(range(7))
    assert p == pytest.approx(sum(1 for k in inversions if k <= 1 or k >= 5) / 24)
    assert p == pytest.approx(1 / 3)
    assert discordant == [("c", "d", 1.0, -10.0)]


def test_ties_take_tau_b_correction_and_only_shared_keys_count() -> None:
    ours = {"a": 2.0, "b": 2.0, "c": 1.0, "only_ours": 9.0}
    theirs = {"a": 3.0, "b": 2.0, "c": 1.0, "only_theirs": 0.0}
    tau, _, discordant, _ = kendall(ours, theirs)
    # n0 = 3 pairs; one tied in ours; concordant (a, c), (b, c); tau-b = 2 / sqrt(2 * 3).
    assert tau == pytest.approx(2 / math.sqrt(6))
    assert discordant == []
    reversed_theirs = {key: -value for key, value in theirs.items()}
    assert kendall(ours, reversed_theirs)[0] == pytest.approx(-2 / math.sqrt(6))


def _published() -> dict:
    return {
        "sources": {"paper": {"short": "Paper, Table 1"}, "paper_cross": {"short": "cross"},
                    "other": {"short": "Other"}},
        "settings": {
            "x/one": {"source": "paper", "top1": {"teacher": 99.0, "vanilla": 70.0, "kd": 72.0,
                                                  "at": 71.0, "rkd": 70.5}},
            "x/two": {"source": "paper_cross", "top1": {"teacher": 1.0, "vanilla": 70.0,
                                                        "kd": 71.0, "at": 72.0, "rkd": 73.0}},
            "x/three": {"source": "other", "top1": {"vanilla": 1.0, "kd": 2.0, "at": 3.0,
                                                    "rkd": 4.0}},
            "x/few": {"source": "paper", "top1": {"vanilla": 1.0, "kd": 2.0, "at": 3.0}},
        },
    }


def test_every_column_against_every_published_setting_with_enough_common_rows() -> None:
    means = {"mine": {"teacher": 0.0, "vanilla": 80.0, "kd": 83.0, "at": 82.0, "rkd": 81.0,
                      "kd[T=2]": 99.0, "crd+kd": 99.0}}
    orderings = compare_orderings(means, _published())
    by_setting = {agreement.published_setting: agreement for agreement in orderings.agreements}
    # x/few has 3 rows in common: too few to rank. The Teacher, a variant and a composition are
    # not the published rows (the teacher's 0.0 would otherwise reverse every pair).
    assert set(by_setting) == {"x/one", "x/two", "x/three"}
    one = by_setting["x/one"]
    assert one.rows == ("kd", "at", "rkd", "vanilla") and one.tau == pytest.approx(1.0)
    assert one.source == "Paper, Table 1" and one.discordant == ()
    # kd > at > rkd against rkd > at > kd, all above vanilla: 3 concordant, 3 discordant.
    assert by_setting["x/two"].tau == pytest.approx(0.0)
    assert {pair[:2] for pair in by_setting["x/two"].discordant} == {
        ("kd", "at"), ("kd", "rkd"), ("at", "rkd")}
    # The reference: published settings of one family against each other. x/one vs x/two
    # (paper, paper_cross; 4 rows: vanilla < kd, at, rkd in both, the rest reversed); x/three
    # is another source and x/few too small.
    assert orderings.published_taus == (pytest.approx(0.0),)


def test_table_orderings_writes_its_markdown_and_csv_against_the_shipped_numbers(
        tmp_path: Path) -> None:
    published = load_published()["settings"]["cifar100/wrn_40_2-wrn_16_2"]["top1"]
    methods = ["vanilla", "kd", "at", "fitnet", "rkd"]
    # Our means in the published order except KD and AT swapped: one discordant pair of 10.
    order = sorted(methods, key=lambda method: -published[method])
    first, second = order.index("kd"), order.index("at")
    order[first], order[second] = order[second], order[first]
    students = {"mine/wrn_16_2-resnet8": {method: [90.0 - rank + 0.01 * s for s in range(3)]
                                          for rank, method in enumerate(order)}}
    results = write_records(tmp_path / "results", students, {"mine/wrn_16_2-resnet8": 95.0})
    parser = argparse.ArgumentParser()
    add_table_arguments(parser)
    args = parser.parse_args(["--results", str(results), "--orderings", "--format", "markdown",
                              "--out", str(tmp_path / "tables" / "mine.md")])
    assert table_command(args, ["kdbench", "table"]) == 0
    with open(tmp_path / "tables" / "mine.orderings.csv", newline="") as handle:
        rows = {row["published_setting"]: row for row in csv.DictReader(handle)}
    row = rows["cifar100/wrn_40_2-wrn_16_2"]
    assert int(row["n_rows"]) == 5 and int(row["n_discordant"]) == 1
    assert float(row["tau_b"]) == pytest.approx((9 - 1) / 10)
    assert row["discordant"].startswith("at>kd:")
    text = (tmp_path / "tables" / "mine.orderings.md").read_text()
    assert "| mine/wrn_16_2-resnet8 | cifar100/wrn_40_2-wrn_16_2" in text
    # Rows are titled as the table titles them (these records carry no display names).
    assert "1 of 10" in text and "at vs kd (+1.00, -0.84)" in text
    taus = sorted(float(row["tau_b"]) for row in rows.values())
    assert len(taus) == 13  # every published CIFAR-100 setting with 4+ of these rows
    assert f"mine/wrn_16_2-resnet8: median τ_b {taus[6]:.2f} over 13 published settings." in text


def test_column_means_skip_cells_without_a_mean() -> None:
    cells = [{"setting": "s", "row": "kd", "mean": 1.5}, {"setting": "s", "row": "at", "mean": math.nan},
             {"setting": "t", "row": "kd", "mean": None}]
    assert column_means(cells) == {"s": {"kd": 1.5}}
