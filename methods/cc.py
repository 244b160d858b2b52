"""CC: Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019 (arXiv:1904.01802).

Besides matching each sample, the student should reproduce the teacher's *correlation* between
the samples of a batch. With ψ(F) = [k(F_i, F_j)] (B × B) for a network's embeddings F,

    L_CC = 1/B² · ‖ψ(F_t) − ψ(F_s)‖²_F,

and the correlation k is the Gaussian RBF kernel exp(−γ‖x − y‖²) approximated by its P-order
Taylor expansion. For unit vectors ‖x − y‖² = 2 − 2xᵀy, so

    exp(−γ‖x − y‖²) = exp(−2γ) · exp(2γ xᵀy) ≈ exp(−2γ) · Σ_{p=0}^{P} (2γ xᵀy)^p / p!,

which is why the embeddings are L2-normalised first: only on the unit sphere is the expansion
the RBF kernel's (``taylor_rbf_kernel``; the test compares it with the exact kernel). Defaults
γ = 0.4, P = 2 as the paper's reimplementations have them (torchdistill's CCKDLoss sample
config, AberHu's Knowledge-Distillation-Zoo ``kd_losses/cc.py``). ψ is B × B in each network,
so teacher and student need no common width: the paper's form adds no module.

RepDistiller's ``distiller_zoo/Correlation`` ("the authors nicely shared the code with me")
computes something else: both embeddings linearly mapped to 128 dims (``LinearEmbed``, both
maps trained), Δ = |e_s − e_t| and L = mean_i Σ_d Δ_{i,d} Δ_{i+1,d} over consecutive samples,
weight 0.02 on CIFAR-100. It is ``form="repdistiller"`` here, with those defaults.

The paper's full objective (CCKD) also carries Hinton's KD term; this method is the
correlation term with CE, as RepDistiller's CC row (``-a 0``): CCKD is ``cc`` plus ``kd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    EMBEDDING,
    FIDELITY_READING,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Progress,
)

FORMS = ("gaussian", "repdistiller")


def taylor_rbf_kernel(embedding: Tensor, gamma: float, order: int) -> Tensor:
    """ψ (B, B): exp(−2γ) Σ_{p ≤ P} (2γ cᵢⱼ)^p / p!, c the cosine of each pair of embeddings.
    Horner's scheme: one multiply-add per order."""
    unit = F.normalize(embedding.float().flatten(1), dim=1)
    scaled = 2.0 * gamma * (unit @ unit.t())
    series = torch.ones_like(scaled)
    for p in range(order, 0, -1):  # 1 + x(1 + x/2(1 + x/3(…)))
        series = 1.0 + scaled / p * series
    return math.exp(-2.0 * gamma) * series


def correlation_congruence(student: Tensor, teacher: Tensor, gamma: float, order: int) -> Tensor:
    """‖ψ(F_t) − ψ(F_s)‖²_F / B²; the widths may differ; no gradient reaches the teacher."""
    with torch.no_grad():
        teacher_correlation = taylor_rbf_kernel(teacher, gamma, order)
    return (taylor_rbf_kernel(student, gamma, order) - teacher_correlation).pow(2).mean()


def repdistiller_correlation(student: Tensor, teacher: Tensor) -> Tensor:
    """RepDistiller's Correlation loss on already embedded (B, D) features: Δ = |e_s − e_t|,
    mean over consecutive sample pairs of Σ_d Δ_i Δ_{i+1}."""
    delta = (student.float() - teacher.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@dataclass(frozen=True)
class CCConfig(MethodConfig):
    # "gaussian": the paper's kernel (default); "repdistiller": RepDistiller's Correlation.
    form: str = "gaussian"
    # β for the gaussian form. No sourced CIFAR-100 value exists for it here (the paper's text
    # was not available to us; 0.02 is RepDistiller's `-b` for its own form, whose loss has
    # another scale), so this is kdbench's choice, stated in fidelity_note: about the weight at
    # which the gaussian form's gradient on the student embedding equals that of RepDistiller's
    # form at β = 0.02, measured at initialisation on wrn_40_2 → wrn_16_2, batch 64, 32-px
    # Gaussian noise (ratios 1.3k, 3.1k, 2.9k over seeds 0-2). Tune it for real use.
    weight: float = 2000.0
    # Taylor expansion of the RBF kernel: γ = 0.4, P = 2 (torchdistill's CCKDLoss sample,
    # AberHu's zoo).
    gamma: float = 0.4
    order: int = 2
    # The repdistiller form: `--distill correlation -b 0.02` and `--feat_dim 128`.
    repdistiller_weight: float = 0.02
    embed_dim: int = 128

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"cc.form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.order < 0 or self.gamma <= 0:
            raise ValueError("cc needs order >= 0 and gamma > 0")


class CC(Method):
    name = "cc"
    display_name = "CC"
    paper = ("Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang. Correlation Congruence for Knowledge "
             "Distillation. ICCV 2019")
    fidelity = FIDELITY_READING
    fidelity_note = ("Correlation term of the paper: P = 2 Taylor RBF kernel (γ = 0.4) on unit "
                     "embeddings, ‖Δψ‖²/B²; no sourced CIFAR-100 weight: 2000 is kdbench's "
                     "gradient-matched choice. form=repdistiller: RepDistiller's loss.")
    Config = CCConfig
    # The pooled penultimate features (RepDistiller: feat[-1]).
    student_taps = frozenset({EMBEDDING})
    teacher_taps = frozenset({EMBEDDING})
    config: CCConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("CC needs a teacher")
        if self.config.form == "repdistiller":
            # Both trained with the student (RepDistiller's trainable_list holds embed_s and embed_t).
            self.embed_student = nn.Linear(student_shapes.embedding[0], self.config.embed_dim)
            self.embed_teacher = nn.Linear(teacher_shapes.embedding[0], self.config.embed_dim)

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        if self.config.form == "repdistiller":
            student = self.embed_student(s.embedding.flatten(1))
            teacher = self.embed_teacher(t.embedding.flatten(1).detach())
            return {"cc": self.config.repdistiller_weight * repdistiller_correlation(student, teacher)}
        return {"cc": self.config.weight * correlation_congruence(
            s.embedding, t.embedding, self.config.gamma, self.config.order)}
