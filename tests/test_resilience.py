"""Nothing lost: a SIGKILLed run resumes to the identical result, concurrent launches share
one teacher, unreadable files are named and redone, and bad input changes nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdbench.cli import main
from kdbench.spec import RunSpec
from kdbench.store import Store

PYTHON = [sys.executable, "-m", "kdbench"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kdbench(*args, **kwargs):
    return subprocess.run(PYTHON + list(args), capture_output=True, text=True, env=ENV,
                          timeout=600, **kwargs)


def snapshot(root: Path) -> dict[str, int]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def history_without_times(record):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in record["history"]]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(results_with_teacher, tmp_path):
    args = ["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
            "--epochs", "5", "--executor", "inprocess", "--no-table"]
    reference = tmp_path / "reference"
    shutil.copytree(results_with_teacher, reference)
    assert kdbench(*args, "--results", str(reference)).returncode == 0

    spec = RunSpec("synthetic/tiny", "vanilla", 0, overrides={"epochs": 5})
    store = Store(results_with_teacher)
    process = subprocess.Popen(PYTHON + args + ["--results", str(results_with_teacher)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not store.checkpoint_path(spec.id).exists():  # the first epoch is checkpointed
        assert process.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert store.read(spec.id) is None, "killed too late: the run had finished"
    epochs_done = torch.load(store.checkpoint_path(spec.id), weights_only=False)["epoch"]
    assert 1 <= epochs_done < 5

    resumed = kdbench(*args, "--results", str(results_with_teacher))
    assert resumed.returncode == 0, resumed.stderr
    expected = Store(reference).read(spec.id)
    got = store.read(spec.id)
    assert history_without_times(got) == history_without_times(expected)
    assert got["metrics"] == expected["metrics"]


def test_two_launches_at_once_train_the_teacher_once(tmp_path):
    results = tmp_path / "results"
    args = ["run", "--methods", "kd", "--setting", "synthetic/tiny", "--executor", "inprocess",
            "--no-table", "--results", str(results)]
    first = subprocess.Popen(PYTHON + args + ["--seed-list", "0"], env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = subprocess.Popen(PYTHON + args + ["--seed-list", "1"], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    teacher_lines = [line for _, err in outputs for line in err.splitlines() if "teacher seed 0:" in line
                     and line.startswith("[")]
    assert len(teacher_lines) == 2
    assert sum("trained by another launch" in line for line in teacher_lines) == 1, teacher_lines
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    assert len(records) == 5 and all(r["status"] == "done" for r in records)
    assert not list((results / "runs").glob(".*"))  # no half-written temporary files


def test_truncated_record_is_named_and_redone(results_with_teacher, capsys):
    args = ["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
            "--executor", "inprocess", "--no-table", "--results", str(results_with_teacher)]
    assert main(args) == 0
    spec = RunSpec("synthetic/tiny", "vanilla", 0)
    path = Store(results_with_teacher).record_path(spec.id)
    path.write_text(path.read_text()[:50])
    capsys.readouterr()
    assert main(["status", "--results", str(results_with_teacher)]) == 0
    assert f"unreadable record (will be redone): {path}" in capsys.readouterr().out
    assert main(args) == 0
    assert json.loads(path.read_text())["status"] == "done"


def test_checkpoint_of_another_run_is_ignored_with_a_warning(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    spec = RunSpec("synthetic/tiny", "vanilla", 0)
    store.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"run_id": "someone-else", "epoch": 1}, store.checkpoint_path(spec.id))
    assert main(["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
                 "--executor", "inprocess", "--no-table", "--results", str(results_with_teacher)]) == 0
    assert "belongs to another run" in capsys.readouterr().out
    assert store.read(spec.id)["status"] == "done"


def test_a_failed_run_does_not_stop_the_grid_and_is_retried_alone(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    base = ["run", "--setting", "synthetic/tiny", "--executor", "inprocess", "--no-table",
            "--results", str(results_with_teacher), "--methods", "kd", "--seeds", "1"]
    # lr 1e30 makes every student diverge: each is stored as failed and the command says so.
    assert main(base + ["--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "2 runs failed" in err and "NonFiniteLoss" in err
    assert main(["status", "--results", str(results_with_teacher)]) == 0
    out = capsys.readouterr().out
    assert "failed: synthetic/tiny kd seed 0" in out
    # The same command retries exactly the failed runs.
    failed = [p for p in store.runs_dir.glob("*.json") if json.loads(p.read_text())["status"] == "failed"]
    assert len(failed) == 2
    assert main(base + ["--lr", "1e30", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would run") == 2


BAD_INPUTS = [
    (["--methods", "kdd"], "did you mean kd"),
    (["--setting", "fashion_mnist/quik"], "did you mean fashion_mnist/quick"),
    (["--seeds", "0"], "at least 1"),
    (["--seeds", "-3"], "at least 1"),
    (["--seeds", "two"], "whole number"),
    (["--set", "kd.temprature=2"], "has no field 'temprature'"),
    (["--set", "kd.temperature=warm"], "expected a float, got 'warm'"),
    (["--set", "temperature=2"], "METHOD.FIELD=VALUE"),
    (["--data-dir", "/nonexistent/data"], "does not exist"),
    (["--setting", "cifar100/wrn_40_2-wrn_16_2", "--data-dir", "EMPTY"], "cifar-100-python"),
    (["--results", "FILE/results"], "not writable"),
    (["--teacher-checkpoint", "GARBAGE"], "does not load"),
    (["--teacher-checkpoint", "WRONG_ARCH"], "does not fit"),
    (["--executor", "nowhere"], "invalid choice"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, message, tmp_path, capsys):
    from kdbench.models import build_model

    results = tmp_path / "results"
    Store(results).write({"id": "keep", "status": "done", "spec": {}})
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("a file, not a directory")
    (tmp_path / "GARBAGE").write_bytes(b"not a checkpoint")
    torch.save(build_model("resnet8", 10, 3).state_dict(), tmp_path / "WRONG_ARCH")
    extra = [str(tmp_path / a) if a in {"EMPTY", "FILE/results", "GARBAGE", "WRONG_ARCH"} else a
             for a in extra]
    args = {"--methods": "kd", "--seeds": "1", "--setting": "synthetic/tiny",
            "--results": str(results), "--executor": "inprocess"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    argv = ["run"] + [x for flag, value in args.items() for x in (flag, value)]
    before = snapshot(results)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert snapshot(results) == before


def test_a_broken_plugin_does_not_break_list_or_other_methods(tmp_path):
    package = tmp_path / "site"
    (package / "brokenkd").mkdir(parents=True)
    (package / "brokenkd" / "__init__.py").write_text("raise ImportError('missing dependency xyz')\n")
    info = package / "brokenkd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenkd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nbroken = brokenkd:Broken\n")
    env = {**ENV, "PYTHONPATH": str(package)}
    listing = subprocess.run(PYTHON + ["list"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0
    assert "broken" in listing.stdout and "BROKEN" in listing.stdout and "xyz" in listing.stdout
    asked = subprocess.run(PYTHON + ["run", "--methods", "broken", "--setting", "synthetic/tiny",
                                     "--results", str(tmp_path / "r")], env=env, capture_output=True, text=True)
    assert asked.returncode == 2 and "failed to import" in asked.stderr
    assert not (tmp_path / "r").exists()
