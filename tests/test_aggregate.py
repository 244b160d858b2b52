"""aggregate.py: cells, failures, variants, and the statistics checked against hand formulas.

Records are written with ``Store.write`` and read back with ``load_records``, the same path
``kdbench table`` takes; no training is involved. Expected numbers are computed here from the
formulas (Welch 1947; Holm 1979) or independently with pandas, never by calling the function
under test's own scipy routine.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.special import betainc

from kdbench.aggregate import (ci_halfwidth, dense_ranks, hedges_g, holm, load_published,
                               paired_interval, paired_pvalue, summarize, welch_interval,
                               welch_pvalue)
from kdbench.errors import UserError
from kdbench.store import Store, load_records

A = "cifar100/wrn_40_2-wrn_16_2"
B = "cifar100/resnet56-resnet20"
TEACHERS = {A: 75.61, B: 72.34}
# None: the run failed. B's "at" has no seed 4 at all (a missing run).
STUDENTS = {
    A: {"vanilla": [73.1, 73.3, 72.9, 73.4, 73.0],
        "kd": [74.9, 75.2, 74.7, 75.0, 74.8],
        "at": [74.0, 74.3, 73.8, 74.1, 74.2]},
    B: {"vanilla": [69.0, 69.3, 68.8, 69.1, 69.2],
        "kd": [70.6, 70.9, 70.4, 70.7, None],
        "at": [70.5, 70.2, 70.6, 70.4]},
}


def make_record(setting: str, method: str, seed: int, value: float | None, *,
                role: str = "student", config: dict | None = None,
                overrides: dict | None = None, epochs: int = 240,
                precision: str = "fp32", display_name: str | None = None,
                fidelity: str | None = None, fidelity_note: str | None = None,
                method_sha: str | None = "a" * 64, training_version: int | None = 1,
                teacher_checkpoint: str | None = None, train_subset: int | None = None,
                resolved_config: dict | None = None, **provenance: Any) -> dict[str, Any]:
    """A record in the format documented in kdbench/store.py, with the fields interfaces.md
    adds (method_display_name; provenance fidelity, fidelity_note, method_source_sha256,
    training_version); value None: a failed run. Like train.py, the record's recipe holds the
    spec's overrides and ``config`` the method's resolved config."""
    spec = {"setting": setting, "method": method, "seed": seed, "role": role,
            "config": config or {}, "overrides": overrides or {}, "teacher_seed": 0,
            "teacher_checkpoint": teacher_checkpoint}
    if precision != "fp32":  # kdbench.spec leaves fp32 out of the JSON
        spec["precision"] = precision
    run_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    dataset, pair = setting.split("/")
    teacher, student = pair.split("-") if "-" in pair else ("wrn_16_2", "resnet8")
    done = value is not None
    recipe = {"epochs": epochs, "batch_size": 64, "lr": 0.05}
    record = {
        "id": run_id,
        "status": "done" if done else "failed",
        "spec": spec,
        "setting": {"name": setting, "dataset": dataset, "teacher": teacher,
                    "student": student, "num_classes": 100,
                    "recipe": {**recipe, **(overrides or {})},
                    "teacher_recipe": recipe, "train_subset": train_subset,
                    "recipe_source": "common recipe (RepDistiller/mdistiller)"},
        "config": {**(config or {}), **(resolved_config or {})},
        "metrics": {"top1_last": value, "top1_best": value + 0.25 + 0.01 * seed,
                    "top5_last": 92.0, "top5_best": 92.5, "best_epoch": 200} if done else None,
        "error": None if done else {"type": "RuntimeError", "message": "CUDA out of memory",
                                    "traceback": "...", "step": 123},
        "history": [],
        "provenance": {"git_commit": "0123abc", "finished_at": f"2025-01-0{seed + 1}T00:00",
                       "method_source_sha256": method_sha, "training_version": training_version,
                       "fidelity": fidelity, "fidelity_note": fidelity_note, **provenance},
    }
    if display_name is not None:
        record["method_display_name"] = display_name
    return record


def write_records(root: Path, students: dict[str, dict[str, list[float | None]]],
                  teachers: dict[str, float] | None = None, **kwargs: Any) -> Path:
    store = Store(root)
    for setting, value in (teachers or {}).items():
        store.write(make_record(setting, "vanilla", 0, value, role="teacher", **kwargs))
    for setting, methods in students.items():
        for method, values in methods.items():
            for seed, value in enumerate(values):
                store.write(make_record(setting, method, seed, value, **kwargs))
    return root


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_records(tmp_path / "results", STUDENTS, TEACHERS)


def hand_welch(a: list[float], b: list[float]) -> float:
    """Welch's t and Welch-Satterthwaite df from the formulas; two-sided p from the t
    distribution's tail identity P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return float(betainc(df / 2, 0.5, df / (df + t * t)))


