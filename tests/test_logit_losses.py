"""DKD, DIST and logit standardisation: hand-computed values, the identities and invariances
their papers state, and equality with independent computations. Milliseconds each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import Batch, Features, Progress
from kdbench.methods.dist import DIST, DISTConfig, dist_terms, inter_class_relation, intra_class_relation
from kdbench.methods.dkd import DKD, DKDConfig, decoupled_kl, dkd_loss, warmup_factor
from kdbench.methods.kd import KD, KDConfig, kd_loss, standardize_logits


def progress(epoch: int, epochs: int) -> Progress:
    return Progress(epoch=epoch, epochs=epochs, step=0, steps_per_epoch=1, pretrain_epochs=0)


def batch_of(labels: torch.Tensor) -> Batch:
    return Batch(torch.zeros(len(labels), 3, 8, 8), labels, torch.arange(len(labels)))


def logits_pair(seed: int = 0, batch: int = 16, classes: int = 10, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, classes, generator=generator)
    teacher = scale * torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, labels


# --- DKD -------------------------------------------------------------------------------------------

# Three classes, label 0. Teacher p = (1/2, 3/10, 1/5), student p = (1/4, 1/4, 1/2), given as
# logits ln p so that softmax at T = 1 returns them. By hand:
#   b^T = (1/2, 1/2), b^S = (1/4, 3/4): TCKD = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3)
#   p̂^T = (3/5, 2/5), p̂^S = (1/2, 1/2)... no: p̂^S = (1/4, 1/2)/(3/4) = (1/3, 2/3):
#   NCKD = 3/5 ln(9/5) + 2/5 ln(3/5)
#   KD   = ½ ln 2 + 3/10 ln(6/5) + 1/5 ln(2/5)
TEACHER_P = torch.tensor([[0.5, 0.3, 0.2]])
STUDENT_P = torch.tensor([[0.25, 0.25, 0.5]])
LABEL = torch.tensor([0])
TCKD = 0.5 * math.log(4 / 3)
NCKD = 0.6 * math.log(9 / 5) + 0.4 * math.log(3 / 5)
KD_VALUE = 0.5 * math.log(2) + 0.3 * math.log(6 / 5) + 0.2 * math.log(2 / 5)


def test_dkd_terms_hand_computed_on_three_classes() -> None:
    tckd, nckd = decoupled_kl(STUDENT_P.log(), TEACHER_P.log(), LABEL, temperature=1.0)
    assert tckd.item() == pytest.approx(TCKD, rel=1e-6)
    assert nckd.item() == pytest.approx(NCKD, rel=1e-6)
    # The paper's identity on these numbers: KD = TCKD + (1 − p_t^T)·NCKD, with p_t^T = 1/2.
    assert KD_VALUE == pytest.approx(TCKD + 0.5 * NCKD, rel=1e-12)
    # At T = 4 the logits 4·ln p give the same distributions; the loss is T²·(α·TCKD + β·NCKD).
    loss = dkd_loss(4 * STUDENT_P.log(), 4 * TEACHER_P.log(), LABEL, alpha=1.0, beta=8.0, temperature=4.0)
    assert loss.item() == pytest.approx(16 * (TCKD + 8 * NCKD), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_tckd_plus_teacher_non_target_mass_times_nckd(temperature: float) -> None:
    """The paper's eq. 1, per sample: KL(p^T ‖ p^S) = TCKD + (1 − p_t^T)·NCKD. So DKD with
    α = β = 1 is *not* KD: KD weighs NCKD by 1 − p_t^T."""
    student, teacher, labels = logits_pair()
    tckd, nckd = decoupled_kl(student, teacher, labels, temperature)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / temperature, dim=1))).sum(dim=1)
    non_target_mass = 1 - p_teacher.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(kl, tckd + non_target_mass * nckd, rtol=1e-5, atol=1e-6)
    # And in the batch form kd_loss uses (T²·mean).
    decoupled = temperature**2 * (tckd + non_target_mass * nckd).mean()
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(decoupled.item(), rel=1e-5)
    equal_weights = dkd_loss(student, teacher, labels, 1.0, 1.0, temperature)
    assert equal_weights.item() > kd_loss(student, teacher, temperature).item()  # NCKD ≥ 0, weight 1 > 1 − p_t


def masked_offset_reference(student, teacher, labels, alpha, beta, temperature):
    """DKD by mdistiller's route, written from its definition: the binary distribution from
    summed softmax probabilities, and p̂ as a softmax of the logits with 1000 subtracted at the
    target. Float64."""
    student, teacher = student.double(), teacher.double()
    mask = F.one_hot(labels, student.shape[1]).double()
    p_s, p_t = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)
    b_s = torch.stack([(p_s * mask).sum(1), (p_s * (1 - mask)).sum(1)], 1)
    b_t = torch.stack([(p_t * mask).sum(1), (p_t * (1 - mask)).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1)
    q_t = F.softmax(teacher / temperature - 1000 * mask, 1)
    log_q_s = F.log_softmax(student / temperature - 1000 * mask, 1)
    nckd = (q_t * (q_t.clamp_min(1e-300).log() - log_q_s)).sum(1)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()


def test_dkd_equals_the_masked_offset_formulation_with_its_gradient() -> None:
    student, teacher, labels = logits_pair(seed=1)
    mine = student.clone().requires_grad_()
    reference = student.double().clone().requires_grad_()
    dkd_loss(mine, teacher, labels, 1.0, 8.0, 4.0).backward()
    expected = masked_offset_reference(reference, teacher, labels, 1.0, 8.0, 4.0)
    expected.backward()
    assert dkd_loss(student, teacher, labels, 1.0, 8.0, 4.0).item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(mine.grad, reference.grad.float(), rtol=1e-4, atol=1e-7)


def test_dkd_stays_exact_where_a_constant_mask_offset_fails() -> None:
    """Logits 10⁴ apart at T = 1: a mask offset of 1000 no longer removes the target class from
    p̂; masking to −∞ does. Checked against float64 with the target dropped explicitly."""
    student = torch.tensor([[0.0, 2.0, 1.0]])
    teacher = torch.tensor([[1e4, 1.0, 3.0]])  # the target, class 0, dominates by 10⁴
    tckd, nckd = decoupled_kl(student.requires_grad_(), teacher, LABEL, 1.0)
    q_t = F.softmax(teacher[:, 1:].double(), 1)
    exact_nckd = (q_t * (q_t.log() - F.log_softmax(student[:, 1:].detach().double(), 1))).sum()
    assert nckd.item() == pytest.approx(exact_nckd.item(), rel=1e-6)
    offset = masked_offset_reference(student.detach(), teacher, LABEL, 0.0, 1.0, 1.0).item()
    assert offset != pytest.approx(exact_nckd.item(), rel=1e-2)  # the offset route is wrong here
    (tckd + nckd).sum().backward()
    assert torch.isfinite(student.grad).all()


def test_dkd_is_zero_when_the_student_is_the_teacher() -> None:
    _, teacher, labels = logits_pair(seed=2)
    assert dkd_loss(teacher.clone(), teacher, labels, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("epochs, epoch, expected", [
    # mdistiller at 240 epochs: min(epoch/20, 1) with epochs counted from 1.
    (240, 0, 1 / 20), (240, 10, 11 / 20), (240, 19, 1.0), (240, 20, 1.0), (240, 30, 1.0),
    # Scaled: 120 epochs warm up over 10, 24 over 2, 12 or fewer not at all.
    (120, 0, 1 / 10), (120, 5, 6 / 10), (120, 9, 1.0), (120, 10, 1.0),
    (24, 0, 1 / 2), (24, 1, 1.0), (12, 0, 1.0), (3, 0, 1.0),
])
def test_dkd_warmup_schedule(epochs: int, epoch: int, expected: float) -> None:
    assert warmup_factor(epoch, epochs, 20.0) == pytest.approx(expected, rel=1e-12)


def test_dkd_method_applies_the_warmup_and_its_weights() -> None:
    student, teacher, labels = logits_pair(seed=3)
    method = DKD(DKDConfig())
    assert method.ce_weight == 1.0 and method.configured_display_name() == "DKD"
    s, t, batch = Features(student), Features(teacher), batch_of(labels)
    full = dkd_loss(student, teacher, labels, 1.0, 8.0, 4.0).item()
    assert method.loss(s, t, batch, progress(30, 240))["dkd"].item() == pytest.approx(full, rel=1e-6)
    assert method.loss(s, t, batch, progress(0, 240))["dkd"].item() == pytest.approx(full / 20, rel=1e-6)
    assert DKD(DKDConfig(warmup_epochs=0)).loss(s, t, batch, progress(0, 240))["dkd"].item() == pytest.approx(full, rel=1e-6)


# --- logit standardisation -----------------------------------------------------------------------

def test_standardize_logits_hand_computed() -> None:
    # (1, 2, 3): mean 2, sample std 1. (0, 0, 3): mean 1, sample std √((1 + 1 + 4)/2) = √3.
    z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]))
    root3 = math.sqrt(3)
    torch.testing.assert_close(z, torch.tensor([[-1.0, 0.0, 1.0], [-1 / root3, -1 / root3, 2 / root3]]),
                               rtol=1e-6, atol=1e-6)
    assert torch.isfinite(standardize_logits(torch.full((1, 4), 7.0))).all()  # constant row: no NaN


def affine(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """A different positive scale and shift per sample."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(len(logits), 1, generator=generator) * 5 + 0.2
    shift = torch.randn(len(logits), 1, generator=generator) * 10
    return scale * logits + shift


