"""CRG: kdbench's *reading* of Wang, Huang, Ma, Wu & Ma, "Exploring Graph-based Knowledge:
Multi-Level Feature Distillation via Channels Relational Graph", arXiv 2405.08547, 2024.

Not the authors' method: no code is public, and the text reachable here is the abstract and a
summary of the objective, L = L_task + α·L_vertex + β·L_edge + γ·L_spectral, over a graph whose
vertices are the channels of a feature map and whose edges are the cosine similarities of the
flattened channel maps, aligned at several levels, "attention-guided", with spectral embedding
as the key step (shared/specs/zoo.md, last section). Everything below that sentence does not
fix is a choice of this file, named here, in ``CRG.fidelity_note`` and where it is made:

1. Levels: the last min(L_s, L_t) stage outputs (STAGES role) of each network, paired in order,
   so that both chains end at the map the classifier reads (MHGD's pairing in this suite).
2. Width: the student's map goes through a 1×1 conv + BN to the teacher's width C_t (one
   connector per level, trained with the student; OFD's connector), so that vertex i of the
   student is matched with vertex i of the teacher. Different spatial sizes: the larger map is
   average-pooled to the smaller one (AT's rule).
3. Vertices: per sample, channel c's map flattened and L2-normalised, v_c ∈ R^{H·W} (a zero
   channel gives a zero vertex).
4. Edges: A = V Vᵀ, the C × C cosine similarities (diagonal 1, 0 for a zero channel).
5. L_vertex = mean over samples and channels of Σ_p w_p (v_s,c,p − v_t,c,p)², w the teacher's
   spatial attention mean_c t²(p), scaled to mean 1 over positions: uniform attention gives
   2 − 2·cos(v_s,c, v_t,c). Only this term is attention-weighted ("attention-guided" is not
   specified further); L_edge and L_spectral are unweighted.
6. L_edge = mean over samples and entries of (A_s − A_t)².
7. The graph of the spectral term: weights W = max(A, 0) off the diagonal (a Laplacian needs
   non-negative weights; cosines of pre-activation maps can be negative), no self-loops; the
   symmetric normalised Laplacian L = I − D^{-1/2} W D^{-1/2}, an isolated vertex (degree 0)
   contributing the row of I.
8. Spectral embedding: the k eigenvectors of L with the smallest eigenvalues (the trivial one
   included), compared through their projector P = U_k U_kᵀ, so that neither the eigenvectors'
   signs nor rotations within a repeated eigenvalue matter: L_spectral = mean over samples of
   ‖P_s − P_t‖²_F / (2k) ∈ [0, 1]. k = min(8, C − 1).
9. Levels are summed, each term unweighted across levels; α = β = γ = 1, k = 8: zoo.md's
   starting values (the paper's values are not public).

The projector's gradient is written out (``_BottomEigenspaceProjector``): torch.linalg.eigh's
backward has 1/(λ_i − λ_j) for *every* pair and returns NaN on the repeated eigenvalues that
rank-deficient maps produce (dead channels are isolated vertices, all with eigenvalue 1), while
the projector's exact gradient only has the pairs across the k-th gap.

Cost: one eigendecomposition of a C_t × C_t matrix per sample, level and network per step, in
fp32 (tests/benchmarks/test_method_overhead.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_READING,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Progress,
)

# Eigenvalue gaps below this fraction of the largest |eigenvalue| are treated as ties in the
# projector's gradient (the order of what fp32 resolves, as in methods/mhgd.py).
DEGENERACY_TOLERANCE = 1e-6


def paired_levels(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student stage, teacher stage): the last min(L_s, L_t) of each, in order (choice 1)."""
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"need at least one stage on each side, got {num_student} and {num_teacher}")
    count = min(num_student, num_teacher)
    return list(zip(range(num_student - count, num_student), range(num_teacher - count, num_teacher)))


def vertex_features(feature_map: Tensor) -> Tensor:
    """(B, C, H, W) → (B, C, H·W): each channel's map flattened and L2-normalised (choice 3)."""
    return F.normalize(feature_map.flatten(2), dim=2)


def edge_matrix(vertices: Tensor) -> Tensor:
    """(B, C, H·W) unit vertices → (B, C, C) cosine similarities (choice 4)."""
    return vertices @ vertices.transpose(1, 2)


