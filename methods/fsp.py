"""FSP: Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017.

The knowledge is the "flow of solution procedure" between two layers: for feature maps F¹
(h × w × m) and F² (h × w × n) of the same spatial size,

    G_{i,j} = Σ_{s,t} F¹_{s,t,i} · F²_{s,t,j} / (h · w)      (an m × n matrix per image).

Training has two stages. Stage 1 trains the student alone to reproduce the teacher's FSP
matrices, L_FSP = 1/N Σ_x Σ_i λ_i ‖G_i^T − G_i^S‖²; stage 2 trains it on the main task (here:
cross-entropy only, ``loss`` adds nothing). RepDistiller (``distiller_zoo/FSP.py``,
``helper/pretrain.py``) does the same: FSP-only initialisation (30 epochs, ``init_epochs``),
then CE alone (its `-b 50` multiplies a stage-2 term that FSP does not have).

Choices, each where it is made below:
- Layers: the FSP matrix of each pair of *consecutive* stage outputs (RepDistiller's
  ``compute_fsp`` over its ``feat[:-1]``), the larger map average-pooled to the smaller's size.
  RepDistiller's list starts with the stem output, so it has one more pair (stem → stage 1);
  kdbench has no role for the stem output, so that pair is missing (L − 1 matrices for L stages).
- λ_i and the norm: the mean over the matrix entries and the batch, summed over the pairs with
  weight 1 (RepDistiller's ``(s - t).pow(2).mean()`` summed, no weight) — the paper's squared
  norm with λ_i = 1/(m·n).
- Widths: the paper distils between networks of equal widths (RepDistiller refuses others and
  reports FSP as N/A for wrn_40_2 → wrn_40_1). Where a student stage is narrower or wider, a
  1×1 convolution without bias maps it to the teacher's width before its FSP matrices, trained
  with the student in stage 1 (kdbench's extension; equal widths use none, as the paper).
- Stage lists of different lengths are paired by relative depth (``methods/at.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_PAPER,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
)
from kdbench.methods.at import pair_stages, pool_to_common_size


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """G (B, C₁, C₂) = F¹ᵀF² / (h·w) of two maps, the larger average-pooled to the smaller."""
    first, second = pool_to_common_size(first.float(), second.float())
    return first.flatten(2) @ second.flatten(2).transpose(1, 2) / (first.shape[2] * first.shape[3])


def fsp_matrices(features: list[Tensor]) -> list[Tensor]:
    """The FSP matrix of each pair of consecutive feature maps."""
    return [fsp_matrix(first, second) for first, second in zip(features[:-1], features[1:])]


def fsp_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Σ_pairs mean((G^S − G^T)²) over equally many feature maps of matching widths; no
    gradient reaches the teacher."""
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"need equally many (>= 2) feature maps, got {len(student)} and {len(teacher)}")
    with torch.no_grad():
        targets = fsp_matrices(teacher)
    return torch.stack([(g - target).pow(2).mean()
                        for g, target in zip(fsp_matrices(student), targets)]).sum()


@dataclass(frozen=True)
class FSPConfig(MethodConfig):
    # Stage-1 epochs: RepDistiller's `--init_epochs 30` (train_student.py); the engine scales it
    # by the setting's pretrain_scale. At the setting's initial learning rate, constant
    # (RepDistiller's init() uses `opt.learning_rate` and no schedule).
    init_epochs: int = 30
    # λ on the summed mean-squared FSP differences: 1, RepDistiller's init loss (sum(loss_group)).
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.init_epochs < 1:
            raise ValueError("fsp.init_epochs must be >= 1: the FSP loss exists only in stage 1")


class FSP(Method):
    name = "fsp"
    display_name = "FSP"
    paper = ("Yim, Joo, Bae & Kim. A Gift from Knowledge Distillation: Fast Optimization, Network "
             "Minimization and Transfer Learning. CVPR 2017")
    fidelity = FIDELITY_PAPER
    fidelity_note = ("Two stages as the paper: FSP matrices of consecutive stage outputs matched "
                     "(30 init epochs, RepDistiller), then CE only; no stem → stage-1 pair (no "
                     "stem role); 1×1 adapters only where widths differ (kdbench's extension).")
    Config = FSPConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    config: FSPConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("FSP needs a teacher")
        self.pairs = pair_stages(len(student_shapes.stages), len(teacher_shapes.stages))
        if len(self.pairs) < 2:
            raise ValueError("FSP needs at least two stage outputs in each network")
        self.adapters = nn.ModuleDict({
            str(i): nn.Conv2d(student_shapes.stages[i][0], teacher_shapes.stages[j][0], 1, bias=False)
            for i, j in self.pairs if student_shapes.stages[i][0] != teacher_shapes.stages[j][0]})

    def adapted(self, s: Features) -> list[Tensor]:
        """The paired student stage outputs, mapped to the teacher's widths where they differ."""
        maps = []
        for i, _ in self.pairs:
            feature = s.stages[i]
            maps.append(self.adapters[str(i)](feature) if str(i) in self.adapters else feature)
        return maps

    def fsp_terms(self, s: Features | None, t: Features, batch: Batch) -> dict[str, Tensor]:
        teacher = [t.stages[j] for _, j in self.pairs]
        return {"fsp": self.config.weight * fsp_loss(self.adapted(s), teacher)}

    def pretrain_stages(self) -> list[PretrainStage]:
        return [PretrainStage(
            name="fsp",
            epochs=self.config.init_epochs,
            loss=self.fsp_terms,
            modules=[self.adapters],
            # Everything that feeds the deepest stage used (RepDistiller: get_feat_modules(),
            # the whole network but its classifier).
            student_up_to_stage=self.pairs[-1][0],
            lr_schedule="constant",
        )]

    def trainable_modules(self) -> list[nn.Module]:
        return []  # stage 2 is the student alone; the adapters served stage 1

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return {}  # the paper's stage 2: the main task's loss (the engine's CE) alone
