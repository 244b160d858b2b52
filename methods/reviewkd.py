"""ReviewKD: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021
(arXiv 2104.09044).

"Review": each of the student's levels learns from the teacher's level at the same depth
*and* from every deeper student level. Going from the deepest level (the pooled embedding, as
a 1×1 map) to the shallowest, an attention-based fusion (ABF) module projects the student's
map to a common width (1×1 conv + BN), fuses it with the result passed up from the deeper
level (nearest-upsampled) through two per-pixel attention maps (1×1 conv + sigmoid on their
concatenation), and outputs the fused map through a 3×3 conv + BN at the teacher's width and
size. The hierarchical context loss (HCL) compares each output with the teacher's map at full
resolution and average-pooled to 4×4, 2×2 and 1×1 (weights 1, ½, ¼, ⅛ where the map is larger
than the pooled size, normalised by their sum), summed over levels.

The reference is the authors' code, dvlab-research/ReviewKD (CIFAR-100/model/reviewkd.py: ABF,
ReviewKD, build_review_kd, hcl; CIFAR-100/train.py), which mdistiller's ReviewKD.py follows:

- features: the student's stage outputs as its forward returns them (``is_feat=True``, no
  preact: STAGES) plus the pooled embedding; the teacher's *pre-activation* stage outputs
  (``preact=True``: PREACT_STAGES) plus its pooled embedding, the stem left out on both sides;
- widths: ABF k maps student width → mid = min(512, student embedding width) → teacher width;
  sizes: the student's own (``shapes``) in, the teacher's (``out_shapes``) out, as
  build_review_kd spells them per architecture and this file derives from the dry pass;
- the loss weight ramps up linearly over the first 20 of 240 epochs, min(1, epoch/20); here over
  the same fraction of the setting's epochs, with mdistiller's epoch count starting at 1
  (weight 1/20 in the first epoch, 1 from the 20th). The authors count from 0, so their first
  epoch has no review term at all — one epoch later, 1/240 of the run.
- the weight: 5.0 in the authors' script (CIFAR-100/script/reviewKD.sh) for wrn_40_2→wrn_16_2,
  wrn_40_2→wrn_40_1, resnet32x4→resnet8x4 and the ShuffleNetV1 pairs, and in mdistiller's
  configs/cifar100/reviewkd.yaml; the authors use 0.6 for resnet56→resnet20, 1.0 for
  resnet110→resnet32 and 8.0 for resnet32x4→ShuffleNetV2 (``--set reviewkd.weight=…``). The
  1.0 of mdistiller's engine/cfg.py and of train.py's ``--kd-loss-weight`` is a default that
  their CIFAR commands override.

kdbench's choice where the authors' code has none: with different stage counts (VGG's 4 vs
WRN/ResNet's 3; the authors only pair equal counts), the last min(L_s, L_t) stages of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    EMBEDDING,
    PREACT_STAGES,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Progress,
)

# The epochs the warm-up's 20 are counted against: both codebases' CIFAR-100 recipe (240 epochs).
REFERENCE_EPOCHS = 240
PYRAMID_SIZES = (4, 2, 1)  # hcl's `for l in [4, 2, 1]`
MAX_MID_CHANNELS = 512  # build's `mid_channel = min(512, in_channels[-1])`


def hcl_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Hierarchical context loss: per level, (MSE + Σ_l w_l·MSE(pool_l(s), pool_l(t))) / (1 + Σ w_l)
    with w = ½, ¼, ⅛ for the pooled sizes 4, 2, 1 smaller than the map's height (the authors'
    hcl); summed over levels. Maps are already of equal shapes per level."""
    total = None
    for s, t in zip(student, teacher, strict=True):
        t = t.detach()
        level = F.mse_loss(s, t)
        weight, weights = 1.0, 1.0
        for size in PYRAMID_SIZES:
            if size >= s.shape[2]:
                continue
            weight /= 2.0
            level = level + weight * F.mse_loss(F.adaptive_avg_pool2d(s, (size, size)),
                                                F.adaptive_avg_pool2d(t, (size, size)))
            weights += weight
        level = level / weights
        total = level if total is None else total + level
    return total


