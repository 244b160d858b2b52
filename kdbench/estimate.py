"""What a grid will cost on this CPU, measured, not guessed: time one training step of each
network pair here and multiply by the grid's steps. Printed before a CPU run starts, so a
user who launched the CIFAR default on a laptop knows within seconds that it means days."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.data import shape_of
from kdbench.models import build_model
from kdbench.settings import QUICK_SETTING, Setting
from kdbench.spec import BF16, FP32, RunSpec


@dataclass(frozen=True)
class StepTimes:
    """One training step of a network pair, in seconds: the frozen teacher's forward pass and
    the student's step (forward, backward, SGD). A run alone pays both on every batch; the runs
    of a group (kdbench.train.train_group) pay the teacher's once per batch between them."""

    teacher_forward: float
    student_step: float


def step_times(arch: str, teacher_arch: str | None, setting: Setting, batch_size: int,
               precision: str = FP32, data_dir=None) -> StepTimes:
    """The step of ``arch`` (and the forward of ``teacher_arch``), each timed after a warm-up,
    under bf16 autocast for a bf16 run (on a CPU without bf16 instructions that is several times
    slower than fp32, which is what a user asking for it must be told)."""
    shape = shape_of(setting.dataset, setting.dataset_options, data_dir)
    channels, classes, size = shape.in_channels, shape.num_classes, shape.image_size
    model = build_model(arch, classes, channels)
    teacher = build_model(teacher_arch, classes, channels).eval() if teacher_arch else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, channels, size, size)
    labels = torch.randint(0, classes, (batch_size,))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == BF16
                else contextlib.nullcontext())
    forwards, steps = [], []
    for _ in range(3):
        started = time.perf_counter()
        with autocast, torch.no_grad():
            if teacher is not None:
                teacher(images)
        forwarded = time.perf_counter()
        with autocast:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        forwards.append(forwarded - started)
        steps.append(time.perf_counter() - forwarded)
    return StepTimes(min(forwards[1:]) if teacher is not None else 0.0, min(steps[1:]))


def grid_seconds(runs: int, groups: int, steps: int, times: StepTimes) -> float:
    """``runs`` student runs of ``steps`` steps each, trained in ``groups`` groups (``runs``
    groups without grouping): one teacher forward per batch of each group. Methods whose main
    stage trains apart (a pre-training stage consumed their stream) pay their own forward; this
    counts them as grouped, so grouped grids of such methods come out a little short."""
    return steps * (groups * times.teacher_forward + runs * times.student_step)


def cpu_cost_warning(teachers: list[RunSpec], students: list[RunSpec], chosen: list[Setting],
                     jobs: int, data_dir=None, group: bool = True,
                     group_size: int | None = None) -> str | None:
    """The warning printed before a CPU grid starts: its rough wall time at ``jobs`` processes
    (at most one per group: a grid with fewer groups than jobs leaves the rest idle)."""
    from kdbench.launch import student_groups

    if not teachers and not students:
        return None
    groups = student_groups(students, group, group_size)
    jobs = max(1, min(jobs, len(groups) + len(teachers)))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // jobs))
    try:
        total = 0.0
        for setting in chosen:
            known = shape_of(setting.dataset, setting.dataset_options, data_dir).num_train
            if known is None:  # an ImageFolder: its size is known once it is listed
                from kdbench.data import open_stream

                known = open_stream(setting.dataset, setting.dataset_options, None, torch.device("cpu"),
                                    1, setting.recipe.augmentation, 0, data_dir, 0).num_train
            n_train = min(known, setting.train_subset or math.inf)
            if any(spec.setting == setting.name for spec in teachers):
                recipe = setting.teacher_recipe
                steps = recipe.epochs * math.ceil(n_train / recipe.batch_size)
                total += steps * step_times(setting.teacher, None, setting, recipe.batch_size,
                                            data_dir=data_dir).student_step
            mine = [members for members in groups if members[0].setting == setting.name]
            if mine:
                recipe = setting.recipe.with_overrides(mine[0][0].overrides)
                steps = recipe.epochs * math.ceil(n_train / recipe.batch_size)
                for precision in sorted({members[0].precision for members in mine}):
                    alike = [members for members in mine if members[0].precision == precision]
                    times = step_times(setting.student, setting.teacher, setting,
                                       recipe.batch_size, precision, data_dir)
                    total += grid_seconds(sum(map(len, alike)), len(alike), steps, times)
    finally:
        torch.set_num_threads(threads)
    hours = total / jobs / 3600
    # Rough: one timed step per network pair, no evaluation, no start-up, no pre-training
    # stages; with records in the results directory, kdbench.progress estimates from their
    # measured epoch times instead.
    rough = ("a rough estimate from one timed training step per network pair, without "
             "evaluation or pre-training stages")
    if hours < 0.25:
        return (f"kdbench: no GPU: running on the CPU, roughly {max(1, round(hours * 60))} min for "
                f"this grid ({rough})")
    quick = all(setting.name == QUICK_SETTING for setting in chosen)
    return (f"kdbench: warning: no GPU: this grid will take roughly {hours:.1f} hours on this CPU "
            f"({jobs} processes at a time; {rough})"
            + ("" if quick else ". Use --executor slurm for a GPU cluster, or "
               f"--setting {QUICK_SETTING} for a quick check"))
