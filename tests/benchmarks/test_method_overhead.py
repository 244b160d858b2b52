"""Each method's overhead: one training step of the method, divided by the same step with the
plain student + the teacher's forward pass (cross-entropy only, no taps).

The step is built from the engine's own pieces, in kdbench/train.py's order: FeatureTaps on
both networks, the teacher under no_grad, the engine's CE term weighted by ``ce_weight``, the
method's ``loss`` and ``backward`` (its gradient rule), the optimiser over the student and the
method's trainable modules. What is measured is what a method adds: taps, its loss terms, its
extra modules and its gradient rule. The loop's own bookkeeping is the framework benchmark's.

The pair is the field's default, wrn_40_2 → wrn_16_2, at the common recipe's batch of 64 on
32-px random data with 100 classes (CIFAR-100's shapes). A method's cost grows with the batch
(RKD's angles are B³) and not with the networks, so a smaller pair or batch would misstate the
ratio; one round costs ~5-8 s on one core of the 2-core VM, hence few rounds.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import registry, settings
from kdbench.errors import UserError
from kdbench.method import Batch, Features, Method, PretrainStage, Progress, iter_parameters
from kdbench.models import build_model
from kdbench.taps import FeatureTaps, as_float32
from kdbench.train import build_optimizer, parameters_feeding, shapes_of, stage_overrides

TEACHER, STUDENT = "wrn_40_2", "wrn_16_2"
NUM_CLASSES, CHANNELS, IMAGE_SIZE = 100, 3, 32
NUM_TRAIN = 50000  # CIFAR's training-set size, for methods that size a memory bank by it
RECIPE = settings.COMMON_CIFAR
BATCH = RECIPE.batch_size
SMOKE_BATCH = 8  # --benchmark-disable (CI): the same steps at a size that only checks they run
ROUNDS = 4
# Targets of issue 7, reported next to the measured ratio; never asserted (shared machines).
TARGETS = {"kd": 1.15, "fitnet": 1.15, "at": 1.15, "rkd": 1.15, "mhgd": 1.5,
           "dkd": 1.15, "dist": 1.15,  # issue 16: the logit methods
           # issue 15: the classic zoo
           "sp": 1.15, "cc": 1.15, "vid": 1.15, "pkt": 1.15, "nst": 1.15, "fsp": 1.15, "ft": 1.15,
           "crd": 1.15, "kdsvd": 1.15, "ab": 1.15, "crd+kd": 1.15}
# Compositions are made on demand, not registered: the one is measured too.
COMPOSITIONS = ["crd+kd"]


def registered_method(name: str) -> type[Method]:
    """The method's class, or a skip naming why its import fails (a colleague's method in
    progress must not break the benchmarks of the others)."""
    try:
        return registry.get(name)
    except UserError as error:
        pytest.skip(f"{name}: {error}")


def calibrate_batch_norm(model: nn.Module, images: Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images``, then eval mode.

    A trained teacher's running statistics match its activations; a freshly initialised one's
    (mean 0, variance 1) do not, and in eval mode its deep stage outputs grow by orders of
    magnitude (resnet56: RMS ~7700 at stage 3, wrn_40_2: ~70). Losses of high degree in the
    features (FSP's Gram matrices) then diverge within a few steps on one batch, which no run
    with a trained teacher sees. Timing is unaffected."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one pass gives the batch's statistics
    model.train()
    with torch.no_grad():
        model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def plain_step(student: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer,
               images: Tensor, labels: Tensor) -> Callable[[], Tensor]:
    """The baseline: the teacher's forward pass (when the method has a teacher) and a
    cross-entropy step of the student, without hooks."""

    def step() -> Tensor:
        if teacher is not None:
            with torch.no_grad():
                teacher(images)
        student.train()
        loss = F.cross_entropy(student(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main_step(method: Method, student: nn.Module, teacher: nn.Module | None,
              student_taps: FeatureTaps, teacher_taps: FeatureTaps | None,
              student_parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
              batch: Batch, progress: Progress) -> Callable[[], dict[str, Tensor]]:
    """One step of the main stage, as kdbench/train.py takes it (fp32: no autocast)."""
    trainable_modules = method.trainable_modules()

    def step() -> dict[str, Tensor]:
        student.train()
        method.eval()
        for module in trainable_modules:
            module.train()
        t: Features | None = None
        if teacher is not None:
            with torch.no_grad():
                t = teacher_taps.pop(teacher(batch.images))
        logits = student(batch.images)
        s = student_taps.pop(logits)
        terms = {"ce": method.ce_weight * F.cross_entropy(logits.float(), batch.labels)}
        terms.update(method.loss(as_float32(s), as_float32(t), batch, progress))
        optimizer.zero_grad(set_to_none=True)
        method.backward(terms, student_parameters, progress)
        optimizer.step()
        return {name: term.detach() for name, term in terms.items()}

    return step


def pretrain_step(stage: PretrainStage, student: nn.Module, teacher: nn.Module,
                  student_taps: FeatureTaps, teacher_taps: FeatureTaps,
                  optimizer: torch.optim.Optimizer, batch: Batch) -> Callable[[], dict[str, Tensor]]:
    """One step of a pre-training stage (FitNets' hints, MHGD's attention network), as
    kdbench/train.py takes it."""
    run_student = stage.student_up_to_stage is not None

    def step() -> dict[str, Tensor]:
        student.train(run_student)
        for module in stage.modules:
            module.train()
        with torch.no_grad():
            t = teacher_taps.pop(teacher(batch.images))
        s = student_taps.pop(student(batch.images)) if run_student else None
        terms = stage.loss(as_float32(s), as_float32(t), batch)
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(terms.values())).sum().backward()
        optimizer.step()
        return {name: term.detach() for name, term in terms.items()}

    return step


@pytest.mark.parametrize("name", registry.names() + COMPOSITIONS)
def test_method_step_overhead(name: str, benchmark, interleave, report) -> None:
    method_class = registered_method(name)
    torch.manual_seed(0)
    batch_size = BATCH if benchmark.enabled else SMOKE_BATCH
    images = torch.randn(batch_size, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))
    batch = Batch(images, labels, torch.arange(batch_size))

    method = method_class(method_class.Config())
    student = build_model(STUDENT, NUM_CLASSES, CHANNELS)
    teacher = calibrate_batch_norm(build_model(TEACHER, NUM_CLASSES, CHANNELS), images).requires_grad_(False)
    if not method.uses_teacher:
        teacher = None
    # The baseline's own copies, taken before any hook is installed on the originals.
    plain_student, plain_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    plain_optimizer = build_optimizer(list(plain_student.parameters()), RECIPE)

    student_taps = FeatureTaps(student, method.student_taps)
    teacher_taps = FeatureTaps(teacher, method.teacher_taps) if teacher is not None else None
    sample = images[:2]
    with torch.no_grad():
        student.eval()
        student_shapes = shapes_of(student_taps.pop(student(sample)), student)
        teacher_shapes = shapes_of(teacher_taps.pop(teacher(sample)), teacher) if teacher is not None else None
    method.build(student_shapes, teacher_shapes, NUM_TRAIN)
    # A balanced training set whose first samples are this batch (Batch.index = 0..B-1).
    training_labels = torch.arange(NUM_TRAIN) % NUM_CLASSES
    training_labels[:batch_size] = labels
    method.observe_training_set(training_labels)

    stages = method.pretrain_stages()
    pretrain_epochs = sum(stage.epochs for stage in stages)
    progress = Progress(epoch=0, epochs=RECIPE.epochs, step=0, steps_per_epoch=NUM_TRAIN // BATCH,
                        pretrain_epochs=pretrain_epochs)
    student_parameters = list(student.parameters())
    optimizer = build_optimizer(student_parameters + iter_parameters(method.trainable_modules()), RECIPE)

    baselines: dict[str, Callable[[], object]] = {
        "plain": plain_step(plain_student, plain_teacher, plain_optimizer, images, labels)}
    stage_results: dict[str, list[dict[str, Tensor]]] = {}
    for stage in stages:
        stage_parameters = (parameters_feeding(student, student_taps, stage.student_up_to_stage, sample,
                                               stage.student_role)
                            if stage.student_up_to_stage is not None else [])
        # A stage may set its own weight decay (MHGD's stage 1) and learning rate, as train.py
        # honours them.
        stage_recipe = RECIPE.with_overrides(stage_overrides(stage))
        stage_optimizer = build_optimizer(stage_parameters + iter_parameters(stage.modules), stage_recipe)
        run_stage = pretrain_step(stage, student, teacher, student_taps, teacher_taps,
                                  stage_optimizer, batch)
        results = stage_results.setdefault(stage.name, [])
        baselines[f"pretrain:{stage.name}"] = lambda run=run_stage, out=results: out.append(run())

    main_results: list[dict[str, Tensor]] = []
    run_main = main_step(method, student, teacher, student_taps, teacher_taps, student_parameters,
                         optimizer, batch, progress)
    comparison = interleave(candidate=("step", lambda: main_results.append(run_main())),
                            baselines=baselines, rounds=ROUNDS)

    # Correctness only: every step ran and every loss term stayed finite.
    assert main_results and all(len(results) == len(main_results) for results in stage_results.values())
    for terms in main_results + [terms for results in stage_results.values() for terms in results]:
        for term_name, value in terms.items():
            assert value.dim() == 0 and math.isfinite(value.item()), f"{name}: {term_name} = {value}"

    # The ratio on CPU time (steady on a shared machine: the step runs in this process, one
    # torch thread), with the wall-clock ratio beside it.
    details: dict[str, object] = {
        "pair": f"{TEACHER}->{STUDENT}" if teacher is not None else STUDENT,
        "batch": batch_size, "rounds": comparison.rounds(),
        "step_cpu_ms": round(1000 * comparison.median("step", "cpu"), 1),
        "plain_cpu_ms": round(1000 * comparison.median("plain", "cpu"), 1),
        "overhead_ratio_wall": round(comparison.ratio("step", "plain", "wall"), 3),
    }
    for stage in stages:
        key = f"pretrain:{stage.name}"
        details[f"pretrain_{stage.name}_cpu_ms"] = round(1000 * comparison.median(key, "cpu"), 1)
        details[f"pretrain_{stage.name}_ratio"] = round(comparison.ratio(key, "plain", "cpu"), 3)
    if name in TARGETS:
        details["target"] = TARGETS[name]
    report("overhead_ratio", comparison.ratio("step", "plain", "cpu"), **details)
