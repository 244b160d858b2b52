"""ShuffleNetV2 1× for 32-px images, as RepDistiller defines it (its `ShuffleV2`).

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV
2018: a basic unit splits the channels in two halves, keeps one and passes the other through
1×1 conv-BN-ReLU, 3×3 depthwise conv-BN, 1×1 conv-BN-ReLU, then concatenates and shuffles
(Fig. 3c); a down-sampling unit runs two stride-2 branches on the whole input (Fig. 3d); stages
of 1 + 3, 1 + 7, 1 + 3 units with 116, 232, 464 channels and a 1×1 conv to 1024 before the
pool (Table 5, 1×). We build RepDistiller's `models/ShuffleNetv2.py` (`net_size=1`), whose
CIFAR-100 numbers our tables compare against, with its departures from the paper:
- the stem is a 1×1 conv (24 channels) + BN + ReLU at full resolution, with no max pool (the
  paper: a 3×3 stride-2 conv and a 3×3 max pool), so the stages run at 16, 8 and 4 px;
- no explicit initialisation: PyTorch's defaults, as RepDistiller.

Feature roles (`feature_points`, kdbench/method.py), for stage k's last unit `layer{k}.<last>`:
- `stages`: the stage's output (the output of `layer{k}`, that unit's shuffled concatenation),
  RepDistiller's features f1..f3.
- `preact_stages`: RepDistiller's `preact=True` features, the last unit's concatenation
  [kept half, branch before its final ReLU], *before* the shuffle (so in another channel order
  than `stages`): the input of `layer{k}.<last>.relu`. That module applies the ReLU to the
  whole concatenation, where RepDistiller applies it to the branch only; the two are equal
  because the kept half is non-negative (a slice of a previous unit's output, and every unit
  ends in ReLUs and a permutation), and so are the gradients (a zero of the kept half came out
  of an earlier ReLU, which already stops its gradient). No BN is named as the one before the
  ReLU: RepDistiller's `get_bn_before_relu` raises for ShuffleNets, and half of this tensor is
  no BN's output.
- `postact_stages`: the same tensors as `stages` (the stage output is post-activation).
- `embedding`: the input of `linear`, the average of relu(bn2(conv2(stage 3))).

Parametrised modules carry RepDistiller's names (`conv1`, `layer1.0.conv5`, `layer3.3.bn3`,
`conv2`, `linear`, …), so its checkpoints load with `load_state_dict`. No operation is in-place.
The channel shuffle is `nn.ChannelShuffle(2)`, which equals RepDistiller's
view-permute-reshape and keeps a channels_last input channels_last.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint

# Ma et al. 2018, Table 5, 1× (RepDistiller's configs[1]): stage channels, the final 1×1 conv's
# width, and the basic units after each stage's down-sampling unit.
STAGE_CHANNELS = (116, 232, 464)
LAST_CHANNELS = 1024
BASIC_UNITS = (3, 7, 3)
STEM_CHANNELS = 24  # Table 5


class BasicUnit(nn.Module):
    """Channel split, one half through 1×1-dw3×3-1×1, concatenate, shuffle (Fig. 3c)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Split ratio 0.5 (Ma et al. 2018, Sec. 4; RepDistiller's SplitBlock(0.5)).
        self.kept = channels // 2
        half = channels - self.kept
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, 3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        # Over the whole concatenation (see the module docstring): its input is RepDistiller's
        # pre-activation feature.
        self.relu = nn.ReLU()
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, : self.kept], x[:, self.kept :]
        branch = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(branch)))))
        branch = self.bn3(self.conv3(branch))
        return self.shuffle(self.relu(torch.cat([kept, branch], 1)))


class DownsampleUnit(nn.Module):
    """Two stride-2 branches over the whole input, concatenated and shuffled (Fig. 3d)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left: 3×3 depthwise (stride 2)-BN, 1×1-BN-ReLU
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        # right: 1×1-BN-ReLU, 3×3 depthwise (stride 2)-BN, 1×1-BN-ReLU
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """RepDistiller's ShuffleV2 (1×); `forward` returns logits only."""

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3")
    classifier_name: str = "linear"

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        widths = (STEM_CHANNELS,) + STAGE_CHANNELS
        self.layer1 = self._make_stage(widths[0], widths[1], BASIC_UNITS[0])
        self.layer2 = self._make_stage(widths[1], widths[2], BASIC_UNITS[1])
        self.layer3 = self._make_stage(widths[2], widths[3], BASIC_UNITS[2])
        self.conv2 = nn.Conv2d(STAGE_CHANNELS[-1], LAST_CHANNELS, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(LAST_CHANNELS)
        self.relu2 = nn.ReLU()
        # Adaptive instead of RepDistiller's F.avg_pool2d(out, 4): the same at 32 px (4×4), and
        # global at 28 or 16 px too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(LAST_CHANNELS, num_classes)

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
    def _make_stage(in_channels: int, out_channels: int, basic_units: int) -> nn.Sequential:
        blocks: list[nn.Module] = [DownsampleUnit(in_channels, out_channels)]
        blocks += [BasicUnit(out_channels) for _ in range(basic_units)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def shufflenet_v2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    """RepDistiller's `ShuffleV2` (1×: stages of 116/232/464 channels, 1024 before the pool)."""
    return ShuffleNetV2(num_classes, in_channels)
