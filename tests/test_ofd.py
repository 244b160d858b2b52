"""OFD (methods/ofd.py, Heo et al. ICCV 2019): the margin against an independent truncated-normal
mean, the partial L2 case by case, the level weights and the build from the teacher's BN.
Milliseconds each."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from kdbench.method import Batch, FeatureShapes, Features, Progress
from kdbench.methods.ofd import OFD, OFDConfig, channel_margin, margins_from_norm, partial_l2

PROGRESS = Progress(epoch=0, epochs=2, step=0, steps_per_epoch=1, pretrain_epochs=0)


@pytest.mark.parametrize("weight, bias", [(1.0, 0.0), (0.5, 0.3), (2.0, -1.0), (-0.7, 0.2), (1.0, 2.9)])
def test_margin_is_the_mean_of_the_negative_part(weight: float, bias: float) -> None:
    # E[x | x < 0] for x ~ N(β, γ²), from scipy's truncated normal: an independent computation.
    std = abs(weight)
    expected = scipy.stats.truncnorm.mean(-math.inf, (0.0 - bias) / std, loc=bias, scale=std)
    assert channel_margin(weight, bias) == pytest.approx(expected, rel=1e-6)
    assert channel_margin(weight, bias) < 0


def test_margin_hand_values_and_the_authors_fallback() -> None:
    # A fresh BN (γ = 1, β = 0): E[x | x < 0] of N(0, 1) = −φ(0)/Φ(0) = −√(2/π).
    assert channel_margin(1.0, 0.0) == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-9)
    # P(x < 0) = Φ(−4) ≈ 3e-5 ≤ 0.001: the authors' get_margin_from_BN falls back to −3σ.
    assert channel_margin(0.5, 2.0) == pytest.approx(-1.5)
    # Φ(−3) ≈ 0.00135 > 0.001: still the conditional mean.
    assert channel_margin(1.0, 3.0) == pytest.approx(
        scipy.stats.truncnorm.mean(-math.inf, -3.0, loc=3.0, scale=1.0), rel=1e-6)
    assert channel_margin(0.0, -0.4) == pytest.approx(-0.4) and channel_margin(0.0, 0.4) == 0.0
    margins = margins_from_norm(((1.0, 0.5), (0.0, 2.0)))
    torch.testing.assert_close(margins, torch.tensor([channel_margin(1.0, 0.0), -1.5]))


def one_channel(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(1, 1, 1, -1)


MARGIN = torch.tensor([-1.0])


@pytest.mark.parametrize("teacher, student, expected", [
    # t ≤ m: the target is the margin m = −1; a student at or below it costs nothing.
    (-2.0, -1.5, 0.0), (-2.0, -1.0, 0.0), (-2.0, -0.5, 0.25),
    # m < t ≤ 0: the target is t; below it is free, above it costs (s − t)².
    (-0.5, -0.7, 0.0), (-0.5, 0.3, 0.64), (0.0, -1.0, 0.0), (0.0, 0.5, 0.25),
    # t > 0: every difference counts, above and below.
    (1.0, 1.5, 0.25), (1.0, 0.2, 0.64), (1.0, 1.0, 0.0),
])
def test_partial_l2_case_by_case(teacher: float, student: float, expected: float) -> None:
    value = partial_l2(one_channel([student]), one_channel([teacher]), MARGIN)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_partial_l2_sums_over_positions_and_channels_and_averages_over_the_batch() -> None:
    teacher = one_channel([-2.0, -0.5, 1.0, 1.0])
    student = one_channel([-0.5, 0.3, 1.5, 0.2])
    assert partial_l2(student, teacher, MARGIN).item() == pytest.approx(0.25 + 0.64 + 0.25 + 0.64)
    # Two channels with their own margins: channel 2's margin −3 makes s = −2.5 cost (−2.5 + 3)².
    two_teacher = torch.tensor([[[[-4.0]], [[-4.0]]]])
    two_student = torch.tensor([[[[-2.5]], [[-2.5]]]])
    margins = torch.tensor([-2.0, -3.0])
    assert partial_l2(two_student, two_teacher, margins).item() == pytest.approx(0.25)
    # Duplicating the batch leaves it unchanged (mean over samples: the authors' sum / batch_size).
    doubled = partial_l2(torch.cat([student, student]), torch.cat([teacher, teacher]), MARGIN)
    assert doubled.item() == pytest.approx(partial_l2(student, teacher, MARGIN).item())


def test_no_gradient_where_the_student_is_below_a_non_positive_target() -> None:
    teacher = one_channel([-2.0, -0.5, 0.0])
    student = one_channel([-1.5, -0.7, -0.1]).requires_grad_(True)
    loss = partial_l2(student, teacher, MARGIN)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


SHAPES = FeatureShapes(stages=(), embedding=(8,), num_classes=5,
                       preact_stages=((4, 8, 8), (8, 4, 4), (8, 2, 2)),
                       preact_norms=(((1.0,) * 4, (0.0,) * 4), ((0.5,) * 8, (0.2,) * 8), ((2.0,) * 8, (-1.0,) * 8)))


def identity_ofd(student: FeatureShapes = SHAPES, teacher: FeatureShapes = SHAPES) -> OFD:
    method = OFD(OFDConfig())
    method.build(student, teacher, num_train=16)
    with torch.no_grad():
        for connector in method.connectors:
            conv, norm = connector
            conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
            norm.running_var.fill_(1.0 - norm.eps)  # eval-mode BN is then exactly the identity
    return method.eval()


def features(stages: list[torch.Tensor]) -> Features:
    return Features(logits=torch.zeros(stages[0].shape[0], 5), preact_stages=stages)


def test_margins_come_from_the_teachers_bn_and_are_saved_with_the_method() -> None:
    method = identity_ofd()
    for position, norm in enumerate(SHAPES.preact_norms):
        torch.testing.assert_close(getattr(method, f"margin{position}"), margins_from_norm(norm))
    assert {"margin0", "margin1", "margin2"} <= set(method.state_dict())
    assert [(c[0].in_channels, c[0].out_channels) for c in method.connectors] == [(4, 4), (8, 8), (8, 8)]
    assert method.fidelity == "authors' code" and method.display_name == "OFD"


def test_deeper_levels_weigh_more_by_powers_of_two() -> None:
    # The same unit excess (student 1 above a positive teacher at one position) at level i of 3
    # costs 1e-3 · 1/2^(2 − i): the authors' / 2 ** (feat_num - i - 1).
    method = identity_ofd()
    batch = Batch(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), torch.arange(1))
    teacher = [torch.ones(1, *shape) for shape in SHAPES.preact_stages]
    for level, expected in enumerate([0.25e-3, 0.5e-3, 1e-3]):
        student = [t.clone() for t in teacher]
        student[level][0, 0, 0, 0] += 1.0
        loss = method.loss(features(student), features(teacher), batch, PROGRESS)["ofd"]
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert method.loss(features(teacher), features(teacher), batch, PROGRESS)["ofd"].item() == 0.0


def test_stage_counts_that_differ_pair_the_last_stages_and_pool_the_teacher() -> None:
    # A 4-stage student (VGG) against a 3-stage teacher: the student's last three stages; the
    # teacher's maps are average-pooled to the student's (smaller) sizes.
    student = FeatureShapes(stages=(), embedding=(8,), num_classes=5,
                            preact_stages=((2, 8, 8), (4, 4, 4), (8, 2, 2), (8, 1, 1)))
    method = OFD(OFDConfig())
    method.build(student, SHAPES, num_train=16)
    assert method.levels == [(1, 0), (2, 1), (3, 2)]
    s = [torch.randn(2, *shape) for shape in student.preact_stages]
    t = [torch.randn(2, *shape) for shape in SHAPES.preact_stages]
    batch = Batch(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.arange(2))
    assert torch.isfinite(method.loss(features(s), features(t), batch, PROGRESS)["ofd"])


def test_a_teacher_without_a_bn_before_the_relu_is_refused() -> None:
    teacher = FeatureShapes(stages=(), embedding=(8,), num_classes=5, preact_stages=SHAPES.preact_stages,
                            preact_norms=(SHAPES.preact_norms[0], None, SHAPES.preact_norms[2]))
    with pytest.raises(ValueError, match="BN before the ReLU"):
        OFD(OFDConfig()).build(SHAPES, teacher, num_train=16)


def test_margins_are_read_from_a_real_teachers_bns_before_the_relu() -> None:
    # wrn_16_1's BNs before the ReLU (the authors' get_bn_before_relu: block2.layer[0].bn1,
    # block3.layer[0].bn1, bn1), given trained-looking values; OFD's margins must be theirs.
    from kdbench.method import PREACT_STAGES
    from kdbench.models import build_model
    from kdbench.taps import FeatureTaps
    from kdbench.train import shapes_of

    torch.manual_seed(0)
    teacher = build_model("wrn_16_1", 10, 3).eval()
    norms = [teacher.get_submodule(name) for name in ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.2, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    taps = FeatureTaps(teacher, {PREACT_STAGES})
    with torch.no_grad():
        shapes = shapes_of(taps.pop(teacher(torch.zeros(2, 3, 16, 16))), teacher)
    method = OFD(OFDConfig())
    method.build(shapes, shapes, num_train=16)
    for position, norm in enumerate(norms):
        expected = [channel_margin(w, b) for w, b in zip(norm.weight.tolist(), norm.bias.tolist())]
        torch.testing.assert_close(getattr(method, f"margin{position}"), torch.tensor(expected))
