"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018 (arXiv:1803.10837).

The student matches the teacher's *distribution* of pairwise affinities in a batch, not its
features. With the cosine kernel K(a, b) = ½ (aᵀb / (‖a‖‖b‖) + 1) ∈ [0, 1] on each network's
embedding, the conditional probabilities of the batch's samples are

    p_{j|i} = K(t_i, t_j) / Σ_{k≠i} K(t_i, t_k)   (teacher),   q_{j|i} the same on the student,

and the loss is KL(P ‖ Q) = Σ_i Σ_{j≠i} p_{j|i} log(p_{j|i} / q_{j|i}). The embeddings' widths
may differ (only within-network affinities are compared), and the loss does not change when any
sample's embedding is scaled by a positive number (the kernel is a cosine).

The authors' code (passalis/probabilistic_kt ``nn/pkt.py``, copied by RepDistiller and
mdistiller) differs in one point: its row sums include k = i, i.e. every sample is its own
neighbour with affinity 1 (``include_self=True``). Both keep the authors' scale: the KL summed
over the B × B entries and divided by B² (their ``torch.mean``; the B(B − 1) off-diagonal terms
here), with ε = 1e-7 inside the logarithm (their ``(p + eps) / (q + eps)``). The paper has no
CIFAR-100 weight; 30000 is RepDistiller's, for that scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.method import (
    EMBEDDING,
    FIDELITY_PAPER,
    Batch,
    Features,
    Method,
    MethodConfig,
    Progress,
)

EPSILON = 1e-7  # the authors' eps: inside the logarithm of the KL


def conditional_probabilities(embedding: Tensor, include_self: bool) -> Tensor:
    """(B, B) rows p_{·|i} of the cosine-kernel affinities, fp32. Without ``include_self`` the
    diagonal is 0 and each row sums to 1 over j ≠ i (the paper)."""
    unit = F.normalize(embedding.float().flatten(1), dim=1)  # a zero vector stays zero
    affinity = (unit @ unit.t() + 1.0) / 2.0
    if not include_self:
        affinity = affinity * (1.0 - torch.eye(len(affinity), device=affinity.device))
    return affinity / affinity.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, include_self: bool = False) -> Tensor:
    """KL(P_teacher ‖ Q_student) summed over the batch's pairs, divided by B²; no gradient
    reaches the teacher."""
    with torch.no_grad():
        p = conditional_probabilities(teacher, include_self)
    q = conditional_probabilities(student, include_self)
    # p = 0 on the diagonal (paper form) contributes 0·log(ε/(q + ε)) = 0, as the sum over j ≠ i.
    return (p * torch.log((p + EPSILON) / (q + EPSILON))).sum() / len(p) ** 2


@dataclass(frozen=True)
class PKTConfig(MethodConfig):
    # RepDistiller's CIFAR-100 command (`--distill pkt -b 30000`), mdistiller PKT.LOSS.FEAT_WEIGHT
    # 30000.0.
    weight: float = 30000.0
    # False: the paper's p_{j|i} over j ≠ i; True: the authors' code (and RepDistiller's,
    # mdistiller's), whose row sums include the sample itself.
    include_self: bool = False


class PKT(Method):
    name = "pkt"
    display_name = "PKT"
    paper = ("Passalis & Tefas. Learning Deep Representations with Probabilistic Knowledge "
             "Transfer. ECCV 2018")
    fidelity = FIDELITY_PAPER
    fidelity_note = ("Cosine-kernel conditional probabilities over j ≠ i and their KL, as the "
                     "paper; the authors' code includes j = i (include_self=true). Authors' B² "
                     "normalisation and ε; weight 30000 from RepDistiller (the paper has none).")
    Config = PKTConfig
    # The pooled penultimate features, as RepDistiller (feat[-1]) and mdistiller ("pooled_feat").
    student_taps = frozenset({EMBEDDING})
    teacher_taps = frozenset({EMBEDDING})
    config: PKTConfig

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return {"pkt": self.config.weight * pkt_loss(s.embedding, t.embedding, self.config.include_self)}
