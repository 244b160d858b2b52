"""End to end through the command line on the synthetic setting: run, resume, table, list."""

import csv
import io
import json
import shutil

import pandas as pd
import pytest

from kdbench.cli import main

GRID = ["--methods", "kd", "--seeds", "2", "--setting", "synthetic/tiny", "--executor", "inprocess"]


@pytest.fixture(scope="module")
def grid_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("cli") / "results"
    assert main(["run", *GRID, "--results", str(results), "--no-table"]) == 0
    return results


def load(results):
    return [json.loads(path.read_text()) for path in sorted((results / "runs").glob("*.json"))]


def test_run_stores_teacher_baseline_and_method(grid_results):
    records = load(grid_results)
    rows = sorted((r["spec"]["role"], r["spec"]["method"], r["spec"]["seed"]) for r in records)
    assert rows == [("student", "kd", 0), ("student", "kd", 1), ("student", "vanilla", 0),
                    ("student", "vanilla", 1), ("teacher", "vanilla", 0)]
    assert all(r["status"] == "done" for r in records)
    assert not list((grid_results / "checkpoints").glob("*.pt"))


def test_table_numbers_equal_the_records(grid_results, capsys):
    capsys.readouterr()
    assert main(["table", "--results", str(grid_results), "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    frame = pd.DataFrame([{"method": r["spec"]["method"], "role": r["spec"]["role"],
                           "top1": r["metrics"]["top1_last"]} for r in load(grid_results)])
    students = frame[frame.role == "student"].groupby("method").top1
    for method, expected_mean in students.mean().items():
        row = table[table["row"] == method].iloc[0]
        assert row["mean"] == pytest.approx(expected_mean, abs=1e-9)
        assert row["std"] == pytest.approx(students.std(ddof=1)[method], abs=1e-9)
        assert row["n"] == 2


def test_markdown_table_shows_teacher_student_and_method(grid_results, capsys):
    capsys.readouterr()
    assert main(["table", "--results", str(grid_results)]) == 0
    text = capsys.readouterr().out
    records = load(grid_results)
    teacher = next(r for r in records if r["spec"]["role"] == "teacher")
    assert "Teacher" in text and "Student" in text and "| KD " in text  # the display name
    assert f"{teacher['metrics']['top1_last']:.2f}" in text
    assert "±" in text


def test_the_same_command_again_trains_nothing(grid_results, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (grid_results / "runs").iterdir()}
    capsys.readouterr()
    assert main(["run", *GRID, "--results", str(grid_results), "--no-table"]) == 0
    out = capsys.readouterr().out
    assert "4 already stored, 0 to train" in out and "nothing to train" in out
    assert before == {p.name: p.stat().st_mtime_ns for p in (grid_results / "runs").iterdir()}


def test_list_shows_methods_with_papers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "Hinton" in out and "fashion_mnist/quick" in out
    # Each method's row title and where its definition comes from, under its citation.
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("at ") and "Zagoruyko" in line)
    assert lines[at + 1].split()[:4] == ['row', '"AT"', "·", "fidelity:"]
    assert "fidelity: authors' code · szagoruyko/attention-transfer" in lines[at + 1]
    kd = next(i for i, line in enumerate(lines) if line.strip().startswith("kd ") and "Hinton" in line)
    assert 'row "KD" · fidelity: paper · ' in lines[kd + 1]


def test_precision_makes_other_runs_under_the_same_fp32_teacher(grid_results, capsys):
    """--precision bf16 on a results directory holding the fp32 grid: the fp32 runs do not count
    as done (another experiment), the fp32 teacher does (teachers are fp32 at every precision)."""
    args = ["run", "--setting", "synthetic/tiny", "--methods", "kd", "--seeds", "2",
            "--results", str(grid_results), "--executor", "inprocess"]
    assert main([*args, "--dry-run", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "0 already stored, 4 to train" in out and "teacher" not in out.split("to train")[1]
    assert out.count("(bf16)") == 4
    assert main([*args, "--dry-run", "--precision", "fp32"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_status_without_precision_shows_every_precision_the_store_holds(grid_results, tmp_path, capsys):
    from kdbench.spec import RunSpec
    from kdbench.store import Store

    results = tmp_path / "results"
    shutil.copytree(grid_results, results)
    bf16 = RunSpec("synthetic/tiny", "kd", 0, precision="bf16")
    Store(results).write({"id": bf16.id, "status": "done", "spec": bf16.to_json(),
                          "metrics": {"top1_last": 50.0}, "provenance": {"precision": "bf16"}})
    status = ["status", "--setting", "synthetic/tiny", "--methods", "kd", "--seeds", "2",
              "--results", str(results)]
    assert main(status) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:] == ["done", "stale", "failed", "running", "pending", "missing"]
    rows = {line.split()[1] + (" " + line.split()[2] if "(" in line else ""): line.split()[-6:]
            for line in lines[1:] if not line.startswith("stale:")}
    assert rows["kd"] == ["2", "0", "0", "0", "0", "0"]  # the fp32 grid: both seeds done
    # bf16: seed 0 stored (by a record that names no code: stale), seed 1 missing
    assert rows["kd (bf16)"] == ["0", "1", "0", "0", "0", "1"]
    assert rows["teacher"] == ["1", "0", "0", "0", "0", "0"]  # one fp32 teacher, listed once
    assert ("stale: kd: 1 stored result was made by other code (1 by another version of methods/kd.py "
            "(sha256 not recorded vs ") in "\n".join(lines)
    assert main([*status, "--precision", "fp32"]) == 0
    assert "bf16" not in capsys.readouterr().out
