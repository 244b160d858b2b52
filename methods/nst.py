"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219, 2017.

Each channel of a feature map is one sample of the network's "neuron selectivity" distribution:
the rows f^k ∈ R^{H·W} of F (C × H·W), each L2-normalised. The student matches the teacher's
distribution by the squared maximum mean discrepancy, per image,

    MMD²(F_T, F_S) = 1/C_T² Σ_{i,i'} k(f_T^i, f_T^i') + 1/C_S² Σ_{j,j'} k(f_S^j, f_S^j')
                     − 2/(C_T C_S) Σ_{i,j} k(f_T^i, f_S^j),

with the polynomial kernel k(x, y) = (xᵀy + c)^d, d = 2, c = 0 (the paper's "NST (poly)"; the
kernel RepDistiller, mdistiller and AberHu's zoo use), averaged over the batch and summed over
the stage outputs. The widths may differ; maps of different sizes are compared after pooling
the larger (RepDistiller); stage lists of different lengths are paired by relative depth
(``methods/at.py``). MMD² is 0 for identical features and never negative.

For d = 2, c = 0 it has a closed form: with A = FᵀF (H·W × H·W), Σ_{i,i'} (f^iᵀf^i')² = ‖A‖²_F
and the cross sum is ⟨A_S, A_T⟩_F, so MMD² = ‖A_S/C_S − A_T/C_T‖²_F. The channel-Gram form
(F Fᵀ, C × C) gives the same number; ``poly_mmd`` takes whichever is cheaper for the map's
shape (the first stages have many positions and few channels, the last the opposite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.method import FIDELITY_PAPER, STAGES, Batch, Features, Method, MethodConfig, Progress
from kdbench.methods.at import pair_stages, pool_to_common_size


def selectivity_rows(feature: Tensor) -> Tensor:
    """(B, C, H·W), each channel's spatial map L2-normalised, fp32."""
    return F.normalize(feature.float().flatten(2), dim=2)


def poly_mmd_by_channels(student: Tensor, teacher: Tensor) -> Tensor:
    """MMD² per sample (B,) from the channel Grams: mean (f_sᵀf_s')² + mean (f_tᵀf_t')² − 2·mean
    (f_sᵀf_t)², the definition term by term (RepDistiller's ``nst_loss``)."""
    def mean_squared(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean(dim=(1, 2))

    return mean_squared(teacher, teacher) + mean_squared(student, student) - 2 * mean_squared(student, teacher)


def poly_mmd_by_positions(student: Tensor, teacher: Tensor) -> Tensor:
    """MMD² per sample (B,) as ‖A_S/C_S − A_T/C_T‖²_F, A = FᵀF over positions."""
    a_student = student.transpose(1, 2) @ student / student.shape[1]
    a_teacher = teacher.transpose(1, 2) @ teacher / teacher.shape[1]
    return (a_student - a_teacher).pow(2).sum(dim=(1, 2))


def poly_mmd(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the batch of MMD² with k(x, y) = (xᵀy)², on normalised rows (B, C, H·W) of the
    same H·W; the teacher's own term carries no gradient."""
    teacher = teacher.detach()
    channels = student.shape[1] + teacher.shape[1]
    positions = student.shape[2]
    # Multiply-adds: C-form (C_s² + C_t² + C_s·C_t)·HW, position form (C_s + C_t)·HW².
    by_channels = (student.shape[1] ** 2 + teacher.shape[1] ** 2 + student.shape[1] * teacher.shape[1])
    if by_channels <= channels * positions:
        return poly_mmd_by_channels(student, teacher).mean()
    return poly_mmd_by_positions(student, teacher).mean()


def nst_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Σ over the paired feature maps of the batch-mean MMD², unweighted."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need equally many (>0) feature maps, got {len(student)} and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        s, t = pool_to_common_size(s.float(), t.float())
        terms.append(poly_mmd(selectivity_rows(s), selectivity_rows(t)))
    return torch.stack(terms).sum()


@dataclass(frozen=True)
class NSTConfig(MethodConfig):
    # λ = 50: RepDistiller's CIFAR-100 command (`--distill nst -b 50`) and mdistiller's
    # NST.LOSS.FEAT_WEIGHT 50.0, both multiplying the summed MMD² as it is.
    weight: float = 50.0


class NST(Method):
    name = "nst"
    display_name = "NST"
    paper = ("Huang & Wang. Like What You Like: Knowledge Distill via Neuron Selectivity "
             "Transfer. arXiv:1707.01219, 2017")
    fidelity = FIDELITY_PAPER
    fidelity_note = ("MMD² of L2-normalised channel maps with the polynomial kernel d = 2, c = 0 "
                     "(the paper's NST-poly), on every stage output as RepDistiller and "
                     "mdistiller; weight 50 from both.")
    Config = NSTConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    config: NSTConfig

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        pairs = pair_stages(len(s.stages), len(t.stages))
        student = [s.stages[i] for i, _ in pairs]
        teacher = [t.stages[j] for _, j in pairs]
        return {"nst": self.config.weight * nst_loss(student, teacher)}
