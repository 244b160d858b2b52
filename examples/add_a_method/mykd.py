"""mykd: logit regression (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014)
as a kdbench plugin.

The student ("mimic") regresses the teacher's logits z, the inputs of its softmax, with squared
error instead of learning from the labels: L = 1/(2B) Σ_i ‖z_s(x_i) − z_t(x_i)‖².
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdbench.method import FIDELITY_PAPER, Batch, Features, Method, MethodConfig, Progress


def logit_regression(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """½‖z_s − z_t‖² summed over classes, mean over the batch, in fp32; no gradient to the teacher."""
    difference = student_logits.float() - teacher_logits.float().detach()
    return 0.5 * difference.pow(2).sum(dim=1).mean()


@dataclass(frozen=True)
class MyKDConfig(MethodConfig):
    weight: float = 1.0  # the paper's objective is the regression alone, unweighted
    labels: float = 0.0  # weight of cross-entropy on the labels: the paper's mimic never sees them


class MyKD(Method):
    name = "mykd"  # = the entry-point name in pyproject.toml
    paper = "Ba & Caruana. Do Deep Nets Really Need to be Deep? NeurIPS 2014"
    display_name = "Logit regression"  # the row title in tables
    fidelity = FIDELITY_PAPER  # or FIDELITY_AUTHORS_CODE, FIDELITY_READING
    fidelity_note = "the paper's L2 regression on the teacher's logits, without label loss"
    Config = MyKDConfig
    # No feature taps: the logits are always there. A feature method declares roles, e.g.
    # student_taps = teacher_taps = frozenset({STAGES}), and reads s.stages / t.stages.

    @property
    def ce_weight(self) -> float:  # the engine's cross-entropy term is multiplied by this
        return self.config.labels

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        # Named, weighted terms; the engine adds cross-entropy ("ce", weighted by ce_weight).
        return {"logits_l2": self.config.weight * logit_regression(s.logits, t.logits)}