def warmup_factor(epoch: int, epochs: int, warmup_epochs: float) -> float:
    """min(1, (epoch + 1)/W), W = warmup_epochs·epochs/240: mdistiller's min(epoch/20, 1) with its
    1-based epoch, stretched to the setting's length. ``epoch`` counts the main stage from 0."""
    span = warmup_epochs * epochs / REFERENCE_EPOCHS
    if span <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / span)


class AttentionBasedFusion(nn.Module):
    """One ABF: student map (C_s) → mid width, fused with the deeper level's result, → teacher
    width at the teacher's size. The deepest level has nothing to fuse (``fuse=False``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool,
                 out_size: tuple[int, int]) -> None:
        super().__init__()
        self.out_size = out_size
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        # The authors' init: kaiming_uniform_(a=1) on both convs; the attention conv keeps
        # PyTorch's default (with its bias), as theirs.
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                          if fuse else None)

    def forward(self, x: Tensor, deeper: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(output at the teacher's width and size, the fused map passed to the next level)."""
        x = self.reduce(x)
        if self.attention is not None:
            # The deeper level's fused map, nearest-upsampled to this student level's size.
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(x.shape[2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="nearest")
        return self.output(x), x


@dataclass(frozen=True)
class ReviewKDConfig(MethodConfig):
    # 5.0: the authors' CIFAR-100 script for the default pair wrn_40_2→wrn_16_2 and most others,
    # mdistiller configs/cifar100/reviewkd.yaml REVIEWKD_WEIGHT 5.0 (module docstring: per-pair).
    weight: float = 5.0
    # 20 of 240 epochs: the authors' --kd-warm-up 20, mdistiller REVIEWKD.WARMUP_EPOCHS 20.
    warmup_epochs: float = 20.0


class ReviewKD(Method):
    name = "reviewkd"
    display_name = "ReviewKD"
    paper = "Chen, Liu, Zhao & Jia. Distilling Knowledge via Knowledge Review. CVPR 2021"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("dvlab-research/ReviewKD CIFAR-100 (= mdistiller ReviewKD): ABF over student stages "
                     "+ embedding, HCL against the teacher's pre-ReLU stages + embedding, weight 5 "
                     "(the authors' per-pair value for wrn_40_2-wrn_16_2), warm-up 20/240 of the epochs "
                     "counted from 1 as mdistiller; last min(L_s, L_t) stages when counts differ")
    Config = ReviewKDConfig
    student_taps = frozenset({STAGES, EMBEDDING})
    teacher_taps = frozenset({PREACT_STAGES, EMBEDDING})
    config: ReviewKDConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("reviewkd needs a teacher")
        count = min(len(student_shapes.stages), len(teacher_shapes.preact_stages))
        self.student_stages = list(range(len(student_shapes.stages)))[-count:]
        self.teacher_stages = list(range(len(teacher_shapes.preact_stages)))[-count:]
        # Shallow to deep: the paired stages, then the embedding as a 1×1 map.
        student_levels = [student_shapes.stages[i] for i in self.student_stages] + [
            (student_shapes.embedding[0], 1, 1)]
        teacher_levels = [teacher_shapes.preact_stages[j] for j in self.teacher_stages] + [
            (teacher_shapes.embedding[0], 1, 1)]
        mid = min(MAX_MID_CHANNELS, student_shapes.embedding[0])
        deepest = len(student_levels) - 1
        # fusions[k] serves level k (shallow to deep); the deepest one fuses nothing.
        self.fusions = nn.ModuleList(
            AttentionBasedFusion(s[0], mid, t[0], fuse=k < deepest, out_size=(t[1], t[2]))
            for k, (s, t) in enumerate(zip(student_levels, teacher_levels)))

    def review(self, s: Features) -> list[Tensor]:
        """The ABF outputs, shallow to deep, computed from the deepest level up."""
        levels = [s.stages[i] for i in self.student_stages] + [s.embedding[:, :, None, None]]
        outputs: list[Tensor] = []
        deeper: Tensor | None = None
        for level, fusion in zip(reversed(levels), reversed(self.fusions)):
            output, deeper = fusion(level, deeper)
            outputs.insert(0, output)
        return outputs

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        teacher = [t.preact_stages[j] for j in self.teacher_stages] + [t.embedding[:, :, None, None]]
        factor = warmup_factor(progress.epoch, progress.epochs, self.config.warmup_epochs)
        return {"review": self.config.weight * factor * hcl_loss(self.review(s), teacher)}