def hand_paired(a: list[float], b: list[float]) -> float:
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    md = sum(d) / n
    sd = math.sqrt(sum((x - md) ** 2 for x in d) / (n - 1))
    t = md / (sd / math.sqrt(n))
    df = n - 1
    return float(betainc(df / 2, 0.5, df / (df + t * t)))


def hand_holm(p: list[float]) -> list[float]:
    """Holm (1979) step-down, written as the textbook loop."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def done_values(setting: str, method: str) -> list[float]:
    return [v for v in STUDENTS[setting][method] if v is not None]


# ---------------------------------------------------------------------------------------------
# The statistics on fixed examples
# ---------------------------------------------------------------------------------------------

def test_holm_matches_a_hand_computed_example() -> None:
    # m = 4: sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Capped at 1 and monotone: 0.5*2 = 1.0, then max(0.6, 1.0).
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_holm_leaves_untestable_pairs_out_of_the_family() -> None:
    adjusted = holm([0.2, math.nan, 0.01])
    assert math.isnan(adjusted[1])
    assert adjusted[[0, 2]] == pytest.approx([0.2, 0.02])  # m = 2, not 3
    assert np.isnan(holm([math.nan])).all() and holm([]).size == 0


def test_welch_matches_the_formula() -> None:
    a, b = [74.9, 75.2, 74.7, 75.0, 74.8], [73.1, 73.3, 72.9, 73.4, 73.0, 73.9]
    assert welch_pvalue(a, b) == pytest.approx(hand_welch(a, b), rel=1e-9)
    # Unequal variances and sizes, a non-significant difference.
    a, b = [70.1, 71.5, 69.8], [70.6, 70.7, 70.5, 70.9]
    expected = hand_welch(a, b)
    assert 0.05 < expected < 1
    assert welch_pvalue(a, b) == pytest.approx(expected, rel=1e-9)


def test_paired_matches_the_formula() -> None:
    a, b = [74.9, 75.2, 74.7, 75.0, 74.8], [74.0, 74.3, 73.8, 74.1, 74.5]
    assert paired_pvalue(a, b) == pytest.approx(hand_paired(a, b), rel=1e-9)


def test_tests_need_two_values_and_spread() -> None:
    assert math.isnan(welch_pvalue([70.0], [71.0, 72.0]))
    assert math.isnan(welch_pvalue([70.0, 70.0], [71.0, 71.0]))
    assert math.isnan(paired_pvalue([70.0, 71.0], [69.0, 70.0]))  # constant shift
    assert math.isnan(paired_pvalue([70.0], [69.0]))


def test_ci_halfwidth_uses_the_t_quantile() -> None:
    # n = 2: t with 1 df is the Cauchy distribution, whose 0.975 quantile is tan(0.475 pi).
    assert ci_halfwidth(0.5, 2) == pytest.approx(math.tan(0.475 * math.pi) * 0.5 / math.sqrt(2))
    assert math.isnan(ci_halfwidth(math.nan, 1))


def test_dense_ranks_at_shown_precision() -> None:
    ranks = dense_ranks({"a": 71.104, "b": 71.096, "c": 70.6, "d": math.nan}, decimals=2)
    assert ranks == {"a": 1, "b": 1, "c": 2}  # 71.10 == 71.10: a tie, and c is second
    assert dense_ranks({"only": 70.0}, decimals=2) == {"only": 1}


# ---------------------------------------------------------------------------------------------
# Records -> cells
# ---------------------------------------------------------------------------------------------

def test_cells_equal_pandas_computed_from_the_records(results: Path) -> None:
    records = load_records(results)
    summary = summarize(records)
    flat = pd.DataFrame([{"setting": r["spec"]["setting"], "role": r["spec"]["role"],
                          "method": r["spec"]["method"], "status": r["status"],
                          "value": (r["metrics"] or {}).get("top1_last")} for r in records])
    done = flat[flat["status"] == "done"]
    expected = done.groupby(["setting", "role", "method"])["value"].agg(["mean", "std", "count"])
    for (setting, role, method), row in expected.iterrows():
        key = "teacher" if role == "teacher" else method
        cell = summary.cell(setting, key)
        assert cell["mean"] == pytest.approx(row["mean"])
        assert cell["n"] == row["count"]
        if row["count"] > 1:
            assert cell["std"] == pytest.approx(row["std"])  # pandas' default is ddof = 1
        else:
            assert math.isnan(cell["std"])
    assert summary.rows == ["teacher", "vanilla", "at", "kd"]  # Teacher, Student, alphabetical
    assert summary.settings == sorted([A, B])


def test_failed_and_missing_runs_are_counted_and_reported(results: Path) -> None:
    summary = summarize(load_records(results))
    kd = summary.cell(B, "kd")
    assert (kd["n"], kd["n_failed"], kd["n_missing"], kd["n_expected"]) == (4, 1, 0, 5)
    assert kd["mean"] == pytest.approx(np.mean(done_values(B, "kd")))
    at = summary.cell(B, "at")
    assert (at["n"], at["n_failed"], at["n_missing"], at["n_expected"]) == (4, 0, 1, 5)
    notes = "\n".join(summary.notes)
    assert "resnet56-resnet20, kd: seed 4 failed" in notes and "CUDA out of memory" in notes
    assert "resnet56-resnet20, at: no record for seed 4" in notes
    assert len(kd["failed_run_ids"]) == 1


def test_significance_and_holm_over_the_whole_table(results: Path) -> None:
    summary = summarize(load_records(results))
    # The family: per column, each method vs Student, and each non-best row vs the best (kd);
    # kd vs Student is one pair, tested once.
    pairs = [(s, "kd", "vanilla") for s in (A, B)] + [(s, "at", "vanilla") for s in (A, B)] \
        + [(s, "at", "kd") for s in (A, B)]
    raw = [hand_welch(done_values(s, x), done_values(s, y)) for s, x, y in pairs]
    adjusted = dict(zip(pairs, hand_holm(raw)))
    raw_by_pair = dict(zip(pairs, raw))
    assert summary.n_tests == 6
    for setting in (A, B):
        kd, at, student = (summary.cell(setting, r) for r in ("kd", "at", "vanilla"))
        assert kd["best_row"] == "kd"
        assert kd["p_vs_student"] == pytest.approx(raw_by_pair[(setting, "kd", "vanilla")])
        assert kd["p_vs_student_holm"] == pytest.approx(adjusted[(setting, "kd", "vanilla")])
        assert at["p_vs_student_holm"] == pytest.approx(adjusted[(setting, "at", "vanilla")])
        assert at["p_vs_best_holm"] == pytest.approx(adjusted[(setting, "at", "kd")])
        assert student["p_vs_best_holm"] == pytest.approx(adjusted[(setting, "kd", "vanilla")])
        assert math.isnan(kd["p_vs_best"])  # the best is not tested against itself
        assert math.isnan(summary.cell(setting, "teacher")["p_vs_student"])  # nor the teacher


def test_paired_uses_the_shared_seeds(results: Path) -> None:
    summary = summarize(load_records(results), paired=True)
    kd_b = done_values(B, "kd")  # seeds 0-3
    student_b = STUDENTS[B]["vanilla"][:4]
    assert summary.cell(B, "kd")["p_vs_student"] == pytest.approx(hand_paired(kd_b, student_b))
    assert summary.cell(B, "kd")["n_vs_student"] == 4
    assert any("paired over the 4 seeds" in note for note in summary.notes)


def test_metric_best_epoch_and_ci(results: Path) -> None:
    summary = summarize(load_records(results), metric="best", confidence=0.95)
    values = [v + 0.25 + 0.01 * seed for seed, v in enumerate(STUDENTS[A]["kd"])]
    cell = summary.cell(A, "kd")
    assert cell["mean"] == pytest.approx(np.mean(values))
    std = np.std(values, ddof=1)
    assert cell["ci_halfwidth"] == pytest.approx(2.7764451051977987 * std / math.sqrt(5))
    assert summary.metric == "top1_best"


def test_ranks_ties_and_a_column_with_one_method(tmp_path: Path) -> None:
    tie = "synthetic/tie"
    lone = "synthetic/lone"
    write_records(tmp_path, {
        tie: {"vanilla": [70.0, 70.2], "m1": [71.0, 71.2], "m2": [71.2, 71.0],
              "m3": [70.5, 70.7]},
        lone: {"vanilla": [60.0, 61.0]},
    }, {tie: 75.0, lone: 65.0})
    summary = summarize(load_records(tmp_path))
    ranks = {row: summary.cell(tie, row)["rank"] for row in ("vanilla", "m1", "m2", "m3")}
    assert ranks == {"vanilla": 3, "m1": 1, "m2": 1, "m3": 2}
    assert summary.cell(lone, "vanilla")["rank"] == 1
    assert math.isnan(summary.cell(tie, "teacher")["rank"])  # the teacher is never ranked


def test_methods_filter_and_order(results: Path) -> None:
    summary = summarize(load_records(results), methods=["kd", "at"], settings=["*wrn*"])
    assert summary.rows == ["teacher", "vanilla", "kd", "at"]
    assert summary.settings == [A]
    with pytest.raises(UserError, match="no records for method 'crd'"):
        summarize(load_records(results), methods=["crd"])
    with pytest.raises(UserError, match="no records for setting 'imagenet/\\*'"):
        summarize(load_records(results), settings=["imagenet/*"])
    with pytest.raises(UserError, match="unknown metric"):
        summarize(load_records(results), metric="top3")


def test_config_variants_become_separate_rows(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed, (v2, v4) in enumerate([(74.0, 74.9), (74.2, 75.1)]):
        store.write(make_record(A, "kd", seed, v2, config={"T": 2}))
        store.write(make_record(A, "kd", seed, v4, config={"T": 4}))
        store.write(make_record(A, "vanilla", seed, 73.0 + seed))
    summary = summarize(load_records(tmp_path))
    assert summary.rows == ["vanilla", "kd[T=2]", "kd[T=4]"]
    assert summary.cell(A, "kd[T=4]")["mean"] == pytest.approx(75.0)
    # The key is what --methods takes; the title is what a paper prints.
    assert summary.cell(A, "kd[T=2]")["title"] == "kd (T = 2)"
    only = summarize(load_records(tmp_path), methods=["kd[T=4]"])
    assert only.rows == ["vanilla", "kd[T=4]"]


def test_two_student_experiments_in_a_column_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(2):
        store.write(make_record(A, "vanilla", seed, 73.0 + seed))
        store.write(make_record(A, "vanilla", seed, 60.0 + seed, overrides={"epochs": 2}))
        store.write(make_record(A, "kd", seed, 74.0 + seed))
    with pytest.raises(UserError, match="2 different Student.*vanilla\\[epochs=2\\]"):
        summarize(load_records(tmp_path))
    summary = summarize(load_records(tmp_path), methods=["vanilla[epochs=2]", "kd"])
    assert summary.cell(A, "vanilla[epochs=2]")["mean"] == pytest.approx(60.5)
    assert summary.cell(A, "vanilla[epochs=2]")["title"] == "Student (epochs = 2)"


def test_a_seed_recorded_twice_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record = make_record(A, "kd", 0, 74.0)
    store.write(record)
    store.write({**record, "id": "copy0000000000"})
    with pytest.raises(UserError, match="seed 0: 2 records.*copy0000000000"):
        summarize(load_records(tmp_path))


def test_published_numbers_and_the_two_std_check(results: Path) -> None:
    published = load_published()
    summary = summarize(load_records(results), published=published)
    kd = summary.cell(A, "kd")
    assert kd["published"] == 74.92
    assert not kd["published_outside_2std"]  # ours 74.92 ± 0.19
    student = summary.cell(A, "vanilla")  # ours 73.14 ± 0.21, published 73.26
    assert student["published"] == 73.26 and not student["published_outside_2std"]
    # 2 std: mean 69.08, std 0.192 in column B; published student 69.06 is inside.
    assert not summary.cell(B, "vanilla")["published_outside_2std"]
    assert summary.cell(B, "at")["published"] == 70.55
    assert "repdistiller" in summary.published_sources
    far = write_records(results.parent / "far", {A: {"vanilla": [70.0, 70.1, 70.2]}})
    cell = summarize(load_records(far), published=published).cell(A, "vanilla")
    assert cell["published_outside_2std"]  # 73.26 is 30 std from 70.1


def test_published_file_covers_the_spec_tables() -> None:
    published = load_published()
    settings = published["settings"]
    assert settings["cifar100/resnet32x4-resnet8x4"]["top1"]["crd"] == 75.51
    assert settings["cifar100/vgg13-vgg8"]["top1"]["vanilla"] == 70.36
    assert settings["cifar100/wrn_22_4-wrn_10_4"]["top1"] == {
        "teacher": 77.22, "vanilla": 71.62, "kd": 71.88, "mhgd": 72.79}
    for name, entry in settings.items():
        source = published["sources"][entry["source"]]
        assert source["citation"] and source["aggregate"]
        # A CIFAR entry's own numbers are last-epoch ones, best-epoch sources under its
        # "also"; the ImageNet settings have only mdistiller's best-epoch README numbers.
        assert source["epoch"] == ("best" if name.startswith("imagenet/") else "last")
    # mdistiller's DKD rows (README, best epoch), one per same-family column and per
    # cross-family column that kdbench has (its "ResNet32x4 -> MobileNet-V2" one is left out).
    dkd = {setting: also["top1"]["dkd"] for setting, entry in settings.items()
           for also in entry.get("also", []) if also["source"] == "mdistiller"}
    assert dkd == {"cifar100/resnet56-resnet20": 71.97, "cifar100/resnet110-resnet32": 74.11,
                   "cifar100/resnet32x4-resnet8x4": 76.32, "cifar100/wrn_40_2-wrn_16_2": 76.23,
                   "cifar100/wrn_40_2-wrn_40_1": 74.81, "cifar100/vgg13-vgg8": 74.68,
                   "cifar100/resnet32x4-shufflenet_v1": 76.45,
                   "cifar100/wrn_40_2-shufflenet_v1": 76.70, "cifar100/vgg13-mobilenetv2": 69.71,
                   "cifar100/resnet50-mobilenetv2": 70.35}
    assert published["sources"]["mdistiller"]["epoch"] == "best"
    # RepDistiller README's cross-family table and resnet110 -> resnet20 column (specs/zoo.md).
    cross = settings["cifar100/resnet32x4-shufflenet_v1"]
    assert cross["source"] == "repdistiller_cross_family"
    assert cross["top1"]["teacher"] == 79.42 and cross["top1"]["crd"] == 75.11
    assert settings["cifar100/resnet50-mobilenetv2"]["top1"]["nst"] == 64.96
    assert settings["cifar100/resnet110-resnet20"]["top1"]["kd"] == 70.67
    assert "fsp" not in settings["cifar100/wrn_40_2-wrn_40_1"]["top1"]  # N/A in the README


def test_published_numbers_are_compared_only_at_their_own_epoch(results: Path) -> None:
    """A best-epoch number (mdistiller's DKD) next to a best-epoch mean, a last-epoch one
    (RepDistiller's) next to a last-epoch mean, never across."""
    published = load_published()
    root = write_records(results.parent / "dkd", {A: {"dkd": [76.0, 76.2, 76.1], "kd": [74.9, 75.0, 74.8]}})
    last = summarize(load_records(root), published=published, metric="top1_last")
    best = summarize(load_records(root), published=published, metric="top1_best")
    assert math.isnan(last.cell(A, "dkd")["published"]) and last.cell(A, "kd")["published"] == 74.92
    assert best.cell(A, "dkd")["published"] == 76.23 and math.isnan(best.cell(A, "kd")["published"])
    assert set(best.published_sources) == {"mdistiller"} and set(last.published_sources) == {"repdistiller"}


def test_compare_published_knows_a_cross_family_setting(tmp_path: Path) -> None:
    """`table --compare-published` on cifar100/resnet32x4-shufflenet_v1: RepDistiller's
    last-epoch numbers for KD and the student, mdistiller's best-epoch DKD, each at its epoch."""
    setting = "cifar100/resnet32x4-shufflenet_v1"
    root = write_records(tmp_path / "results", {setting: {"vanilla": [70.4, 70.6, 70.5],
                                                          "kd": [74.0, 74.2, 74.1],
                                                          "dkd": [76.3, 76.5, 76.4]}},
                         {setting: 79.4})
    published = load_published()
    last = summarize(load_records(root), published=published, metric="top1_last")
    assert last.cell(setting, "kd")["published"] == 74.07
    assert last.cell(setting, "vanilla")["published"] == 70.50
    assert not last.cell(setting, "kd")["published_outside_2std"]
    assert set(last.published_sources) == {"repdistiller_cross_family"}
    best = summarize(load_records(root), published=published, metric="top1_best")
    assert best.cell(setting, "dkd")["published"] == 76.45


def test_published_numbers_name_real_settings_and_rows() -> None:
    """Every published setting exists, and every row key is the teacher, the student or a
    method name of the zoo (a misspelt key would silently never match a cell)."""
    from kdbench import settings as kdbench_settings

    zoo = {"kd", "fitnet", "at", "rkd", "mhgd", "sp", "cc", "vid", "pkt", "ab", "ft", "fsp", "nst",
           "crd", "dkd"}
    published = load_published()
    for name, entry in published["settings"].items():
        assert name in kdbench_settings.SETTINGS, name
        for top1 in [entry["top1"]] + [also["top1"] for also in entry.get("also", [])]:
            assert set(top1) <= {"teacher", "vanilla"} | zoo, name
            assert all(0 < value < 100 for value in top1.values()), name
    cross_family = [entry for entry in published["settings"].values()
                    if entry["source"] == "repdistiller_cross_family"]
    # 6 columns; 14 rows each: teacher, student and every method but FSP
    assert len(cross_family) == 6
    assert all(len(entry["top1"]) == 14 and "fsp" not in entry["top1"] for entry in cross_family)


def test_aggregation_modules_import_no_torch() -> None:
    code = ("import sys, kdbench.aggregate, kdbench.tables, kdbench.report, kdbench.power, "
            "kdbench.rows, kdbench.figure, kdbench.latex_pdf, kdbench.revision, "
            "kdbench.datasets; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --- precision: bf16 runs are other experiments than fp32 ones --------------------------------

def test_bf16_runs_never_share_a_cell_with_fp32_runs(tmp_path: Path) -> None:
    """The same grid in fp32 and bf16 in one results directory: without --precision the two
    Student experiments are refused (the reference must be one experiment); with it, each
    table holds exactly its precision's runs, under the one fp32 teacher, and says so."""
    from kdbench.tables import Layout, render_markdown

    fp32 = {A: {"vanilla": [73.1, 73.3, 72.9], "kd": [74.9, 75.2, 74.7]}}
    bf16 = {A: {"vanilla": [73.0, 73.4, 72.8], "kd": [75.1, 74.8, 74.6]}}
    root = write_records(tmp_path / "results", fp32, {A: 75.61})
    write_records(root, bf16, precision="bf16")
    records = load_records(root)
    with pytest.raises(UserError, match="different Student"):
        summarize(records)
    for precision, values in (("fp32", fp32), ("bf16", bf16)):
        summary = summarize(records, precision=precision)
        cells = summary.cells.set_index("row")
        for method in ("vanilla", "kd"):
            assert cells.loc[method, "mean"] == pytest.approx(np.mean(values[A][method]))
            assert cells.loc[method, "n"] == 3
        assert cells.loc["teacher", "mean"] == pytest.approx(75.61)
        text = render_markdown(summary, Layout())
        assert ("bf16 autocast" in text) == (precision == "bf16")
        assert ("Arithmetic: fp32." in text) == (precision == "fp32")
    with pytest.raises(UserError, match="no student runs made at precision bf16"):
        summarize(load_records(write_records(tmp_path / "only-fp32", fp32, {A: 75.61})), precision="bf16")


# --- effect sizes -----------------------------------------------------------------------------

def test_welch_interval_and_hedges_g_by_hand() -> None:
    a, b = [74.9, 75.2, 74.7, 75.0, 74.8], [73.1, 73.3, 72.9, 73.4, 73.0, 73.9]
    ma, mb = sum(a) / 5, sum(b) / 6
    va = sum((x - ma) ** 2 for x in a) / 4
    vb = sum((x - mb) ** 2 for x in b) / 5
    se2 = va / 5 + vb / 6
    df = se2 ** 2 / ((va / 5) ** 2 / 4 + (vb / 6) ** 2 / 5)
    half = stats_t_quantile(0.975, df) * math.sqrt(se2)
    assert welch_interval(a, b) == pytest.approx((ma - mb - half, ma - mb + half))
    pooled = math.sqrt((4 * va + 5 * vb) / 9)
    # Hedges' J at df = 9 from the gamma functions: Gamma(4.5) / (sqrt(4.5) Gamma(4)).
    j = math.gamma(4.5) / (math.sqrt(4.5) * math.gamma(4.0))
    assert j == pytest.approx(1 - 3 / (4 * 9 - 1), abs=2e-3)  # Hedges' approximation agrees
    assert hedges_g(a, b) == pytest.approx(j * (ma - mb) / pooled)
    assert hedges_g(b, a) == pytest.approx(-hedges_g(a, b))  # antisymmetric
    assert math.isnan(hedges_g([1.0], [1.0, 2.0])) and math.isnan(welch_interval([1.0], b)[0])


def stats_t_quantile(q: float, df: float) -> float:
    """The t quantile by bisection on the regularised incomplete beta (independent of ppf)."""
    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        tail = 0.5 * float(betainc(df / 2, 0.5, df / (df + middle * middle)))
        low, high = (middle, high) if 1 - tail < q else (low, middle)
    return (low + high) / 2


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    a, b = [74.9, 75.2, 74.7, 75.0, 74.8], [74.0, 74.3, 73.8, 74.1, 74.5]
    d = [x - y for x, y in zip(a, b)]
    md = sum(d) / 5
    sd = math.sqrt(sum((x - md) ** 2 for x in d) / 4)
    half = stats_t_quantile(0.975, 4) * sd / math.sqrt(5)
    assert paired_interval(a, b) == pytest.approx((md - half, md + half))


def test_cells_carry_effect_sizes_following_the_test(results: Path) -> None:
    welch = summarize(load_records(results)).cell(A, "kd")
    low, high = welch_interval(STUDENTS[A]["kd"], STUDENTS[A]["vanilla"])
    assert (welch["delta_ci_low"], welch["delta_ci_high"]) == pytest.approx((low, high))
    assert welch["hedges_g"] == pytest.approx(hedges_g(STUDENTS[A]["kd"], STUDENTS[A]["vanilla"]))
    assert low < welch["delta"] < high
    paired = summarize(load_records(results), paired=True).cell(B, "kd")  # seeds 0-3 shared
    low, high = paired_interval(done_values(B, "kd"), STUDENTS[B]["vanilla"][:4])
    assert (paired["delta_ci_low"], paired["delta_ci_high"]) == pytest.approx((low, high))
    summary = summarize(load_records(results))
    assert math.isnan(summary.cell(A, "vanilla")["delta_ci_low"])  # no interval to itself


def test_comparisons_are_the_holm_family_oriented_method_vs_reference(results: Path) -> None:
    summary = summarize(load_records(results))
    family = summary.comparisons
    assert len(family) == summary.n_tests == 6
    pairs = set(zip(family["setting"], family["row_a"], family["row_b"]))
    assert (A, "kd", "vanilla") in pairs and (A, "at", "kd") in pairs
    kd = family[(family["setting"] == A) & (family["row_a"] == "kd")].iloc[0]
    assert kd["kinds"] == "vs student, vs best"  # the best vs Student: one test, two roles
    assert kd["p_holm"] == pytest.approx(summary.cell(A, "kd")["p_vs_student_holm"])


# --- titles, versions, fidelity ---------------------------------------------------------------

def test_titles_come_from_the_records_display_names(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(2):
        store.write(make_record(A, "vanilla", seed, 73.0 + seed, display_name="Vanilla"))
        store.write(make_record(A, "fitnet", seed, 74.0 + seed, display_name="FitNets"))
        store.write(make_record(A, "crd+kd", seed, 75.0 + seed, display_name="CRD + KD"))
        store.write(make_record(A, "rkd", seed, 73.5 + seed))  # an old record: no display name
    summary = summarize(load_records(tmp_path))
    assert summary.titles == {"vanilla": "Student", "crd+kd": "CRD + KD", "fitnet": "FitNets",
                              "rkd": "rkd"}
    renamed = summarize(load_records(tmp_path), labels={"rkd": "RKD", "vanilla": "Baseline"})
    assert renamed.titles["rkd"] == "RKD" and renamed.titles["vanilla"] == "Baseline"
    with pytest.raises(UserError, match="--label dkd=.*no such row"):
        summarize(load_records(tmp_path), labels={"dkd": "DKD"})
    with pytest.raises(UserError, match="two rows the title 'FitNets'"):
        summarize(load_records(tmp_path), labels={"rkd": "FitNets"})


def test_variant_titles_are_printable_with_resolved_values(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(2):
        store.write(make_record(A, "vanilla", seed, 73.0 + seed))
        # The default run stores no T in its spec; its record's config says T was 4.0.
        store.write(make_record(A, "kd", seed, 74.0 + seed, display_name="KD",
                                resolved_config={"T": 4.0, "logit_standardization": False}))
        store.write(make_record(A, "kd", seed, 74.5 + seed, config={"T": 2.0}, display_name="KD",
                                resolved_config={"logit_standardization": False}))
        store.write(make_record(A, "kd", seed, 75.0 + seed, config={"logit_standardization": True},
                                display_name="KD + LS", resolved_config={"T": 4.0}))
        store.write(make_record(A, "at", seed, 74.2 + seed, overrides={"epochs": 5}))
        store.write(make_record(A, "at", seed, 74.1 + seed))
    summary = summarize(load_records(tmp_path))
    titles = {row: summary.titles[row] for row in summary.rows}
    # Keys keep the spec's view; titles print values ("default" becomes the number used), and
    # the LS field is left out because the display names already tell those rows apart.
    assert titles["kd[T=default,logit_standardization=default]"] == "KD (T = 4)"
    assert titles["kd[T=2.0,logit_standardization=default]"] == "KD (T = 2)"
    assert titles["kd[T=default,logit_standardization=true]"] == "KD + LS (T = 4)"
    assert titles["at[epochs=5]"] == "at (epochs = 5)"
    assert titles["at[epochs=default]"] == "at (epochs = 240)"
    assert not any("default" in title or "[" in title for title in titles.values())
    # Renaming the method renames every variant alike, so the LS field must now be printed.
    one = summarize(load_records(tmp_path), labels={"kd": "Hinton KD"})
    assert (one.titles["kd[T=2.0,logit_standardization=default]"]
            == "Hinton KD (T = 2, logit_standardization = off)")
    assert (one.titles["kd[T=default,logit_standardization=true]"]
            == "Hinton KD (T = 4, logit_standardization = on)")
    row = summarize(load_records(tmp_path), labels={"at[epochs=5]": "AT, short"})
    assert row.titles["at[epochs=5]"] == "AT, short"
    assert row.titles["at[epochs=default]"] == "at (epochs = 240)"


def test_two_versions_in_a_cell_are_refused_unless_pooled(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(4):
        store.write(make_record(A, "vanilla", seed, 73.0 + 0.1 * seed))
        # Seeds 2 and 3 of kd were made after methods/kd.py changed.
        store.write(make_record(A, "kd", seed, 74.0 + 0.1 * seed,
                                method_sha=("a" if seed < 2 else "b") * 64))
    with pytest.raises(UserError, match=r"kd: its 4 records come from 2 versions.*"
                                        r"2 from sha256 aaaaaaaaaaaa.*--pool-versions"):
        summarize(load_records(tmp_path))
    summary = summarize(load_records(tmp_path), pool_versions=True)
    kd = summary.cell(A, "kd")
    assert kd["n"] == 4 and kd["version_mark"] and summary.pooled_versions == 1
    assert not summary.cell(A, "vanilla")["version_mark"]
    assert any("pooled over 2 code versions" in note for note in summary.notes)


def test_an_engine_version_change_is_a_version_change(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(2):
        store.write(make_record(A, "kd", seed, 74.0 + seed, training_version=1 + seed))
    with pytest.raises(UserError, match="training_version 1.*training_version 2|training_version 2.*training_version 1"):
        summarize(load_records(tmp_path))


def test_a_row_with_one_version_per_column_is_marked(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(2):
        for setting, sha in ((A, "a"), (B, "b")):
            store.write(make_record(setting, "vanilla", seed, 73.0 + seed))
            store.write(make_record(setting, "kd", seed, 74.0 + seed, method_sha=sha * 64))
    summary = summarize(load_records(tmp_path))  # no cell pools: allowed, but marked
    assert summary.cell(A, "kd")["version_mark"] and summary.cell(B, "kd")["version_mark"]
    assert not summary.cell(A, "vanilla")["version_mark"]
    assert any("kd: its columns come from different code versions" in n for n in summary.notes)


def test_a_reading_of_the_paper_gets_a_footnote(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in range(2):
        store.write(make_record(A, "vanilla", seed, 73.0 + seed, fidelity="paper"))
        store.write(make_record(A, "crg", seed, 74.0 + seed, display_name="CRG",
                                fidelity="reading of the paper",
                                fidelity_note="only the abstract is public"))
    summary = summarize(load_records(tmp_path))
    assert summary.cell(A, "crg")["reading"] and not summary.cell(A, "vanilla")["reading"]
    assert summary.footnotes == ["CRG: kdbench's reading of the paper, whose full details are "
                                 "not public (only the abstract is public)"]


# --- the teacher, published protocols ---------------------------------------------------------

def test_a_given_teacher_checkpoint_is_named_in_the_columns(tmp_path: Path) -> None:
    store = Store(tmp_path)
    checksum = "c" * 64
    store.write(make_record(A, "vanilla", 0, 76.0, role="teacher", teacher_checkpoint=checksum,
                            teacher_checkpoint_file="wrn40.pth", epochs=8))
    for seed in range(2):
        store.write(make_record(A, "kd", seed, 74.0 + seed, teacher_checkpoint=checksum))
    column = summarize(load_records(tmp_path)).column(A)
    assert column["teacher_checkpoint"] == checksum
    assert column["teacher_checkpoint_file"] == "wrn40.pth"
    assert column["teacher_epochs"] is None and not column["trained_teacher"]


def test_published_numbers_are_compared_only_at_the_same_epoch(results: Path) -> None:
    published = {
        "sources": {"last": {"short": "R", "epoch": "last", "aggregate": "mean of 5"},
                    "best": {"short": "M", "epoch": "best", "aggregate": "best epoch, mean of 5"}},
        "settings": {A: [{"source": "last", "top1": {"kd": 74.9}},
                         {"source": "best", "top1": {"kd": 76.0, "dkd": 76.3}}]},
    }
    last = summarize(load_records(results), published=published)
    assert last.cell(A, "kd")["published"] == 74.9 and list(last.published_sources) == ["last"]
    assert any("published numbers of M are best-epoch" in note for note in last.notes)
    best = summarize(load_records(results), published=published, metric="best")
    assert best.cell(A, "kd")["published"] == 76.0 and list(best.published_sources) == ["best"]
    # published.json's own form: further sources under the entry's "also".
    nested = {"sources": published["sources"],
              "settings": {A: {"source": "last", "top1": {"kd": 74.9},
                               "also": [{"source": "best", "top1": {"kd": 76.0}}]}}}
    assert summarize(load_records(results), published=nested,
                     metric="best").cell(A, "kd")["published"] == 76.0
    assert summarize(load_records(results), published=nested).cell(A, "kd")["published"] == 74.9
    # The format before lists: one entry per setting, still read.
    old = {"sources": published["sources"], "settings": {A: {"source": "last",
                                                             "top1": {"kd": 74.0}}}}
    assert summarize(load_records(results), published=old).cell(A, "kd")["published"] == 74.0
