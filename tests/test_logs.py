"""Per-epoch logs (kdbench/logs.py): the CSV beside each record and the optional TensorBoard
events, both rebuilt from the run's history."""

from __future__ import annotations

import sys

import pytest

from kdbench.cli import main
from kdbench.logs import EpochLog, csv_path, render_csv, tensorboard_dir
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.worker import run_job

# A pre-training stage with its own term, then two main epochs, the first without a test
# evaluation (eval_every > 1).
HISTORY = [
    {"stage": "hint", "epoch": 1, "loss": 0.5, "terms": {"hint": 0.5}, "lr": 0.1, "lr_next": 0.1,
     "seconds": 2.0},
    {"stage": "main", "epoch": 1, "loss": 2.25, "terms": {"ce": 2.0, "kd": 0.25}, "lr": 0.1,
     "lr_next": 0.1, "train_top1": 30.0, "seconds": 3.5},
    {"stage": "main", "epoch": 2, "loss": 1.125, "terms": {"ce": 1.0, "kd": 0.125}, "lr": 0.1,
     "lr_next": 0.01, "train_top1": 61.5, "top1": 58.25, "top5": 90.0, "seconds": 3.25},
]


def test_the_csv_has_one_row_per_epoch_and_a_column_per_term():
    assert render_csv(HISTORY) == (
        "epoch,stage,loss,loss_hint,loss_ce,loss_kd,train_top1,top1,top5,lr,seconds\n"
        "1,hint,0.5,0.5,,,,,,0.1,2.0\n"
        "1,main,2.25,,2.0,0.25,30.0,,,0.1,3.5\n"
        "2,main,1.125,,1.0,0.125,61.5,58.25,90.0,0.1,3.25\n"
    )


def test_floats_are_written_so_they_read_back_equal():
    entry = {**HISTORY[1], "loss": 1 / 3, "terms": {"ce": 2 / 3}}
    line = render_csv([entry]).splitlines()[1]
    assert float(line.split(",")[2]) == 1 / 3 and float(line.split(",")[3]) == 2 / 3


def test_a_restart_rewrites_the_csv_from_the_checkpoints_history(tmp_path):
    """An attempt killed after logging an epoch but before checkpointing it left one row too
    many: the resumed run's CSV is its checkpoint's history, not the old file plus more."""
    store = Store(tmp_path)
    path = csv_path(store, "run")
    path.parent.mkdir(parents=True)
    path.write_text(render_csv(HISTORY))
    log = EpochLog(store, "run")
    log.start(HISTORY[:2])
    assert path.read_text() == render_csv(HISTORY[:2])
    log.epoch(HISTORY)
    assert path.read_text() == render_csv(HISTORY)
    log.close()


def test_tensorboard_shows_each_epoch_once_after_a_kill_and_resume(tmp_path):
    """A 2-epoch run killed after epoch 1 and resumed: TensorBoard (its own event reader) holds
    one value per epoch for each tag, equal to the record's history."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Interrupt(BaseException):
        pass

    def stop(event):
        if event["event"] == "epoch" and event["epoch"] == 1:
            raise Interrupt

    spec = RunSpec("synthetic/tiny", "vanilla", 0, overrides={"epochs": 2})
    options = {"tensorboard": True}
    with pytest.raises(Interrupt):
        run_job(spec.to_json(), str(tmp_path), options, on_progress=stop)
    assert run_job(spec.to_json(), str(tmp_path), options)["status"] == "done"
    history = Store(tmp_path).read(spec.id)["history"]
    events = EventAccumulator(str(tensorboard_dir(Store(tmp_path), spec.id)))
    events.Reload()
    assert {"main/loss", "main/loss_ce", "main/top1", "main/top5", "main/lr"} <= set(events.Tags()["scalars"])
    for tag, key in [("main/loss", "loss"), ("main/top1", "top1"), ("main/lr", "lr")]:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([e[key] for e in history], rel=1e-6)
    assert [s.value for s in events.Scalars("main/loss_ce")] == pytest.approx(
        [e["terms"]["ce"] for e in history], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_and_nothing_written(tmp_path, monkeypatch, capsys):
    # Python's own way to make an import fail: None in sys.modules (the package may be
    # installed here, and the test must see the machine without it).
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    results = tmp_path / "results"
    code = main(["run", "--setting", "synthetic/tiny", "--methods", "kd", "--seeds", "1",
                 "--results", str(results), "--executor", "inprocess", "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--tensorboard needs the tensorboard package" in err
    assert "kdbench[tensorboard]" in err
    assert not results.exists()
