"""Kept students (kdbench/students.py, api.load_student): every run keeps its final student,
--keep best its best epoch's too, across a kill and resume; loading one gives back the model
whose test accuracy the record states."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from torch import nn

from kdbench import api
from kdbench.errors import UserError
from kdbench.logs import csv_path
from kdbench.spec import RunSpec
from kdbench.store import Store, sha256_file
from kdbench.students import CHECKPOINT_FIELD, KeptStudents, student_path
from kdbench.worker import run_job

# The student alone: no teacher to train, three epochs of wrn_10_1 on 16-px images.
SPEC = RunSpec("synthetic/tiny", "vanilla", 0, overrides={"epochs": 3})
KEEP_BEST = {"keep": "best"}


class Interrupt(BaseException):
    """Escapes the worker's error handling, like a kill between two epochs."""


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key].cpu(), b[key].cpu()) for key in a)


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """SPEC trained once with --keep best, and the student of each epoch as its checkpoint
    held it right after that epoch (read independently of kdbench.students)."""
    root = tmp_path_factory.mktemp("kept")
    store = Store(root)
    per_epoch: dict[int, dict] = {}

    def capture(event):
        if event["event"] == "epoch":
            per_epoch[event["epoch"]] = torch.load(store.checkpoint_path(SPEC.id), map_location="cpu",
                                                   weights_only=False)["student"]

    outcome = run_job(SPEC.to_json(), str(root), KEEP_BEST, on_progress=capture)
    assert outcome["status"] == "done", outcome
    return root, store.read(SPEC.id), per_epoch


def test_a_run_keeps_its_last_and_best_student_with_checksums(kept_run):
    root, record, per_epoch = kept_run
    kept = record["student_weights"]
    assert kept["last"]["path"] == f"students/{SPEC.id}.pt" and kept["last"]["epoch"] == 3
    assert kept["best"]["path"] == f"students/{SPEC.id}.best.pt"
    assert kept["best"]["epoch"] == record["metrics"]["best_epoch"]
    for which in ("last", "best"):
        path = root / kept[which]["path"]
        assert sha256_file(path) == kept[which]["sha256"]
        assert states_equal(load(path), per_epoch[kept[which]["epoch"]])
    assert not list((root / "students").glob(".*.tmp"))  # written atomically, nothing left over


def test_loaded_student_reproduces_the_records_accuracy_exactly(kept_run):
    root, record, _ = kept_run
    student = api.load_student(root, SPEC.id)
    assert isinstance(student, nn.Module) and not student.training
    top1, top5 = api.evaluate(student, SPEC.setting)
    assert (top1, top5) == (record["metrics"]["top1_last"], record["metrics"]["top5_last"])
    best = api.load_student(root, SPEC.id, which="best")
    assert api.evaluate(best, SPEC.setting) == (record["metrics"]["top1_best"],
                                                 record["metrics"]["top5_best"])


def test_a_teachers_run_loads_as_its_teacher(trained_tiny_teacher):
    teacher_id = RunSpec("synthetic/tiny", "vanilla", 0, "teacher").id
    record = Store(trained_tiny_teacher).read(teacher_id)
    # One copy of a teacher's weights: its record names the teachers/ file as its last student.
    assert record["student_weights"]["last"]["path"] == record["teacher_weights"]["path"]
    teacher = api.load_student(trained_tiny_teacher, teacher_id)
    from kdbench.models import build_model

    # The teacher's architecture (wrn_10_2), not the student's (wrn_10_1).
    assert teacher.state_dict().keys() == build_model("wrn_10_2", 10, 3).state_dict().keys()
    assert [p.shape for p in teacher.parameters()] == [p.shape for p in build_model("wrn_10_2", 10, 3).parameters()]
    assert api.evaluate(teacher, "synthetic/tiny")[0] == record["metrics"]["top1_last"]


def csv_rows(path) -> list[dict]:
    """runs/<id>.csv read back with the csv module, numbers as floats."""
    with open(path, newline="") as handle:
        return [{key: (value if key == "stage" else float(value) if value else None)
                 for key, value in row.items()} for row in csv.DictReader(handle)]


def as_rows(history: list[dict]) -> list[dict]:
    """What the CSV must hold for ``history``, built here from the history's own fields."""
    rows = []
    for entry in history:
        rows.append({"epoch": float(entry["epoch"]), "stage": entry["stage"], "loss": entry["loss"],
                     **{f"loss_{name}": value for name, value in entry["terms"].items()},
                     "train_top1": entry.get("train_top1"), "top1": entry.get("top1"),
                     "top5": entry.get("top5"), "lr": entry["lr"], "seconds": entry["seconds"]})
    return rows


