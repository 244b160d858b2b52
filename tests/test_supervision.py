"""The local executor's supervision of its worker processes, through the real command line:
thread counts that do not depend on what remains of a grid, Ctrl-C and SIGTERM that stop a
grid within seconds and leave no process behind, a worker killed as the out-of-memory killer
would that fails only its own run, and concurrent launches that train each run once.

Every test runs `python -m kdbench` in its own session (start_new_session), so the signals a
terminal would send can be sent to exactly that process group, and every process it started
can be found afterwards by its session id."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdbench.cli import main
from kdbench.launch import usable_cores
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions, train
from kdbench.worker import run_job

PYTHON = [sys.executable, "-m", "kdbench"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--setting", "synthetic/tiny", "--no-table"]


def kdbench(*args):
    return subprocess.run(PYTHON + list(args), capture_output=True, text=True, env=ENV, timeout=600)


def launch(*args) -> subprocess.Popen:
    return subprocess.Popen(PYTHON + list(args), env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def session_members(session: int) -> list[int]:
    """PIDs of the live processes of a session (zombies excluded), from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_for(condition, process: subprocess.Popen, timeout: float = 300, what: str = ""):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            out, err = process.communicate()
            pytest.fail(f"gave up waiting for {what} (exit {process.returncode}):\n{out}\n{err}")
        time.sleep(0.05)


def history_without_times(record):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in record["history"]]


def records(results: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in (results / "runs").glob("*.json")}


# --- 1. threads --------------------------------------------------------------------------------

@pytest.mark.skipif(usable_cores() < 2, reason="with one core every run gets one thread anyway")
def test_a_retried_run_gets_the_threads_of_the_command_not_of_what_remains(results_with_teacher):
    """The first launch trains 2 runs at once (--jobs 2); the retry of one of them is the only
    run left. Its thread count, and so its numbers, must be those of the first launch."""
    args = ["run", "--methods", "vanilla", "--seeds", "2", "--epochs", "1", "--jobs", "2", *TINY,
            "--results", str(results_with_teacher)]
    first = kdbench(*args)
    assert first.returncode == 0, first.stderr
    store = Store(results_with_teacher)
    spec = RunSpec("synthetic/tiny", "vanilla", 1, overrides={"epochs": 1})
    original = store.read(spec.id)
    assert original["provenance"]["threads"] == usable_cores() // 2
    store.record_path(spec.id).unlink()
    again = kdbench(*args)
    assert again.returncode == 0, again.stderr
    assert "1 to train" in again.stdout
    retried = store.read(spec.id)
    assert retried["provenance"]["threads"] == original["provenance"]["threads"]
    assert history_without_times(retried) == history_without_times(original)
    assert retried["metrics"] == original["metrics"]


class StopAfterFirstEpoch(BaseException):
    """Escapes the worker's error handling, as a kill between two epochs does."""


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(tmp_path):
    spec = RunSpec("synthetic/tiny", "vanilla", 0, overrides={"epochs": 3})
    try:
        reference = train(spec, Store(tmp_path / "reference"), TrainOptions(threads=1))

        def stop(event):
            if event["event"] == "epoch" and event["epoch"] == 1:
                raise StopAfterFirstEpoch

        results = tmp_path / "results"
        with pytest.raises(StopAfterFirstEpoch):
            run_job(spec.to_json(), str(results), {"threads": 1}, on_progress=stop)
        assert torch.load(Store(results).checkpoint_path(spec.id), weights_only=False)["threads"] == 1
        # Resumed by a launch that would give a fresh run two threads.
        assert run_job(spec.to_json(), str(results), {"threads": 2})["status"] == "done"
    finally:
        torch.set_num_threads(1)  # conftest's setting, for the tests after this one
    resumed = Store(results).read(spec.id)
    assert resumed["provenance"]["threads"] == 1
    assert history_without_times(resumed) == history_without_times(reference)
    assert resumed["metrics"] == reference["metrics"]


# --- 2. Ctrl-C and SIGTERM ---------------------------------------------------------------------

def interrupt_mid_grid(results: Path, send) -> tuple[subprocess.Popen, str, str, float]:
    """Start a 3-run grid (--jobs 2: one run queued), wait until the two running ones have
    checkpointed an epoch, then ``send(process)``. Returns the process, its output and the
    seconds it took to exit."""
    store = Store(results)
    specs = [RunSpec("synthetic/tiny", "vanilla", seed, overrides={"epochs": 40}) for seed in range(3)]
    process = launch("run", "--methods", "vanilla", "--seeds", "3", "--epochs", "40", "--jobs", "2",
                     *TINY, "--results", str(results))
    checkpointed = lambda: [spec for spec in specs if store.checkpoint_path(spec.id).exists()]
    wait_for(lambda: len(checkpointed()) == 2, process, what="a checkpoint of each running run")
    sent = time.time()
    send(process)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"still running 30 s after the signal:\n{err[-3000:]}")
    took = time.time() - sent
    for spec in specs:  # every finished epoch kept, nothing recorded, the queued run not started
        assert store.read(spec.id) is None
    interrupted = checkpointed()
    assert len(interrupted) == 2
    for spec in interrupted:
        assert torch.load(store.checkpoint_path(spec.id), weights_only=False)["epoch"] >= 1
    return process, out, err, took


