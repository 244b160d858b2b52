"""ShuffleNetV1 (g = 3) for 32-px images, as RepDistiller defines it (its `ShuffleV1`).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018: units of 1×1 group conv, channel shuffle, 3×3 depthwise conv (stride 2 in
a stage's first unit) and 1×1 group conv, added to the input, or concatenated with its 3×3
average pool in a stage's first unit (Fig. 2); stages of 4, 8, 4 units with 240, 480, 960
channels for g = 3 (Table 1); no group conv on the first pointwise layer of stage 2, whose
input has only 24 channels (Sec. 3.3). We build RepDistiller's `models/ShuffleNetv1.py`, whose
CIFAR-100 numbers our tables compare against, with its departures from the paper:
- the stem is a 1×1 conv (24 channels) + BN + ReLU at full resolution, with no max pool (the
  paper: a 3×3 stride-2 conv and a 3×3 max pool), so the three stages run at 16, 8 and 4 px;
- the ReLU after the depthwise conv's BN, which the paper leaves out (Fig. 2: BN only), is kept
  as RepDistiller has it;
- no explicit initialisation: PyTorch's defaults, as RepDistiller.

Feature roles (`feature_points`, kdbench/method.py), for stage k's last unit `layer{k}.<last>`
(stride 1: its output is relu(bn3(conv3(·)) + input)):
- `stages`: the stage's output, after that ReLU (the output of `layer{k}`): RepDistiller's
  features f1..f3 (f0 is the stem, f4 the pooled vector).
- `preact_stages`: the sum before it, the input of `layer{k}.<last>.relu`: RepDistiller's
  `preact=True` features. No BN is named as the one before the ReLU: RepDistiller's (and
  mdistiller's) `get_bn_before_relu` raises for ShuffleNets ("not supported for Overhaul
  teacher"), and we follow it.
- `postact_stages`: the same tensors as `stages` (a post-activation network).
- `embedding`: the input of `linear`, the global average of the stage-3 output.

Parametrised modules carry RepDistiller's names (`conv1`, `layer2.0.conv3`, `linear`, …), so its
checkpoints load with `load_state_dict`. No operation is in-place. The channel shuffle is
`nn.ChannelShuffle`, which equals RepDistiller's view-permute-reshape (Zhang et al. 2018,
Fig. 1c) and keeps a channels_last input channels_last.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint

# Zhang et al. 2018, Table 1, g = 3 (RepDistiller's `ShuffleV1` cfg).
GROUPS = 3
STAGE_CHANNELS = (240, 480, 960)
STAGE_UNITS = (4, 8, 4)
STEM_CHANNELS = 24  # Table 1


class ShuffleUnit(nn.Module):
    """A ShuffleNet unit (Zhang et al. 2018, Fig. 2b/c); stride 2 concatenates the shortcut.

    `out_channels` counts the branch only: a stride-2 unit outputs `out_channels + in_channels`
    channels (the paper's stage widths include the concatenated shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        # The bottleneck is a quarter of the output (Zhang et al. 2018, Sec. 3.3), taken of the
        # branch's width as RepDistiller does.
        mid = out_channels // 4
        # "we do not apply group convolution on the first pointwise layer because the number of
        # input channels is relatively small" (Sec. 3.3): RepDistiller tests for 24 inputs.
        first_groups = 1 if in_channels == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle1 = nn.ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # RepDistiller's `shortcut` (AvgPool2d(3, 2, padding=1) for stride 2; it has no
        # parameters, so the name does not matter for checkpoints).
        self.shortcut: nn.Module = (
            nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        )
        # A module so that a forward hook reads the pre-activation as its input.
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        preact = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return self.relu(preact)


class ShuffleNetV1(nn.Module):
    """RepDistiller's ShuffleV1 (g = 3); `forward` returns logits only."""

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3")
    classifier_name: str = "linear"

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        widths = (STEM_CHANNELS,) + STAGE_CHANNELS
        self.layer1 = self._make_stage(widths[0], widths[1], STAGE_UNITS[0])
        self.layer2 = self._make_stage(widths[1], widths[2], STAGE_UNITS[1])
        self.layer3 = self._make_stage(widths[2], widths[3], STAGE_UNITS[2])
        # Adaptive instead of RepDistiller's F.avg_pool2d(out, 4): the same at 32 px (4×4), and
        # global at 28 or 16 px too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(STAGE_CHANNELS[-1], num_classes)

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        """Where each role's tensors are (module docstring)."""
        stages = tuple(TapPoint(name) for name in self.stage_names)
        last_units = [f"{name}.{len(self.get_submodule(name)) - 1}" for name in self.stage_names]
        return {
            STAGES: stages,
            PREACT_STAGES: tuple(TapPoint(f"{unit}.relu", "input") for unit in last_units),
            POSTACT_STAGES: stages,
            EMBEDDING: (TapPoint(self.classifier_name, "input"),),
        }

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, units: int) -> nn.Sequential:
        # The first unit has stride 2 and concatenates its input, so its branch is narrower.
        blocks = [ShuffleUnit(in_channels, out_channels - in_channels, 2, GROUPS)]
        blocks += [ShuffleUnit(out_channels, out_channels, 1, GROUPS) for _ in range(units - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def shufflenet_v1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """RepDistiller's `ShuffleV1` (g = 3, stages of 240/480/960 channels)."""
    return ShuffleNetV1(num_classes, in_channels)
