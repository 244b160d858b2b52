"""KD-SVD: Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018. The reference is the authors' TensorFlow code,
sseung0703/KD_methods_with_TF: ``nets/Shared.py`` (KD_SVD), ``nets/SVP.py`` (SVD, SVD_eid,
Align_rsv), ``nets/ResNet.py`` (its sensing points) and ``op_util.py``
(Optimizer_w_Distillation, the ``KD-`` branch: its gradient rule).

At every sensing point (stage output after its activation) each sample's feature map, as X
(H·W × C), is compressed to its first right singular vector(s) — K = 1 for the teacher, K + 3
candidates for the student, of which the one with the largest |cosine| with the teacher's,
signed to agree with it, is kept (Align_rsv). The vectors are scaled by the teacher's
L2-normalised top-K singular values (for K = 1 that factor is 1, or 0 for an all-zero map).
Between consecutive sensing points, a radial-basis "correlation" relates every entry of the
deeper vector to every entry of the shallower one, G_ij = exp(−(v_i − v'_j)²/8); the loss is
the squared difference of the student's and the teacher's G, summed over entries, samples and
pairs of sensing points (non-finite entries zeroed, as the reference's ``tf.where``). The
gradient rule is the authors': each student parameter tensor's distillation gradient is
clipped to ‖∇CE‖ times sigmoid(epoch) and added to ∇CE (MHGD's rule, which the same authors
reused; the functions come from methods/mhgd.py).

The decomposition is kdbench/spectral.py's, shared with MHGD (exact, with the exact SVD
gradient; the reference's hand-written gradient is twice the exact one, which the clip
absorbs whenever it is active). Where this file chooses what the reference leaves open:

- Widths that differ (the reference and RepDistiller/mdistiller pair networks of equal
  widths only; G is C_deeper × C_shallower): the student's candidates, given a canonical sign,
  go through a trainable Linear(C_s → C_t, no bias) + BatchNorm1d and are L2-normalised before
  the alignment — the MHGD authors' later answer to the same mismatch (specs/mhgd.md §2).
- Stage counts that differ (VGG 4, ResNet/WRN 3): the last min(L_s, L_t) sensing points of
  each network, as methods/mhgd.py pairs them.
- The teacher's sign: G changes when one sensing point's vector changes sign, and the
  reference takes whatever sign its solver returns (the student's vector is aligned to it, so
  the loss depends on the solver). Here the teacher's vectors get a canonical sign (entries
  summing to ≥ 0, ``canonical_sign``), so the loss is the same whatever the decomposition.
- Sensing points: the POSTACT_STAGES role (after the activation, as the reference's ResNet
  collects ``relu(x + out)``); RepDistiller and mdistiller take the stage outputs
  (``feat[1:-1]``), which differ from these on pre-activation WRNs.

``clip_to_ce = false`` and ``batch_mean = true`` give RepDistiller's/mdistiller's variant
(the summed loss divided by the batch size, back-propagated with CE, weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    POSTACT_STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Progress,
    iter_parameters,
)
from kdbench.spectral import align_to_teacher, canonical_sign, right_singular_vectors
from kdbench.methods.mhgd import clip_transfer_gradients, transfer_bound_factor

TRANSFER = "svd_rbf"  # the name of the transfer term, the one the gradient rule clips
RBF_WIDTH = 8.0  # Shared.py KD_SVD: exp(−(v_S − v_Sb)²/8)


def rbf_correlation(deeper: Tensor, shallower: Tensor) -> Tensor:
    """G (B, C_d, C_s, K): exp(−(deeper[b, i, k] − shallower[b, j, k])²/8) (Shared.py)."""
    return torch.exp(-(deeper.unsqueeze(2) - shallower.unsqueeze(1)).square() / RBF_WIDTH)


def correlation_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Σ over consecutive pairs of Σ (G_S − G_T)², the teacher's G without gradient and
    non-finite entries zeroed (Shared.py KD_SVD, ``tf.reduce_sum`` of ``l2loss``). Vectors are
    (B, C, K) per sensing point, student and teacher of equal widths."""
    total = None
    for index in range(1, len(student)):
        g_s = rbf_correlation(student[index], student[index - 1])
        g_t = rbf_correlation(teacher[index], teacher[index - 1]).detach()
        squared = (g_s - g_t).square()
        term = torch.where(torch.isfinite(squared), squared, torch.zeros_like(squared)).sum()
        total = term if total is None else total + term
    return total