def test_kd_with_logit_standardization_is_invariant_to_shifting_and_scaling_the_logits() -> None:
    student, teacher, labels = logits_pair(seed=4)
    s, t, batch = Features(student), Features(teacher), batch_of(labels)
    method = KD(KDConfig(logit_standardization=True))
    assert method.configured_display_name() == "KD + LS"
    reference = method.loss(s, t, batch, progress(0, 1))["kd"].item()
    moved = method.loss(Features(affine(student, 1)), Features(affine(teacher, 2)), batch, progress(0, 1))["kd"]
    assert moved.item() == pytest.approx(reference, rel=1e-5)
    # The authors' settings: 9 · T²·KL at base temperature 2 on the z-scored logits.
    expected = 9.0 * kd_loss(standardize_logits(student), standardize_logits(teacher), 2.0).item()
    assert reference == pytest.approx(expected, rel=1e-6)
    # Plain KD is not invariant to scale: the option is what makes it so.
    plain = KD(KDConfig())
    assert plain.loss(Features(2 * student), t, batch, progress(0, 1))["kd"].item() != pytest.approx(
        plain.loss(s, t, batch, progress(0, 1))["kd"].item(), rel=1e-2)


def test_dkd_with_logit_standardization_is_invariant_and_weighted_as_the_command() -> None:
    student, teacher, labels = logits_pair(seed=5)
    batch = batch_of(labels)
    method = DKD(DKDConfig(logit_standardization=True))
    assert method.configured_display_name() == "DKD + LS"
    reference = method.loss(Features(student), Features(teacher), batch, progress(30, 240))["dkd"].item()
    moved = method.loss(Features(affine(student, 3)), Features(affine(teacher, 4)), batch, progress(30, 240))
    assert moved["dkd"].item() == pytest.approx(reference, rel=1e-5)
    expected = dkd_loss(standardize_logits(student), standardize_logits(teacher), labels, 9.0, 72.0, 2.0).item()
    assert reference == pytest.approx(expected, rel=1e-6)


