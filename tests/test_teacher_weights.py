"""A student's result never outlives its teacher's weights silently.

A teacher's run id names how it is trained, not the bits it ended with: retrained (another
machine, another thread count, a deleted weights file) it can differ, and the students already
stored distilled the old one. Each student record names the sha256 of the weights it distilled
from; `run` and `status` count a student of other weights than the stored teacher's as stale,
`table` refuses a column that mixes them, and a checkpoint made with other teacher weights is
not resumed.

The retraining is simulated: the teacher's weights file is replaced by perturbed weights and
its record's checksum updated, as a retrain that ended elsewhere writes them. On this CPU a
real retrain gives the very same bits (tests/test_resilience.py), so nothing else would differ.
"""

from __future__ import annotations

import hashlib
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
from kdbench.data import fingerprint, load_dataset
from kdbench.spec import RunSpec
from kdbench.staleness import distilled_from_other_teacher, other_teacher_summary
from kdbench.store import Store

SETTING = "synthetic/tiny"
TEACHER = RunSpec(SETTING, "vanilla", 0, role="teacher")
PYTHON = [sys.executable, "-m", "kdbench"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_args(results: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["run", "--methods", "kd", "--seeds", "1", "--setting", SETTING, "--epochs", str(epochs),
            "--executor", "inprocess", "--no-table", "--results", str(results), *extra]


def student(epochs: int = 1) -> RunSpec:
    return RunSpec(SETTING, "kd", 0, overrides={"epochs": epochs})


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace_teacher(results: Path) -> str:
    """What a retrain that ended in other weights leaves: another weights file at the same
    place, and the teacher's record naming its checksum. Returns the new checksum."""
    store = Store(results)
    path = store.teacher_path(TEACHER.id)
    state = torch.load(path, weights_only=True)
    first = next(name for name, tensor in state.items() if tensor.is_floating_point())
    state[first] = state[first] + 0.01
    torch.save(state, path)
    record_path = store.record_path(TEACHER.id)
    record = json.loads(record_path.read_text())
    record["teacher_weights"]["sha256"] = file_sha256(path)
    record_path.write_text(json.dumps(record))
    return record["teacher_weights"]["sha256"]


@pytest.mark.slow
def test_a_student_of_a_replaced_teacher_is_stale_and_never_tabulated_with_the_new(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    old = file_sha256(store.teacher_path(TEACHER.id))
    assert main(run_args(results_with_teacher)) == 0
    distilled = store.read(student().id)
    assert distilled["provenance"]["teacher_weights_sha256"] == old  # the bytes' own checksum
    vanilla = store.read(RunSpec(SETTING, "vanilla", 0, overrides={"epochs": 1}).id)
    assert "teacher_weights_sha256" not in vanilla["provenance"]  # the student alone has none
    table = ["table", "--results", str(results_with_teacher)]
    assert main(table) == 0  # one teacher: tabulated
    capsys.readouterr()

    new = replace_teacher(results_with_teacher)
    assert new != old
    kept = store.record_path(student().id).read_bytes()
    assert main(run_args(results_with_teacher)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"kdbench: kd: 1 stored result was distilled from other teacher weights "
                      f"(sha256 {old[:12]}…) than the stored teacher's ({new[:12]}…): the teacher "
                      "was retrained or replaced after them; --retrain-stale retrains them, "
                      "--keep-stale keeps them")
    assert err[1].startswith("kdbench: error: 1 stored result was made by other code than the "
                             "installed or from another teacher")
    assert store.record_path(student().id).read_bytes() == kept  # nothing overwritten

    assert main(["status", "--results", str(results_with_teacher)]) == 0
    out = capsys.readouterr().out.splitlines()
    columns = out[0].split()[2:]
    counts = {line.split()[1]: dict(zip(columns, line.split()[2:])) for line in out
              if line.startswith(SETTING)}
    assert (counts["kd"]["done"], counts["kd"]["stale"]) == ("0", "1")
    assert (counts["vanilla"]["done"], counts["vanilla"]["stale"]) == ("1", "0")

    assert main(table) == 2
    refused = capsys.readouterr().err
    assert (f"{SETTING}: its records name 2 different weights of one teacher "
            f"({new[:12]}…: 1 record (Teacher); {old[:12]}…: 1 record (KD))") in refused, refused
    assert main([*table, "--pool-versions"]) == 0
    assert "its records name different weights of one teacher (--pool-versions)" in capsys.readouterr().out

    assert main(run_args(results_with_teacher, "--retrain-stale")) == 0
    assert "1 stale record moved to" in capsys.readouterr().err
    aside = list((results_with_teacher / "runs" / "stale").glob(f"{student().id}.*.json"))
    assert [path.read_bytes() for path in aside] == [kept]  # kept, byte for byte
    assert store.read(student().id)["provenance"]["teacher_weights_sha256"] == new
    assert main(table) == 0
    assert main(run_args(results_with_teacher)) == 0
    assert "nothing to train" in capsys.readouterr().out


@pytest.mark.slow
def test_a_checkpoint_of_other_teacher_weights_is_not_resumed(results_with_teacher, tmp_path):
    """Killed after its first epoch, the teacher replaced, the run starts over: its result
    equals a run of the new teacher from scratch (resumed, its first epoch would be the old
    teacher's)."""
    store = Store(results_with_teacher)
    spec = student(epochs=4)
    process = subprocess.Popen(PYTHON + run_args(results_with_teacher, epochs=4), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not store.checkpoint_path(spec.id).exists():
        assert process.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.02)
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert store.read(spec.id) is None, "killed too late: the run had finished"
    old = store.read(TEACHER.id)["teacher_weights"]["sha256"]
    checkpoint = torch.load(store.checkpoint_path(spec.id), weights_only=False)
    assert checkpoint["teacher_weights_sha256"] == old
    # It names its data too: resumed on another copy, it would start over the same way.
    assert checkpoint["data_sha256"] == fingerprint(load_dataset("synthetic"))

    new = replace_teacher(results_with_teacher)
    reference = tmp_path / "reference"
    shutil.copytree(results_with_teacher, reference)
    shutil.rmtree(reference / "checkpoints")
    assert subprocess.run(PYTHON + run_args(reference, epochs=4), env=ENV, capture_output=True,
                          timeout=600).returncode == 0

    resumed = subprocess.run(PYTHON + run_args(results_with_teacher, epochs=4), env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (f"ignoring checkpoint {store.checkpoint_path(spec.id)}: it distilled other teacher "
            "weights than the stored teacher's; starting over") in resumed.stdout
    got, expected = store.read(spec.id), Store(reference).read(spec.id)
    assert got["provenance"]["teacher_weights_sha256"] == new
    assert got["metrics"] == expected["metrics"]
    assert ([entry["loss"] for entry in got["history"]]
            == [entry["loss"] for entry in expected["history"]])


# --- the pure functions ---------------------------------------------------------------------------

def distilled(sha: str | None) -> dict:
    return {"provenance": {"teacher_weights_sha256": sha} if sha else {}}


def test_only_a_recorded_checksum_that_differs_from_a_stored_teacher_is_other() -> None:
    assert distilled_from_other_teacher(distilled("a" * 64), "b" * 64)
    assert not distilled_from_other_teacher(distilled("a" * 64), "a" * 64)
    assert not distilled_from_other_teacher(distilled(None), "b" * 64)  # not recorded: not judged
    assert not distilled_from_other_teacher(distilled("a" * 64), None)  # no teacher stored yet


def test_the_summary_names_both_checksums_and_counts() -> None:
    line = other_teacher_summary("kd", [distilled("a" * 64), distilled("c" * 64)], "b" * 64)
    assert line == ("kd: 2 stored results were distilled from other teacher weights (sha256 "
                    "aaaaaaaaaaaa…, cccccccccccc…) than the stored teacher's (bbbbbbbbbbbb…): "
                    "the teacher was retrained or replaced after them")


@pytest.mark.slow
def test_a_teacher_trained_again_names_its_stored_students(results_with_teacher, capsys):
    """Its weights file deleted, the teacher is retrained before new students; the stored KD
    student distilled the earlier weights, which the launch says. On this CPU the retrain gives
    the same bits, so afterwards nothing is stale and the table is one experiment."""
    store = Store(results_with_teacher)
    assert main(run_args(results_with_teacher)) == 0
    old = store.read(TEACHER.id)["teacher_weights"]["sha256"]
    store.teacher_path(TEACHER.id).unlink()
    capsys.readouterr()
    assert main(run_args(results_with_teacher, "--seeds", "2")) == 0
    out = capsys.readouterr().out
    assert (f"kdbench: note: {TEACHER.label()} is trained again; 1 stored student distilled its "
            f"earlier weights (sha256 {old[:12]}…): if the new weights differ, the next `kdbench "
            "run` counts them as stale and `kdbench table` refuses their column") in out, out
    assert store.read(TEACHER.id)["teacher_weights"]["sha256"] == old
    assert main(run_args(results_with_teacher, "--seeds", "2")) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert main(["table", "--results", str(results_with_teacher)]) == 0
