"""Loss functions: properties only a correct implementation has, and values computed by hand.

Every expected number here is derived in the test from the definition (a closed form, a
triangle's sides, a softmax of ln 3), never by calling the function under test on other
inputs. Milliseconds each.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.method import Batch, FeatureShapes, Features, Progress
from kdbench.models import build_model
from kdbench.taps import FeatureTaps
from kdbench.train import shapes_of
from kdbench.methods.at import AT, ATConfig, at_loss, attention_map, pair_stages
from kdbench.methods.fitnet import FitNet, FitNetConfig, hint_loss, regressor
from kdbench.methods.kd import KD, KDConfig, kd_loss
from kdbench.methods.rkd import RKD, RKDConfig, rkd_loss

PROGRESS = Progress(epoch=0, epochs=1, step=0, steps_per_epoch=1, pretrain_epochs=0)


def no_batch(size: int = 2) -> Batch:
    return Batch(torch.zeros(size, 3, 8, 8), torch.zeros(size, dtype=torch.long), torch.arange(size))


def random_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # a uniformly random orthogonal matrix


# --- KD --------------------------------------------------------------------------------------------


def test_kd_hand_computed_value() -> None:
    # Teacher logits (ln 3, 0) at T = 1 give p_t = (3/4, 1/4); the student's (0, 0) give (1/2, 1/2).
    # KL(p_t ‖ p_s) = 3/4 ln(3/2) + 1/4 ln(1/2).
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2 with logits doubled: the same distributions, and the loss carries the factor T² = 4.
    assert kd_loss(2 * student, 2 * teacher, temperature=2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_kd_is_zero_for_equal_logits_and_averages_over_the_batch() -> None:
    logits = torch.randn(5, 7)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # "batchmean": duplicating the batch leaves the loss unchanged.
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    single = kd_loss(student, teacher, 4.0)
    double = kd_loss(torch.cat([student, student]), torch.cat([teacher, teacher]), 4.0)
    assert double.item() == pytest.approx(single.item(), rel=1e-6)


def test_kd_gradient_is_the_closed_form() -> None:
    # ∂/∂z_s [T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))] / B = T·(softmax(z_s/T) − softmax(z_t/T)) / B
    # (Hinton et al. 2015, eq. 2 times the T² factor).
    generator = torch.Generator().manual_seed(0)
    batch, classes, temperature = 6, 10, 4.0
    student = torch.randn(batch, classes, generator=generator, requires_grad=True)
    teacher = torch.randn(batch, classes, generator=generator)
    kd_loss(student, teacher, temperature).backward()
    closed = temperature * (torch.softmax(student.detach() / temperature, 1)
                            - torch.softmax(teacher / temperature, 1)) / batch
    torch.testing.assert_close(student.grad, closed, rtol=1e-5, atol=1e-7)


def test_kd_high_temperature_gradient_is_logit_matching() -> None:
    # For T ≫ |z| and zero-mean logits, softmax(z/T) ≈ (1 + z/T)/C, so the gradient above becomes
    # (z_s − z_t)/(C·B): matching logits with squared error (Hinton et al. 2015, Sec. 2.1). The
    # T² factor is what makes the limit independent of T; the error of the approximation is O(|z|/T).
    generator = torch.Generator().manual_seed(1)
    batch, classes = 4, 5
    student = torch.randn(batch, classes, generator=generator)
    teacher = torch.randn(batch, classes, generator=generator)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    logit_matching = (student - teacher) / (classes * batch)

    def relative_error(temperature: float) -> float:
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, temperature).backward()
        return ((z.grad - logit_matching).norm() / logit_matching.norm()).item()

    # fp32 softmax limits how large T can usefully be; 30 → 300 must shrink the error ~10×.
    assert relative_error(300.0) < 1e-2
    assert relative_error(300.0) < relative_error(30.0) / 5


def test_kd_method_weights() -> None:
    method = KD(KDConfig())
    assert method.ce_weight == pytest.approx(0.1)
    s, t = Features(torch.randn(3, 4)), Features(torch.randn(3, 4))
    term = method.loss(s, t, no_batch(3), PROGRESS)["kd"]
    assert term.item() == pytest.approx(0.9 * kd_loss(s.logits, t.logits, 4.0).item(), rel=1e-6)


# --- FitNets ---------------------------------------------------------------------------------------


def test_hint_loss_hand_computed_and_zero_for_equal_features() -> None:
    regressed = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hint_loss(regressed, torch.zeros_like(regressed)).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    features = torch.randn(2, 3, 4, 4)
    assert hint_loss(features, features.clone()).item() == 0.0


# (student (C, H, W), teacher (C, H, W), the regressor's layer, its parameters): RepDistiller's
# ConvReg case by case (models/util.py), counted by hand as conv weight + conv bias + BN γ, β.
REGRESSOR_CASES = [
    ((16, 8, 8), (32, 8, 8), "1×1 conv", 16 * 32 + 32 + 64),  # equal sizes: every standard pair
    ((16, 16, 16), (32, 8, 8), "3×3 conv, stride 2", 16 * 32 * 9 + 32 + 64),  # twice as large
    ((16, 14, 14), (32, 7, 7), "3×3 conv, stride 2", 16 * 32 * 9 + 32 + 64),  # 28 px: 14 → 7
    ((16, 4, 4), (32, 8, 8), "4×4 transposed conv", 16 * 32 * 16 + 32 + 64),  # half as large
    ((16, 8, 8), (32, 5, 5), "valid 4×4 conv", 16 * 32 * 16 + 32 + 64),  # larger: kernel 1 + 8 − 5
    ((16, 7, 7), (32, 4, 4), "valid 4×4 conv", 16 * 32 * 16 + 32 + 64),  # odd: 7 ≠ 2·4, kernel 1 + 7 − 4
    ((16, 3, 3), (32, 7, 7), "resize, 1×1 conv", 16 * 32 + 32 + 64),  # smaller, not half: ConvReg raises
]


@pytest.mark.parametrize("student_shape, teacher_shape, layer, parameters", REGRESSOR_CASES,
                         ids=[case[2].replace("×", "x") for case in REGRESSOR_CASES])
def test_regressor_is_convreg_case_by_case(student_shape, teacher_shape, layer, parameters) -> None:
    module = regressor(student_shape, teacher_shape)
    assert tuple(module(torch.randn(2, *student_shape)).shape[1:]) == teacher_shape
    assert sum(p.numel() for p in module.parameters()) == parameters
    conv = next(m for m in module if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    kernel = {"1×1 conv": (1, 1), "3×3 conv, stride 2": (3, 3), "4×4 transposed conv": (4, 4),
              "valid 4×4 conv": (4, 4), "resize, 1×1 conv": (1, 1)}[layer]
    assert conv.kernel_size == kernel and isinstance(conv, nn.ConvTranspose2d) == ("transposed" in layer)
    assert isinstance(module[-1], nn.BatchNorm2d) and conv.bias is not None


# The standard CIFAR-100 pairs (specs/methods.md), hint and guided layer RepDistiller's
# hint_layer 2 (stage output 1): all at equal sizes, so a 1×1 conv (+ bias) and BN. The issue's
# figure for wrn_40_2 → wrn_16_2 is 4,288 (a 3×3 conv had 37,056).
STANDARD_PAIRS = [
    ("wrn_40_2", "wrn_16_2", 64 * 64 + 64 + 2 * 64),  # 4,288
    ("wrn_40_2", "wrn_40_1", 32 * 64 + 64 + 2 * 64),  # 2,240
    ("resnet56", "resnet20", 32 * 32 + 32 + 2 * 32),  # 1,120
    ("resnet110", "resnet32", 32 * 32 + 32 + 2 * 32),  # 1,120
    ("resnet32x4", "resnet8x4", 128 * 128 + 128 + 2 * 128),  # 16,768
    ("vgg13", "vgg8", 256 * 256 + 256 + 2 * 256),  # 66,304
]


@pytest.mark.parametrize("teacher, student, parameters", STANDARD_PAIRS)
def test_regressor_parameters_on_the_standard_pairs(teacher: str, student: str, parameters: int) -> None:
    shapes = []
    for arch in (student, teacher):
        model = build_model(arch, num_classes=100).eval()
        taps = FeatureTaps(model, FitNet.student_taps)
        with torch.no_grad():
            shapes.append(shapes_of(taps.pop(model(torch.zeros(2, 3, 32, 32))), model))
        taps.remove()
    method = FitNet()
    method.build(shapes[0], shapes[1], num_train=10)
    assert method.extra_parameters() == parameters
    assert method.regressor[0].kernel_size == (1, 1)


def built_fitnet(**overrides) -> FitNet:
    method = FitNet(FitNetConfig(**overrides))
    student = FeatureShapes(stages=((4, 8, 8), (8, 4, 4), (16, 2, 2)), embedding=(16,), num_classes=3)
    teacher = FeatureShapes(stages=((8, 8, 8), (16, 4, 4), (32, 2, 2)), embedding=(32,), num_classes=3)
    method.build(student, teacher, num_train=10)
    return method


def test_fitnet_two_stage_default_is_hints_then_kd() -> None:
    method = built_fitnet()
    (stage,) = method.pretrain_stages()
    assert stage.student_up_to_stage == 1  # RepDistiller's hint_layer = 2
    assert stage.modules == [method.regressor]
    assert stage.epochs == 40 and stage.lr_schedule == "constant"
    assert method.trainable_modules() == []  # the regressor is done after stage 1
    assert method.ce_weight == pytest.approx(KDConfig.gamma)
    s, t = Features(torch.randn(2, 3)), Features(torch.randn(2, 3))
    terms = method.loss(s, t, no_batch(), PROGRESS)
    assert set(terms) == {"kd"}
    expected = KDConfig.alpha * kd_loss(s.logits, t.logits, 4.0).item()
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-6)


def test_fitnet_stage_one_and_single_stage_use_the_weighted_hint_loss() -> None:
    for stages in (1, 2):
        method = built_fitnet(stages=stages, regressor_relu="never")
        s = Features(torch.randn(2, 3), stages=[torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4),
                                                torch.randn(2, 16, 2, 2)])
        t = Features(torch.randn(2, 3), stages=[torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4),
                                                torch.randn(2, 32, 2, 2)])
        expected = 100.0 * F.mse_loss(method.regressor(s.stages[1]), t.stages[1]).item()
        if stages == 1:
            assert method.pretrain_stages() == [] and method.ce_weight == 1.0
            assert method.trainable_modules() == [method.regressor]
            term = method.loss(s, t, no_batch(), PROGRESS)["hint"]
        else:
            term = method.pretrain_stages()[0].loss(s, t, no_batch())["hint"]
        assert term.item() == pytest.approx(expected, rel=1e-5)


def test_fitnet_regressor_relu_matches_the_hint_nonlinearity() -> None:
    method = built_fitnet()
    guided = torch.randn(4, 8, 4, 4)
    post_relu_hint = torch.rand(4, 16, 4, 4)  # a ResNet/VGG stage output
    pre_activation_hint = torch.randn(4, 16, 4, 4)  # a WRN stage output (residual sum)
    assert method.regress(guided, post_relu_hint).min() >= 0
    assert method.regress(guided, pre_activation_hint).min() < 0  # BN output, no ReLU
    always = built_fitnet(regressor_relu="always")
    assert always.regress(guided, pre_activation_hint).min() >= 0


def test_fitnet_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="stages"):
        FitNetConfig(stages=3)
    with pytest.raises(ValueError, match="regressor_relu"):
        FitNetConfig(regressor_relu="sometimes")


# --- AT --------------------------------------------------------------------------------------------


def test_attention_map_hand_computed() -> None:
    # Channels (1, 0) and (1, 2) at two positions: mean of squares = (1, 2); normalised (1, 2)/√5.
    feature = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # (B=1, C=2, H=1, W=2)
    torch.testing.assert_close(attention_map(feature, 2.0), torch.tensor([[1.0, 2.0]]) / math.sqrt(5.0))


def test_at_loss_hand_computed_and_beta_conventions() -> None:
    # Student attention (1, 0), teacher (0, 1): squared differences (1, 1), mean 1.
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0]]]])
    assert at_loss([student], [teacher]).item() == pytest.approx(1.0)
    s, t = Features(torch.zeros(1, 2), stages=[student]), Features(torch.zeros(1, 2), stages=[teacher])
    assert AT(ATConfig()).loss(s, t, no_batch(1), PROGRESS)["at"].item() == pytest.approx(1000.0)
    halved = AT(ATConfig(beta_halved=True)).loss(s, t, no_batch(1), PROGRESS)["at"]
    assert halved.item() == pytest.approx(500.0)


def test_at_loss_is_zero_for_equal_maps_and_invariant_to_scaling_a_feature_map() -> None:
    generator = torch.Generator().manual_seed(2)
    student = [torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 8, 4, 4, generator=generator)]
    teacher = [torch.randn(3, 16, 8, 8, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)]
    assert at_loss(student, [f.clone() for f in student]).item() == pytest.approx(0.0, abs=1e-9)
    reference = at_loss(student, teacher).item()
    assert reference > 0
    scaled = [student[0] * 7.5, -0.01 * student[1]]  # any non-zero factor, per map
    assert at_loss(scaled, teacher).item() == pytest.approx(reference, rel=1e-5)
    # ... and per sample: maps are normalised per example, not over the batch.
    one_sample = student[0].clone()
    one_sample[1] *= 5.0
    assert at_loss([one_sample, student[1]], teacher).item() == pytest.approx(reference, rel=1e-5)
    assert at_loss(student, [teacher[0] * 3.0, teacher[1]]).item() == pytest.approx(reference, rel=1e-5)


def test_at_loss_sums_over_pairs_and_pools_the_larger_map() -> None:
    generator = torch.Generator().manual_seed(3)
    s1, t1 = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 8, 8, 8, generator=generator)
    s2, t2 = torch.randn(2, 4, 2, 2, generator=generator), torch.randn(2, 8, 2, 2, generator=generator)
    # The 8×8 teacher map against a 4×4 student map: 2×2 average pooling of the teacher first.
    pooled = t1.reshape(2, 8, 4, 2, 4, 2).mean(dim=(3, 5))
    a_s, a_t = attention_map(s1, 2.0), attention_map(pooled, 2.0)
    first = (a_s - a_t).pow(2).mean().item()
    assert at_loss([s1], [t1]).item() == pytest.approx(first, rel=1e-5)
    second = at_loss([s2], [t2]).item()
    assert at_loss([s1, s2], [t1, t2]).item() == pytest.approx(first + second, rel=1e-5)


def test_at_gradient_reaches_the_student_only() -> None:
    student = torch.randn(2, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 4, requires_grad=True)
    at_loss([student], [teacher]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("num_student, num_teacher, expected", [
    (3, 3, [(0, 0), (1, 1), (2, 2)]),
    (3, 4, [(0, 0), (1, 2), (2, 3)]),  # WRN/ResNet student, VGG teacher
    (4, 3, [(0, 0), (2, 1), (3, 2)]),  # VGG student, WRN/ResNet teacher
])
def test_pair_stages_known_cases(num_student: int, num_teacher: int, expected: list) -> None:
    assert pair_stages(num_student, num_teacher) == expected


def test_pair_stages_properties() -> None:
    for num_student in range(1, 7):
        for num_teacher in range(1, 7):
            pairs = pair_stages(num_student, num_teacher)
            assert len(pairs) == min(num_student, num_teacher)
            assert pairs[-1] == (num_student - 1, num_teacher - 1)  # deepest with deepest
            for (s0, t0), (s1, t1) in zip(pairs, pairs[1:]):
                assert s0 < s1 and t0 < t1  # in order, nothing used twice


# --- RKD -------------------------------------------------------------------------------------------


def test_rkd_hand_computed_triangle() -> None:
    # Teacher: the right triangle (0,0), (3,0), (0,4): sides 3, 4, 5, mean μ = 4, so
    # ψ_D = 3/4, 1, 5/4. Student: an equilateral triangle, ψ_D = 1. The 3×3 distance matrices
    # differ by 1/4 on four entries (the pairs at distance 3 and 5, both orders): Huber 1/2·(1/4)²
    # each, averaged over the 9 entries.
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2]])
    distance = 4 * 0.5 * (1 / 4) ** 2 / 9
    # Angles: cosines at the teacher's vertices are 0 (right angle), 3/5 and 4/5; the student's
    # are all 1/2. Each vertex contributes its cosine twice (i, k and k, i); the i = k entries
    # are 1 on both sides and entries with i or k at the vertex are 0 on both: 27 entries.
    angle = 2 * 0.5 * ((0 - 0.5) ** 2 + (0.6 - 0.5) ** 2 + (0.8 - 0.5) ** 2) / 27
    terms = rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0)
    assert terms["rkd_distance"].item() == pytest.approx(25.0 * distance, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(50.0 * angle, rel=1e-5)


def test_rkd_is_invariant_to_scaling_rotating_and_translating_the_embedding() -> None:
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(8, 6, generator=generator)
    teacher = torch.randn(8, 10, generator=generator)
    reference = rkd_loss(student, teacher)
    moved = 3.7 * student @ random_rotation(6, generator) + torch.randn(1, 6, generator=generator)
    for key, value in rkd_loss(moved, teacher).items():
        assert value.item() == pytest.approx(reference[key].item(), rel=1e-4, abs=1e-6)
    assert reference["rkd_distance"].item() > 0 and reference["rkd_angle"].item() > 0


def test_rkd_is_zero_when_the_student_is_a_similar_copy_of_the_teacher() -> None:
    # Same relations, different width: the teacher scaled, rotated and padded with zero columns.
    generator = torch.Generator().manual_seed(5)
    teacher = torch.randn(8, 4, generator=generator)
    student = torch.cat([0.2 * teacher @ random_rotation(4, generator), torch.zeros(8, 3)], dim=1)
    for value in rkd_loss(student, teacher).values():
        assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_normalize_option_ignores_each_embedding_norm() -> None:
    generator = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    norms = torch.rand(6, 1, generator=generator) + 0.5
    plain = rkd_loss(student, teacher, normalize=True)
    rescaled = rkd_loss(student * norms, teacher, normalize=True)
    for key in plain:
        assert rescaled[key].item() == pytest.approx(plain[key].item(), rel=1e-5)
    assert rkd_loss(student * norms, teacher)["rkd_angle"].item() != pytest.approx(
        rkd_loss(student, teacher)["rkd_angle"].item(), rel=1e-3)


def test_rkd_gradients_are_finite_and_skip_the_teacher() -> None:
    # Two identical embeddings (a zero distance off the diagonal) must not make NaN gradients.
    student = torch.randn(5, 4)
    student[1] = student[0]
    student.requires_grad_(True)
    teacher = torch.randn(5, 4, requires_grad=True)
    terms = RKD(RKDConfig()).loss(Features(torch.zeros(5, 2), embedding=student),
                                  Features(torch.zeros(5, 2), embedding=teacher), no_batch(5), PROGRESS)
    torch.stack(list(terms.values())).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
