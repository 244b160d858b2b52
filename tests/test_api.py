"""The Python API (kdbench/api.py): README's example run verbatim, runs() and summary() against
independent computations, run() through the command line's own parser and checks."""

from __future__ import annotations

import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest

from kdbench import api
from kdbench.errors import UserError
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.worker import failed_record

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_api_example() -> str:
    """The first ```python block of README's "## Python API" section."""
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


def test_the_readme_example_runs_verbatim(trained_tiny_teacher, tmp_path, monkeypatch):
    # Its results="results" is relative: run it in a directory whose results/ already hold
    # the synthetic/tiny teacher (trained once per test session), as a re-run would.
    shutil.copytree(trained_tiny_teacher, tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_api_example(), "README.md", "exec"), scope)
    grid, runs = scope["grid"], scope["runs"]
    # What the example claims, checked here from the records themselves.
    assert sorted(zip(grid["role"], grid["method"])) == [("student", "kd"), ("student", "vanilla"),
                                                         ("teacher", "vanilla")]
    kd = Store(tmp_path / "results").read(RunSpec("synthetic/tiny", "kd", 0, overrides={"epochs": 1}).id)
    row = runs[runs["run_id"] == kd["id"]].iloc[0]
    assert row["top1_last"] == kd["metrics"]["top1_last"] and row["config.temperature"] == 4.0
    assert row["recipe.epochs"] == 1 and row["title"] == "KD" and row["row"] == "kd"
    assert row["best_student_weights"] == kd["student_weights"]["best"]["path"]
    assert list(scope["epochs"]["top1"]) == [e["top1"] for e in kd["history"]]
    assert not scope["best"].training


# --- runs() and summary() on hand-made records ---------------------------------------------

def record(method: str, seed: int, top1: float, **config) -> dict:
    spec = RunSpec("synthetic/tiny", method, seed, config=dict(config))
    return {
        "id": spec.id, "status": "done", "spec": spec.to_json(),
        "setting": {"name": "synthetic/tiny", "dataset": "synthetic", "teacher": "wrn_10_2",
                    "student": "wrn_10_1", "num_classes": 10,
                    "recipe": {"epochs": 2, "lr": 0.05, "augmentation": {"flip": True}}},
        "config": {"temperature": 4.0, **config} if method == "kd" else {},
        "metrics": {"top1_last": top1, "top5_last": 99.0, "top1_best": top1 + 1,
                    "top5_best": 99.5, "best_epoch": 1},
        "history": [], "error": None, "method_display_name": "KD" if method == "kd" else "Student",
        "provenance": {"method_source_sha256": "a" * 64, "training_version": 1},
    }


VALUES = {"vanilla": [60.0, 61.5, 59.0], "kd": [63.0, 64.25, 62.5]}


@pytest.fixture
def hand_results(tmp_path) -> Path:
    store = Store(tmp_path)
    for method, values in VALUES.items():
        for seed, value in enumerate(values):
            store.write(record(method, seed, value))
    store.write(record("kd", 0, 70.0, temperature=2.0))  # another experiment: its own row
    store.write(failed_record(RunSpec("synthetic/tiny", "at", 0), RuntimeError("boom\nsecond line")))
    return tmp_path


def test_runs_has_one_row_per_record_with_spec_config_recipe_and_metrics(hand_results):
    frame = api.runs(hand_results)
    assert len(frame) == 8 and frame["run_id"].is_unique
    kd = frame[(frame["method"] == "kd") & (frame["config.temperature"] == 4.0)].sort_values("seed")
    assert list(kd["top1_last"]) == VALUES["kd"] and list(kd["seed"]) == [0, 1, 2]
    assert set(kd["recipe.epochs"]) == {2} and set(kd["recipe.augmentation.flip"]) == {True}
    variant = frame[frame["config.temperature"] == 2.0].iloc[0]
    assert variant["row"] != kd.iloc[0]["row"] and variant["row"].startswith("kd[")
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert failed["method"] == "at" and failed["error"] == "RuntimeError: boom"
    assert pd.isna(failed["top1_last"])


