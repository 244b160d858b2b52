"""Grouped training (issue 17): the runs of one setting and seed train together, one teacher
forward per batch, and each run's record is bit-identical to the same run trained alone."""

import dataclasses
import shutil

import pytest
import torch

from kdbench import registry, settings
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import train, train_group
from kdbench.worker import run_group_job

SETTING = "synthetic/tiny"


class Interrupt(BaseException):
    """Escapes every handler, like a kill between two epochs."""


def built_ins() -> list[str]:
    """The methods kdbench ships (a third-party plugin installed here is not ours to time)."""
    return [name for name in registry.names()
            if registry.registrations()[name][0].distribution == "kdbench"]


def student(method: str, seed: int = 1, **overrides) -> RunSpec:
    return RunSpec(SETTING, method, seed, overrides={"epochs": 1, **overrides})


@pytest.fixture
def small_setting(monkeypatch):
    """synthetic/tiny on 192 of its training images (3 steps an epoch): every built-in trains
    twice (alone and grouped) in seconds. Its teacher is the session's (a teacher's weights do
    not depend on the students' subset)."""
    tiny = settings.SETTINGS[SETTING]
    monkeypatch.setitem(settings.SETTINGS, SETTING, dataclasses.replace(tiny, train_subset=192))


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
        small_setting, results_with_teacher, tmp_path):
    methods = built_ins() + ["crd+kd"]
    assert {"vanilla", "kd", "fitnet", "mhgd", "crd", "ab"} <= set(methods)
    # One epoch: the pre-training stages (FitNets, MHGD, AB, FT, FSP) run their stage epoch in
    # the cohort of the others' main epoch (the same batches), then their main epoch apart.
    specs = [student(method) for method in methods]
    alone_store = Store(copy_of(results_with_teacher, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in specs}
    grouped = train_group(specs, Store(results_with_teacher))
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
        small_setting, results_with_teacher, tmp_path):
    # The same run after another run that draws from the global RNG at build and every step
    # (CRD: projection heads, negative sampling), or first: the same numbers.
    target = student("kd")
    after = train_group([student("crd"), target], Store(results_with_teacher))[target.id]
    first = train_group([target], Store(copy_of(results_with_teacher, tmp_path, "b")))[target.id]
    assert comparable(after) == comparable(first)


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


def test_a_group_makes_one_teacher_forward_per_batch(small_setting, results_with_teacher, monkeypatch):
    batches = counting_teacher_forwards(monkeypatch)
    specs = [student("kd"), student("at"), student("vanilla")]
    outcomes = train_group(specs, Store(results_with_teacher))
    assert all(outcome["status"] == "done" for outcome in outcomes.values())
    assert len(batches) == 3  # one epoch of 3 batches, shared by kd and at (vanilla needs none)


def test_runs_resumed_at_different_epochs_catch_up_apart_then_rejoin(
        small_setting, results_with_teacher, tmp_path, monkeypatch):
    ahead, behind = student("kd", epochs=3), student("rkd", epochs=3)
    alone_store = Store(copy_of(results_with_teacher, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in (ahead, behind)}
    store = Store(results_with_teacher)

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
        small_setting, failing_methods, results_with_teacher, tmp_path):
    good = [student("kd", epochs=2), student("fitnet", epochs=2)]
    bad = [student("failing", epochs=2), student("nonfinite", epochs=2)]
    alone_store = Store(copy_of(results_with_teacher, tmp_path, "alone"))
    alone = {spec.id: train(spec, alone_store) for spec in good}
    store = Store(results_with_teacher)
    outcomes = {outcome["id"]: outcome
                for outcome in run_group_job([spec.to_json() for spec in [good[0], *bad, good[1]]],
                                             str(results_with_teacher))}
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
        small_setting, results_with_teacher):
    done, missing = student("kd"), student("at")
    store = Store(results_with_teacher)
    assert run_group_job([done.to_json()], str(results_with_teacher))[0]["status"] == "done"
    before = store.record_path(done.id).stat().st_mtime_ns
    outcomes = run_group_job([done.to_json(), missing.to_json()], str(results_with_teacher))
    assert outcomes[0].get("skipped") and outcomes[1]["status"] == "done"
    assert store.record_path(done.id).stat().st_mtime_ns == before


def test_runs_of_different_groups_are_refused(results_with_teacher):
    with pytest.raises(ValueError, match="share"):
        train_group([student("kd", seed=1), student("kd", seed=2)], Store(results_with_teacher))
