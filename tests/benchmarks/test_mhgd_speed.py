"""MHGD's training-step time against KD's on the same pair and batch, and its decomposition.

    python -m pytest tests/benchmarks/test_mhgd_speed.py --benchmark-enable

The step group compares one main-stage training step (teacher forward, student forward and
backward through the method's own ``loss``/``backward``, optimiser step) of vanilla, KD and MHGD
on wrn_16_2 → wrn_16_1, batch 64, 32 px: pytest-benchmark prints each mean with its ratio to the
fastest. The issue's target is MHGD ≤ 1.5 × KD. The decomposition group times the compression
of one batch of feature maps (forward and backward) at the sizes the spec names.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdbench import registry, settings
from kdbench.method import Batch, Progress, iter_parameters
from kdbench.models import build_model
from kdbench.taps import FeatureTaps
from kdbench.train import build_optimizer, shapes_of
from methods.mhgd import right_singular_vectors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def training_step(method_name: str, device: str, batch_size: int = 64):
    torch.manual_seed(0)
    method_class = registry.get(method_name)
    method = method_class(method_class.Config())
    student = build_model("wrn_16_1", 100).to(device)
    teacher = build_model("wrn_16_2", 100).to(device).eval().requires_grad_(False)
    student_taps = FeatureTaps(student, method.student_taps)
    teacher_taps = FeatureTaps(teacher, method.teacher_taps)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.arange(batch_size, device=device) % 100
    batch = Batch(images, labels, torch.arange(batch_size, device=device))
    with torch.no_grad():
        student.eval()
        student_shapes = shapes_of(student_taps.pop(student(images[:2])))
        teacher_shapes = shapes_of(teacher_taps.pop(teacher(images[:2])))
    method.build(student_shapes, teacher_shapes, 50000)
    method.to(device)
    student_parameters = list(student.parameters())
    optimizer = build_optimizer(student_parameters + iter_parameters(method.trainable_modules()),
                                settings.COMMON_CIFAR)
    student.train()
    method.eval()
    for module in method.trainable_modules():
        module.train()
    progress = Progress(epoch=1, epochs=240, step=0, steps_per_epoch=782, pretrain_epochs=40)

    def step() -> None:
        with torch.no_grad():
            t = teacher_taps.pop(teacher(images)) if method.uses_teacher else None
        logits = student(images)
        s = student_taps.pop(logits)
        terms = {"ce": method.ce_weight * F.cross_entropy(logits, labels)}
        terms.update(method.loss(s, t, batch, progress))
        optimizer.zero_grad(set_to_none=True)
        method.backward(terms, student_parameters, progress)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method_name", ["vanilla", "kd", "mhgd"])
def test_training_step(benchmark, method_name, device):
    benchmark.group = f"training step wrn_16_2 → wrn_16_1, batch 64, 32 px, {device}"
    step = training_step(method_name, device)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8),
                                   (128, 256, 32, 32)], ids=lambda shape: "x".join(map(str, shape)))
def test_decomposition(benchmark, shape, device):
    benchmark.group = f"student decomposition (4 vectors), forward + backward, {device}"
    torch.manual_seed(0)
    maps = torch.randn(*shape, device=device).relu().requires_grad_(True)
    weights = torch.randn(shape[0], shape[1], 4, device=device)

    def run() -> None:
        vectors = right_singular_vectors(maps, 4)
        torch.autograd.grad((vectors * weights).sum(), maps)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