def normalized_laplacian(edges: Tensor) -> Tensor:
    """I − D^{-1/2} W D^{-1/2}, W = max(A, 0) without the diagonal (choice 7)."""
    channels = edges.shape[-1]
    eye = torch.eye(channels, dtype=edges.dtype, device=edges.device)
    weights = edges.clamp_min(0.0) * (1.0 - eye)
    degrees = weights.sum(dim=-1)
    # An isolated vertex has no D^{-1/2}: 0 there (clamp_min passes no gradient below tiny).
    inverse_root = torch.where(degrees > 0, degrees.clamp_min(torch.finfo(edges.dtype).tiny).rsqrt(), 0.0)
    return eye - inverse_root[..., :, None] * weights * inverse_root[..., None, :]


def _inverse_gaps(gaps: Tensor, largest: Tensor) -> Tensor:
    """1/gap, tamed to gap/(gap² + ε²), ε = DEGENERACY_TOLERANCE·max|λ|: 0 at a tie, bounded by
    1/(2ε), within a factor 1/(1 + ε²/gap²) of 1/gap for every gap fp32 resolves."""
    epsilon = DEGENERACY_TOLERANCE * largest
    return gaps / (gaps * gaps + epsilon * epsilon + torch.finfo(gaps.dtype).tiny)


class _BottomEigenspaceProjector(torch.autograd.Function):
    """P = U_k U_kᵀ for the k smallest eigenvalues of each symmetric matrix, exact gradient.

    For L = U Λ Uᵀ, dP = Σ_{i ≤ k < j} (u_jᵀ dL u_i)/(λ_i − λ_j) (u_j u_iᵀ + u_i u_jᵀ): the
    pairs within the first k (or within the rest) cancel, so ties there cost nothing. With
    S = sym(P̄), L̄ = sym(U_r K U_kᵀ), K = 2 (U_rᵀ S U_k) ∘ F, F_ji = 1/(λ_i − λ_j) tamed."""

    @staticmethod
    def forward(ctx: Any, matrices: Tensor, count: int) -> Tensor:
        eigenvalues, vectors = torch.linalg.eigh(matrices)  # ascending
        ctx.save_for_backward(eigenvalues, vectors)
        ctx.count = count
        bottom = vectors[..., :count]
        return bottom @ bottom.transpose(-1, -2)

    @staticmethod
    def backward(ctx: Any, grad_projector: Tensor) -> tuple[Tensor, None]:
        eigenvalues, vectors = ctx.saved_tensors
        count = ctx.count
        bottom, rest = vectors[..., :count], vectors[..., count:]
        symmetric = 0.5 * (grad_projector + grad_projector.transpose(-1, -2))
        coupling = rest.transpose(-1, -2) @ symmetric @ bottom  # (B, C − k, k): u_jᵀ S u_i
        gaps = eigenvalues[..., None, :count] - eigenvalues[..., count:, None]  # λ_i − λ_j
        largest = eigenvalues.abs().amax(dim=-1)[..., None, None]
        factor = 2.0 * coupling * _inverse_gaps(gaps, largest)
        grad = rest @ factor @ bottom.transpose(-1, -2)
        return 0.5 * (grad + grad.transpose(-1, -2)), None


def bottom_eigenspace_projector(matrices: Tensor, count: int) -> Tensor:
    """(B, C, C) symmetric → (B, C, C) projector onto the eigenvectors of the ``count`` smallest
    eigenvalues (choice 8), differentiable when the input requires grad."""
    if torch.is_grad_enabled() and matrices.requires_grad:
        return _BottomEigenspaceProjector.apply(matrices, count)
    vectors = torch.linalg.eigh(matrices)[1][..., :count]
    return vectors @ vectors.transpose(-1, -2)


def projector_distance(student: Tensor, teacher: Tensor, count: int) -> Tensor:
    """mean over samples of ‖P_s − P_t‖²_F / (2k): 0 for the same subspace, 1 for orthogonal
    ones (‖P_s − P_t‖² = 2k − 2·tr(P_s P_t))."""
    return (student - teacher).pow(2).sum(dim=(-2, -1)).mean() / (2 * count)


