"""FT: Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018 (arXiv:1802.04977).

The teacher's last-stage feature map x is "paraphrased" by a convolutional auto-encoder P
(encoder: three 3×3 convs, C → C → k·C → k·C; decoder: three 3×3 transposed convs back to C;
leaky ReLU 0.1 after each), trained first and alone to reconstruct x. Its code is the teacher
factor F_T. A "translator" (three 3×3 convs shaped like the encoder) maps the student's
last-stage map to the factor's shape, giving F_S, and the student is trained with

    L = CE + β · mean | F_T/‖F_T‖₂ − F_S/‖F_S‖₂ |,

each factor flattened per sample and L2-normalised, the L1 distance averaged over its entries.

The defaults are the authors' code (Jangho-Kim/Factor-Transfer-pytorch: ``Models/
FeatureProjection.py``, ``train_Paraphraser.py``, ``train_student.py``, ``utils.FT``): paraphrase
rate k = 0.5; no batch norm in paraphraser or translator; the paraphraser trained with an L1
reconstruction loss at the student's learning rate, constant (lr 0.1 for both there, decay
milestones beyond its epochs), for 6 epochs (``range(0, 5 + 1)``); then β = 500, translator
trained with the student, paraphraser frozen. The factor maps keep the teacher's spatial size;
maps of different sizes are compared after pooling the larger (RepDistiller).

RepDistiller (``distiller_zoo/FT.py``, ``models/util.py``, ``helper/pretrain.py``) differs in
five places, each an option: its "factor" is an attention map of the code, normalize(mean_c
F²) (``factor="attention"``); MSE reconstruction (``reconstruction="mse"``); batch norm in the
translator (``translator_bn=true``); 30 paraphraser epochs at lr 0.01 (``paraphraser_epochs``,
``paraphraser_lr``); and β = 200 (``beta``).
"""

from __future__ import annotations

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
    PretrainStage,
    Progress,
)
from kdbench.methods.at import pool_to_common_size

FACTORS = ("flatten", "attention")
RECONSTRUCTIONS = ("l1", "mse")
LEAKY_SLOPE = 0.1  # the authors' nn.LeakyReLU(0.1), RepDistiller's too


def conv_block(in_channels: int, out_channels: int, transposed: bool, batch_norm: bool) -> list[nn.Module]:
    """A 3×3 (transposed) conv with bias, stride 1, padding 1, optionally BN, then leaky ReLU."""
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(in_channels, out_channels, 3, 1, 1)
    return [conv, *([nn.BatchNorm2d(out_channels)] if batch_norm else []), nn.LeakyReLU(LEAKY_SLOPE)]


def encoder(in_channels: int, factor_channels: int, batch_norm: bool) -> nn.Sequential:
    """C → C → F → F: the paraphraser's encoder and, with the student's C, the translator."""
    return nn.Sequential(*conv_block(in_channels, in_channels, False, batch_norm),
                         *conv_block(in_channels, factor_channels, False, batch_norm),
                         *conv_block(factor_channels, factor_channels, False, batch_norm))


class Paraphraser(nn.Module):
    """The teacher's auto-encoder: ``encoder`` gives the factor, ``decoder`` reconstructs."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = encoder(channels, factor_channels, batch_norm=False)
        self.decoder = nn.Sequential(*conv_block(factor_channels, factor_channels, True, False),
                                     *conv_block(factor_channels, channels, True, False),
                                     *conv_block(channels, channels, True, False))

    def forward(self, feature: Tensor) -> Tensor:
        return self.decoder(self.encoder(feature))


def factor_vector(factor: Tensor, form: str) -> Tensor:
    """(B, ·) unit vectors of a factor map: the whole map flattened (the paper, the authors'
    ``utils.FT``) or RepDistiller's attention map normalize(mean_c F²)."""
    if form == "attention":
        return F.normalize(factor.float().pow(2).mean(dim=1).flatten(1), dim=1)
    return F.normalize(factor.float().flatten(1), dim=1)


def factor_transfer_loss(student_factor: Tensor, teacher_factor: Tensor, form: str = "flatten") -> Tensor:
    """mean |F_T/‖F_T‖ − F_S/‖F_S‖| (the authors' nn.L1Loss on utils.FT), the larger factor map
    pooled to the smaller's size; no gradient reaches the teacher's factor."""
    student_factor, teacher_factor = pool_to_common_size(student_factor.float(), teacher_factor.float())
    return (factor_vector(student_factor, form) - factor_vector(teacher_factor.detach(), form)).abs().mean()


