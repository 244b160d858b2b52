"""FitNets: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015 (arXiv:1412.6550).

A regressor r maps the student's *guided* layer to the shape of the teacher's *hint* layer and
the hint loss is MSE(r(f_s), f_t). Two ways to use it:

- ``stages=2`` (the paper, default; torchdistill and KD_methods_with_TF): stage 1 trains the
  student up to its guided layer plus the regressor on the hint loss alone ("hint-based
  training", the paper's Algorithm 1, line 1), then stage 2 trains the whole student with KD
  (Algorithm 1, line 2). The regressor is dropped after stage 1.
- ``stages=1`` (RepDistiller/mdistiller; mdistiller issue #29 notes it differs from the paper):
  L = CE + 100·MSE(r(f_s), f_t) from the start, the regressor trained with the student.

Hint and guided layers are stage outputs given by index into each network's stage list; the
default, index 1 in both, is RepDistiller's ``hint_layer = 2`` (its feature list starts with
the stem output) — the middle stage of a 3-stage WRN/ResNet, and of VGG's 4 stages the one at
the same resolution RepDistiller uses (see kdbench/models/vgg.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_PAPER,
    NON_NEGATIVE,
    POSITIVE,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
    bounded,
)
from kdbench.methods.kd import KDConfig, kd_loss

REGRESSOR_RELU = ("match", "always", "never")


def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """MSE(r(f_s), f_t), the mean over batch × C × H × W (RepDistiller's nn.MSELoss()), in fp32;
    no gradient reaches the teacher."""
    return F.mse_loss(regressed.float(), hint.float().detach())


def regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Sequential:
    """Conv + BN from the guided layer's (C, H, W) to the hint layer's; the ReLU is applied in
    ``FitNet.regress`` (whether depends on the hint layer, see ``regressor_relu``).

    RepDistiller's ConvReg (models/util.py; mdistiller's _common.py is the same), its cases in
    its order, decided on the height as it does:
    - the student's map twice the teacher's (H_s = 2·H_t): a 3×3 conv, stride 2, padding 1;
    - half of it (2·H_s = H_t): a 4×4 transposed conv, stride 2, padding 1;
    - otherwise larger or equal: a "valid" conv of kernel (1 + H_s − H_t, 1 + W_s − W_t), which
      for the equal sizes of every standard pair is a **1×1 conv**;
    all with bias (PyTorch's default there), then BatchNorm2d. Where ConvReg raises (a smaller
    student map that is not half the size, e.g. 3 vs 7 px on 28-px input), we resize bilinearly
    to the hint's size and use its equal-size case, the 1×1 conv."""
    (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
    layers: list[nn.Module]
    if h_s == 2 * h_t:
        layers = [nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)]
    elif 2 * h_s == h_t:
        layers = [nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)]
    elif h_s >= h_t and w_s >= w_t:
        layers = [nn.Conv2d(c_s, c_t, (1 + h_s - h_t, 1 + w_s - w_t))]
    else:
        layers = [nn.Upsample(size=(h_t, w_t), mode="bilinear", align_corners=False),
                  nn.Conv2d(c_s, c_t, 1)]
    return nn.Sequential(*layers, nn.BatchNorm2d(c_t))