def test_a_killed_run_resumed_keeps_the_same_students_and_logs(kept_run, tmp_path):
    """Killed after epoch 2 of 3: the checkpoint carries the best weights so far, the CSV
    holds exactly the checkpoint's epochs; resumed, the kept students are bit-identical to the
    uninterrupted run's and the CSV is the record's history."""
    root, uninterrupted, _ = kept_run

    def stop_after_second_epoch(event):
        if event["event"] == "epoch" and event["epoch"] == 2:
            raise Interrupt

    store = Store(tmp_path)
    with pytest.raises(Interrupt):
        run_job(SPEC.to_json(), str(tmp_path), KEEP_BEST, on_progress=stop_after_second_epoch)
    checkpoint = torch.load(store.checkpoint_path(SPEC.id), map_location="cpu", weights_only=False)
    best_so_far = max((e for e in checkpoint["history"]), key=lambda e: e["top1"])
    assert checkpoint[CHECKPOINT_FIELD]["epoch"] == best_so_far["epoch"]
    assert not student_path(store, SPEC.id).exists()  # kept only once the run is done
    log = csv_path(store, SPEC.id)
    assert csv_rows(log) == as_rows(checkpoint["history"]) and len(csv_rows(log)) == 2
    assert run_job(SPEC.to_json(), str(tmp_path), KEEP_BEST)["status"] == "done"
    resumed = store.read(SPEC.id)
    for which in ("last", "best"):
        assert resumed["student_weights"][which]["sha256"] == uninterrupted["student_weights"][which]["sha256"]
    assert csv_rows(log) == as_rows(resumed["history"])
    without_seconds = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert without_seconds(csv_rows(log)) == without_seconds(csv_rows(csv_path(Store(root), SPEC.id)))
    # The learning rate each epoch trained with (not the next one's): MultiStepLR's milestone
    # round(0.5 * 3) = 2 decays it x0.1 after two epochs.
    assert [row["lr"] for row in csv_rows(log)] == pytest.approx([0.05, 0.05, 0.005])


class Counter(nn.Module):
    """A module whose one weight says which epoch's state it is."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def set(self, value: float) -> "Counter":
        with torch.no_grad():
            self.weight.fill_(value)
        return self


def test_best_is_the_first_epoch_of_the_highest_top1_and_survives_a_resume(tmp_path):
    """Hand-made epochs 1..4 with top-1 50, 40, 50, 45: the best is epoch 1 (a tie later is not
    a new best, as the record's max() takes the first), though epochs 2-4 changed the weights;
    it survives a checkpoint round trip made after epoch 3."""
    store = Store(tmp_path)
    model = Counter()
    history = [{"stage": "pretrain", "epoch": 1}]  # a stage without test accuracy: never a best
    kept = KeptStudents(store, "run", keep="best")
    kept.observe(history[0], model.set(-1.0))
    for epoch, top1 in [(1, 50.0), (2, 40.0), (3, 50.0)]:
        history.append({"stage": "main", "epoch": epoch, "top1": top1})
        kept.observe(history[-1], model.set(float(epoch)))
    checkpoint = kept.checkpoint_state()
    assert checkpoint[CHECKPOINT_FIELD]["epoch"] == 1
    resumed = KeptStudents(store, "run", keep="best")
    resumed.resume(checkpoint, history)
    history.append({"stage": "main", "epoch": 4, "top1": 45.0})
    resumed.observe(history[-1], model.set(4.0))
    weights = resumed.keep(model, last_epoch=4, best_epoch=1)
    assert weights["best"]["epoch"] == 1 and weights["last"]["epoch"] == 4
    assert load(tmp_path / weights["best"]["path"])["weight"].item() == 1.0
    assert load(tmp_path / weights["last"]["path"])["weight"].item() == 4.0


def test_best_weights_not_held_are_not_claimed(tmp_path, capsys):
    """A run resumed with --keep best from a checkpoint made without it has no weights of its
    best epoch (before the kill): it keeps the last, warns, and claims no best."""
    model = Counter().set(2.0)
    history = [{"stage": "main", "epoch": 1, "top1": 60.0}, {"stage": "main", "epoch": 2, "top1": 55.0}]
    kept = KeptStudents(Store(tmp_path), "run", keep="best")
    kept.resume({CHECKPOINT_FIELD: None}, history)
    weights = kept.keep(model, last_epoch=2, best_epoch=1)
    assert "best" not in weights and "without --keep best" in capsys.readouterr().out
    assert not student_path(Store(tmp_path), "run", "best").exists()


def test_loading_what_is_not_there_is_one_clear_error(kept_run, tmp_path):
    root, record, _ = kept_run
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    with pytest.raises(UserError, match="no run 'nope'"):
        api.load_student(copy, "nope")
    other = RunSpec("synthetic/tiny", "vanilla", 1, overrides={"epochs": 1})
    run_job(other.to_json(), str(copy))  # default: the last student only
    with pytest.raises(UserError, match="trained without --keep best"):
        api.load_student(copy, other.id, which="best")
    (copy / record["student_weights"]["last"]["path"]).write_bytes(b"not these weights")
    with pytest.raises(UserError, match="does not match the checksum"):
        api.load_student(copy, SPEC.id)