def reconstruction_loss(reconstructed: Tensor, target: Tensor, kind: str) -> Tensor:
    target = target.detach()
    return F.l1_loss(reconstructed, target) if kind == "l1" else F.mse_loss(reconstructed, target)


@dataclass(frozen=True)
class FTConfig(MethodConfig):
    # β = 500: the authors' train_student.py (`--beta 500`); RepDistiller uses `-b 200` with its
    # attention-map factor.
    beta: float = 500.0
    # Paraphrase rate k: the authors' `--rate 0.5`, RepDistiller's Paraphraser(k=0.5).
    rate: float = 0.5
    # The authors' train_Paraphraser.py: `--epoch 5`, trained over range(0, 5 + 1) = 6 epochs,
    # with nn.L1Loss; RepDistiller: 30 (`--init_epochs`) with nn.MSELoss. The engine scales the
    # epochs by the setting's pretrain_scale.
    paraphraser_epochs: int = 6
    reconstruction: str = "l1"
    # The paraphraser's learning rate; None: the setting's (the authors train it at their
    # student's 0.1). RepDistiller: 0.01 for its ResNet/WRN students.
    paraphraser_lr: float | None = None
    # "flatten": the paper's and authors' factor; "attention": RepDistiller's.
    factor: str = "flatten"
    # The authors' translator has no BN; RepDistiller's Translator(use_bn=True) has.
    translator_bn: bool = False

    def __post_init__(self) -> None:
        if self.factor not in FACTORS:
            raise ValueError(f"ft.factor must be one of {', '.join(FACTORS)}, got {self.factor!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"ft.reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, "
                             f"got {self.reconstruction!r}")
        if not 0 < self.rate or self.paraphraser_epochs < 1:
            raise ValueError("ft needs rate > 0 and paraphraser_epochs >= 1")
        if self.paraphraser_lr is not None and not self.paraphraser_lr > 0:
            raise ValueError("ft.paraphraser_lr must be > 0 (or none: the setting's)")


class FT(Method):
    name = "ft"
    display_name = "FT"
    paper = ("Kim, Park & Kwak. Paraphrasing Complex Network: Network Compression via Factor "
             "Transfer. NeurIPS 2018")
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("The authors' code: paraphraser (k = 0.5, no BN) pre-trained 6 epochs with L1 "
                     "reconstruction on the teacher's last stage, translator, L1 between unit "
                     "factors, β = 500. RepDistiller's variant through factor/reconstruction/"
                     "translator_bn/paraphraser_lr/beta.")
    Config = FTConfig
    # The last stage output of each network: the authors' outputs[2] (layer3 of their CIFAR
    # ResNets), RepDistiller's feat[-2].
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})
    config: FTConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("FT needs a teacher")
        teacher_channels = teacher_shapes.stages[-1][0]
        # int(round(C·k)): the authors' Paraphraser(64, int(round(64*RATE))).
        factor_channels = max(1, int(round(teacher_channels * self.config.rate)))
        self.paraphraser = Paraphraser(teacher_channels, factor_channels)
        self.translator = encoder(student_shapes.stages[-1][0], factor_channels, self.config.translator_bn)

    def paraphrase_terms(self, s: Features | None, t: Features, batch: Batch) -> dict[str, Tensor]:
        feature = t.stages[-1]
        return {"reconstruction": reconstruction_loss(self.paraphraser(feature), feature,
                                                      self.config.reconstruction)}

    def pretrain_stages(self) -> list[PretrainStage]:
        return [PretrainStage(
            name="paraphraser",
            epochs=self.config.paraphraser_epochs,
            loss=self.paraphrase_terms,
            modules=[self.paraphraser],
            student_up_to_stage=None,  # the teacher's auto-encoder alone: the student waits
            # The authors' MultiStepLR milestones (150, 225) lie beyond its epochs: constant.
            lr_schedule="constant",
            lr=self.config.paraphraser_lr,
        )]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.translator]  # the paraphraser stays frozen (and in eval mode) after stage 1

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(t.stages[-1])
        student_factor = self.translator(s.stages[-1])
        return {"ft": self.config.beta * factor_transfer_loss(student_factor, teacher_factor,
                                                               self.config.factor)}
