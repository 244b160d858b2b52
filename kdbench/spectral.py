"""Top right singular vectors of feature maps, with an exact gradient that stays finite.

For a feature map F of shape (B, C, H, W), each sample's X = F reshaped to (H·W, C) has right
singular vectors of length C; the first few, unit length, summarise the sample's map in one
vector per component (the feature-map compression of Lee, Kim & Song, "Self-supervised
Knowledge Distillation Using Singular Value Decomposition", ECCV 2018, and of its authors'
later graph distillation). The reference is those authors' TensorFlow code,
sseung0703/KD_methods_with_TF ``nets/SVP.py`` (SVD_eid, Align_rsv, gradient_svd).

- ``right_singular_vectors(feature_map, count)``: from the eigendecomposition of the smaller
  Gram matrix (XᵀX or XXᵀ) as SVD_eid does, exact, batched, in fp32 with autocast off (the
  reference also uses the plain SVD when H·W and C are within a factor 3/2 of each other; the
  result is the same decomposition). Its gradient is the exact SVD gradient, with the
  1/(λ_i − λ_j) terms tamed near ties and NaN/inf zeroed (``_inverse_gaps``), so it stays
  finite for zero, rank-deficient and degenerate maps (zero ReLU maps are common).
  The reference's hand-written ``gradient_svd`` is not this gradient. When H·W ≥ C (its
  ``right_grad``) it is exactly *twice* it: its ``msym`` is X + Xᵀ where the formula has
  ½(X + Xᵀ). When H·W < C (its ``left_grad``, from the transposed problem: the last stage of a
  WRN at 28 px, 7·7 < 64; VGG's 4×4 maps; ResNet×4's 8×8 × 256) its direction differs as well.
  Measured in fp64 against torch.linalg.svd's gradient (tests/test_spectral.py ports
  ``gradient_svd``), on random ReLU maps, a batch of 64, the incoming gradient on one of the
  first 4 vectors per sample (what alignment passes back): the cosine over the whole batch is
  0.977–0.9998 for (H·W, C) in (49, 64), (64, 256), (16, 512), (16, 32), (9, 40); per sample it
  goes down to 0.90, and the norm ratio to the exact gradient is 1.3–2.0 instead of 2.
- ``canonical_sign(vectors)``: a sign convention, for maps that are not odd.
- ``align_to_teacher(candidates, teacher)``: Align_rsv, the candidate with the largest
  |cosine| with a reference vector, signed to agree with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Eigenvalue gaps below about this fraction of the largest eigenvalue are treated as ties in the
# gradient (``_inverse_gaps``): it is the order of what a fp32 Gram matrix resolves (rounding
# 2⁻²⁴ ≈ 6e-8 of λ_max, amplified with the matrix size), so smaller gaps are mostly noise.
DEGENERACY_TOLERANCE = 1e-6


def _inverse_gaps(gaps: Tensor, largest: Tensor) -> Tensor:
    """1/gap, tamed near zero as gap/(gap² + ε²), ε = DEGENERACY_TOLERANCE·λ_max.

    The eigenvector gradient has 1/(λ_i − λ_j) terms that are infinite for equal eigenvalues
    (zero or rank-deficient ReLU maps) and huge for nearly equal ones. The reference sets the
    infinite ones to zero (SVP.py ``removenan(KT)``) and keeps the huge ones; this form also
    gives 0 at an exact tie, differs from 1/gap by a factor 1/(1 + ε²/gap²) (≈ 1 for any gap
    fp32 resolves), and is bounded by 1/(2ε) in between, so the gradient stays finite."""
    epsilon = DEGENERACY_TOLERANCE * largest
    return gaps / (gaps * gaps + epsilon * epsilon + torch.finfo(gaps.dtype).tiny)


def _spectrum(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Right singular vectors V (B, C, r) and squared singular values λ (B, r), in descending
    order, of each sample's X = flatᵀ (H·W × C), r = min(H·W, C).

    From the eigendecomposition of the smaller Gram matrix, as the reference's SVD_eid does:
    XᵀX (C × C) when H·W ≥ C; otherwise XXᵀ (H·W × H·W), whose eigenvectors u give v = Xᵀu/‖Xᵀu‖
    (zero where ‖Xᵀu‖ = 0, the reference's ``removenan``), with λ = ‖Xᵀu‖² as its s_svd."""
    channels, positions = flat.shape[-2:]
    if positions >= channels:
        eigenvalues, vectors = torch.linalg.eigh(flat @ flat.transpose(1, 2))
        return vectors.flip(-1), eigenvalues.flip(-1).clamp_min(0.0)
    _, left = torch.linalg.eigh(flat.transpose(1, 2) @ flat)
    rows = left.flip(-1).transpose(1, 2) @ flat.transpose(1, 2)  # (Xᵀu)ᵀ as rows: (B, r, C)
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    rows = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return rows.transpose(1, 2), norms.squeeze(-1) ** 2


