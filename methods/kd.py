"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS-W 2015.

L = γ·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), the KL summed over classes and
averaged over the batch. The T² factor keeps the soft term's gradient magnitude independent of
T (paper, section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import FIDELITY_PAPER, Batch, Features, Method, MethodConfig, Progress


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch.

    Computed in fp32 whatever the autocast precision: softmax with temperature in bf16 loses
    the small probabilities that carry the "dark knowledge"."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@dataclass(frozen=True)
class KDConfig(MethodConfig):
    # RepDistiller's CIFAR-100 command (`--kd_T 4 -r 0.1 -a 0.9`) and mdistiller's
    # configs (KD.TEMPERATURE 4, LOSS.CE_WEIGHT 0.1, LOSS.KD_WEIGHT 0.9) agree on all three.
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft (KL) term
    gamma: float = 0.1  # weight of cross-entropy on the labels


class KD(Method):
    name = "kd"
    paper = "Hinton, Vinyals & Dean. Distilling the Knowledge in a Neural Network. NIPS-W 2015"
    display_name = "KD"
    fidelity = FIDELITY_PAPER
    fidelity_note = ("the paper's T²-scaled KL (sec. 2); T = 4, α = 0.9, γ = 0.1 from "
                     "RepDistiller's and mdistiller's CIFAR-100 commands, which agree")
    Config = KDConfig

    @property
    def ce_weight(self) -> float:
        return self.config.gamma

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return {"kd": self.config.alpha * kd_loss(s.logits, t.logits, self.config.temperature)}
