"""Grouped training (issue 17): the runs of one setting and seed train together, one teacher
forward per batch, and each run's record is bit-identical to the same run trained alone."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdbench import registry, settings
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import train, train_group
from kdbench.worker import run_group_job, run_job

SETTING = "synthetic/tiny"


class Interrupt(BaseException):
    """Escapes every handler, like a kill between two epochs."""


def built_ins() -> list[str]:
    """The methods kdbench ships (a third-party plugin installed here is not ours to time)."""
    return [name for name in registry.names()
            if registry.registrations()[name][0].distribution == "kdbench"]


def student(method: str, seed: int = 1, **overrides) -> RunSpec:
    return RunSpec(SETTING, method, seed, overrides={"epochs": 1, **overrides},
                   **settings.get(SETTING).spec_fields())


@pytest.fixture
def small_results(monkeypatch, tmp_path):
    """A results directory with the teacher of synthetic/tiny on 192 of its training images (3
    steps an epoch; trained here in seconds): every built-in trains twice (alone and grouped)
    in seconds. The setting's content is part of the run ids, so its runs and teacher are
    other runs than the full setting's."""
    tiny = settings.SETTINGS[SETTING]
    monkeypatch.setitem(settings.SETTINGS, SETTING, dataclasses.replace(tiny, train_subset=192))
    results = tmp_path / "small-results"
    teacher = RunSpec(SETTING, "vanilla", 0, "teacher", **settings.get(SETTING).spec_fields())
    assert run_job(teacher.to_json(), str(results))["status"] == "done"
    return results


def comparable(record: dict) -> dict:
    """What a run computes: history (not its seconds), metrics, the kept student's checksum."""
    return {
        "history": [{key: value for key, value in entry.items() if key != "seconds"}
                    for entry in record["history"]],
        "metrics": record["metrics"],
        "student_sha256": record["student_weights"]["last"]["sha256"],
        "config": record["config"],
        "extra_parameters": record["extra_parameters"],
    }


