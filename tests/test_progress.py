"""The progress display (kdbench/progress.py): the grid counted in epochs (teachers and
pre-training stages included), the time left simulated from measured epoch times, each
finished run's top-1, "resuming" for a run that starts from its checkpoint, a log without
carriage returns or cursor moves, and a terminal whose clock moves without events.

A terminal, captured from tmux (``tmux capture-pane -p``) while ``kdbench run --methods
kd,fitnet --seeds 2 --setting synthetic/tiny --epochs 2`` trained on a results directory that
held the teacher and one earlier run, is in tests/data/progress_tmux.txt; the same grid's log
(stderr to a file) in tests/data/progress_log.txt.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from kdbench import progress
from kdbench.launch import InProcessExecutor
from kdbench.progress import ProgressDisplay, start_estimate
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions, train

DATA = Path(__file__).parent / "data"
SETTING = "synthetic/tiny"  # teacher recipe: 4 epochs; students: 2 with --epochs 2 below
TEACHER_SPEC = RunSpec(SETTING, "vanilla", 0, role=TEACHER)
KD = [RunSpec(SETTING, "kd", seed, overrides={"epochs": 2}) for seed in (0, 1)]


def epoch(number: int, epochs: int, seconds: float, top1: float | None = None, stage: str = "main") -> dict:
    event = {"event": "epoch", "stage": stage, "epoch": number, "epochs": epochs, "loss": 1.0,
             "seconds": seconds}
    return {**event, "top1": top1} if top1 is not None else event


def started(display: ProgressDisplay, spec: RunSpec, schedule: list, done: int = 0) -> None:
    display.start(spec.label())
    display.event(spec.label(), {"event": "start", "schedule": schedule,
                                 "epochs": sum(e for _, e in schedule), "done": done})


def test_a_log_counts_epochs_teacher_first_and_simulates_the_time_left():
    log = io.StringIO()
    display = ProgressDisplay([TEACHER_SPEC, *KD], stream=log, live=False, jobs=2)
    assert display.epochs() == (0, 4 + 2 + 2, True)  # kd declares no pre-training stage
    started(display, TEACHER_SPEC, [["main", 4]])
    display.event(TEACHER_SPEC.label(), epoch(1, 4, 10.0))
    # By hand: the teacher's 3 epochs left at 10 s, then both students at once (2 slots), each
    # 2 epochs timed by the teacher's (no student epoch measured yet): 30 + 20 = 50 s, not the
    # (30 + 40) / 2 = 35 s that dividing by the slots would say.
    assert display.seconds_left() == pytest.approx(50.0, abs=0.5)
    line = log.getvalue().splitlines()[-1]
    assert line.startswith(f"  {TEACHER_SPEC.label()}: epoch 1/4 loss 1.0000 (10.0 s) | 1/8 epochs, 0/3 runs")
    assert "roughly 50 s left (students' epochs guessed from the teacher's)" in line
    for number in (2, 3, 4):
        display.event(TEACHER_SPEC.label(), epoch(number, 4, 10.0, top1=90.0 + number))
    display.finish(TEACHER_SPEC.label(), "done", top1=94.0)
    assert log.getvalue().splitlines()[-1].startswith(
        f"[1/3] {TEACHER_SPEC.label()}: done, test top-1 94.00% | 4/8 epochs, 1/3 runs")
    for spec in KD:
        started(display, spec, [["main", 2]])
    display.event(KD[0].label(), epoch(1, 2, 4.0))
    # Now a kd epoch is measured (4 s): kd seed 0 has one left, seed 1 two: max(4, 8) = 8 s.
    assert display.seconds_left() == pytest.approx(8.0, abs=0.5)
    assert "about 8 s left" in log.getvalue().splitlines()[-1]
    display.event(KD[0].label(), epoch(2, 2, 4.0, top1=71.25))
    display.finish(KD[0].label(), "done")  # the top-1 from its last epoch
    display.finish(KD[1].label(), "failed", "RuntimeError: boom")
    display.close()
    lines = log.getvalue().splitlines()
    assert f"[2/3] {KD[0].label()}: done, test top-1 71.25%" in lines[-3]
    # The failed run's untrained epochs leave the grid: 4 + 2 + 0 of 8 planned.
    assert lines[-2].startswith(f"[3/3] {KD[1].label()}: failed - RuntimeError: boom | 6/6 epochs, 3/3 runs, 1 failed")
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    # One line per finished epoch and run, one summary: nothing for starts or steps.
    assert len(lines) == 4 + 1 + 2 + 2 + 1


def test_a_resumed_run_says_from_where_and_counts_its_checkpointed_epochs():
    log = io.StringIO()
    spec, other_seed = (RunSpec(SETTING, "fitnet", seed, overrides={"epochs": 3}) for seed in (0, 1))
    display = ProgressDisplay([spec, other_seed], stream=log, live=False)
    # fitnet has a hint stage that only its start event (or a stored run) tells: "+".
    assert display.epochs() == (0, 6, False)
    assert "0/6+ epochs" in display._summary()
    started(display, spec, [["hints", 2], ["main", 3]], done=3)
    assert log.getvalue().splitlines() == [f"  resuming {spec.label()} from its checkpoint: epoch 3 of 5 done"]
    # The other seed trains the same stages: known now too.
    assert display.epochs() == (3, 10, True)
    assert display.runs[0].remaining() == [("main", 2)]
    assert display.runs[1].remaining() == [("hints", 2), ("main", 3)]


def test_stored_records_give_the_start_estimate_and_the_stages_of_a_method():
    measured = {"id": "x", "status": "done", "spec": RunSpec(SETTING, "fitnet", 7).to_json(),
                "history": [{"stage": "hints", "epoch": 1, "seconds": 2.0},
                            {"stage": "main", "epoch": 1, "seconds": 6.0},
                            {"stage": "main", "epoch": 2, "seconds": 6.0}]}
    teacher = {"id": "t", "status": "done", "spec": TEACHER_SPEC.to_json(),
               "history": [{"stage": "main", "epoch": e, "seconds": 5.0} for e in (1, 2, 3, 4)]}
    fitnets = [RunSpec(SETTING, "fitnet", seed) for seed in (0, 1)]
    display = ProgressDisplay(fitnets, stream=io.StringIO(), live=False, records=[measured, teacher])
    assert [run.schedule for run in display.runs] == [[("hints", 1), ("main", 2)]] * 2
    assert display.seconds_left() == pytest.approx(2 * (2.0 + 2 * 6.0))
    # A GPU's epochs say nothing of this CPU's: only records made on the device count.
    on_gpu = {**measured, "id": "g", "spec": RunSpec(SETTING, "fitnet", 8).to_json(),
              "provenance": {"device": "cuda: NVIDIA H100"},
              "history": [{**entry, "seconds": 0.1} for entry in measured["history"]]}
    measured["provenance"] = teacher["provenance"] = {"device": "cpu: x86_64"}
    line = start_estimate(fitnets, [measured, teacher, on_gpu], jobs=1, device="cpu")
    assert start_estimate(fitnets, [measured, on_gpu], jobs=1, device="cuda").startswith(
        "kdbench: about 1 s of training")  # 2 × (0.1 + 2 × 0.1) = 0.6 s
    assert line == ("kdbench: about 28 s of training for this grid (6 epochs, up to 1 run at a time; from 7 epoch "
                    "times measured in this results directory)")
    # Nothing measured for this grid's kinds of epoch: no estimate from records (the CLI then
    # prints the rough one and says it is rough).
    assert start_estimate([RunSpec("fashion_mnist/quick", "kd", 0)], [measured, teacher], jobs=1) is None


def test_a_terminal_clock_moves_every_tick_without_events(monkeypatch):
    monkeypatch.setattr(progress, "TICK_S", 0.05)
    screen = io.StringIO()
    display = ProgressDisplay([TEACHER_SPEC], stream=screen, live=True)
    started(display, TEACHER_SPEC, [["main", 4]])
    drawn = screen.getvalue().count("\x1b[")
    time.sleep(0.5)
    redraws = screen.getvalue().count("\x1b[") - drawn
    display.close()
    assert redraws >= 3  # the ticker redrew the block in place: cursor up, clear
    assert not display._ticker.is_alive()
    last = screen.getvalue().rpartition("\x1b[J")[2]
    assert re.fullmatch(r"\[\.{30}\] 0/4 epochs, 0/1 runs, 0:0\d elapsed, time left: after the "
                        r"first epochs are measured\n", last), last


def test_a_real_run_and_its_resume_as_a_log_shows_them(tmp_path):
    """Real training (vanilla on synthetic/tiny, 2 epochs, no teacher needed): the first launch
    is stopped by an error right after epoch 1 is checkpointed, the second resumes it."""
    spec = RunSpec(SETTING, "vanilla", 0, overrides={"epochs": 2})
    store = Store(tmp_path)

    def stop_after_the_first_epoch(event):
        if event["event"] == "epoch":
            raise KeyboardInterrupt("stopped after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        train(spec, store, TrainOptions(threads=1), stop_after_the_first_epoch)
    assert store.checkpoint_path(spec.id).exists()
    log = io.StringIO()
    display = ProgressDisplay([spec], stream=log, live=False)
    [result] = InProcessExecutor(display).run([], [spec], tmp_path, TrainOptions(threads=1))
    display.close()
    assert result.status == "done"
    record = store.read(spec.id)
    lines = log.getvalue().splitlines()
    assert lines[0] == f"  resuming {spec.label()} from its checkpoint: epoch 1 of 2 done"
    assert re.fullmatch(rf"  {re.escape(spec.label())}: epoch 2/2 loss \d+\.\d{{4}} test top-1 "
                        rf"{record['metrics']['top1_last']:.2f}% \(\d+\.\d s\) \| 2/2 epochs, 0/1 runs, "
                        r"\d+:\d\d elapsed, about \d+ s left", lines[1]), lines[1]
    assert lines[2].startswith(f"[1/1] {spec.label()}: done, test top-1 {record['metrics']['top1_last']:.2f}% | 2/2 epochs")
    assert len(lines) == 4 and "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_the_captured_terminal_and_log_samples_are_those_of_this_display():
    screen = (DATA / "progress_tmux.txt").read_text()
    log = (DATA / "progress_log.txt").read_text()
    assert re.search(r"^\[[#.]{30}\] \d+/\d+\+? epochs, \d+/\d+ runs, \d+:\d\d elapsed", screen, re.M)
    assert re.search(r"^  synthetic/tiny \w+ seed \d: (\[hints\] )?epoch \d/\d step \d+/\d+$", screen, re.M)
    assert "resuming synthetic/tiny" in log and "\r" not in log and "\x1b" not in log
    assert re.search(r"^\[\d/\d\] synthetic/tiny \w+ seed \d: done, test top-1 \d+\.\d\d%", log, re.M)


def test_grouped_runs_hold_one_slot_for_the_sum_of_their_shares_of_the_group_epoch():
    """A record trained in a group of 2 measured the group's epoch (10 s): each run's share is
    5 s. Four pending students in two groups of 2 on 2 slots then take 2 epochs × (5 + 5) s =
    20 s in parallel, not the 4 runs × 2 epochs × 10 s / 2 slots = 40 s of counting every run
    as a process of its own at the group's time."""
    methods = ("kd", "at")
    measured = [{"id": f"m{i}", "status": "done", "spec": RunSpec(SETTING, method, 7).to_json(),
                 "provenance": {"group": {"size": 2, "members": ["m0", "m1"]}},
                 "history": [{"stage": "main", "epoch": e, "seconds": 10.0} for e in (1, 2)]}
                for i, method in enumerate(methods)]
    students = [RunSpec(SETTING, method, seed) for seed in (0, 1) for method in methods]
    groups = [students[:2], students[2:]]
    line = start_estimate(students, measured, jobs=2, groups=groups)
    assert line.startswith("kdbench: about 20 s of training for this grid (8 epochs")
    # The same records counted as solo runs (no group in their provenance): 10 s per run and
    # epoch; in groups, (10 + 10) × 2 per group: 40 s on 2 slots; without groups also 40 s.
    solo = [{**record, "provenance": {}} for record in measured]
    assert start_estimate(students, solo, jobs=2, groups=groups).startswith("kdbench: about 40 s")
    assert start_estimate(students, solo, jobs=2).startswith("kdbench: about 40 s")
    # One slot: the two groups one after the other, 2 × 20 s.
    assert start_estimate(students, measured, jobs=1, groups=groups).startswith("kdbench: about 40 s")

    # Live: a running group's epoch events (12 s each, the group's time) count 6 s per run,
    # and the epoch under way is subtracted once for the group, not once per run.
    display = ProgressDisplay(students, stream=io.StringIO(), live=False, jobs=1, groups=groups)
    for spec in groups[0]:
        started(display, spec, [["main", 2]])
    for spec in groups[0]:
        display.event(spec.label(), epoch(1, 2, 12.0))
    running = [run for run in display.runs if run.group == 0]
    assert [run.group_size for run in running] == [2, 2]
    for run in running:
        run.epoch_started = time.monotonic() - 3.0  # 3 s into the group's second epoch
    # Shares: 6 s per epoch of kd and of at (this display was given no records). Left: group
    # 0's last epoch of both, less the 3 s under way; then group 1's two epochs of both, on
    # the one slot: 12 - 3 + 24.
    share = 6.0
    assert display.seconds_left() == pytest.approx(2 * share - 3.0 + 4 * share, abs=0.1)
