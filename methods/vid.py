"""VID: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
Transfer", CVPR 2019 (arXiv:1904.05835).

VID maximises a variational lower bound on the mutual information between a teacher feature map
t and the student's s at the same depth: with a Gaussian q(t | s) whose mean μ(s) is a small
learned network and whose variance σ_c² is one learned value per teacher channel (the paper's
heteroscedastic mean and homoscedastic variance),

    −log q(t | s) = Σ_{c,h,w} [ log σ_c + (t_{c,h,w} − μ_{c,h,w}(s))² / (2σ_c²) ] + const,

σ_c² = softplus(α_c) + ε so that it stays positive; L = CE + Σ_k λ_k · (−log q(t_k | s_k)).

Everything else follows the authors' code as RepDistiller ships it (``distiller_zoo/VID.py``,
"code from author: ssahn0215/variational-information-distillation"; mdistiller's is the same):
μ = three 1×1 convs without bias (``VariationalGaussian``), ReLU between, s's channels → t's → t's → t's; α initialised so
that σ² starts at 5 (``init_pred_var``), ε = 1e-5; the negative log-likelihood is averaged over
batch × C × H × W (the constant ½ log 2π dropped), which fixes the scale of λ = 1; one term per
stage output; the larger map average-pooled to the smaller size. Stage lists of different
lengths are paired by relative depth (``methods/at.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Progress,
)
from kdbench.methods.at import pair_stages, pool_to_common_size


def inverse_softplus(value: float) -> float:
    """α with softplus(α) = value: log(exp(value) − 1)."""
    return math.log(math.expm1(value))


def per_position(feature: Tensor) -> Tensor:
    """(B, C, H, W) → (B·H·W, C): one row per position. A view for a channels-last tensor (as
    on CUDA), one copy otherwise."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


class VariationalGaussian(nn.Module):
    """q(t | s) for one stage: the mean network μ and the per-channel log-scale α.

    μ's 1×1 convolutions are written as linear maps of each position's channel vector (the same
    function and the same default initialisation, fan-in = input channels): on the CPU the
    matrix products over channels-last rows take about 30% less time than 1×1 convolutions
    on such thin, large maps (measured on wrn_16_2's stage outputs, batch 64)."""

    def __init__(self, student_channels: int, teacher_channels: int, init_variance: float,
                 epsilon: float) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.mean = nn.Sequential(
            nn.Linear(student_channels, teacher_channels, bias=False), nn.ReLU(),
            nn.Linear(teacher_channels, teacher_channels, bias=False), nn.ReLU(),
            nn.Linear(teacher_channels, teacher_channels, bias=False))
        # softplus(α) + ε = init_variance at the start (RepDistiller: log(exp(init − ε) − 1)).
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), inverse_softplus(init_variance - epsilon)))

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + self.epsilon

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean over batch × C × H × W of ½ (log σ_c² + (t − μ(s))² / σ_c²)."""
        student, teacher = pool_to_common_size(student.float(), teacher.float())
        return vid_nll(self.mean(per_position(student)), self.variance(), per_position(teacher))


def vid_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """½ (log σ_c² + (t − μ)² / σ_c²) averaged over every element of (N, C) rows; ``variance``
    is (C,). Every channel has N elements, so the mean over all of them is the mean over c of
    ½ (log σ_c² + mean_n (t − μ)² / σ_c²): the division by σ² happens on C numbers, not N·C."""
    squared_residual = (target.detach() - mean).pow(2).mean(dim=0)
    return 0.5 * (squared_residual / variance + variance.log()).mean()


@dataclass(frozen=True)
class VIDConfig(MethodConfig):
    # λ = 1 for every stage: RepDistiller's CIFAR-100 command (`--distill vid -b 1`), mdistiller
    # VID.LOSS.FEAT_WEIGHT 1.0.
    weight: float = 1.0
    # The authors' code via RepDistiller/mdistiller: init_pred_var 5.0, eps 1e-5.
    init_variance: float = 5.0
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if not self.init_variance > self.epsilon > 0:
            raise ValueError("vid needs init_variance > epsilon > 0")


class VID(Method):
    name = "vid"
    display_name = "VID"
    paper = ("Ahn, Hu, Damianou, Lawrence & Dai. Variational Information Distillation for "
             "Knowledge Transfer. CVPR 2019")
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("Gaussian q(t|s), 1×1-conv mean network and softplus per-channel variance, "
                     "on every stage output, as the authors' code in RepDistiller/mdistiller "
                     "(init variance 5, ε 1e-5, element mean, weight 1).")
    Config = VIDConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    config: VIDConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("VID needs a teacher")
        self.pairs = pair_stages(len(student_shapes.stages), len(teacher_shapes.stages))
        self.gaussians = nn.ModuleList(
            VariationalGaussian(student_shapes.stages[i][0], teacher_shapes.stages[j][0],
                                self.config.init_variance, self.config.epsilon)
            for i, j in self.pairs)

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        terms = [gaussian(s.stages[i], t.stages[j]) for gaussian, (i, j) in zip(self.gaussians, self.pairs)]
        return {"vid": self.config.weight * torch.stack(terms).sum()}