def copy_of(results, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(results, target)
    return target


# slow: every built-in (22 with a composition) trains twice, alone and grouped, ~90 s on 2 cores.
@pytest.mark.slow
def test_every_built_in_trained_in_one_group_equals_it_trained_alone(
        small_results, tmp_path):
    methods = built_ins() + ["crd+kd"]
    assert {"vanilla", "kd", "fitnet", "mhgd", "crd", "ab"} <= set(methods)
    # One epoch: the pre-training stages (FitNets, MHGD, AB, FT, FSP) run their stage epoch in
    # the cohort of the others' main epoch (the same batches), then their main epoch apart.
    specs = [student(method) for method in methods]
    alone_store = Store(copy_of(small_results, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in specs}
    grouped = train_group(specs, Store(small_results))
    failed = {spec.method: outcome for spec in specs
              if isinstance(outcome := grouped[spec.id], Exception)}
    assert not failed, failed
    for spec in specs:
        assert comparable(grouped[spec.id]) == comparable(alone[spec.id]), spec.method
        group = grouped[spec.id]["provenance"]["group"]
        assert group == {"size": len(specs), "members": [s.id for s in specs]}
        assert alone[spec.id]["provenance"]["group"] == {"size": 1, "members": [spec.id]}
        assert grouped[spec.id]["peak_memory_bytes"] > 0


def test_a_run_in_a_group_is_initialised_from_its_own_seed_whatever_comes_before(
        small_results, tmp_path):
    # The same run after another run that draws from the global RNG at build and every step
    # (CRD: projection heads, negative sampling), or first: the same numbers.
    target = student("kd")
    after = train_group([student("crd"), target], Store(small_results))[target.id]
    first = train_group([target], Store(copy_of(small_results, tmp_path, "b")))[target.id]
    assert comparable(after) == comparable(first)


def test_a_group_holding_out_a_validation_split_equals_its_runs_alone(
        small_results, tmp_path):
    specs = [dataclasses.replace(student(method), held_out=0.25) for method in ("kd", "fitnet")]
    alone_store = Store(copy_of(small_results, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in specs}
    grouped = train_group(specs, Store(small_results))
    for spec in specs:
        record = grouped[spec.id]
        assert comparable(record) == comparable(alone[spec.id]), spec.method
        assert record["metrics"]["val_top1_last"] == alone[spec.id]["metrics"]["val_top1_last"]
        assert record["validation"] == alone[spec.id]["validation"]


def counting_teacher_forwards(monkeypatch) -> list[int]:
    """Counts the teacher's forward passes over a training batch (the dry passes use 2 images)."""
    import kdbench.teachers

    batches: list[int] = []
    load = kdbench.teachers.load_teacher

    def counted(*args, **kwargs):
        teacher = load(*args, **kwargs)
        teacher.register_forward_pre_hook(
            lambda module, inputs: batches.append(1) if inputs[0].shape[0] > 2 else None)
        return teacher

    monkeypatch.setattr(kdbench.teachers, "load_teacher", counted)
    return batches


def test_a_group_makes_one_teacher_forward_per_batch(small_results, monkeypatch):
    batches = counting_teacher_forwards(monkeypatch)
    specs = [student("kd"), student("at"), student("vanilla")]
    outcomes = train_group(specs, Store(small_results))
    assert all(outcome["status"] == "done" for outcome in outcomes.values())
    assert len(batches) == 3  # one epoch of 3 batches, shared by kd and at (vanilla needs none)


def test_runs_resumed_at_different_epochs_catch_up_apart_then_rejoin(
        small_results, tmp_path, monkeypatch):
    ahead, behind = student("kd", epochs=3), student("rkd", epochs=3)
    alone_store = Store(copy_of(small_results, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in (ahead, behind)}
    store = Store(small_results)

    def stop_after_epoch(event):
        if event["event"] == "epoch" and event["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(ahead, store, on_progress=stop_after_epoch)  # ahead: 2 epochs checkpointed
    batches = counting_teacher_forwards(monkeypatch)
    order = []
    outcomes = train_group([ahead, behind], store, on_progress=lambda spec, event: event["event"] == "epoch"
                           and order.append((spec.method, event["epoch"])))
    assert order == [("rkd", 1), ("rkd", 2), ("kd", 3), ("rkd", 3)]
    assert len(batches) == 3 * 3  # rkd's first two epochs alone, the last one together
    for spec in (ahead, behind):
        assert comparable(outcomes[spec.id]) == comparable(alone[spec.id]), spec.method


class FailingKD(registry.get("kd")):
    """KD whose loss goes wrong at one step of the first epoch: raises, or turns non-finite."""

    name = "failing"
    failure = "raise"

    def loss(self, s, t, batch, progress):
        terms = super().loss(s, t, batch, progress)
        if progress.epoch == 0 and progress.step == 1:
            if self.failure == "raise":
                raise RuntimeError("boom at step 2")
            terms["kd"] = terms["kd"] * float("nan")
        return terms


class NonFiniteKD(FailingKD):
    name = "nonfinite"
    failure = "nan"


@pytest.fixture
def failing_methods(monkeypatch):
    get = registry.get
    plugins = {"failing": FailingKD, "nonfinite": NonFiniteKD}
    monkeypatch.setattr(registry, "get", lambda name: plugins.get(name) or get(name))


def test_a_run_that_fails_leaves_the_group_and_the_others_go_on(
        failing_methods, small_results, tmp_path):
    good = [student("kd", epochs=2), student("fitnet", epochs=2)]
    bad = [student("failing", epochs=2), student("nonfinite", epochs=2)]
    alone_store = Store(copy_of(small_results, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in good}
    store = Store(small_results)
    outcomes = {outcome["id"]: outcome
                for outcome in run_group_job([spec.to_json() for spec in [good[0], *bad, good[1]]],
                                             str(small_results))}
    assert outcomes[bad[0].id]["status"] == "failed" and "boom at step 2" in outcomes[bad[0].id]["error"]
    assert outcomes[bad[1].id]["status"] == "failed"
    assert outcomes[bad[1].id]["error"].startswith("NonFiniteLoss: loss became non-finite in stage 'main', epoch 1, step 2")
    for spec in bad:
        record = store.read(spec.id)
        assert record["status"] == "failed" and "Traceback" in record["error"]["traceback"]
    for spec in good:
        assert outcomes[spec.id]["status"] == "done"
        assert comparable(store.read(spec.id)) == comparable(alone[spec.id]), spec.method
        assert not store.checkpoint_path(spec.id).exists()


def test_a_group_of_runs_stored_already_trains_only_what_is_missing(
        small_results):
    done, missing = student("kd"), student("at")
    store = Store(small_results)
    assert run_group_job([done.to_json()], str(small_results))[0]["status"] == "done"
    before = store.record_path(done.id).stat().st_mtime_ns
    outcomes = run_group_job([done.to_json(), missing.to_json()], str(small_results))
    assert outcomes[0].get("skipped") and outcomes[1]["status"] == "done"
    assert store.record_path(done.id).stat().st_mtime_ns == before


def test_runs_of_different_groups_are_refused(tmp_path):
    with pytest.raises(ValueError, match="share"):
        train_group([student("kd", seed=1), student("kd", seed=2)], Store(tmp_path))
    assert not any(tmp_path.iterdir())  # refused before anything was written




def test_memory_estimate_counts_each_layer_output_and_one_steps_activations():
    from torch import nn

    from kdbench.memory import HEADROOM, ActivationCounter, fits, parameter_bytes, still_to_allocate

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with ActivationCounter(model) as counted:
        model(torch.zeros(3, 4))
    assert counted.bytes == 4 * (3 * 8 + 3 * 8 + 3 * 2)  # fp32 outputs of the three layers
    assert counted.scaled(3, 6) == 2 * counted.bytes
    model(torch.zeros(3, 4))
    assert counted.bytes == 4 * 54  # hooks gone after the block
    assert parameter_bytes([model, model[0]]) == 4 * (4 * 8 + 8 + 8 * 2 + 2)  # shared counted once
    # Gradients and momentum of every run; the activations of the largest step only.
    assert still_to_allocate([100, 50], [1000, 3000]) == 2 * 150 + 3000
    assert fits([100, 50], [1000, 3000], int(3300 / HEADROOM) + 1)
    assert not fits([100, 50], [1000, 3000], int(3300 / HEADROOM) - 1)

# --- through the command line: the local executor ---------------------------------------------

PYTHON = [sys.executable, "-m", "kdbench"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stored(results) -> dict[str, dict]:
    return {record["id"]: record for record in Store(results).records()
            if record["spec"]["role"] == "student"}


# slow: 2 runs of 4 epochs, three times (alone, grouped until killed, resumed), ~40 s on 2 idle
# cores (the kill needs epochs long enough to land inside one).
@pytest.mark.slow
def test_run_groups_a_seeds_runs_by_default_and_a_killed_group_resumes_to_the_same_records(
        results_with_teacher, tmp_path):
    grid = ["run", "--setting", SETTING, "--methods", "kd", "--seeds", "1", "--epochs", "4",
            "--jobs", "2", "--no-table"]
    alone = copy_of(results_with_teacher, tmp_path, "alone")
    solo = subprocess.run(PYTHON + grid + ["--no-group", "--results", str(alone)], env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert solo.returncode == 0, solo.stderr
    expected = stored(alone)
    assert len(expected) == 2 and all(r["provenance"]["group"]["size"] == 1 for r in expected.values())

    # Grouped (the default): SIGKILL the launcher and its group's worker once every run of
    # the group has checkpointed an epoch, then the same command again.
    results = results_with_teacher
    store = Store(results)
    process = subprocess.Popen(PYTHON + grid + ["--results", str(results)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 900
    while not all(store.checkpoint_path(run_id).exists() for run_id in expected):
        assert process.poll() is None and time.time() < deadline, "ended before every checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not stored(results), "killed too late: a run had finished"
    resumed = subprocess.run(PYTHON + grid + ["--results", str(results)], env=ENV,
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr
    got = stored(results)
    assert got.keys() == expected.keys()
    for run_id, record in got.items():
        assert comparable(record) == comparable(expected[run_id]), record["spec"]["method"]
        assert record["provenance"]["group"] == {"size": 2, "members": sorted(
            got, key=lambda i: ["vanilla", "kd"].index(got[i]["spec"]["method"]))}


def test_group_size_cuts_each_group_into_chunks_that_go_across_the_seeds_first():
    from kdbench.launch import student_groups

    methods = ["vanilla", "kd", "at", "rkd", "fitnet"]
    students = [RunSpec("synthetic/tiny", method, seed) for seed in (0, 1) for method in methods]
    whole = student_groups(students)
    assert [[spec.method for spec in group] for group in whole] == [methods, methods]
    chunked = student_groups(students, group_size=2)
    assert [[(spec.method, spec.seed) for spec in group] for group in chunked] == [
        [("vanilla", 0), ("kd", 0)], [("vanilla", 1), ("kd", 1)],
        [("at", 0), ("rkd", 0)], [("at", 1), ("rkd", 1)],
        [("fitnet", 0)], [("fitnet", 1)]]
    assert student_groups(students, group=False, group_size=2) == [[spec] for spec in students]
