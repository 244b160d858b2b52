"""ReviewKD (methods/reviewkd.py, Chen et al. CVPR 2021): the hierarchical context loss by hand,
the warm-up schedule, the review order of the fusions, and the modules' sizes against the
authors' build_review_kd lists. Milliseconds each."""

from __future__ import annotations

import pytest
import torch

from kdbench.method import Batch, FeatureShapes, Features, Progress
from kdbench.methods.reviewkd import ReviewKD, ReviewKDConfig, hcl_loss, warmup_factor


def test_hcl_hand_value_on_a_two_by_two_map() -> None:
    # s = 0, t = [[1, 2], [3, 4]]: MSE = (1 + 4 + 9 + 16)/4 = 7.5. Height 2: only the 1×1 pooling
    # is smaller (mean 2.5, MSE 6.25, weight ½): (7.5 + 3.125) / 1.5.
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hcl_loss([torch.zeros_like(teacher)], [teacher]).item() == pytest.approx((7.5 + 3.125) / 1.5)
    # A 1×1 level (the embedding) is its MSE alone.
    assert hcl_loss([torch.zeros(2, 3, 1, 1)], [torch.full((2, 3, 1, 1), 2.0)]).item() == pytest.approx(4.0)


def test_hcl_pyramid_weights_on_an_eight_by_eight_map() -> None:
    # A constant offset c survives every pooling: every MSE is c², so the normalised sum is c².
    teacher = torch.randn(2, 3, 8, 8)
    assert hcl_loss([teacher + 0.5], [teacher]).item() == pytest.approx(0.25, rel=1e-5)
    # A ±1 checkerboard offset vanishes under 4×4, 2×2 and 1×1 pooling of an 8×8 map: only the
    # full-resolution MSE (1) remains, divided by 1 + ½ + ¼ + ⅛.
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    assert hcl_loss([teacher + checkerboard], [teacher]).item() == pytest.approx(1 / 1.875, rel=1e-5)
    # Levels add up; equal maps cost nothing.
    assert hcl_loss([teacher + 0.5, teacher], [teacher, teacher]).item() == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("epoch, epochs, expected", [
    (0, 240, 1 / 20), (9, 240, 0.5), (18, 240, 19 / 20), (19, 240, 1.0), (30, 240, 1.0),
    (0, 120, 0.1), (4, 120, 0.5), (9, 120, 1.0), (0, 2, 1.0),
])
def test_warmup_is_linear_over_20_of_240_epochs_scaled(epoch: int, epochs: int, expected: float) -> None:
    assert warmup_factor(epoch, epochs, 20.0) == pytest.approx(expected)


def wrn_shapes(width: int) -> tuple[FeatureShapes, FeatureShapes]:
    """(student: stages, teacher: pre-activation stages) of a WRN of widen factor k on 32 px."""
    stages = ((16 * width, 32, 32), (32 * width, 16, 16), (64 * width, 8, 8))
    shapes = FeatureShapes(stages=stages, embedding=(64 * width,), num_classes=100, preact_stages=stages)
    return shapes, shapes


def abf_parameters(in_channels: int, mid: int, out_channels: int, fuse: bool) -> int:
    """The authors' ABF: conv1 (1×1, no bias) + BN, conv2 (3×3, no bias) + BN, att_conv (1×1, bias)."""
    count = in_channels * mid + 2 * mid + 9 * mid * out_channels + 2 * out_channels
    return count + (2 * mid * 2 + 2 if fuse else 0)


def test_modules_match_the_authors_lists_for_wrn_40_2_to_wrn_16_2() -> None:
    # build_review_kd for 'wrn' students, r = 2: in_channels [32, 64, 128, 128], out_channels
    # [32, 64, 128, 128] (the wrn_40_2 teacher's), shapes [1, 8, 16, 32], mid = min(512, 128).
    student, teacher = wrn_shapes(2)
    method = ReviewKD(ReviewKDConfig())
    method.build(student, teacher, num_train=16)
    widths = [(f.reduce[0].in_channels, f.reduce[0].out_channels, f.output[0].out_channels,
               f.attention is not None, f.out_size) for f in method.fusions]
    assert widths == [(32, 128, 32, True, (32, 32)), (64, 128, 64, True, (16, 16)),
                      (128, 128, 128, True, (8, 8)), (128, 128, 128, False, (1, 1))]
    expected = sum(abf_parameters(i, 128, o, fuse) for i, o, fuse in
                   [(32, 32, True), (64, 64, True), (128, 128, True), (128, 128, False)])
    assert method.extra_parameters() == expected
    assert method.fidelity == "authors' code" and method.display_name == "ReviewKD"


