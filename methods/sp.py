"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).

Two inputs that the teacher maps to similar activations should be mapped to similar activations
by the student. For a feature map of a batch, A (B, C, H, W), reshaped to Q (B, C·H·W):

    G̃ = Q Qᵀ (B × B),   G[i, :] = G̃[i, :] / ‖G̃[i, :]‖₂   (each row L2-normalised),
    L_SP = 1/B² · Σ_(l, l') ‖G_T^(l) − G_S^(l')‖²_F,        L = CE + γ · L_SP.

G is B × B whatever the widths, so teacher and student need no projection and no extra module.
Scaling a feature map by any positive number leaves G, hence the loss, unchanged.

Which layers: RepDistiller (``distiller_zoo/SP.py``, "verified by original author") and
mdistiller both apply it to the last stage output only (RepDistiller's ``feat[-2]``): the
default. ``stages="all"`` sums one term per paired stage output (pairs by relative depth, as
AT: ``methods/at.py``), the paper's loss over a set of layer pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.method import FIDELITY_PAPER, STAGES, Batch, Features, Method, MethodConfig, Progress
from kdbench.methods.at import pair_stages

STAGE_CHOICES = ("last", "all")


def similarity_matrix(feature: Tensor) -> Tensor:
    """G: the batch's (B, B) Gram matrix of the flattened features, rows L2-normalised, fp32."""
    flat = feature.float().flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """‖G_T − G_S‖²_F / B² for one pair of feature maps (any widths and sizes); no gradient
    reaches the teacher."""
    with torch.no_grad():
        teacher_similarity = similarity_matrix(teacher)
    return (similarity_matrix(student) - teacher_similarity).pow(2).sum() / len(student) ** 2


@dataclass(frozen=True)
class SPConfig(MethodConfig):
    # γ = 3000: RepDistiller's CIFAR-100 command (`--distill similarity -b 3000`) and mdistiller's
    # SP.LOSS.FEAT_WEIGHT 3000.0.
    gamma: float = 3000.0
    # "last": the last stage output (RepDistiller's feat[-2], mdistiller's feats[-1]);
    # "all": every paired stage output, summed.
    stages: str = "last"

    def __post_init__(self) -> None:
        if self.stages not in STAGE_CHOICES:
            raise ValueError(f"sp.stages must be one of {', '.join(STAGE_CHOICES)}, got {self.stages!r}")


class SP(Method):
    name = "sp"
    display_name = "SP"
    paper = "Tung & Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019"
    fidelity = FIDELITY_PAPER
    fidelity_note = ("The paper's L_SP (row-normalised batch Gram matrices, squared Frobenius "
                     "distance / B²) on the last stage output, as RepDistiller (author-verified) "
                     "and mdistiller; γ = 3000 from RepDistiller's CIFAR-100 command.")
    Config = SPConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    config: SPConfig

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        if self.config.stages == "last":
            pairs = [(len(s.stages) - 1, len(t.stages) - 1)]
        else:
            pairs = pair_stages(len(s.stages), len(t.stages))
        total = torch.stack([sp_loss(s.stages[i], t.stages[j]) for i, j in pairs]).sum()
        return {"sp": self.config.gamma * total}
