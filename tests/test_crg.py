"""CRG (methods/crg.py, kdbench's reading of arXiv 2405.08547): values by hand, the properties the
reading promises, and the projector's gradient. Milliseconds each."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.method import Batch, FeatureShapes, Features, Progress
from kdbench.methods.crg import (
    CRG,
    CRGConfig,
    bottom_eigenspace_projector,
    crg_level_terms,
    edge_matrix,
    eigenvector_count,
    normalized_laplacian,
    paired_levels,
    projector_distance,
    vertex_features,
)

PROGRESS = Progress(epoch=0, epochs=2, step=0, steps_per_epoch=1, pretrain_epochs=0)


def random_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_hand_computed_terms_on_three_channels() -> None:
    # One sample, 3 channels over 3 positions (H = 1, W = 3).
    # Teacher: t1 = (1,0,0), t2 = (1,1,0), t3 = (0,0,1): cos(1,2) = 1/√2, the rest 0, so the graph
    # is the edge 1–2 plus the isolated vertex 3. Student: s1 = (1,0,0), s2 = (1,0,1), s3 = (0,0,1):
    # the path 1–2–3 with weights 1/√2.
    teacher = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]]).view(1, 3, 1, 3)
    student = torch.tensor([[1.0, 0, 0], [1, 0, 1], [0, 0, 1]]).view(1, 3, 1, 3)
    terms = crg_level_terms(student, teacher, count=1)
    # Vertex: the teacher's attention mean_c t² = (2/3, 1/3, 1/3), mean 4/9 → w = (3/2, 3/4, 3/4).
    # Only vertex 2 differs: v_s − v_t = (0, −1/√2, 1/√2), Σ_p w_p Δ_p² = 3/4·1/2 + 3/4·1/2 = 3/4;
    # the mean over the 3 channels is 1/4.
    assert terms["vertex"].item() == pytest.approx(0.25, rel=1e-5)
    # Edge: A_s − A_t is 1/√2 at (2,3) and (3,2), 0 elsewhere: (1/2 + 1/2)/9.
    assert terms["edge"].item() == pytest.approx(1 / 9, rel=1e-5)
    # Spectral, k = 1: the bottom eigenvector of I − D^{-1/2} W D^{-1/2} on a connected part is
    # D^{1/2}·1 normalised: u_t = (1, 1, 0)/√2 (vertex 3 is isolated, eigenvalue 1), and
    # u_s = (1, √2, 1)/2 (degrees w, 2w, w). ‖P_s − P_t‖²/2 = 1 − (u_sᵀu_t)² = 1 − (3 + 2√2)/8.
    assert terms["spectral"].item() == pytest.approx((5 - 2 * math.sqrt(2)) / 8, rel=1e-5)


def test_laplacian_of_a_hand_graph() -> None:
    # Two channels at cosine 1/√2: W = [[0, w], [w, 0]], D = w·I, L = [[1, −1], [−1, 1]];
    # a zero third channel is isolated: its row is that of I.
    maps = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    laplacian = normalized_laplacian(edge_matrix(vertex_features(maps)))
    expected = torch.tensor([[[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    torch.testing.assert_close(laplacian, expected, rtol=0, atol=1e-6)


def test_all_terms_are_zero_at_student_equal_teacher() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 16, 4, 4, generator=generator)  # signed, as WRN stage outputs are
    for key, term in crg_level_terms(maps.clone(), maps, count=8).items():
        assert term.item() == pytest.approx(0.0, abs=1e-6), key
    # ... and each term is positive for another map.
    other = torch.randn(3, 16, 4, 4, generator=generator)
    assert all(term.item() > 1e-3 for term in crg_level_terms(other, maps, count=8).values())


def test_method_loss_is_zero_when_student_equals_teacher_through_identity_connectors() -> None:
    shapes = FeatureShapes(stages=((8, 8, 8), (16, 4, 4), (32, 2, 2)), embedding=(32,), num_classes=5)
    method = CRG(CRGConfig())
    method.build(shapes, shapes, num_train=16)
    with torch.no_grad():
        for project in method.connectors:
            conv, norm = project
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    method.eval()  # BN with its initial running statistics: a positive scale, which cosines ignore
    generator = torch.Generator().manual_seed(1)
    stages = [torch.randn(4, *shape, generator=generator) for shape in shapes.stages]
    features = Features(logits=torch.zeros(4, 5), stages=stages)
    batch = Batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    terms = method.loss(features, features, batch, PROGRESS)
    assert set(terms) == {"vertex", "edge", "spectral"}
    for key, term in terms.items():
        assert term.item() == pytest.approx(0.0, abs=1e-5), key


def test_spectral_term_ignores_eigenvector_signs_and_rotations_within_a_repeated_eigenvalue() -> None:
    generator = torch.Generator().manual_seed(2)
    basis = random_rotation(6, generator)
    # λ = 0.5 three times, all inside the bottom k = 4: any orthonormal basis of its eigenspace is
    # an equally valid set of eigenvectors.
    eigenvalues = torch.tensor([0.0, 0.5, 0.5, 0.5, 1.2, 1.7], dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    vectors = basis[:, :4]
    rotated = vectors.clone()
    rotated[:, 1:4] = vectors[:, 1:4] @ random_rotation(3, generator)
    rotated = rotated * torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)  # and flip signs
    # The two bases differ, so a loss on the eigenvectors themselves would see a difference ...
    assert (rotated - vectors).abs().max() > 0.1
    # ... their projectors do not, and both equal what the method computes from the matrix.
    projector, projector_rotated = vectors @ vectors.T, rotated @ rotated.T
    torch.testing.assert_close(projector, projector_rotated)
    torch.testing.assert_close(bottom_eigenspace_projector(matrix[None], 4)[0], projector)
    other = random_rotation(6, generator)[:, :4]
    teacher = (other @ other.T)[None]
    assert projector_distance(projector[None], teacher, 4).item() == pytest.approx(
        projector_distance(projector_rotated[None], teacher, 4).item(), rel=1e-12)
    # Bounds: 0 for the same subspace, 1 for orthogonal ones.
    complement = basis[:, 2:6]
    assert projector_distance(projector[None], projector[None], 4).item() == pytest.approx(0.0, abs=1e-12)
    assert projector_distance((basis[:, :2] @ basis[:, :2].T)[None],
                              (complement[:, :2] @ complement[:, :2].T)[None], 2).item() == pytest.approx(1.0)


def test_projector_gradient_equals_autograd_through_eigh_on_a_generic_matrix() -> None:
    # An independent computation: torch.linalg.eigh's own backward, exact when no eigenvalues tie.
    generator = torch.Generator().manual_seed(3)
    raw = torch.randn(3, 7, 7, generator=generator, dtype=torch.float64)
    matrices = (raw + raw.transpose(1, 2)).requires_grad_(True)
    weights = torch.randn(3, 7, 7, generator=generator, dtype=torch.float64)
    (bottom_eigenspace_projector(matrices, 3) * weights).sum().backward()
    ours = matrices.grad.clone()
    matrices.grad = None
    vectors = torch.linalg.eigh(matrices)[1][..., :3]
    ((vectors @ vectors.transpose(1, 2)) * weights).sum().backward()
    torch.testing.assert_close(ours, matrices.grad, rtol=1e-8, atol=1e-10)


def test_gradients_are_finite_on_rank_deficient_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    # More channels (12) than positions (2 × 2), dead channels, a duplicated and a scaled channel:
    # rank-deficient maps whose Laplacians have repeated eigenvalues (every isolated vertex has 1).
    teacher = torch.relu(torch.randn(2, 12, 2, 2, generator=generator))
    teacher[:, :3] = 0
    teacher[:, 5] = teacher[:, 4]
    student = torch.relu(torch.randn(2, 12, 2, 2, generator=generator))
    student[:, :2] = 0
    student[:, 7] = 2 * student[:, 6]
    laplacian = normalized_laplacian(edge_matrix(vertex_features(student)))
    spectrum = torch.linalg.eigvalsh(laplacian)
    assert ((spectrum[:, 1:] - spectrum[:, :-1]).abs() < 1e-6).any(), "the test needs tied eigenvalues"
    for maps in (student, torch.zeros_like(student)):  # and an all-zero student map
        maps = maps.clone().requires_grad_(True)
        terms = crg_level_terms(maps, teacher, count=8)
        torch.stack(list(terms.values())).sum().backward()
        assert all(torch.isfinite(term) for term in terms.values())
        assert torch.isfinite(maps.grad).all()


def test_levels_pair_the_last_stages_and_k_is_capped() -> None:
    assert paired_levels(4, 3) == [(1, 0), (2, 1), (3, 2)]
    assert paired_levels(3, 4) == [(0, 1), (1, 2), (2, 3)]
    assert paired_levels(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert eigenvector_count(64, 8) == 8 and eigenvector_count(5, 8) == 4
    with pytest.raises(ValueError):
        CRGConfig(eigenvectors=0)


def test_connectors_map_each_paired_student_stage_to_the_teacher_width() -> None:
    student = FeatureShapes(stages=((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)),
                            embedding=(512,), num_classes=5)
    teacher = FeatureShapes(stages=((16, 16, 16), (32, 8, 8), (64, 4, 4)), embedding=(64,), num_classes=5)
    method = CRG(CRGConfig())
    method.build(student, teacher, num_train=16)
    assert [(c[0].in_channels, c[0].out_channels) for c in method.connectors] == [(128, 16), (256, 32), (512, 64)]
    assert method.fidelity == "reading of the paper" and method.display_name == "CRG"

