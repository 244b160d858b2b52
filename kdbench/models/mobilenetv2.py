"""MobileNetV2 for 32-px images, as RepDistiller defines it (its `MobileNetV2` = `mobile_half`).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, Table 2:
a 3×3 stride-2 conv stem, seven groups of inverted-residual blocks (t, c, n, s), a 1×1 conv to
1280 channels, global average pooling and a linear classifier. We build RepDistiller's
`models/mobilenetv2.py` (taken from "Knowledge Distillation via Route Constrained
Optimization", Jin et al., ICCV 2019), whose CIFAR-100 numbers our tables compare against, with
its departures from the paper, because they are what its published numbers measure:
- width multiplier 0.5 and expansion t = 6 (`mobile_half`); the last conv keeps 1280 channels
  (the paper keeps 1280 for multipliers below 1 too);
- the second group runs at stride 1 (the paper's s = 2), so the strides are 2 (stem), 1, 1, 2,
  2, 1, 2, 1 and 32 px ends at 2×2;
- ReLU instead of the paper's ReLU6;
- the t = 1 group keeps its 1×1 expansion conv (16 → 16 channels at this width), which
  torchvision's MobileNetV2 omits.

Feature roles (`feature_points`, kdbench/method.py), for groups 1, 2, 4 and 6 (`blocks.1`,
`blocks.2`, `blocks.4`, `blocks.6`), whose last block ends with the BN `conv.7` and, where the
stride is 1 and the width unchanged, the residual sum:
- `stages`: the groups' outputs, RepDistiller's features f1..f4 (its f0 is the stem, its f5
  the pooled vector).
- `preact_stages`: the same tensors. They are linear bottlenecks (Sandler et al. 2018, Sec.
  3.2): no activation follows them, and RepDistiller's forward ignores `preact=True`. The BN
  before the ReLU is that last block's `conv.7`, which RepDistiller's `get_bn_before_relu`
  names.
- `postact_stages`: the same tensors again: no activation is ever applied to a stage output
  (the next block's 1×1 expansion conv reads it as it is), so none is invented here.
- `embedding`: the input of `classifier.0`, the average of relu(bn(conv2(f4))), not of f4.

Parametrised modules carry RepDistiller's names (`conv1.0`, `blocks.3.2.conv.4`,
`classifier.0`, …), so its checkpoints load with `load_state_dict`. No operation is in-place
(RepDistiller's `ReLU(inplace=True)` becomes `ReLU()`): forward hooks keep references.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint

# (expansion t, output channels c, blocks n, first stride s) of each group before the width
# multiplier: Sandler et al. 2018, Table 2, with RepDistiller's s = 1 for the second group.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# RepDistiller's `mobile_half`: mobilenetv2_T_w(T=6, W=0.5).
WIDTH_MULTIPLIER = 0.5
LAST_CHANNELS = 1280  # kept at 1280 for multipliers <= 1 (Sandler et al. 2018; RepDistiller)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int
) -> nn.Sequential:
    """conv-BN-ReLU, indexed 0/1/2 as RepDistiller's `conv_bn` and `conv_1x1_bn`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 project-BN (linear bottleneck), plus the
    input when the stride is 1 and the width unchanged (Sandler et al. 2018, Table 1, Fig. 4)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"an inverted residual block has stride 1 or 2, got {stride}")
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        # One Sequential, indexed as RepDistiller's `self.conv`, so its checkpoints load.
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """RepDistiller's MobileNetV2 (width 0.5, t = 6); `forward` returns logits only."""

    stage_names: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
    classifier_name: str = "classifier.0"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_multiplier: float = WIDTH_MULTIPLIER,
        expansion: int = 6,
    ) -> None:
        super().__init__()
        channels = int(32 * width_multiplier)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, stride=2)
        groups = []
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            # RepDistiller passes its T to every group, the t = 1 one included: its t column is
            # (1, T, T, ...), so `expansion` replaces the 6s only.
            group_expansion = t if t == 1 else expansion
            out_channels = int(c * width_multiplier)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(channels, out_channels, stride, group_expansion))
                channels = out_channels
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last = int(LAST_CHANNELS * width_multiplier) if width_multiplier > 1.0 else LAST_CHANNELS
        self.conv2 = conv_bn_relu(channels, last, 1, stride=1)
        # Adaptive instead of RepDistiller's AvgPool2d(input_size // 16, ceil_mode=True): the
        # same global average at 32 px (2×2), and global at 28 or 16 px too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        # A Sequential around the Linear, as RepDistiller (its `classifier.0.weight`).
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self._init_weights()

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        """Where each role's tensors are (module docstring)."""
        stages = tuple(TapPoint(name) for name in self.stage_names)
        # The BN ending each group's last block (RepDistiller's get_bn_before_relu).
        last_bns = [f"{name}.{len(self.get_submodule(name)) - 1}.conv.7"
                    for name in self.stage_names]
        return {
            STAGES: stages,
            PREACT_STAGES: tuple(TapPoint(name, norm=bn)
                                 for name, bn in zip(self.stage_names, last_bns)),
            POSTACT_STAGES: stages,
            EMBEDDING: (TapPoint(self.classifier_name, "input"),),
        }

    def _init_weights(self) -> None:
        # RepDistiller models/mobilenetv2.py: conv weights N(0, 2 / (k·k·out_channels)), i.e.
        # Kaiming normal, fan-out (the depthwise convs too: fan-out = k·k·channels); BN weight 1,
        # bias 0; linear weight N(0, 0.01), bias 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(self.flatten(self.avgpool(x)))


def mobilenetv2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's `MobileNetV2` (`mobile_half`: width 0.5, expansion 6)."""
    return MobileNetV2(num_classes, in_channels)