def assert_stopped_cleanly(process: subprocess.Popen, out: str, err: str, took: float, code: int):
    # "Within seconds" is checked by interrupt_mid_grid's 30 s bound, generous on purpose: a
    # tighter timer fails on a loaded machine (17 s seen at load 12 on 2 cores) without any
    # fault in the code; the time taken is printed for the log.
    print(f"stopped {took:.1f} s after the signal")
    assert process.returncode == code, err
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "resume" in lines[0], err
    deadline = time.time() + 5
    while session_members(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert session_members(process.pid) == [], "processes left behind"


def test_ctrl_c_stops_the_grid_within_seconds_and_leaves_nothing_running(results_with_teacher):
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group.
    process, out, err, took = interrupt_mid_grid(
        results_with_teacher, lambda process: os.killpg(process.pid, signal.SIGINT))
    assert_stopped_cleanly(process, out, err, took, 130)


def test_sigterm_to_the_launcher_stops_its_workers_too(results_with_teacher):
    # `kill PID`, systemd, a container runtime: SIGTERM to the launcher alone.
    process, out, err, took = interrupt_mid_grid(
        results_with_teacher, lambda process: os.kill(process.pid, signal.SIGTERM))
    assert_stopped_cleanly(process, out, err, took, 143)


# --- 3. a dead worker --------------------------------------------------------------------------

def test_a_worker_killed_like_the_oom_killer_fails_only_its_run(results_with_teacher, capsys):
    results = results_with_teacher
    store = Store(results)
    process = launch("run", "--methods", "vanilla", "--seeds", "3", "--epochs", "5", "--jobs", "2",
                     *TINY, "--results", str(results))
    markers = results / "running"

    def a_run_in_training():
        for marker in markers.glob("*.json") if markers.is_dir() else []:
            if store.checkpoint_path(marker.stem).exists():
                return marker
        return None

    wait_for(a_run_in_training, process, what="a run's first checkpoint")
    marker = a_run_in_training()
    victim = marker.stem
    os.kill(int(marker.read_text().split()[1]), signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    stored = records(results)
    students = {run_id: r for run_id, r in stored.items() if r["spec"]["role"] == "student"}
    assert len(students) == 3
    assert stored[victim]["status"] == "failed"
    assert "SIGKILL" in stored[victim]["error"]["message"], stored[victim]["error"]
    assert all(r["status"] == "done" for run_id, r in students.items() if run_id != victim)
    assert "1 run failed" in err and "SIGKILL" in err
    assert main(["status", "--results", str(results)]) == 0
    status = capsys.readouterr().out
    assert "failed: " in status and victim in status and "SIGKILL" in status
    # Its checkpoint is kept: the retry resumes it.
    assert store.checkpoint_path(victim).exists()


def test_a_worker_killed_after_storing_its_record_leaves_no_checkpoint_or_marker(results_with_teacher):
    """SIGKILL between a run's record and its clean-up (kdbench.worker.run_job removes the
    checkpoint, then the running marker): the launcher finds the run stored and must finish the
    clean-up, since no later launch takes a stored run up again to do it. The files are planted
    as the kill leaves them: no kill can be timed into that window."""
    from kdbench.grid import running_marker
    from kdbench.worker import record_death

    store = Store(results_with_teacher)
    teacher = RunSpec("synthetic/tiny", "vanilla", 0).teacher_spec()
    assert store.is_done(teacher.id)
    checkpoint, marker = store.checkpoint_path(teacher.id), running_marker(store, teacher.id)
    for path, text in ((checkpoint, b"its last epoch"), (marker, b"host 12345\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
    record = store.record_path(teacher.id).read_bytes()
    outcome = record_death(teacher, store, "worker process killed by SIGKILL")
    assert outcome["status"] == "done"
    assert not checkpoint.exists() and not marker.exists()
    assert store.record_path(teacher.id).read_bytes() == record


# --- 8. concurrent launches --------------------------------------------------------------------

def test_three_launches_at_once_train_every_run_once(results_with_teacher):
    args = ["run", "--methods", "vanilla", "--seeds", "2", "--epochs", "3", "--executor",
            "inprocess", *TINY, "--results", str(results_with_teacher)]
    launches = [launch(*args) for _ in range(3)]
    outputs = [process.communicate(timeout=600) for process in launches]
    assert all(process.returncode == 0 for process in launches), outputs
    finished = [line for _, err in outputs for line in err.splitlines()
                if line.startswith("[") and "vanilla seed" in line]
    assert len(finished) == 6, finished  # each launch accounts for both runs...
    trained = [line for line in finished if "trained by another launch" not in line]
    assert sorted(line.split("]", 1)[1].split(":")[0] for line in trained) == [
        " synthetic/tiny vanilla seed 0 [epochs=3]", " synthetic/tiny vanilla seed 1 [epochs=3]"
    ], finished  # ...once (the label names the run's recipe override)
    assert all(r["status"] == "done" for r in records(results_with_teacher).values())