def random_features(shapes: FeatureShapes, batch: int, requires_grad: bool) -> Features:
    draw = lambda *shape: torch.randn(batch, *shape).requires_grad_(requires_grad)
    return Features(logits=draw(shapes.num_classes), stages=[draw(*s) for s in shapes.stages],
                    embedding=draw(*shapes.embedding), preact_stages=[draw(*s) for s in shapes.preact_stages])


def test_each_level_reviews_the_deeper_student_levels_only() -> None:
    student, teacher = wrn_shapes(1)
    method = ReviewKD(ReviewKDConfig())
    method.build(student, teacher, num_train=16)
    s = random_features(student, 2, requires_grad=True)
    outputs = method.review(s)
    assert [tuple(o.shape[1:]) for o in outputs] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)]
    inputs = [*s.stages, s.embedding]
    for level, output in enumerate(outputs):
        # A random projection, not .sum(): the sum of a train-mode BN's output is constant.
        probe = (output * torch.randn_like(output)).sum()
        grads = torch.autograd.grad(probe, inputs, allow_unused=True, retain_graph=True)
        reached = [g is not None and g.abs().sum().item() > 0 for g in grads]
        # Level k's output depends on student levels k..deepest, never on shallower ones.
        assert reached == [index >= level for index in range(len(inputs))], level


def test_loss_is_weight_times_warmup_times_hcl() -> None:
    student, teacher = wrn_shapes(1)
    method = ReviewKD(ReviewKDConfig())
    method.build(student, teacher, num_train=16)
    s, t = random_features(student, 2, False), random_features(teacher, 2, False)
    batch = Batch(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.arange(2))
    targets = [*t.preact_stages, t.embedding[:, :, None, None]]
    hcl = hcl_loss(method.review(s), targets)
    early = method.loss(s, t, batch, Progress(0, 240, 0, 1, 0))["review"]
    late = method.loss(s, t, batch, Progress(100, 240, 0, 1, 0))["review"]
    assert early.item() == pytest.approx(5.0 / 20 * hcl.item(), rel=1e-5)
    assert late.item() == pytest.approx(5.0 * hcl.item(), rel=1e-5)


def test_stage_counts_that_differ_use_the_last_stages() -> None:
    vgg = FeatureShapes(stages=((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4)), embedding=(512,),
                        num_classes=100, preact_stages=((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4)))
    wrn, _ = wrn_shapes(1)
    method = ReviewKD(ReviewKDConfig())
    method.build(vgg, wrn, num_train=16)
    assert method.student_stages == [1, 2, 3] and method.teacher_stages == [0, 1, 2]
    outputs = method.review(random_features(vgg, 2, False))
    assert [tuple(o.shape[1:]) for o in outputs] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)]


@pytest.mark.parametrize("teacher, student, in_channels, out_channels, sizes", [
    # build_review_kd: 'x4' students [64, 128, 256, 256] → the same, shapes [1, 8, 16, 32];
    # 'resnet' students [16, 32, 64, 64], 'wrn' students [16r, 32r, 64r, 64r] → [32, 64, 128, 128].
    ("resnet32x4", "resnet8x4", [64, 128, 256, 256], [64, 128, 256, 256], [32, 16, 8, 1]),
    ("resnet56", "resnet20", [16, 32, 64, 64], [16, 32, 64, 64], [32, 16, 8, 1]),
    ("wrn_40_2", "wrn_40_1", [16, 32, 64, 64], [32, 64, 128, 128], [32, 16, 8, 1]),
])
def test_modules_from_the_real_networks_match_build_review_kd(teacher, student, in_channels, out_channels,
                                                               sizes) -> None:
    from kdbench.testing import architecture_shapes

    method = ReviewKD(ReviewKDConfig())
    method.build(architecture_shapes(student, 100, 3, 32), architecture_shapes(teacher, 100, 3, 32), 16)
    assert [f.reduce[0].in_channels for f in method.fusions] == in_channels
    assert [f.output[0].out_channels for f in method.fusions] == out_channels
    assert [f.out_size for f in method.fusions] == [(size, size) for size in sizes]
    assert {f.reduce[0].out_channels for f in method.fusions} == {min(512, in_channels[-1])}
