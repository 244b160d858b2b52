"""The zoo's classic methods (issue 15): sp, cc, vid, pkt, nst, fsp, ft.

For each: a value computed by hand on tiny tensors, the invariances its paper states (or its
kernel implies), zero loss at student = teacher where the loss has that property, behaviour a
wrong implementation would not show, and an independent computation where the method has a
fast form. Expected numbers are derived in the test from the definitions, never by calling the
function under test on other inputs. The contract for the defaults is tests/test_contract.py's
(parametrised over the registry); the options that build other modules are checked here; and
one two-epoch synthetic/tiny run trains all seven through the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kdbench import registry
from kdbench.cli import main
from kdbench.method import FIDELITIES, Batch, FeatureShapes, Features, Progress
from kdbench.testing import check_method_class
from kdbench.train import stage_overrides
from kdbench.methods.cc import CC, CCConfig, correlation_congruence, repdistiller_correlation, taylor_rbf_kernel
from kdbench.methods.fsp import FSP, FSPConfig, fsp_loss, fsp_matrix
from kdbench.methods.ft import FT, FTConfig, Paraphraser, factor_transfer_loss
from kdbench.methods.nst import (
    NST,
    nst_loss,
    poly_mmd,
    poly_mmd_by_channels,
    poly_mmd_by_positions,
    selectivity_rows,
)
from kdbench.methods.pkt import PKT, PKTConfig, conditional_probabilities, pkt_loss
from kdbench.methods.sp import SP, SPConfig, similarity_matrix, sp_loss
from kdbench.methods.vid import VID, VariationalGaussian, per_position, vid_nll

PROGRESS = Progress(epoch=0, epochs=1, step=0, steps_per_epoch=1, pretrain_epochs=0)
ZOO = ("sp", "cc", "vid", "pkt", "nst", "fsp", "ft")


def no_batch(size: int = 2) -> Batch:
    return Batch(torch.zeros(size, 3, 8, 8), torch.zeros(size, dtype=torch.long), torch.arange(size))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_zoo_method_declares_its_row_title_and_fidelity() -> None:
    titles = {"sp": "SP", "cc": "CC", "vid": "VID", "pkt": "PKT", "nst": "NST", "fsp": "FSP", "ft": "FT"}
    for name, title in titles.items():
        method_class = registry.get(name)
        assert method_class.display_name == title
        assert method_class.fidelity in FIDELITIES
        assert method_class.fidelity_note.strip()


# --- SP ---------------------------------------------------------------------------------------------


def test_sp_hand_computed_value() -> None:
    # Teacher q = (1, 0), (1, 1): G̃ = [[1, 1], [1, 2]], rows normalised (1, 1)/√2 and (1, 2)/√5.
    # Student q = (1, 0), (0, 1): G̃ = I = G. L = ‖G_t − G_s‖²_F / 2².
    r2, r5 = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = ((r2 - 1) ** 2 + r2**2 + r5**2 + (2 * r5 - 1) ** 2) / 4
    teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 2, 1)  # another shape, same values
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_sp_is_invariant_to_scaling_the_features_and_zero_at_the_teacher() -> None:
    g = generator()
    student, teacher = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 8, 2, 2, generator=g)
    reference = sp_loss(student, teacher)
    assert reference > 0
    assert sp_loss(3.7 * student, 0.2 * teacher).item() == pytest.approx(reference.item(), rel=1e-5)
    assert sp_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)
    # Rows of G are unit vectors whatever the scale.
    norms = similarity_matrix(5.0 * student).norm(dim=1)
    assert torch.allclose(norms, torch.ones(6), atol=1e-6)


def test_sp_applies_to_the_last_stage_by_default_and_to_every_pair_on_request() -> None:
    g = generator()
    stages = [torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 3, 2, 2, generator=g)]
    teacher = [torch.randn(4, 5, 4, 4, generator=g), torch.randn(4, 6, 2, 2, generator=g)]
    s = Features(logits=torch.zeros(4, 3), stages=stages)
    t = Features(logits=torch.zeros(4, 3), stages=teacher)
    last = SP(SPConfig(gamma=1.0)).loss(s, t, no_batch(4), PROGRESS)["sp"]
    every = SP(SPConfig(gamma=1.0, stages="all")).loss(s, t, no_batch(4), PROGRESS)["sp"]
    assert last.item() == pytest.approx(sp_loss(stages[1], teacher[1]).item(), rel=1e-6)
    assert every.item() == pytest.approx((sp_loss(stages[0], teacher[0]) + sp_loss(stages[1], teacher[1])).item(),
                                         rel=1e-6)
    with pytest.raises(ValueError, match="sp.stages"):
        SPConfig(stages="middle")


# --- PKT --------------------------------------------------------------------------------------------


def test_pkt_hand_computed_value_over_pairs_j_not_i() -> None:
    # Teacher (1,0), (0,1), (−1,0): K = ½(cos + 1) gives K12 = K23 = ½, K13 = 0, so
    # p(·|1) = (−, 1, 0), p(·|2) = (½, −, ½), p(·|3) = (0, 1, −).
    # Student (1,0), (0,1), (0,1): K12 = K13 = ½, K23 = 1, so
    # q(·|1) = (−, ½, ½), q(·|2) = (⅓, −, ⅔), q(·|3) = (⅓, ⅔, −).
    kl = math.log(2) + (0.5 * math.log(1.5) + 0.5 * math.log(0.75)) + math.log(1.5)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert pkt_loss(student, teacher).item() == pytest.approx(kl / 9, rel=1e-5)
    p = conditional_probabilities(teacher, include_self=False)
    assert torch.allclose(p, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]), atol=1e-7)


def test_pkt_authors_form_equals_a_direct_transcription_of_their_code() -> None:
    # passalis/probabilistic_kt cosine_similarity_loss, written out elementwise with Python loops:
    # rows include the sample itself, mean over the B × B terms, eps 1e-7 in the logarithm.
    g = generator()
    student, teacher = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)
    eps = 1e-7

    def probabilities(x: torch.Tensor) -> list[list[float]]:
        unit = [row / (row.norm() + eps) for row in x]
        affinity = [[(float(a @ b) + 1) / 2 for b in unit] for a in unit]
        return [[value / sum(row) for value in row] for row in affinity]

    p, q = probabilities(teacher.double()), probabilities(student.double())
    expected = sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(5) for j in range(5)) / 25
    assert pkt_loss(student, teacher, include_self=True).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("include_self", [False, True])
def test_pkt_is_invariant_to_scaling_each_sample_and_zero_at_the_teacher(include_self: bool) -> None:
    g = generator()
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    scales_s = torch.rand(6, 1, generator=g) * 10 + 0.1
    scales_t = torch.rand(6, 1, generator=g) * 10 + 0.1
    reference = pkt_loss(student, teacher, include_self).item()
    assert reference > 0
    assert pkt_loss(scales_s * student, scales_t * teacher, include_self).item() == pytest.approx(reference, rel=1e-4)
    assert pkt_loss(teacher, teacher, include_self).item() == pytest.approx(0.0, abs=1e-7)


# --- NST --------------------------------------------------------------------------------------------


def test_nst_hand_computed_value() -> None:
    # Teacher channels (1,0) and (0,1), student one channel (1,0), over H·W = 2 positions, one image.
    # k(x, y) = (xᵀy)²: teacher–teacher mean (1+0+0+1)/4 = ½, student–student 1, cross (1+0)/2 = ½:
    # MMD² = ½ + 1 − 2·½ = ½.
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    student = torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 2)
    assert nst_loss([student], [teacher]).item() == pytest.approx(0.5, rel=1e-6)


def test_nst_is_zero_for_identical_features_and_positive_otherwise() -> None:
    g = generator()
    features = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 8, 2, 2, generator=g)]
    assert nst_loss(features, [f.clone() for f in features]).item() == pytest.approx(0.0, abs=1e-6)
    other = [torch.randn(3, 6, 5, 5, generator=g), torch.randn(3, 2, 2, 2, generator=g)]
    assert nst_loss(other, features).item() > 1e-3


def test_nst_channel_and_position_forms_agree() -> None:
    # Two algebraically equal forms of the polynomial MMD (module docstring): a wrong identity
    # or a wrong normalisation in either would differ.
    g = generator()
    for channels_s, channels_t, positions in ((3, 5, 16), (40, 24, 4)):
        student = selectivity_rows(torch.randn(2, channels_s, positions, 1, generator=g))
        teacher = selectivity_rows(torch.randn(2, channels_t, positions, 1, generator=g))
        by_channels = poly_mmd_by_channels(student, teacher)
        by_positions = poly_mmd_by_positions(student, teacher)
        assert torch.allclose(by_channels, by_positions, rtol=1e-4, atol=1e-7)
        assert poly_mmd(student, teacher).item() == pytest.approx(by_channels.mean().item(), rel=1e-4)


def test_nst_ignores_the_scale_of_each_channel_map() -> None:
    # Rows are normalised: scaling one channel's map by a positive number changes nothing.
    g = generator()
    student, teacher = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    scales = torch.tensor([0.1, 4.0, 30.0]).view(1, 3, 1, 1)
    assert nst_loss([scales * student], [teacher]).item() == pytest.approx(
        nst_loss([student], [teacher]).item(), rel=1e-5)


# --- VID --------------------------------------------------------------------------------------------


def test_vid_hand_computed_value() -> None:
    # μ = 0, σ² = 2, t = 2: ½ (log 2 + 2²/2) = ½ (log 2 + 2).
    value = vid_nll(torch.zeros(1, 1), torch.tensor([2.0]), torch.full((1, 1), 2.0))
    assert value.item() == pytest.approx(0.5 * (math.log(2) + 2), rel=1e-6)
    # Two channels, two positions: the mean over all four elements of ½(log σ_c² + r²/σ_c²).
    mean = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    variance = torch.tensor([1.0, 3.0])
    elements = [0.5 * (math.log(v) + r * r / v) for r, v in ((1, 1), (0, 3), (2, 1), (3, 3))]
    assert vid_nll(mean, variance, target).item() == pytest.approx(sum(elements) / 4, rel=1e-6)


def test_vid_variance_starts_at_init_and_its_optimum_is_the_mean_squared_residual() -> None:
    gaussian = VariationalGaussian(3, 4, init_variance=5.0, epsilon=1e-5)
    assert torch.allclose(gaussian.variance(), torch.full((4,), 5.0), rtol=1e-5)
    # For fixed residuals the Gaussian likelihood is maximal at σ_c² = mean over (b, h, w) of r²:
    # the gradient with respect to σ² vanishes there, and not elsewhere.
    g = generator()
    residual = torch.randn(18, 4, generator=g) * torch.tensor([0.5, 1.0, 2.0, 3.0])
    optimum = residual.pow(2).mean(dim=0).requires_grad_(True)
    grad, = torch.autograd.grad(vid_nll(torch.zeros_like(residual), optimum, residual), optimum)
    assert grad.abs().max().item() < 1e-6
    wrong = (2 * optimum.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(vid_nll(torch.zeros_like(residual), wrong, residual), wrong)
    assert grad.abs().min().item() > 1e-3


def test_vid_mean_network_is_three_one_by_one_convolutions() -> None:
    # μ as linear maps of per-position rows equals the same weights as 1×1 convolutions.
    g = generator()
    gaussian = VariationalGaussian(3, 5, 5.0, 1e-5)
    x = torch.randn(2, 3, 4, 4, generator=g)
    weights = [layer.weight[:, :, None, None] for layer in gaussian.mean if isinstance(layer, torch.nn.Linear)]
    expected = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, weights[0])), weights[1])), weights[2])
    assert torch.allclose(gaussian.mean(per_position(x)), per_position(expected), atol=1e-6)


def test_vid_pools_the_larger_map_and_builds_one_gaussian_per_paired_stage() -> None:
    method = VID()
    method.build(FeatureShapes(((4, 8, 8), (6, 4, 4), (8, 2, 2)), (8,), 3),
                 FeatureShapes(((5, 8, 8), (7, 4, 4), (9, 2, 2), (9, 1, 1)), (9,), 3), 10)
    assert method.pairs == [(0, 0), (1, 2), (2, 3)]
    assert [gaussian.log_scale.numel() for gaussian in method.gaussians] == [5, 9, 9]
    g = generator()
    s = Features(torch.zeros(2, 3), stages=[torch.randn(2, c, h, h, generator=g) for c, h in ((4, 8), (6, 4), (8, 2))])
    t = Features(torch.zeros(2, 3), stages=[torch.randn(2, c, h, h, generator=g)
                                            for c, h in ((5, 8), (7, 4), (9, 2), (9, 1))])
    term = method.loss(s, t, no_batch(), PROGRESS)["vid"]
    # The third pair compares a 2×2 student map with a 1×1 teacher map: pooled to 1×1.
    pooled = F.adaptive_avg_pool2d(s.stages[2], (1, 1)).flatten(1)
    third = vid_nll(method.gaussians[2].mean(pooled), method.gaussians[2].variance(), t.stages[3].flatten(1))
    first = method.gaussians[0](s.stages[0], t.stages[0])
    second = method.gaussians[1](s.stages[1], t.stages[2])
    assert term.item() == pytest.approx((first + second + third).item(), rel=1e-6)


# --- CC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.4, 1.5])
def test_cc_taylor_kernel_is_the_exact_rbf_kernel_to_the_expansions_order(gamma: float) -> None:
    g = generator()
    embedding = torch.randn(7, 5, generator=g, dtype=torch.float64)
    unit = F.normalize(embedding, dim=1)
    exact = torch.exp(-gamma * torch.cdist(unit, unit).pow(2))
    cosine = unit @ unit.t()
    for order in range(0, 6):
        taylor = taylor_rbf_kernel(embedding, gamma, order).double()
        # The remainder of exp's series after order P: the next term, within a factor e^{2γ|c|}.
        next_term = math.exp(-2 * gamma) * (2 * gamma * cosine).pow(order + 1) / math.factorial(order + 1)
        remainder = exact - taylor
        assert torch.all(remainder.abs() <= next_term.abs() * math.exp(2 * gamma) + 1e-6)
        # One more order adds exactly that next term.
        assert torch.allclose(taylor_rbf_kernel(embedding, gamma, order + 1).double() - taylor, next_term, atol=1e-6)
    assert torch.allclose(taylor_rbf_kernel(embedding, gamma, 25).double(), exact, atol=1e-6)


def test_cc_hand_computed_value() -> None:
    # Teacher embeddings orthogonal (c = 0), student's identical (c = 1), γ = 0.4, P = 2:
    # ψ_t = e^{−0.8} [[k1, 1], [1, k1]], ψ_s = e^{−0.8} k1 everywhere, k1 = 1 + 0.8 + 0.32.
    k1 = 1 + 0.8 + 0.8**2 / 2
    expected = 2 * (math.exp(-0.8) * (k1 - 1)) ** 2 / 4
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[2.0, 1.0, 0.0], [4.0, 2.0, 0.0]])
    assert correlation_congruence(student, teacher, 0.4, 2).item() == pytest.approx(expected, rel=1e-6)


def test_cc_is_invariant_to_scaling_each_embedding_and_zero_at_the_teacher() -> None:
    g = generator()
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 10, generator=g)
    reference = correlation_congruence(student, teacher, 0.4, 2).item()
    assert reference > 0
    scales = torch.rand(6, 1, generator=g) + 0.5
    assert correlation_congruence(scales * student, teacher, 0.4, 2).item() == pytest.approx(reference, rel=1e-5)
    assert correlation_congruence(teacher, teacher, 0.4, 2).item() == pytest.approx(0.0, abs=1e-12)


def test_cc_repdistiller_form_hand_computed_and_its_embeddings() -> None:
    # Δ = |e_s − e_t| rows (1, 2), (3, 0), (1, 1): mean of Σ_d Δ_i Δ_{i+1} = (3 + 3) / 2.
    student = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    assert repdistiller_correlation(student, torch.zeros(3, 2)).item() == pytest.approx(3.0)
    method = CC(CCConfig(form="repdistiller"))
    method.build(FeatureShapes((), (6,), 3), FeatureShapes((), (9,), 3), 10)
    assert method.embed_student.weight.shape == (128, 6) and method.embed_teacher.weight.shape == (128, 9)
    paper = CC()
    paper.build(FeatureShapes((), (6,), 3), FeatureShapes((), (9,), 3), 10)
    assert not list(paper.parameters())  # ψ is B × B in each network: no module


# --- FSP --------------------------------------------------------------------------------------------


def test_fsp_matrix_hand_computed_and_pooled() -> None:
    # F¹ = [1, 2] (one channel, 1×2), F² = [[3, 4], [5, 6]] (two channels): G = F¹F²ᵀ / 2.
    first = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    second = torch.tensor([[3.0, 4.0], [5.0, 6.0]]).view(1, 2, 1, 2)
    assert torch.allclose(fsp_matrix(first, second), torch.tensor([[[5.5, 8.5]]]))
    # A 2×2 map against a 1×1 one: the larger is averaged to 1×1 first.
    big = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).view(1, 1, 2, 2)
    assert torch.allclose(fsp_matrix(big, torch.full((1, 1, 1, 1), 2.0)), torch.tensor([[[6.0]]]))


def test_fsp_loss_is_zero_at_the_teacher_and_counts_consecutive_pairs() -> None:
    g = generator()
    teacher = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g),
               torch.randn(2, 4, 1, 1, generator=g)]
    assert fsp_loss([t.clone() for t in teacher], teacher).item() == pytest.approx(0.0, abs=1e-12)
    student = [t + 0.1 * torch.randn(t.shape, generator=g) for t in teacher]
    expected = sum((fsp_matrix(a, b) - fsp_matrix(c, d)).pow(2).mean()
                   for (a, b), (c, d) in zip(zip(student[:-1], student[1:]), zip(teacher[:-1], teacher[1:])))
    assert fsp_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fsp_adapts_only_unequal_widths_and_trains_only_in_its_first_stage() -> None:
    same = FSP()
    same.build(FeatureShapes(((4, 8, 8), (8, 4, 4), (16, 2, 2)), (16,), 3),
               FeatureShapes(((4, 8, 8), (8, 4, 4), (16, 2, 2)), (16,), 3), 10)
    assert len(same.adapters) == 0  # the paper's setting: equal widths, nothing learned beside the student
    wider = FSP()
    wider.build(FeatureShapes(((4, 8, 8), (8, 4, 4), (16, 2, 2)), (16,), 3),
                FeatureShapes(((4, 8, 8), (12, 4, 4), (32, 2, 2)), (32,), 3), 10)
    assert sorted(wider.adapters) == ["1", "2"]
    (stage,) = wider.pretrain_stages()
    assert stage.name == "fsp" and stage.epochs == 30 and stage.student_up_to_stage == 2
    assert stage.modules == [wider.adapters] and stage.lr_schedule == "constant"
    assert wider.trainable_modules() == [] and wider.loss(None, None, no_batch(), PROGRESS) == {}
    with pytest.raises(ValueError, match="init_epochs"):
        FSPConfig(init_epochs=0)


# --- FT ---------------------------------------------------------------------------------------------


def test_ft_factor_loss_hand_computed() -> None:
    # Student factor [3, 4] → (0.6, 0.8); teacher [1, 0]: mean |·| = (0.4 + 0.8) / 2.
    student = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    teacher = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert factor_transfer_loss(student, teacher).item() == pytest.approx(0.6, rel=1e-6)
    # RepDistiller's attention factor: normalize(mean_c F²) of two channels [1, 0] and [1, 2]:
    # (1, 2)/√5 against the teacher's (1, 0): mean |(1/√5 − 1, 2/√5)|.
    two = torch.tensor([[1.0, 0.0], [1.0, 2.0]]).view(1, 2, 1, 2)
    expected = (abs(1 / math.sqrt(5) - 1) + 2 / math.sqrt(5)) / 2
    assert factor_transfer_loss(two, teacher, "attention").item() == pytest.approx(expected, rel=1e-6)


def test_ft_factor_loss_ignores_each_factors_scale_and_is_zero_at_the_teacher() -> None:
    g = generator()
    student, teacher = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    scales = torch.tensor([0.5, 2.0, 9.0]).view(3, 1, 1, 1)
    assert factor_transfer_loss(scales * student, teacher).item() == pytest.approx(
        factor_transfer_loss(student, teacher).item(), rel=1e-5)
    assert factor_transfer_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_ft_paraphraser_translator_and_stages() -> None:
    paraphraser = Paraphraser(8, 4)
    x = torch.randn(2, 8, 3, 3)
    assert paraphraser.encoder(x).shape == (2, 4, 3, 3) and paraphraser(x).shape == x.shape
    method = FT()
    method.build(FeatureShapes(((4, 8, 8), (6, 4, 4)), (6,), 3), FeatureShapes(((8, 8, 8), (10, 4, 4)), (10,), 3), 10)
    encoder_convs = [m for m in method.paraphraser.encoder if isinstance(m, torch.nn.Conv2d)]
    translator_convs = [m for m in method.translator if isinstance(m, torch.nn.Conv2d)]
    assert [conv.out_channels for conv in encoder_convs] == [10, 5, 5]  # round(10 · 0.5)
    assert translator_convs[0].in_channels == 6 and [c.out_channels for c in translator_convs] == [6, 5, 5]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in method.modules())  # the authors': no BN
    (stage,) = method.pretrain_stages()
    assert stage.modules == [method.paraphraser] and stage.student_up_to_stage is None
    assert stage.epochs == 6 and stage_overrides(stage) == {}
    assert method.trainable_modules() == [method.translator]
    # The main-stage loss reaches the translator and the student, never the paraphraser.
    s = Features(torch.zeros(2, 3), stages=[torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4, requires_grad=True)])
    t = Features(torch.zeros(2, 3), stages=[torch.randn(2, 8, 8, 8), torch.randn(2, 10, 4, 4)])
    method.loss(s, t, no_batch(), PROGRESS)["ft"].backward()
    assert s.stages[1].grad is not None and all(p.grad is not None for p in method.translator.parameters())
    assert all(p.grad is None for p in method.paraphraser.parameters())


def test_ft_repdistiller_options() -> None:
    config = FTConfig(factor="attention", reconstruction="mse", translator_bn=True, paraphraser_lr=0.01,
                      paraphraser_epochs=30, beta=200.0)
    method = FT(config)
    method.build(FeatureShapes(((6, 4, 4),), (6,), 3), FeatureShapes(((10, 4, 4),), (10,), 3), 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in method.translator.modules())
    (stage,) = method.pretrain_stages()
    assert stage_overrides(stage) == {"lr": 0.01} and stage.epochs == 30
    feature = torch.randn(2, 10, 4, 4)
    terms = stage.loss(None, Features(torch.zeros(2, 3), stages=[feature]), no_batch())
    assert terms["reconstruction"].item() == pytest.approx(
        F.mse_loss(method.paraphraser(feature), feature).item(), rel=1e-6)
    for bad in ({"factor": "gram"}, {"reconstruction": "l2"}, {"paraphraser_lr": 0.0}):
        with pytest.raises(ValueError):
            FTConfig(**bad)


# --- the options that build other modules meet the contract --------------------------------------


def with_defaults(method_class, **defaults):
    fields = [(key, type(value), dataclasses.field(default=value)) for key, value in defaults.items()]
    config = dataclasses.make_dataclass("Variant", fields, bases=(method_class.Config,), frozen=True)
    return type(f"{method_class.__name__}Variant", (method_class,), {"Config": config})


@pytest.mark.parametrize("name, defaults", [
    ("cc", {"form": "repdistiller"}),  # two trained linear embeddings
    ("ft", {"factor": "attention", "reconstruction": "mse", "translator_bn": True, "paraphraser_lr": 0.01}),
])
def test_repdistiller_variants_meet_the_contract(name: str, defaults: dict) -> None:
    check_method_class(with_defaults(registry.get(name), **defaults), name)


# --- two epochs of all seven, end to end -------------------------------------------------------


def test_two_epoch_synthetic_run_of_the_zoo(results_with_teacher, capsys) -> None:
    command = ["run", "--methods", ",".join(ZOO), "--setting", "synthetic/tiny", "--seeds", "1",
               "--epochs", "2", "--executor", "inprocess", "--results", str(results_with_teacher)]
    assert main(command) == 0
    table = capsys.readouterr().out
    records = {}
    for path in (results_with_teacher / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        if record["spec"]["role"] == "student":
            records[record["spec"]["method"]] = record
    assert set(ZOO) <= set(records)
    for name in ZOO:
        record = records[name]
        assert record["status"] == "done", (name, record.get("error"))
        main_epochs = [entry for entry in record["history"] if entry["stage"] == "main"]
        assert len(main_epochs) == 2 and all(math.isfinite(entry["loss"]) for entry in main_epochs)
        assert f"| {name}" in table or f"| {registry.get(name).display_name}" in table
    # The initialisation stages ran before the main stage, with their own terms.
    assert {entry["stage"] for entry in records["fsp"]["history"]} == {"fsp", "main"}
    assert "fsp" in records["fsp"]["history"][0]["terms"]
    assert records["ft"]["history"][0]["stage"] == "paraphraser"
    assert "reconstruction" in records["ft"]["history"][0]["terms"]
    for name, term in (("sp", "sp"), ("cc", "cc"), ("vid", "vid"), ("pkt", "pkt"), ("nst", "nst"), ("ft", "ft")):
        assert term in records[name]["history"][-1]["terms"]
    assert set(records["fsp"]["history"][-1]["terms"]) == {"ce"}


def test_a_stage_learning_rate_reaches_the_stage_optimiser(results_with_teacher) -> None:
    # FT's paraphraser at RepDistiller's 0.01 while the setting's rate is 0.05: train.py builds
    # the stage's optimiser with the stage's lr (PretrainStage.lr), the main stage with the setting's.
    from kdbench.settings import get as get_setting
    from kdbench.spec import RunSpec
    from kdbench.worker import run_job

    spec = RunSpec("synthetic/tiny", "ft", 0, config={"paraphraser_lr": 0.01}, overrides={"epochs": 1})
    outcome = run_job(spec.to_json(), str(results_with_teacher))
    assert outcome["status"] == "done", outcome
    record = json.loads((results_with_teacher / "runs" / f"{spec.id}.json").read_text())
    stage, main_stage = record["history"][0], record["history"][-1]
    assert stage["stage"] == "paraphraser" and stage["lr_next"] == pytest.approx(0.01)
    recipe = get_setting("synthetic/tiny").recipe.with_overrides({"epochs": 1})
    decays = sum(milestone <= 1 for milestone in recipe.milestones())
    assert main_stage["stage"] == "main"
    assert main_stage["lr_next"] == pytest.approx(recipe.lr * recipe.lr_decay**decays)
    assert recipe.lr != pytest.approx(0.01)
