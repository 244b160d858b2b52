"""The validation protocol: the held-out split (kdbench/validation.py), choosing variants on
it (kdbench/selection.py, ``table --select-on``), and issue 21's done-when command end to end.

The selection tests use hand-built records in a results directory (written with
``Store.write``, read by ``kdbench table`` as a user's are), where validation and test
disagree on the best variant, so a table that chose on the wrong split shows a different
number.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np
import pytest
import torch

from kdbench.aggregate import summarize
from kdbench.cli import main
from kdbench.data import NORMALISATION, Dataset, synthetic
from kdbench.errors import UserError
from kdbench.store import Store, load_records
from kdbench.tables import Layout, render_csv, render_latex, render_markdown
from kdbench.validation import VALIDATION_FRACTION, held_out_indices, split, split_seed


# --- the split -------------------------------------------------------------------------------

def test_the_split_is_disjoint_from_the_rest_and_together_they_are_the_training_set():
    dataset = synthetic()
    training, held_out, facts = split(dataset)
    assert (facts.images, facts.train_images) == (120, 1080)
    assert training.num_train == 1080 and len(held_out.test_labels) == 120
    assert held_out.num_train == 0  # nothing trains on the held-out set
    # Every training image lands on exactly one side: compare the images themselves.
    def rows(images: torch.Tensor) -> set[bytes]:
        return {image.numpy().tobytes() for image in images}

    train_rows, val_rows = rows(training.train_images), rows(held_out.test_images)
    assert not train_rows & val_rows
    assert train_rows | val_rows == rows(dataset.train_images)
    # The test split is untouched.
    assert torch.equal(training.test_images, dataset.test_images)


def test_the_split_holds_out_the_same_fraction_of_every_class():
    dataset = synthetic()
    _, held_out, _ = split(dataset)
    assert torch.bincount(held_out.test_labels, minlength=10).tolist() == [12] * 10
    # An unbalanced set: 10 % of each class, rounded half up (a class of 5 gives 1, where
    # torch.round's half-to-even would give 0), never a class's last image.
    labels = torch.tensor([0] * 25 + [1] * 5 + [2] * 1 + [3] * 14)
    held = held_out_indices(labels, 4, 0.1, seed=7)
    assert torch.bincount(labels[held], minlength=4).tolist() == [3, 1, 0, 1]  # 2.5, 0.5, 0.1, 1.4
    assert held.tolist() == sorted(set(held.tolist()))


def test_the_split_is_fixed_per_dataset_whatever_the_run_seed():
    dataset = synthetic()
    torch.manual_seed(0)
    np.random.seed(0)
    first = held_out_indices(dataset.train_labels, 10, VALIDATION_FRACTION, split_seed("synthetic"))
    torch.manual_seed(12345)  # what a run's seed sets before loading its data
    np.random.seed(12345)
    torch.rand(17)
    second = held_out_indices(dataset.train_labels, 10, VALIDATION_FRACTION, split_seed("synthetic"))
    assert torch.equal(first, second)
    _, a, _ = split(dataset)
    _, b, _ = split(dataset)
    assert torch.equal(a.test_images, b.test_images)


def test_different_datasets_get_different_splits():
    assert split_seed("synthetic") == zlib.crc32(b"synthetic")
    assert len({split_seed(name) for name in ("cifar10", "cifar100", "fashion_mnist", "synthetic")}) == 4
    base = synthetic()
    renamed = Dataset("cifar10", base.train_images, base.train_labels, base.test_images,
                      base.test_labels, base.num_classes)
    _, mine, facts = split(base)
    _, theirs, other = split(renamed)
    assert facts.seed != other.seed
    assert not torch.equal(mine.test_images, theirs.test_images)


# --- choosing variants -------------------------------------------------------------------------

A = "synthetic/tiny"
B = "fashion_mnist/quick"
RULE = "the same fraction of every class, one permutation per dataset"
SPLITS = {"synthetic": {"dataset": "synthetic", "fraction": 0.1, "seed": 1103364695, "images": 120,
                        "train_images": 1080, "rule": RULE},
          "fashion_mnist": {"dataset": "fashion_mnist", "fraction": 0.1, "seed": 77, "images": 1000,
                            "train_images": 9000, "rule": RULE}}


def record(setting: str, method: str, seed: int, test: float, val: float | None, *,
           role: str = "student", config: dict | None = None, overrides: dict | None = None,
           display: str | None = None) -> dict:
    """A record as kdbench/train.py writes it, with val metrics when ``val`` is given."""
    spec = {"setting": setting, "method": method, "seed": seed, "role": role,
            "config": config or {}, "overrides": overrides or {}, "teacher_seed": 0,
            "teacher_checkpoint": None}
    if val is not None:
        spec["held_out"] = 0.1
    run_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    recipe = {"epochs": 2, "batch_size": 64, "lr": 0.05}
    metrics = {"top1_last": test, "top1_best": test, "top5_last": 90.0, "top5_best": 90.0,
               "best_epoch": 2}
    if val is not None:
        metrics.update(val_top1_last=val, val_top1_best=val, val_top5_last=90.0,
                       val_top5_best=90.0, val_best_epoch=2)
    out = {"id": run_id, "status": "done", "spec": spec,
           "setting": {"name": setting, "dataset": setting.split("/")[0], "teacher": "wrn_10_2",
                       "student": "wrn_10_1", "recipe": {**recipe, **(overrides or {})},
                       "teacher_recipe": recipe, "train_subset": None,
                       "recipe_source": "test recipe"},
           "config": {"temperature": 4.0, **(config or {})}, "metrics": metrics, "history": [],
           "error": None,
           "method_display_name": display or {"kd": "KD", "vanilla": "Student"}.get(method, method),
           "provenance": {"method_source_sha256": "a" * 64, "training_version": 1,
                          "fidelity": "paper", "git_commit": "abc"}}
    if val is not None:
        out["validation"] = SPLITS[setting.split("/")[0]]
    return out


# Test and validation accuracy per seed (0, 1, 2). In A, T = 2 is best on validation and
# T = 4 on test; in B the other way round. The Student's lr 0.01 wins on validation in A.
GRID = {
    A: {("vanilla", (), (("lr", 0.01),)): ([70.0, 71.0, 72.0], [66.0, 67.0, 68.0]),
        ("vanilla", (), (("lr", 0.05),)): ([73.0, 74.0, 75.0], [64.0, 65.0, 66.0]),
        ("kd", (("temperature", 2.0),), ()): ([75.0, 76.0, 77.0], [70.0, 71.0, 72.0]),
        ("kd", (("temperature", 4.0),), ()): ([79.0, 80.0, 81.0], [68.0, 69.0, 70.0])},
    B: {("vanilla", (), (("lr", 0.01),)): ([80.0, 80.5, 81.0], [80.0, 80.0, 81.0]),
        ("vanilla", (), (("lr", 0.05),)): ([80.0, 81.0, 82.0], [79.0, 79.0, 80.0]),
        ("kd", (("temperature", 2.0),), ()): ([85.0, 86.0, 87.0], [80.0, 81.0, 82.0]),
        ("kd", (("temperature", 4.0),), ()): ([83.0, 84.0, 85.0], [83.0, 84.0, 85.0])},
}


@pytest.fixture
def sweep_results(tmp_path):
    """Every variant twice: once with a validation split (val metrics) and once trained on the
    full set (test numbers 1 point higher, no val metrics), plus one teacher per setting."""
    store = Store(tmp_path / "results")
    for setting, cells in GRID.items():
        store.write(record(setting, "vanilla", 0, 90.0, None, role="teacher"))
        for (method, config, overrides), (tests, vals) in cells.items():
            for seed, (test, val) in enumerate(zip(tests, vals)):
                store.write(record(setting, method, seed, test, val, config=dict(config),
                                   overrides=dict(overrides)))
                store.write(record(setting, method, seed, test + 1.0, None, config=dict(config),
                                   overrides=dict(overrides)))
    return tmp_path / "results"


def test_select_on_val_reports_the_validation_chosen_variants_test_accuracy(sweep_results):
    summary = summarize(load_records(sweep_results), select_on="val")
    assert summary.rows == ["teacher", "vanilla", "kd"]
    # A: T = 2 wins on validation (71 > 69) though T = 4 has the better test mean (80 > 76).
    assert summary.cell(A, "kd")["mean"] == pytest.approx(76.0)
    assert summary.cell(B, "kd")["mean"] == pytest.approx(84.0)  # B: T = 4 (84 > 81)
    # The Student is tuned the same way: lr 0.01 in A (67 > 65), lr 0.01 in B (80.33 > 79.33).
    assert summary.cell(A, "vanilla")["mean"] == pytest.approx(71.0)
    assert summary.cell(B, "vanilla")["mean"] == pytest.approx(80.5)
    assert summary.cell(A, "kd")["delta"] == pytest.approx(5.0)  # against the chosen Student
    assert summary.titles["kd"] == "KD" and summary.titles["vanilla"] == "Student"
    chosen = summary.selection.choices.set_index(["setting", "method"])
    assert chosen.loc[(A, "kd"), "chosen_title"] == "KD (T = 2)"
    assert chosen.loc[(A, "kd"), "score"] == pytest.approx(71.0)
    assert chosen.loc[(B, "kd"), "chosen_title"] == "KD (T = 4)"
    assert chosen.loc[(A, "vanilla"), "chosen_title"] == "Student (lr = 0.01)"
    # Only the held-out runs were used: each cell is the 3 seeds of one variant.
    assert set(summary.cells["n"]) == {1, 3}
    held = summary.runs[summary.runs["role"] != "teacher"]
    assert held["held_out"].notna().all()

    text = render_markdown(summary, Layout())
    assert "Variants chosen on a held-out 10 % of the training set" in text
    assert (f"({B}: 1\u202f000 of its 10\u202f000 images, seed 77; {A}: 120 of its 1\u202f200 "
            "images, seed 1103364695; the same fraction of every class") in text
    assert "Student: lr ∈ {0.01, 0.05}; KD: T ∈ {2, 4}" in text
    assert "mean validation top-1 at the last epoch over seeds, shown by its test accuracy" in text
    assert f"{A}, KD: chose KD (T = 2) by mean validation top-1 at the last epoch" in text
    assert "KD (T = 4): 69.00 (n = 3)" in text
    latex = render_latex(summary, Layout())
    assert r"T $\in$ \{2, 4\}" in latex and r"10\,\% of the training set" in latex
    csv = render_csv(summary)
    assert "selected_variant" in csv.splitlines()[0] and "kd[T=2" not in csv  # keys use field names
    assert "kd[temperature=2.0]" in csv and "kd[temperature=4.0]" in csv


def test_select_on_test_chooses_on_the_test_numbers_and_says_it_is_optimistic(sweep_results):
    summary = summarize(load_records(sweep_results), select_on="test")
    # The full-set runs (test + 1): A picks T = 4 (81), B T = 2 (87).
    assert summary.cell(A, "kd")["mean"] == pytest.approx(81.0)
    assert summary.cell(B, "kd")["mean"] == pytest.approx(87.0)
    assert summary.runs.loc[summary.runs["role"] != "teacher", "held_out"].isna().all()
    text = render_markdown(summary, Layout())
    assert "Variants chosen on the test set among Student: lr ∈ {0.01, 0.05}; KD: T ∈ {2, 4} " \
           "(optimistic: the numbers shown chose themselves)" in text


def test_the_table_command_selects_and_refuses_variant_keys(sweep_results, capsys):
    assert main(["table", "--results", str(sweep_results), "--select-on", "val",
                 "--settings", A]) == 0
    out = capsys.readouterr().out
    kd_line = next(line for line in out.splitlines() if line.startswith("| KD"))
    assert "76.00 ± 1.00" in kd_line
    assert main(["table", "--results", str(sweep_results), "--select-on", "val",
                 "--methods", "kd[temperature=2.0]"]) == 2
    assert "name methods (kd), not variants" in capsys.readouterr().err
    # Without --select-on every variant of each protocol is a row of its own; the two
    # Students (held out or not) are two experiments, which the table refuses to guess.
    assert main(["table", "--results", str(sweep_results)]) == 2
    assert "different Student (vanilla) experiments" in capsys.readouterr().err


def test_select_on_val_needs_runs_that_held_out_a_split(tmp_path):
    store = Store(tmp_path)
    store.write(record(A, "vanilla", 0, 90.0, None, role="teacher"))
    store.write(record(A, "kd", 0, 75.0, None))
    with pytest.raises(UserError, match="no student run in these results held out a validation"):
        summarize(load_records(tmp_path), select_on="val")


# --- issue 21's done-when command ---------------------------------------------------------------

@pytest.mark.slow  # six student runs in process: about 60 s on the shared 2-core machine
def test_done_when_sweep_trains_both_variants_selects_on_validation(results_with_teacher, capsys):
    from kdbench import api
    from kdbench.data import load_dataset

    results = str(results_with_teacher)
    assert main(["run", "--methods", "kd", "--set", "kd.temperature=2,4", "--select-on", "val",
                 "--seeds", "2", "--setting", A, "--results", results,
                 "--executor", "inprocess"]) == 0
    out = capsys.readouterr().out
    records = [r for r in load_records(results) if r["spec"]["role"] == "student"]
    assert len(records) == 6 and all(r["spec"]["held_out"] == 0.1 for r in records)
    temperatures = {r["spec"]["config"].get("temperature") for r in records if r["spec"]["method"] == "kd"}
    assert temperatures == {2.0, 4.0}
    # The validation accuracy in each record is the kept student's accuracy on the held-out
    # images, evaluated here independently.
    _, held_out, _ = split(load_dataset("synthetic"))
    run = records[0]
    student = api.load_student(results, run["id"])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["synthetic"])
    # x / 255 then (x - mean) / std, folded as BatchStream.normalise folds it (same rounding).
    images = held_out.test_images.float() * (1.0 / (255.0 * std)) + (-mean / std)
    with torch.no_grad():
        predicted = student.eval()(images).argmax(1)
    accuracy = 100.0 * (predicted == held_out.test_labels).double().mean().item()
    assert run["metrics"]["val_top1_last"] == pytest.approx(accuracy, abs=1e-9)
    assert run["validation"]["images"] == 120 and run["validation"]["train_images"] == 1080
    # The variant with the higher mean validation accuracy is the row, by its test accuracy.
    by_t = {t: [r for r in records if r["spec"]["config"].get("temperature") == t] for t in (2.0, 4.0)}
    val = {t: np.mean([r["metrics"]["val_top1_last"] for r in rs]) for t, rs in by_t.items()}
    best = max(val, key=lambda t: (val[t], -t))  # ties: the first row key (T = 2)
    test_mean = np.mean([r["metrics"]["top1_last"] for r in by_t[best]])
    kd_line = next(line for line in out.splitlines() if line.startswith("| KD"))
    assert f"{test_mean:.2f}" in kd_line
    assert "Variants chosen on a held-out 10 % of the training set" in out
    assert f"seed {zlib.crc32(b'synthetic')}" in out and "among KD: T ∈ {2, 4}" in out
    assert f"chose KD (T = {best:g})" in out