def test_runs_of_an_empty_directory_is_an_empty_frame_with_the_columns(tmp_path):
    frame = api.runs(tmp_path)
    assert frame.empty and list(frame.columns) == list(api.RUN_COLUMNS)


def test_summary_is_the_tables_mean_and_sample_std_over_seeds(hand_results):
    frame = api.runs(hand_results)
    # runs()' row keys are the summary's: the T = 4 runs of kd are one row, T = 2 another.
    kd_row = frame.loc[frame["config.temperature"] == 4.0, "row"].unique().tolist()
    assert len(kd_row) == 1
    summary = api.summary(hand_results, methods=["vanilla", *kd_row], metric="last")
    cells = summary.cells.set_index("row")
    everything = api.summary(hand_results).cells
    assert dict(zip(everything["row"], everything["title"])) == dict(zip(frame["row"], frame["title"]))
    assert "KD (T = 2)" in set(frame["title"])
    for row, values in [("vanilla", VALUES["vanilla"]), (kd_row[0], VALUES["kd"])]:
        assert cells.loc[row, "mean"] == pytest.approx(statistics.mean(values))
        assert cells.loc[row, "std"] == pytest.approx(statistics.stdev(values))
        assert cells.loc[row, "n"] == 3
    best = api.summary(hand_results, methods=f"vanilla,{kd_row[0]}", metric="best").cells.set_index("row")
    assert best.loc[kd_row[0], "mean"] == pytest.approx(statistics.mean(VALUES["kd"]) + 1)
    assert "published" in api.summary(hand_results, compare_published=True).cells


def test_summary_of_a_directory_without_records_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds no run records"):
        api.summary(tmp_path)


# --- run(): the command line's namespace and checks ---------------------------------------

def test_run_options_become_the_namespace_the_command_line_builds():
    from kdbench.cli import build_parser

    args = api.parse_run_options({"methods": ["kd", "at"], "seed_list": [3, 7], "setting": "synthetic/tiny",
                                  "results": "out", "epochs": 1, "set": {"kd.temperature": 2,
                                                                         "kd.logit_standardization": True},
                                  "executor": "inprocess", "keep": "best", "dry_run": True})
    cli = build_parser().parse_args(
        ["run", "--methods", "kd,at", "--seed-list", "3,7", "--setting", "synthetic/tiny",
         "--results", "out", "--epochs", "1", "--set", "kd.temperature=2",
         "--set", "kd.logit_standardization=true", "--executor", "inprocess", "--keep", "best",
         "--dry-run"])
    assert vars(args) == vars(cli)


def test_run_takes_seeds_as_a_count_or_as_a_list(tmp_path, capsys):
    common = {"methods": ["kd"], "setting": "synthetic/tiny", "results": tmp_path,
              "executor": "inprocess", "dry_run": True}
    api.run(seeds=2, **common)
    assert "kdbench: 4 student runs (2 methods × 2 seeds" in capsys.readouterr().out
    api.run(seeds=[5, 9, 11], **common)
    out = capsys.readouterr().out
    assert "2 methods × 3 seeds" in out and "kd seed 11" in out and "kd seed 0" not in out


def test_run_mistakes_are_the_commands_errors_before_anything_is_written(tmp_path):
    results = tmp_path / "results"
    with pytest.raises(UserError, match="unknown method 'kdd'.*kd"):
        api.run(methods=["kdd"], seeds=1, setting="synthetic/tiny", results=results)
    with pytest.raises(UserError, match="--epochs: must be at least 1"):
        api.run(methods=["kd"], seeds=1, setting="synthetic/tiny", results=results, epochs=0)
    with pytest.raises(UserError, match="has no field 'temp'"):
        api.run(methods=["kd"], seeds=1, setting="synthetic/tiny", results=results, set={"kd.temp": 2})
    with pytest.raises(TypeError, match="unknown option 'epoch'"):
        api.run(methods=["kd"], seeds=1, setting="synthetic/tiny", results=results, epoch=1)
    with pytest.raises(TypeError, match="--compile is a flag"):
        api.run(methods=["kd"], seeds=1, setting="synthetic/tiny", results=results, compile="yes")
    assert not results.exists()