def singular_value_weights(feature_map: Tensor, vectors: Tensor) -> Tensor:
    """The first K singular values σ_k = ‖X v_k‖ of each sample, L2-normalised (SVP.py:
    ``tf.nn.l2_normalize(s[:, :K])``, ε = 1e-12 as TF's): (B, 1, K), no gradient. For K = 1
    it is 1, or 0 where the map is all zero."""
    with torch.no_grad():
        flat = feature_map.float().flatten(2)  # (B, C, H·W): Xᵀ
        sigma = torch.linalg.vector_norm(flat.transpose(1, 2) @ vectors, dim=1)  # (B, K)
        sigma = sigma / sigma.square().sum(dim=1, keepdim=True).clamp_min(1e-12).sqrt()
    return sigma.unsqueeze(1)


def projection(student_width: int, teacher_width: int) -> nn.Sequential:
    """Linear(C_s → C_t, no bias) + BatchNorm1d: MHGD's width map (specs/mhgd.md §2)."""
    return nn.Sequential(nn.Linear(student_width, teacher_width, bias=False),
                         nn.BatchNorm1d(teacher_width))


@dataclass(frozen=True)
class KDSVDConfig(MethodConfig):
    # Shared.py KD_SVD: K = 1 teacher vector, K + 3 student candidates; mdistiller KDSVD.K 1.
    teacher_vectors: int = 1
    extra_candidates: int = 3
    # The reference adds the loss unweighted; mdistiller KDSVD.LOSS.FEAT_WEIGHT 1.0.
    weight: float = 1.0
    # op_util.py Optimizer_w_Distillation ('KD-' branch): ∇CE + clip_by_norm(∇dist,
    # ‖∇CE‖·sigmoid(epoch)) per variable; false: the plain sum (RepDistiller, mdistiller).
    clip_to_ce: bool = True
    # Shared.py sums over the batch; RepDistiller/mdistiller divide the sum by the batch size.
    batch_mean: bool = False

    def __post_init__(self) -> None:
        if self.teacher_vectors < 1 or self.extra_candidates < 0:
            raise ValueError("kdsvd.teacher_vectors must be >= 1 and kdsvd.extra_candidates >= 0")


