"""Grouped training (issue 17): a seed's runs with one teacher forward per batch, against the
same runs each with its own teacher forward, and against the arithmetic bound.

Six built-ins × 1 seed on wrn_40_2 → wrn_16_2 (CPU, fp32, batch 64: CIFAR-100's shapes on
random data, 100 classes), built by the engine itself (``kdbench.train.build_run``, each from
its own seed) and stepped by the engine's own ``lockstep_step``:

- ``solo:<m>``: a cohort of one, ``[run_m]``: its own teacher forward, then its step
  (what a run alone costs per batch, T + S_m);
- ``teacher``: the teacher's forward with the union of the six methods' taps, alone (T);
- ``student:<m>``: run_m's step given that forward's features (S_m);
- ``grouped`` (the candidate): the cohort of all six (T + Σ S_m).

Reported: grouped / Σ solo (issue 17's target ≤ 0.70) and its ratio to the bound
(T + Σ S_m) / Σ (T + S_m) from the T and S_m of the same rounds (target within 5 %). Each
round times every side once, in turn; ratios are medians over the rounds (conftest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch

from kdbench import settings
from kdbench.data import Dataset
from kdbench.method import Batch
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions, build_run, lockstep_step, restricted, rng_of, start_epoch, train_step
from kdbench.taps import FeatureTaps

from test_method_overhead import calibrate_batch_norm

METHODS = ("kd", "fitnet", "at", "rkd", "mhgd", "vanilla")  # issue 17's six built-ins
TEACHER, STUDENT = "wrn_40_2", "wrn_16_2"
NUM_CLASSES, CHANNELS, IMAGE_SIZE = 100, 3, 32
NUM_TRAIN = 2048  # a batch's worth of shapes; method memory banks are sized by it
BATCH, SMOKE_BATCH = 64, 8
ROUNDS = 3
TARGET_RATIO, TARGET_OF_BOUND = 0.70, 0.05


def random_dataset(size: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                                     generator=generator)
    labels = lambda n: torch.arange(n) % NUM_CLASSES
    return Dataset("cifar100", images(size), labels(size), images(256), labels(256), NUM_CLASSES)


def test_grouped_step_against_solo_steps_and_the_bound(benchmark, interleave, report, monkeypatch, tmp_path):
    import kdbench.teachers
    from kdbench.models import build_model

    batch_size = BATCH if benchmark.enabled else SMOKE_BATCH
    dataset = random_dataset(NUM_TRAIN)
    sample = dataset.train_images[:batch_size].float() / 255
    teacher = calibrate_batch_norm(build_model(TEACHER, NUM_CLASSES, CHANNELS), sample)
    # The engine's teacher loader, given this calibrated teacher (no trained one here).
    monkeypatch.setattr(kdbench.teachers, "load_teacher", lambda *args, **kwargs: teacher)
    # ... and no stored teacher record to name its weights: a stand-in checksum.
    monkeypatch.setattr(kdbench.teachers, "stored_teacher_weights", lambda *args, **kwargs: "0" * 64)
    setting = dataclasses.replace(settings.get("cifar100/wrn_40_2-wrn_16_2"), train_subset=None)
    recipe = setting.recipe.with_overrides({"batch_size": batch_size})
    shared = {"teacher": None}
    runs = {method: build_run(RunSpec(setting.name, method, 1), setting, recipe, dataset,
                              torch.device("cpu"), Store(tmp_path), TrainOptions(), shared,
                              lambda event: None)
            for method in METHODS}
    teacher_forward = shared["teacher"]
    roles = frozenset().union(*(run.method.teacher_taps for run in runs.values()))
    teacher_taps = FeatureTaps(teacher_forward, roles)
    for run in runs.values():
        run.stage_index = len(run.schedule) - 1  # the main stage's step (FitNets, MHGD: after stage 1)
        start_epoch(run, recipe, torch.device("cpu"))
    images = (dataset.train_images[:batch_size].float() / 255 - 0.5) / 0.25
    batch = Batch(images, dataset.train_labels[:batch_size], torch.arange(batch_size))
    steps = NUM_TRAIN // batch_size
    no_autocast = contextlib.nullcontext()
    failures: list = []

    def cohort(members) -> Callable[[], None]:
        return lambda: failures.extend(lockstep_step(members, batch, teacher_forward, teacher_taps,
                                                     no_autocast, 0, steps))

    features: dict = {}

    def teacher_alone() -> None:
        with torch.no_grad():
            features["t"] = teacher_taps.pop(teacher_forward(batch.images))

    def student_alone(run) -> Callable[[], None]:
        def step() -> None:
            t = restricted(features["t"], run.method.teacher_taps) if run.method.uses_teacher else None
            with rng_of(run):
                train_step(run, batch, t, 0, steps, no_autocast)
        return step

    baselines: dict[str, Callable[[], object]] = {"teacher": teacher_alone}
    for method, run in runs.items():
        baselines[f"student:{method}"] = student_alone(run)
        baselines[f"solo:{method}"] = cohort([run])
    comparison = interleave(candidate=("grouped", cohort(list(runs.values()))), baselines=baselines,
                            rounds=ROUNDS)

    # Correctness only: no step raised, every run's loss stayed finite.
    assert not failures, failures
    for method, run in runs.items():
        assert math.isfinite(run.loss_sum.item()), method

    clock = "cpu"
    times = comparison.seconds[clock]
    rounds = range(comparison.rounds())
    ratio = [times["grouped"][i] / sum(times[f"solo:{m}"][i] for m in METHODS) for i in rounds]
    uses_teacher = [m for m in METHODS if runs[m].method.uses_teacher]
    bound = [(times["teacher"][i] + sum(times[f"student:{m}"][i] for m in METHODS))
             / sum(times["teacher"][i] * (m in uses_teacher) + times[f"student:{m}"][i] for m in METHODS)
             for i in rounds]
    median = lambda values: sorted(values)[len(values) // 2]
    measured, arithmetic = median(ratio), median(bound)
    report("grouped_over_solo", measured,
           bound=round(arithmetic, 3), of_bound=round(median([r / b for r, b in zip(ratio, bound)]), 3),
           teacher_cpu_ms=round(1000 * comparison.median("teacher", clock), 1),
           student_cpu_ms={m: round(1000 * comparison.median(f"student:{m}", clock), 1) for m in METHODS},
           grouped_cpu_ms=round(1000 * comparison.median("grouped", clock), 1),
           solo_sum_cpu_ms=round(1000 * sum(comparison.median(f"solo:{m}", clock) for m in METHODS), 1),
           wall_ratio=round(median([comparison.seconds["wall"]["grouped"][i] / sum(
               comparison.seconds["wall"][f"solo:{m}"][i] for m in METHODS) for i in rounds]), 3),
           batch=batch_size, rounds=comparison.rounds(), target=TARGET_RATIO,
           target_of_bound=f"within {TARGET_OF_BOUND:.0%}")

