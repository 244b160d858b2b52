"""AB: Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons", AAAI 2019 (arXiv 1811.03233). The references are the authors' code,
bhheo/AB_distillation (``cifar10_AB_distillation.py``: the alternative L2 loss and its
weights; ``models/distillation_module.py``: the connectors and the pre-ReLU features), and
RepDistiller (``distiller_zoo/AB.py``, ``models/util.py`` Connector, ``helper/pretrain.py``,
``train_student.py``), whose CIFAR-100 table this suite reproduces.

AB transfers *where* the teacher's hidden neurons switch on: at each stage's pre-activation
output (the tensor a ReLU is about to read: PREACT_STAGES), the student's response, mapped to
the teacher's width by a connector r, is pushed past a margin m on the side of zero the
teacher's neuron is on. Per stage, the alternative L2 loss

    Σ (r(s) + m)² · [r(s) > −m and t ≤ 0] + (r(s) − m)² · [r(s) ≤ m and t > 0]

over every element, divided by the batch size; the deepest stage weighs 1, each shallower one
half the next (the authors' /2, /4; RepDistiller's 2^(i−n+1)); the sum is scaled by 3/1000
(both: ``loss / 1000 * 3``), margin m = 1. AB is an *initialisation*: a pre-training stage
trains the student's feature layers (everything that feeds the deepest pre-activation output;
not the classifier) and the connectors on this loss alone; then the student trains with
cross-entropy only and the connectors are dropped (RepDistiller: ``-a 0``, ``loss_kd = 0``
after ``init``; ``abound`` connector not in the trainable list).

Where the sources differ, or leave a choice open:

- Main stage: cross-entropy alone (RepDistiller, whose numbers the suite's tables compare
  against). The authors' CIFAR-10 script trains it with a KD term instead (T = 3, no CE);
  ``ab+kd`` (kdbench/composition.py) adds the suite's KD to AB.
- Initialisation epochs: 30 (RepDistiller ``--init_epochs 30``; the authors' released
  script sets ``distill_epoch = 1`` next to ``max_epoch = 1``, placeholders), at the setting's
  initial learning rate, constant, with its momentum and weight decay (helper/pretrain.py).
- Connectors: none where the widths and sizes agree (both sources); a 1×1 conv (no bias) + BN
  with He-normal fan-out init where only the widths differ (the authors'); where the spatial
  sizes differ too, RepDistiller's ConvReg without ReLU (methods/fitnet.py ``regressor``).
- Stage counts that differ (VGG 4, ResNet/WRN 3): the last min(L_s, L_t) stages of each, the
  weights counted from the deepest pair (both sources pair equal counts only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    PREACT_STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
)
from kdbench.methods.fitnet import regressor

TRANSFER = "activation_boundary"


def alternative_l2(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """Σ (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0] over all elements (the authors'
    ``criterion_alternative_L2``); the masks multiply, no boolean indexing (no host sync)."""
    target = target.detach()
    below = ((source > -margin) & (target <= 0)).to(source.dtype)
    above = ((source <= margin) & (target > 0)).to(source.dtype)
    return ((source + margin).square() * below + (source - margin).square() * above).sum()


def ab_loss(student: list[Tensor], teacher: list[Tensor], margin: float) -> Tensor:
    """Σ_i 2^(i − n + 1) · alternative_l2(s_i, t_i) / B over the paired (connected) stages,
    shallow to deep: the deepest weighs 1, each shallower one half the next."""
    count = len(student)
    batch = student[0].shape[0]
    total = None
    for index, (s, t) in enumerate(zip(student, teacher)):
        term = alternative_l2(s, t, margin) * 2.0 ** (index - count + 1) / batch
        total = term if total is None else total + term
    return total


def connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """Student pre-activation map (C_s, H_s, W_s) → the teacher's shape (module docstring)."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    if tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
        conv = nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False)
        # distillation_module.py: normal(0, √(2/n)), n = k·k·out_channels; BN weight 1, bias 0.
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_shape[0]))
        return nn.Sequential(conv, nn.BatchNorm2d(teacher_shape[0]))
    return regressor(tuple(student_shape), tuple(teacher_shape))


@dataclass(frozen=True)
class ABConfig(MethodConfig):
    # The authors' criterion_alternative_L2 `margin = 1.0`; RepDistiller ABLoss(margin=1.0).
    margin: float = 1.0
    # The authors' and RepDistiller's `loss / 1000 * 3`.
    weight: float = 3e-3
    # RepDistiller train_student.py `--init_epochs 30` (module docstring); the engine multiplies
    # it by the setting's pretrain_scale.
    init_epochs: int = 30

    def __post_init__(self) -> None:
        if self.init_epochs < 1:
            raise ValueError("ab.init_epochs must be >= 1: AB is an initialisation")
        if not self.margin >= 0:
            raise ValueError("ab.margin must be >= 0")


class AB(Method):
    name = "ab"
    paper = ("Heo, Lee, Yun & Choi. Knowledge Transfer via Distillation of Activation Boundaries "
             "Formed by Hidden Neurons. AAAI 2019")
    display_name = "AB"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("the authors' loss, weights and connectors (bhheo/AB_distillation); "
                     "RepDistiller's 30 init epochs and CE-only main stage")
    Config = ABConfig
    student_taps = frozenset({PREACT_STAGES})
    teacher_taps = frozenset({PREACT_STAGES})
    config: ABConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("AB needs a teacher")
        student, teacher = student_shapes.preact_stages, teacher_shapes.preact_stages
        count = min(len(student), len(teacher))
        if count < 1:
            raise ValueError("AB needs pre-activation stage outputs in both networks")
        self.student_points = list(range(len(student)))[-count:]
        self.teacher_points = list(range(len(teacher)))[-count:]
        self.connectors = nn.ModuleList(connector(student[i], teacher[j])
                                        for i, j in zip(self.student_points, self.teacher_points))

    def boundary_terms(self, s: Features, t: Features) -> dict[str, Tensor]:
        student = [connect(s.preact_stages[i]) for connect, i in zip(self.connectors, self.student_points)]
        teacher = [t.preact_stages[j] for j in self.teacher_points]
        return {TRANSFER: self.config.weight * ab_loss(student, teacher, self.config.margin)}

    def pretrain_stages(self) -> list[PretrainStage]:
        return [PretrainStage(
            name="boundaries",
            epochs=self.config.init_epochs,
            loss=lambda s, t, batch: self.boundary_terms(s, t),
            modules=[self.connectors],
            # Everything that feeds the deepest pre-activation output: the whole feature
            # extractor, not the classifier. On ResNet students this is RepDistiller's
            # get_feat_modules(); on WRN students the final BN trains here too (in train
            # mode), which RepDistiller's init leaves out and in eval mode
            # (tests/peers/RESULTS-repdistiller.md).
            student_up_to_stage=self.student_points[-1],
            student_role=PREACT_STAGES,
            lr_schedule="constant",  # helper/pretrain.py: a fixed learning rate
        )]

    def trainable_modules(self) -> list[nn.Module]:
        return []  # the connectors served the initialisation only

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return {}  # cross-entropy alone after the initialisation (module docstring)