@dataclass(frozen=True)
class FitNetConfig(MethodConfig):
    # The paper's two-stage training (Algorithm 1); 1: RepDistiller/mdistiller's single stage.
    stages: int = 2
    # RepDistiller `--hint_layer 2` and mdistiller FITNET.HINT_LAYER 2 (in their feature lists,
    # whose entry 0 is the stem output) = stage output 1 here, for teacher and student alike.
    hint_stage: int = 1
    guided_stage: int = 1
    # Weight of the hint MSE: RepDistiller's FitNet command `-b 100`, mdistiller
    # FITNET.LOSS.FEAT_WEIGHT 100.0. Used in stage 1 too: with the engine's SGD its scale is a
    # learning-rate factor, and 100·mean-MSE is the scale those benchmarks run with the same SGD
    # and lr (the paper's ½·sum-of-squares, with its own optimiser, has no SGD lr to match).
    hint_weight: float = 100.0
    # Stage-1 epochs (two-stage only). The paper trains the hints "until convergence" with early
    # stopping; KD_methods_with_TF (train_w_distill.py, CIFAR-100) initialises FitNet for
    # `init_epoch = 40` epochs at a constant learning rate before its 100 main epochs
    # (torchdistill's ImageNet sample: 5 hint epochs, then 15). The engine scales this by the
    # setting's `pretrain_scale`.
    hint_epochs: int = 40
    # The paper (Sec. 2.2) asks the regressor's output to be comparable to the hint, with the
    # same non-linearity as the teacher's hint layer. "match"
    # applies a ReLU exactly when the teacher's hint is post-ReLU (non-negative: ResNet, VGG
    # stage outputs) and none for a pre-activation hint (WRN stage outputs are residual sums);
    # "always": RepDistiller's ConvReg (BN + ReLU whatever the hint); "never": conv + BN only.
    regressor_relu: str = "match"
    # Stage 2 is KD (Hinton et al.) with the suite's KD defaults (methods/kd.py cites them), so
    # that the FitNet row differs from the KD row only by the hint initialisation.
    temperature: float = bounded(KDConfig.temperature, POSITIVE)
    alpha: float = bounded(KDConfig.alpha, NON_NEGATIVE)
    gamma: float = bounded(KDConfig.gamma, NON_NEGATIVE)

    def __post_init__(self) -> None:
        super().__post_init__()  # finite numbers, declared ranges (kdbench.method)
        if self.stages not in (1, 2):
            raise ValueError(f"fitnet.stages must be 1 or 2, got {self.stages}")
        if self.regressor_relu not in REGRESSOR_RELU:
            raise ValueError(f"fitnet.regressor_relu must be one of {', '.join(REGRESSOR_RELU)}, "
                             f"got {self.regressor_relu!r}")
        if self.hint_stage < 0 or self.guided_stage < 0:
            raise ValueError("fitnet.hint_stage and fitnet.guided_stage are stage indices >= 0")


class FitNet(Method):
    name = "fitnet"
    paper = "Romero, Ballas, Kahou, Chassang, Gatta & Bengio. FitNets: Hints for Thin Deep Nets. ICLR 2015"
    display_name = "FitNets"
    fidelity = FIDELITY_PAPER
    fidelity_note = ("the paper's two-stage training (Algorithm 1) by default, hint/guided layers "
                     "weight 100 and regressor (ConvReg) as RepDistiller; stages=1 is "
                     "RepDistiller/mdistiller's variant")
    Config = FitNetConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    config: FitNetConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("FitNets needs a teacher")
        guided, hint = self.config.guided_stage, self.config.hint_stage
        if guided >= len(student_shapes.stages) or hint >= len(teacher_shapes.stages):
            raise ValueError(f"fitnet: guided stage {guided} / hint stage {hint} out of range for "
                             f"{len(student_shapes.stages)} student / {len(teacher_shapes.stages)} "
                             "teacher stages")
        self.regressor = regressor(student_shapes.stages[guided], teacher_shapes.stages[hint])
        # Check the shape now, not at the first step of a long run.
        with torch.no_grad():
            probe = self.regressor.eval()(torch.zeros(2, *student_shapes.stages[guided]))
        self.regressor.train()
        if tuple(probe.shape[1:]) != tuple(teacher_shapes.stages[hint]):
            raise AssertionError(f"fitnet regressor maps {student_shapes.stages[guided]} to "
                                 f"{tuple(probe.shape[1:])}, not {teacher_shapes.stages[hint]}")

    def regress(self, guided: Tensor, hint: Tensor) -> Tensor:
        regressed = self.regressor(guided)
        mode = self.config.regressor_relu
        if mode == "always":
            return F.relu(regressed)
        if mode == "never":
            return regressed
        # "match": decided on the device (no host sync): a post-ReLU hint has no negative value.
        return torch.where(hint.amin() >= 0, F.relu(regressed), regressed)

    def hint_terms(self, s: Features, t: Features) -> dict[str, Tensor]:
        guided = s.stages[self.config.guided_stage]
        hint = t.stages[self.config.hint_stage]
        return {"hint": self.config.hint_weight * hint_loss(self.regress(guided, hint), hint)}

    @property
    def ce_weight(self) -> float:
        return self.config.gamma if self.config.stages == 2 else 1.0

    def pretrain_stages(self) -> list[PretrainStage]:
        if self.config.stages == 1:
            return []
        return [PretrainStage(
            name="hints",
            epochs=self.config.hint_epochs,
            loss=lambda s, t, batch: self.hint_terms(s, t),
            modules=[self.regressor],
            student_up_to_stage=self.config.guided_stage,
            lr_schedule="constant",  # KD_methods_with_TF decays only after its init epochs
        )]

    def trainable_modules(self) -> list[nn.Module]:
        # Two-stage: the regressor served stage 1 only and is not trained (or decayed) after it.
        return [self.regressor] if self.config.stages == 1 else []

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        if self.config.stages == 1:
            return self.hint_terms(s, t)
        return {"kd": self.config.alpha * kd_loss(s.logits, t.logits, self.config.temperature)}