class KDSVD(Method):
    name = "kdsvd"
    paper = ("Lee, Kim & Song. Self-supervised Knowledge Distillation Using Singular Value "
             "Decomposition. ECCV 2018")
    display_name = "KD-SVD"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("the authors' KD_methods_with_TF (Shared.py KD_SVD, SVP.py, op_util.py "
                     "clip rule); different widths: MHGD's Linear+BN projection (kdbench's choice)")
    Config = KDSVDConfig
    student_taps = frozenset({POSTACT_STAGES})
    teacher_taps = frozenset({POSTACT_STAGES})
    # As MHGD: the decompositions are eigh, whose CUDA kernel reads cuSOLVER's error code on
    # the host; PyTorch has no eigh without that check. Once per sensing point per step.
    host_syncs = {"aten._linalg_eigh": "the singular vectors come from torch.linalg.eigh, which "
                                       "checks cuSOLVER's error code on the host"}
    config: KDSVDConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("KD-SVD needs a teacher")
        student_points, teacher_points = student_shapes.postact_stages, teacher_shapes.postact_stages
        count = min(len(student_points), len(teacher_points))
        if count < 2:
            raise ValueError("KD-SVD needs at least two sensing points in each network")
        # The last min(L_s, L_t) points of each network (module docstring).
        self.student_points = list(range(len(student_points)))[-count:]
        self.teacher_points = list(range(len(teacher_points)))[-count:]
        self.projections = nn.ModuleDict({
            str(point): projection(student_points[s][0], teacher_points[t][0])
            for point, (s, t) in enumerate(zip(self.student_points, self.teacher_points))
            if student_points[s][0] != teacher_points[t][0]})

    def trainable_modules(self) -> list[nn.Module]:
        return [self.projections]

    def vectors(self, s: Features, t: Features) -> tuple[list[Tensor], list[Tensor]]:
        """Per sensing point, the student's and the teacher's (B, C_t, K) vectors."""
        teacher_count = self.config.teacher_vectors
        candidates_count = teacher_count + self.config.extra_candidates
        student_vectors, teacher_vectors = [], []
        for point, (i, j) in enumerate(zip(self.student_points, self.teacher_points)):
            teacher_map = t.postact_stages[j]
            with torch.no_grad():
                # A singular vector's sign is arbitrary and G is not invariant to it (flipping
                # one point's vector changes (v_i − v'_j)²): fix it (module docstring).
                teacher = canonical_sign(right_singular_vectors(teacher_map, teacher_count))
            candidates = right_singular_vectors(s.postact_stages[i], candidates_count)
            if str(point) in self.projections:
                batch, width, count = candidates.shape
                flat = canonical_sign(candidates).transpose(1, 2).reshape(batch * count, width)
                projected = F.normalize(self.projections[str(point)](flat), dim=-1)
                candidates = projected.view(batch, count, -1).transpose(1, 2)
            # Align_rsv: for each teacher vector, the best-matching candidate, signed.
            student = torch.stack([align_to_teacher(candidates, teacher[..., k])
                                   for k in range(teacher.shape[-1])], dim=-1)
            weights = singular_value_weights(teacher_map, teacher)
            student_vectors.append(student * weights)
            teacher_vectors.append(teacher * weights)
        return student_vectors, teacher_vectors

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        with torch.autocast(s.logits.device.type, enabled=False):
            student, teacher = self.vectors(s, t)
            loss = correlation_loss(student, teacher)
        if self.config.batch_mean:
            loss = loss / s.logits.shape[0]
        return {TRANSFER: self.config.weight * loss}

    def backward(self, terms: Mapping[str, Tensor], student_parameters: list[nn.Parameter],
                 progress: Progress) -> None:
        """g = ∇CE + clip_by_norm(∇transfer, ‖∇CE‖·sigmoid(epoch)) per student parameter tensor
        (op_util.py, the 'KD-' branch, init_epoch 0); the projections get their plain gradient;
        any other term (a composition's) is added unclipped. ``clip_to_ce = false``: the sum."""
        if not self.config.clip_to_ce:
            super().backward(terms, student_parameters, progress)
            return
        student = [p for p in student_parameters if p.requires_grad]
        extra = [p for p in iter_parameters(self.trainable_modules()) if p.requires_grad]
        others = [term for name, term in terms.items() if name not in ("ce", TRANSFER)]
        transfer_grads = torch.autograd.grad(terms[TRANSFER], student + extra, retain_graph=True,
                                             allow_unused=True)
        ce_grads = torch.autograd.grad(terms["ce"], student, retain_graph=bool(others),
                                       allow_unused=True)
        ce_grads = [grad if grad is not None else torch.zeros_like(parameter)
                    for parameter, grad in zip(student, ce_grads)]
        grads = clip_transfer_gradients(ce_grads, list(transfer_grads[:len(student)]),
                                        transfer_bound_factor(progress.epoch))
        for parameter, grad in zip(student, grads):
            parameter.grad = grad
        for parameter, grad in zip(extra, transfer_grads[len(student):]):
            parameter.grad = grad if grad is not None else torch.zeros_like(parameter)
        if others:
            for parameter, grad in zip(student + extra, torch.autograd.grad(
                    torch.stack(others).sum(), student + extra, allow_unused=True)):
                if grad is not None:
                    parameter.grad = grad if parameter.grad is None else parameter.grad + grad