def spatial_attention(teacher_map: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H·W): mean_c t², scaled to mean 1 over positions (0 for a zero map)."""
    energy = teacher_map.pow(2).mean(dim=1).flatten(1)
    mean = energy.mean(dim=1, keepdim=True)
    return energy / mean.clamp_min(torch.finfo(energy.dtype).tiny)


def crg_level_terms(student_map: Tensor, teacher_map: Tensor, count: int) -> dict[str, Tensor]:
    """The three unweighted terms at one level, from the student's map already at the teacher's
    width (B, C_t, H, W) and the teacher's map; no gradient reaches the teacher."""
    teacher_map = teacher_map.detach()
    height = min(student_map.shape[2], teacher_map.shape[2])
    width = min(student_map.shape[3], teacher_map.shape[3])
    if student_map.shape[2:] != (height, width):
        student_map = F.adaptive_avg_pool2d(student_map, (height, width))
    if teacher_map.shape[2:] != (height, width):
        teacher_map = F.adaptive_avg_pool2d(teacher_map, (height, width))
    student_vertices, teacher_vertices = vertex_features(student_map), vertex_features(teacher_map)
    attention = spatial_attention(teacher_map)
    vertex = (attention[:, None, :] * (student_vertices - teacher_vertices).pow(2)).sum(dim=2).mean()
    student_edges, teacher_edges = edge_matrix(student_vertices), edge_matrix(teacher_vertices)
    edge = (student_edges - teacher_edges).pow(2).mean()
    spectral = projector_distance(
        bottom_eigenspace_projector(normalized_laplacian(student_edges), count),
        bottom_eigenspace_projector(normalized_laplacian(teacher_edges), count), count)
    return {"vertex": vertex, "edge": edge, "spectral": spectral}


def eigenvector_count(channels: int, requested: int) -> int:
    """k = min(requested, C − 1): the projector onto all C eigenvectors is I and carries nothing."""
    if channels < 2:
        raise ValueError(f"crg needs at least 2 channels per level, got {channels}")
    return min(requested, channels - 1)


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1×1 conv (no bias) + BN from the student's width to the teacher's (choice 2), initialised
    as the OFD authors' connector (clovaai/overhaul-distillation distiller.py): N(0, 2/(k²·C_out))
    weights, BN γ = 1, β = 0."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, (2.0 / teacher_channels) ** 0.5)
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


@dataclass(frozen=True)
class CRGConfig(MethodConfig):
    # α, β, γ = 1 and k = 8: shared/specs/zoo.md's starting values for this reading; the paper's
    # values are not public (choice 9).
    alpha: float = 1.0  # weight of L_vertex
    beta: float = 1.0  # weight of L_edge
    gamma: float = 1.0  # weight of L_spectral
    eigenvectors: int = 8  # k, capped at C − 1 per level

    def __post_init__(self) -> None:
        if self.eigenvectors < 1:
            raise ValueError(f"crg.eigenvectors must be >= 1, got {self.eigenvectors}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("crg.alpha, crg.beta and crg.gamma must be >= 0")


class CRG(Method):
    name = "crg"
    display_name = "CRG"
    paper = ("Wang, Huang, Ma, Wu & Ma. Exploring Graph-based Knowledge: Multi-Level Feature "
             "Distillation via Channels Relational Graph. arXiv 2405.08547, 2024")
    fidelity = FIDELITY_READING
    fidelity_note = ("abstract and objective only (no code): channel graphs at the last min(L_s, L_t) "
                     "stages, student 1x1 conv+BN to the teacher's width, cosine edges, vertex MSE "
                     "weighted by the teacher's spatial attention, edge MSE, spectral term = distance "
                     "of the projectors onto the 8 smallest eigenvectors of the normalised Laplacian "
                     "of max(A, 0); alpha = beta = gamma = 1 (kdbench's choices)")
    Config = CRGConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    host_syncs = {"aten._linalg_eigh": "the spectral embedding is torch.linalg.eigh of each channel "
                                       "graph's Laplacian, which checks the solver's error code on the host"}
    config: CRGConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("crg needs a teacher")
        self.levels = paired_levels(len(student_shapes.stages), len(teacher_shapes.stages))
        self.counts = [eigenvector_count(teacher_shapes.stages[j][0], self.config.eigenvectors)
                       for _, j in self.levels]
        self.connectors = nn.ModuleList(
            connector(student_shapes.stages[i][0], teacher_shapes.stages[j][0]) for i, j in self.levels)

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        totals: dict[str, Tensor] = {}
        for (i, j), project, count in zip(self.levels, self.connectors, self.counts):
            for key, term in crg_level_terms(project(s.stages[i]), t.stages[j], count).items():
                totals[key] = totals[key] + term if key in totals else term
        weights = {"vertex": self.config.alpha, "edge": self.config.beta, "spectral": self.config.gamma}
        return {key: weights[key] * term for key, term in totals.items()}
