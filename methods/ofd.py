"""OFD: Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation",
ICCV 2019 (arXiv 1904.01866).

The student is taught at the end of every stage, *before* the ReLU (PREACT_STAGES role), where
the teacher's negative responses still carry information the ReLU would erase. A connector
(1×1 conv + BN) maps the student's map to the teacher's width; the teacher's map is replaced by
max(t, m), m per channel the expectation of the teacher's pre-ReLU response given that it is
negative, from the statistics of "the BN before the ReLU" (the teacher's preact_norms): for a
response N(μ, σ²) with σ = |γ|, μ = β of that BN, m = E[x | x < 0] = μ − σ·φ(μ/σ)/Φ(−μ/σ)
(−3σ where Φ(−μ/σ) ≤ 0.001). The partial L2 then ignores a student response below a
non-positive target: d(s, t') = (s − t')² unless s ≤ t' ≤ 0.

Sources. The reference is the authors' code, clovaai/overhaul-distillation
(CIFAR-100/distiller.py: ``distillation_loss``, ``build_feature_connector``,
``get_margin_from_BN``; train_with_distillation.py: ``loss_distill.sum() / batch_size / 1000``),
which mdistiller's OFD.py reproduces (``feat_loss``, FEAT_WEIGHT 1e-3, CONNECTOR.KERNEL_SIZE 1):

- loss = 1e-3 · Σ_levels 2^{−(L−1−i)} · Σ_{C,H,W} d(s_i, t'_i), averaged over the batch: the
  deeper a level, the larger its weight (the authors' ``/ 2 ** (feat_num - i - 1)``);
- the levels are the stage outputs after the stem (mdistiller's ``preact_feats[1:]``); with
  different stage counts, the last min(L_s, L_t) of each (mdistiller's ``_align_list``);
- maps of different spatial sizes: the teacher's is average-pooled to the student's size
  (mdistiller; the authors' pairs always match).

Known difference: the authors' loop keeps the teacher in train mode (``d_net.t_net.train()``:
its features use batch statistics, its running statistics keep moving), and mdistiller's OFD
does the same; kdbench's engine runs every teacher in eval mode, for every method alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    PREACT_STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    NormParameters,
    Progress,
)

# Below this probability of a negative response the conditional mean is numerically unreliable
# and the authors fall back to −3σ (get_margin_from_BN).
NEGATIVE_PROBABILITY_FLOOR = 0.001


def standard_normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def channel_margin(weight: float, bias: float) -> float:
    """E[x | x < 0] for x ~ N(bias, weight²): the authors' get_margin_from_BN for one channel.

    σ = |γ|: a BN's scale may be negative and only its magnitude is a standard deviation. A zero
    scale (a constant response, which the authors' division does not handle) gives the response
    itself if it is negative and 0 otherwise."""
    std, mean = abs(weight), bias
    if std == 0.0:
        return min(mean, 0.0)
    negative = standard_normal_cdf(-mean / std)
    if negative > NEGATIVE_PROBABILITY_FLOOR:
        density = math.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi)
        return mean - std * density / negative
    return -3.0 * std


def margins_from_norm(norm: NormParameters) -> Tensor:
    weights, biases = norm
    return torch.tensor([channel_margin(w, b) for w, b in zip(weights, biases)], dtype=torch.float32)


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Σ over C, H, W of d(s, max(t, m)), mean over the batch; ``margin`` (C,) per channel.

    d(s, t') = (s − t')² where s > t' or t' > 0, else 0 (the paper's partial L2, the authors'
    ``distillation_loss`` with ``target = torch.max(target, margin)``). As the authors, the mask
    is computed without a boolean index, so no host sync."""
    target = torch.maximum(teacher.detach(), margin.view(1, -1, 1, 1).to(teacher))
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum() / student.shape[0]


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1×1 conv (no bias) + BN, initialised as the authors' build_feature_connector:
    N(0, 2/(k²·C_out)) weights, BN γ = 1, β = 0."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    norm = nn.BatchNorm2d(teacher_channels)
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    return nn.Sequential(conv, norm)


@dataclass(frozen=True)
class OFDConfig(MethodConfig):
    # 1e-3: the authors' `loss_distill.sum() / batch_size / 1000` on CIFAR-100 (the paper's eq. 6
    # α = 1/1000), mdistiller OFD.LOSS.FEAT_WEIGHT 0.001.
    weight: float = 1e-3


class OFD(Method):
    name = "ofd"
    display_name = "OFD"
    paper = ("Heo, Kim, Yun, Park, Kwak & Choi. A Comprehensive Overhaul of Feature Distillation. "
             "ICCV 2019")
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("clovaai/overhaul-distillation CIFAR-100 (= mdistiller OFD): pre-ReLU stages, "
                     "1x1 conv+BN connector, margin from the teacher's BN, partial L2, level i of L "
                     "weighted 2^-(L-1-i), weight 1e-3; the teacher runs in eval mode here (train mode "
                     "in the authors' loop)")
    Config = OFDConfig
    student_taps = frozenset({PREACT_STAGES})
    teacher_taps = frozenset({PREACT_STAGES})
    config: OFDConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("ofd needs a teacher")
        count = min(len(student_shapes.preact_stages), len(teacher_shapes.preact_stages))
        if count < 1:
            raise ValueError("ofd needs pre-activation stages on both networks")
        student_levels = list(range(len(student_shapes.preact_stages)))[-count:]
        teacher_levels = list(range(len(teacher_shapes.preact_stages)))[-count:]
        self.levels = list(zip(student_levels, teacher_levels))
        self.connectors = nn.ModuleList(
            connector(student_shapes.preact_stages[i][0], teacher_shapes.preact_stages[j][0])
            for i, j in self.levels)
        for position, (_, j) in enumerate(self.levels):
            norm = teacher_shapes.preact_norms[j]
            if norm is None:
                raise ValueError(f"ofd needs the teacher's BN before the ReLU at pre-activation stage "
                                 f"{j}, and the teacher's architecture names none there")
            # A buffer: saved with the method's state and moved to its device, never trained.
            self.register_buffer(f"margin{position}", margins_from_norm(norm))

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        total = None
        count = len(self.levels)
        for position, ((i, j), project) in enumerate(zip(self.levels, self.connectors)):
            student = project(s.preact_stages[i])
            teacher = t.preact_stages[j]
            if teacher.shape[2:] != student.shape[2:]:
                teacher = F.adaptive_avg_pool2d(teacher, student.shape[2:])
            term = partial_l2(student, teacher, getattr(self, f"margin{position}")) / 2 ** (count - 1 - position)
            total = term if total is None else total + term
        return {"ofd": self.config.weight * total}
