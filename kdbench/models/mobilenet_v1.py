"""MobileNetV1 as the KD papers' ImageNet tables use it (ResNet50 -> MobileNet), from
mdistiller's ``mdistiller/models/imagenet/mobilenetv1.py`` (its ImageNet configs'
``MobileNetV1`` student, configs/imagenet/r50_mv1/*.yaml).

Howard et al., "MobileNets", arXiv:1704.04861, Table 1: a 3×3 stride-2 conv, thirteen
depthwise-separable blocks (3×3 depthwise conv-BN-ReLU, 1×1 conv-BN-ReLU) with widths 64 … 1024
and strides 1, 2, 1, 2, 1, 2, 1×5, 2, 1, global average pooling and one linear layer. Width
multiplier 1, ReLU (not ReLU6), PyTorch's default initialisation: mdistiller's code sets none.

Modules carry mdistiller's names (``model.0.0``, ``model.13.4``, ``fc``), so its released
checkpoints (e.g. ``imgnet_dkd_mv1``) load with ``load_state_dict``. Its ``AvgPool2d(7)``
(``model.14``) becomes an adaptive average pool: the same at 224 px, and it serves any size.
No operation is in place.

Feature roles (kdbench/method.py), as mdistiller's forward returns them:
- ``stages``: the outputs of blocks ``model.3``, ``model.5``, ``model.11`` and ``model.13``
  (128, 256, 512 and 1024 channels at strides 4, 8, 16, 32), after their final ReLU:
  mdistiller's ``feats``;
- ``preact_stages``: the same blocks before that ReLU, the inputs of ``model.{3,5,11,13}.5``:
  its ``preact_feats``; the BN before the ReLU is ``model.{3,5,11,13}.4``, its
  ``get_bn_before_relu``;
- ``postact_stages``: the same tensors as ``stages``;
- ``embedding``: the input of ``fc`` (mdistiller's ``pooled_feat``).
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint

# (output channels, stride) of the thirteen depthwise-separable blocks (Howard et al. 2017,
# Table 1; mdistiller's conv_dw calls).
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip
STAGE_BLOCKS = (3, 5, 11, 13)  # the indices in ``model`` of mdistiller's feat1..feat4


def conv_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def conv_dw(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    stage_names = tuple(f"model.{index}" for index in STAGE_BLOCKS)
    classifier_name = "fc"

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, 32, 2)]
        width = 32
        for channels, stride in BLOCKS:
            layers.append(conv_dw(width, channels, stride))
            width = channels
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        stages = tuple(TapPoint(name) for name in self.stage_names)
        preact = tuple(TapPoint(f"{name}.5", "input", norm=f"{name}.4") for name in self.stage_names)
        return {STAGES: stages, PREACT_STAGES: preact, POSTACT_STAGES: stages,
                EMBEDDING: (TapPoint(self.classifier_name, "input"),)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.model(x)))


def mobilenet_v1(num_classes: int, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels)