# --- DIST ----------------------------------------------------------------------------------------

def test_pearson_relation_hand_computed() -> None:
    # u = (1, 2, 3) centres to (−1, 0, 1); v = (2, 4, 7) to (−7, −1, 8)/3: their dot product is 5,
    # their norms √2 and √114/3, so ρ = 15/√228 (≈ 0.9934; 1 − ρ is fp32-rounded to ~1e-7).
    # w = (3, 1, 2) centres to (1, −1, 0): ρ(u, w) = −1/(√2·√2) = −1/2.
    u, v, w = (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]]),
               torch.tensor([[3.0, 1.0, 2.0]]))
    assert inter_class_relation(u, v).item() == pytest.approx(1 - 15 / math.sqrt(228), abs=1e-6)
    assert inter_class_relation(u, w).item() == pytest.approx(1.5, rel=1e-6)
    both = torch.cat([u, u]), torch.cat([v, w])  # the batch mean of the two rows
    assert inter_class_relation(*both).item() == pytest.approx(1 - (15 / math.sqrt(228) - 0.5) / 2, rel=1e-6)
    assert intra_class_relation(u.t(), w.t()).item() == pytest.approx(1.5, rel=1e-6)


def predictions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher, _ = logits_pair(seed=seed)
    return student.softmax(1), teacher.softmax(1)