class _TopRightSingularVectors(torch.autograd.Function):
    """The first ``count`` right singular vectors of each sample, with the exact SVD gradient.

    Backward, for X = U S Vᵀ (r components) and an incoming gradient V̄ on the first n columns:
        X̄ = U S (F ∘ (VᵀV̄ − V̄ᵀV)) Vᵀ + U S⁻¹ V̄ᵀ (I − V Vᵀ),   F_ij = 1/(λ_j − λ_i), F_ii = 0
    (the second term only exists when H·W < C). U S = X V, so with A = F ∘ (VᵀV̄ − V̄ᵀV), which is
    symmetric and zero outside its first n rows and columns, the first term is X·(Z V_nᵀ + V_n Zᵀ)
    with Z = V A[:, :n] − ½ V_n A[:n, :n]; the second is X·V_n Λ_n⁻¹ Rᵀ, R = (I − VVᵀ)V̄_n, folded
    into Z as Z + R Λ_n⁻¹ (the V_n Rᵀ Xᵀ this adds to the transposed product is zero: Xᵀ lies in
    span V). Everything costs O(H·W·C·n) after the forward's Gram matrix: no C × C product."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, count: int) -> Tensor:
        vectors, eigenvalues = _spectrum(flat)
        ctx.save_for_backward(flat, vectors, eigenvalues)
        ctx.count = count
        return vectors[..., :count]

    @staticmethod
    def backward(ctx: Any, grad_top: Tensor) -> tuple[Tensor, None]:
        flat, vectors, eigenvalues = ctx.saved_tensors
        n = ctx.count
        top = vectors[..., :n]
        largest = eigenvalues[:, :1, None]
        projections = vectors.transpose(1, 2) @ grad_top  # VᵀV̄ (B, r, n), its first n columns
        transposed = torch.zeros_like(projections)  # (V̄ᵀV)ᵀ restricted the same way
        transposed[:, :n] = projections[:, :n].transpose(1, 2)
        inverse_gaps = _inverse_gaps(eigenvalues[:, None, :n] - eigenvalues[:, :, None], largest)
        a = inverse_gaps * (projections - transposed)  # A[:, :n]; the diagonal of F is 0
        z = vectors @ a - 0.5 * top @ a[:, :n]
        if vectors.shape[-1] < flat.shape[-2]:  # H·W < C: the null-space term U S⁻¹ V̄ᵀ(I − VVᵀ)
            outside = grad_top - vectors @ projections
            z = z + outside * _inverse_gaps(eigenvalues[:, None, :n], largest)  # V̄⊥·λ⁻¹
        # NaN/inf zeroed as SVP.py's removenan does, here on the small factor: the product of
        # finite factors with the finite input is finite (|F| ≤ 1/2ε keeps it far from overflow).
        z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        # X̄ᵀ = (V_n Zᵀ + Z V_nᵀ)·Xᵀ as one product of rank 2n: [V_n, Z]·([Z, V_n]ᵀ·Xᵀ).
        grad = torch.cat([top, z], dim=2) @ (torch.cat([z, top], dim=2).transpose(1, 2) @ flat)
        return grad, None


def right_singular_vectors(feature_map: Tensor, count: int) -> Tensor:
    """(B, C, H, W) → (B, C, n), n = min(count, H·W, C): the first n right singular vectors of
    each sample's X = F reshaped to (H·W, C), unit length (zero for a zero singular value).

    Computed in fp32 whatever the autocast precision (a Gram matrix in bf16 has no top
    eigenvectors worth the name); differentiable when the map requires grad."""
    with torch.autocast(feature_map.device.type, enabled=False):
        flat = feature_map.float().flatten(2)
        n = min(count, *flat.shape[1:])
        if torch.is_grad_enabled() and flat.requires_grad:
            return _TopRightSingularVectors.apply(flat, n)
        return _spectrum(flat)[0][..., :n]


def canonical_sign(vectors: Tensor) -> Tensor:
    """Flip each vector of (B, C, n) so that its entries sum to ≥ 0: a singular vector's sign is
    arbitrary, and a map that is not odd (BatchNorm's shift) must not see that arbitrariness."""
    signs = torch.where(vectors.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    return vectors * signs


def align_to_teacher(candidates: Tensor, teacher: Tensor) -> Tensor:
    """Of the student's candidates (B, C, n), the one with the largest |cosine| with the teacher's
    vector (B, C), times the sign of that cosine → (B, C). Candidates and the teacher's vector
    are unit vectors, so the dot product is the cosine (SVP.py Align_rsv).

    The reference builds a mask from ``|cos| == max |cos|`` and multiplies by ``sign(cos)``, so a
    zero cosine (a zero teacher vector) gives a zero student vector; ``sign`` does the same here.
    The selection carries no gradient; the selected vector does."""
    cosines = torch.einsum("bcn,bc->bn", candidates, teacher)
    best = cosines.abs().argmax(dim=1, keepdim=True)
    signs = cosines.gather(1, best).sign().detach()
    chosen = candidates.gather(2, best[:, None, :].expand(-1, candidates.shape[1], 1)).squeeze(2)
    return chosen * signs
