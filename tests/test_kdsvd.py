"""KD-SVD (methods/kdsvd.py): hand values, an independent computation from torch.linalg.svd,
the properties the method has, the authors' gradient rule, the contract and a run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import Batch, FeatureShapes, Features, Progress
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.testing import check_method
from kdbench.train import train
from kdbench.methods.kdsvd import KDSVD, KDSVDConfig, correlation_loss

SHAPES = [(4, 5, 5), (6, 3, 3), (8, 2, 2)]  # the last has H·W < C: the other Gram matrix


def built(config: KDSVDConfig = KDSVDConfig(), student=SHAPES, teacher=SHAPES) -> KDSVD:
    method = KDSVD(config)
    method.build(FeatureShapes((), (), 5, postact_stages=tuple(student)),
                 FeatureShapes((), (), 5, postact_stages=tuple(teacher)), 32)
    return method


def maps(seed: int, shapes=SHAPES, batch: int = 3, requires_grad: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=generator).requires_grad_(requires_grad)
            for shape in shapes]


def features(stage_maps: list[torch.Tensor]) -> Features:
    return Features(logits=torch.zeros(stage_maps[0].shape[0], 5), postact_stages=stage_maps)


BATCH = Batch(torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.long), torch.arange(3))
PROGRESS = Progress(0, 2, 0, 1, 0)


def test_correlation_loss_hand_computed() -> None:
    # One sample, one entry per vector: G_S = exp(−(2 − 0)²/8) = e^(−1/2), G_T = exp(0) = 1.
    student = [torch.tensor([[[0.0]]]), torch.tensor([[[2.0]]])]
    teacher = [torch.tensor([[[0.0]]]), torch.tensor([[[0.0]]])]
    assert correlation_loss(student, teacher).item() == pytest.approx((math.exp(-0.5) - 1) ** 2)


def independent_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """KD-SVD as Shared.py writes it, from torch.linalg.svd: V_T the first right singular vector
    (its entries summing to ≥ 0, kdbench's fixed sign), the student's four candidates, the one with the largest |cos| signed to agree (Align_rsv),
    then the RBF correlations of consecutive points and the summed squared difference."""
    student_vectors, teacher_vectors = [], []
    for s, t in zip(student_maps, teacher_maps):
        v_s = torch.linalg.svd(s.flatten(2).transpose(1, 2), full_matrices=False).Vh[:, :4].transpose(1, 2)
        v_t = torch.linalg.svd(t.flatten(2).transpose(1, 2), full_matrices=False).Vh[:, :1].transpose(1, 2)
        v_t = v_t * torch.where(v_t.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)  # the fixed sign
        cosine = v_s.transpose(1, 2) @ v_t  # (B, 4, 1)
        mask = torch.where(cosine.abs() == cosine.abs().amax(dim=1, keepdim=True), cosine.sign(), 0.0)
        student_vectors.append(v_s @ mask)
        teacher_vectors.append(v_t)
    total = 0.0
    for i in range(1, len(student_maps)):
        g_s = torch.exp(-(student_vectors[i][:, :, None] - student_vectors[i - 1][:, None]) ** 2 / 8)
        g_t = torch.exp(-(teacher_vectors[i][:, :, None] - teacher_vectors[i - 1][:, None]) ** 2 / 8)
        total = total + ((g_s - g_t.detach()) ** 2).sum()
    return total


def test_loss_and_gradient_equal_an_independent_svd_computation() -> None:
    method = built()
    student, teacher = maps(0, requires_grad=True), maps(1)
    ours = method.loss(features(student), features(teacher), BATCH, PROGRESS)["svd_rbf"]
    twin = [m.detach().clone().requires_grad_(True) for m in student]
    theirs = independent_loss(twin, teacher)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)
    ours.backward()
    theirs.backward()
    for a, b in zip(student, twin):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5)


def test_zero_at_student_equal_teacher_and_positive_otherwise() -> None:
    method = built()
    same = maps(0)
    assert method.loss(features(same), features(same), BATCH, PROGRESS)["svd_rbf"].item() == 0.0
    assert method.loss(features(maps(2)), features(same), BATCH, PROGRESS)["svd_rbf"].item() > 0.0


def test_invariant_to_scaling_the_feature_maps() -> None:
    method = built()
    student, teacher = maps(0), maps(1)
    base = method.loss(features(student), features(teacher), BATCH, PROGRESS)["svd_rbf"]
    scaled = method.loss(features([3.0 * m for m in student]), features([0.5 * m for m in teacher]),
                         BATCH, PROGRESS)["svd_rbf"]
    assert scaled.item() == pytest.approx(base.item(), rel=1e-4)


def test_batch_mean_is_repdistillers_division_by_the_batch_size() -> None:
    student, teacher = maps(0), maps(1)
    summed = built().loss(features(student), features(teacher), BATCH, PROGRESS)["svd_rbf"]
    mean = built(KDSVDConfig(batch_mean=True)).loss(features(student), features(teacher), BATCH, PROGRESS)
    assert mean["svd_rbf"].item() == pytest.approx(summed.item() / 3)


def test_widths_and_stage_counts_that_differ_project_and_pair_the_last_points() -> None:
    student_shapes = [(4, 5, 5), (5, 3, 3), (8, 2, 2)]
    teacher_shapes = [(2, 6, 6), (4, 5, 5), (6, 3, 3), (8, 2, 2)]
    method = built(student=student_shapes, teacher=teacher_shapes)
    assert method.student_points == [0, 1, 2] and method.teacher_points == [1, 2, 3]
    assert set(method.projections) == {"1"}  # only the 5 → 6 point
    terms = method.loss(features(maps(0, student_shapes, requires_grad=True)),
                        features(maps(1, teacher_shapes)), BATCH, PROGRESS)
    terms["svd_rbf"].backward()
    assert all(p.grad is not None for p in method.projections.parameters())


def test_the_authors_rule_clips_each_tensors_transfer_gradient_to_its_ce_gradient() -> None:
    torch.manual_seed(0)
    method = built()
    layer = torch.nn.Conv2d(4, 4, 1)
    student_maps = maps(0)
    for epoch in (0, 3):
        progress = Progress(epoch, 5, 0, 1, 0)

        def terms():
            first = layer(student_maps[0])
            s = features([first, *student_maps[1:]])
            ce = F.cross_entropy(first.mean((2, 3))[:, :4], torch.tensor([0, 1, 2]))
            return {"ce": ce, **method.loss(s, features(maps(1)), BATCH, progress)}

        found = terms()
        ce = torch.autograd.grad(found["ce"], list(layer.parameters()), retain_graph=True)
        transfer = torch.autograd.grad(found["svd_rbf"], list(layer.parameters()))
        factor = 1 / (1 + math.exp(-epoch))
        expected = [g_ce + g_t * min(1.0, (g_ce.norm() * factor / g_t.norm()).item())
                    for g_ce, g_t in zip(ce, transfer)]
        for parameter in layer.parameters():
            parameter.grad = None
        method.backward(terms(), list(layer.parameters()), progress)
        for parameter, grad in zip(layer.parameters(), expected):
            assert torch.allclose(parameter.grad, grad, rtol=1e-4, atol=1e-7)


def test_contract() -> None:
    check_method("kdsvd")


def test_two_epoch_run(results_with_teacher) -> None:
    record = train(RunSpec("synthetic/tiny", "kdsvd", 0), Store(results_with_teacher))
    main = [entry for entry in record["history"] if entry["stage"] == "main"]
    assert [entry["epoch"] for entry in main] == [1, 2] and set(main[0]["terms"]) == {"ce", "svd_rbf"}
    assert all(math.isfinite(entry["loss"]) for entry in main)
    assert record["method_display_name"] == "KD-SVD"
