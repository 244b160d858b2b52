"""RKD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).

Instead of matching individual outputs, the student matches *relations* among the examples of
a batch, computed on each network's pooled penultimate embedding (the paper: "the last pooling
layer"):

- distance-wise potential ψ_D(i, j) = ‖e_i − e_j‖₂ / μ, μ the mean of the batch's non-zero
  pairwise distances (so the loss ignores the embedding's scale);
- angle-wise potential ψ_A(i, j, k) = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩ over all triplets.

L = CE + w_d·Huber(ψ_D^s, ψ_D^t) + w_a·Huber(ψ_A^s, ψ_A^t), Huber = smooth-L1 with δ = 1 averaged
over all pairs / triplets (the authors' lenscloth/RKD ``metric/loss.py``), teacher potentials
computed without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.method import EMBEDDING, FIDELITY_PAPER, Batch, Features, Method, MethodConfig, Progress


def pairwise_distances(embedding: Tensor) -> Tensor:
    """(B, B) Euclidean distances with an exact-zero diagonal.

    Squared distances are clamped at 1e-12 before the square root (the authors' ``pdist``): the
    gradient of √x at 0 is infinite, and the diagonal is masked out rather than written in place."""
    squared = embedding.pow(2).sum(dim=1)
    gram = embedding @ embedding.t()
    distances = (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=1e-12).sqrt()
    off_diagonal = ~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)
    return distances * off_diagonal


def distance_potential(embedding: Tensor) -> Tensor:
    """ψ_D: pairwise distances divided by their mean over the non-zero ones (the authors'
    ``d / d[d > 0].mean()``, written as sum / count: the same value without a boolean index,
    which would make the host wait for the GPU every step)."""
    distances = pairwise_distances(embedding)
    return distances / (distances.sum() / (distances > 0).sum())


def angle_potential(embedding: Tensor) -> Tensor:
    """ψ_A as a (B, B, B) tensor: entry [j, i, k] is the cosine of the angle at e_j between
    e_i − e_j and e_k − e_j. Degenerate triplets (i = j or k = j) are 0 on both
    sides, as in the authors' code."""
    differences = F.normalize(embedding[None, :, :] - embedding[:, None, :], p=2, dim=2)
    return differences @ differences.transpose(1, 2)


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, normalize: bool = False) -> dict[str, Tensor]:
    """The weighted RKD-D and RKD-A terms, computed in fp32 on (B, D_s) and (B, D_t) embeddings
    (the dimensions may differ: only relations within each network are compared)."""
    student = student.float().flatten(1)
    teacher = teacher.float().flatten(1).detach()
    if normalize:
        student, teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    with torch.no_grad():
        teacher_distance = distance_potential(teacher)
        teacher_angle = angle_potential(teacher)
    distance = F.smooth_l1_loss(distance_potential(student), teacher_distance, beta=1.0)
    angle = F.smooth_l1_loss(angle_potential(student), teacher_angle, beta=1.0)
    return {"rkd_distance": distance_weight * distance, "rkd_angle": angle_weight * angle}


@dataclass(frozen=True)
class RKDConfig(MethodConfig):
    # w_d = 25, w_a = 50: the authors' CIFAR script (lenscloth/RKD run_distill_classification.py,
    # `--dist_ratio 25 --angle_ratio 50`) and RepDistiller's RKDLoss(w_d=25, w_a=50).
    distance_weight: float = 25.0
    angle_weight: float = 50.0
    # L2-normalise each embedding first: RepDistiller does not (default, the numbers we compare
    # with); the authors' CIFAR script does (`F.normalize(e_s, p=2, dim=1)`, and it also adds KD
    # with weight 16, which this method leaves to the kd row). KD_methods_with_TF calls
    # tf.nn.l2_normalize without an axis — over the whole batch, which ψ_D and ψ_A cancel.
    normalize: bool = False


class RKD(Method):
    name = "rkd"
    paper = "Park, Kim, Lu & Cho. Relational Knowledge Distillation. CVPR 2019"
    display_name = "RKD"
    fidelity = FIDELITY_PAPER
    fidelity_note = ("the paper's distance and angle potentials with Huber loss; w_d = 25, "
                     "w_a = 50 and the pdist clamp as the authors' code, no L2 norm as RepDistiller")
    Config = RKDConfig
    student_taps = frozenset({EMBEDDING})
    teacher_taps = frozenset({EMBEDDING})

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return rkd_loss(s.embedding, t.embedding, self.config.distance_weight,
                        self.config.angle_weight, self.config.normalize)