def test_inter_class_relation_is_invariant_to_positive_affine_maps_of_each_prediction() -> None:
    student, teacher = predictions(6)
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(len(student), 1, generator=generator) + 0.1
    shift = torch.randn(len(student), 1, generator=generator)
    reference = inter_class_relation(student, teacher).item()
    assert inter_class_relation(scale * student + shift, teacher).item() == pytest.approx(reference, rel=1e-5)
    # A negative scale flips every correlation: what a distance that ignored the sign would miss.
    flipped = inter_class_relation(-scale * student + shift, teacher).item()
    assert flipped == pytest.approx(2 - reference, rel=1e-5)


def test_intra_class_relation_is_invariant_to_positive_affine_maps_of_each_class() -> None:
    student, teacher = predictions(7)
    generator = torch.Generator().manual_seed(1)
    scale = torch.rand(1, student.shape[1], generator=generator) + 0.1
    shift = torch.randn(1, student.shape[1], generator=generator)
    reference = intra_class_relation(student, teacher).item()
    assert intra_class_relation(scale * student + shift, teacher).item() == pytest.approx(reference, rel=1e-5)
    # Per-sample maps are not per-class ones: this term does change under them.
    per_sample = torch.rand(len(student), 1, generator=generator) + 0.1
    assert intra_class_relation(per_sample * student, teacher).item() != pytest.approx(reference, rel=1e-3)


def test_dist_loss_invariant_to_shifting_each_samples_logits_and_zero_at_the_teacher() -> None:
    student, teacher, labels = logits_pair(seed=8)
    method = DIST(DISTConfig())
    assert method.ce_weight == 1.0 and method.configured_display_name() == "DIST"
    batch = batch_of(labels)
    terms = method.loss(Features(student), Features(teacher), batch, progress(0, 1))
    shift = torch.randn(len(student), 1) * 20
    moved = method.loss(Features(student + shift), Features(teacher - shift), batch, progress(0, 1))
    for name in ("dist_inter", "dist_intra"):
        assert moved[name].item() == pytest.approx(terms[name].item(), rel=1e-4)
    inter, intra = dist_terms(student, teacher, 4.0)
    assert terms["dist_inter"].item() == pytest.approx(2 * inter.item(), rel=1e-6)
    assert terms["dist_intra"].item() == pytest.approx(2 * intra.item(), rel=1e-6)
    zero_inter, zero_intra = dist_terms(teacher.clone(), teacher, 4.0)
    assert abs(zero_inter.item()) < 1e-5 and abs(zero_intra.item()) < 1e-5
