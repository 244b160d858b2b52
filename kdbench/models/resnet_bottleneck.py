"""ResNet-50 with a CIFAR stem, as RepDistiller defines it (its `ResNet50`, models/resnetv2.py).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1 (50-layer): four
stages of 3, 4, 6, 3 bottleneck blocks (1×1, 3×3, 1×1 convs, the last one 4× wider) with 64,
128, 256, 512 bottleneck channels, strides 1, 2, 2, 2, a projection shortcut (1×1 conv + BN)
wherever the shape changes, global average pooling and one linear layer. RepDistiller's
ResNet50, whose CIFAR-100 numbers our tables compare against, replaces the ImageNet stem (7×7
stride-2 conv and 3×3 max pool) by a 3×3 stride-1 conv with 64 channels, so the stages run at
32, 16, 8 and 4 px. This is not a member of the basic-block CIFAR family of resnet_cifar.py
(resnet20, resnet56, …): it is the only network in the zoo named `resnet50`.

Feature roles (`feature_points`, kdbench/method.py), for stage k's last block
`layer{k}.<last>`, whose output is relu3(bn3(conv3(·)) + shortcut):
- `stages`: the stage's output, after that ReLU (the output of `layer{k}`): RepDistiller's
  features f1..f4 (f0 is the stem, f5 the pooled vector).
- `preact_stages`: the residual sum before it, the input of `layer{k}.<last>.relu3`:
  RepDistiller's `preact=True` features. The BN before the ReLU is that block's `bn3`
  (RepDistiller's `get_bn_before_relu` for bottleneck blocks).
- `postact_stages`: the same tensors as `stages` (a post-activation network).
- `embedding`: the input of `linear`, the global average of the stage-4 output.

Parametrised modules carry RepDistiller's names (`conv1`, `layer2.0.shortcut.0`, `linear`, …), so
its checkpoints (RepDistiller publishes a ResNet50 teacher) load with `load_state_dict`. No
operation is in-place (RepDistiller's `out += self.shortcut(x)` is replaced).
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint

EXPANSION = 4  # the last 1×1 conv of a bottleneck is 4× wider (He et al. 2016, Table 1)
STEM_CHANNELS = 64
STAGE_PLANES = (64, 128, 256, 512)  # bottleneck widths (He et al. 2016, Table 1)
RESNET50_BLOCKS = (3, 4, 6, 3)  # He et al. 2016, Table 1, 50-layer


class Bottleneck(nn.Module):
    """1×1-BN-ReLU, 3×3 (stride here)-BN-ReLU, 1×1-BN, plus shortcut, then ReLU (Fig. 5)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = EXPANSION * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        # The stride sits on the 3×3 conv, as in RepDistiller (and torchvision's "ResNet v1.5").
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # RepDistiller's `shortcut`: empty Sequential (identity) or 1×1 conv + BN.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        # A module so that a forward hook reads the pre-activation (the sum) as its input.
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """A bottleneck ResNet with RepDistiller's CIFAR stem; `forward` returns logits only."""

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
    classifier_name: str = "linear"

    def __init__(
        self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        widths = (STEM_CHANNELS,) + tuple(EXPANSION * planes for planes in STAGE_PLANES)
        self.layer1 = self._make_stage(widths[0], STAGE_PLANES[0], blocks[0], stride=1)
        self.layer2 = self._make_stage(widths[1], STAGE_PLANES[1], blocks[1], stride=2)
        self.layer3 = self._make_stage(widths[2], STAGE_PLANES[2], blocks[2], stride=2)
        self.layer4 = self._make_stage(widths[3], STAGE_PLANES[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(widths[4], num_classes)
        self._init_weights()

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        """Where each role's tensors are (module docstring)."""
        stages = tuple(TapPoint(name) for name in self.stage_names)
        last_blocks = [f"{name}.{len(self.get_submodule(name)) - 1}" for name in self.stage_names]
        return {
            STAGES: stages,
            PREACT_STAGES: tuple(TapPoint(f"{block}.relu3", "input", norm=f"{block}.bn3")
                                 for block in last_blocks),
            POSTACT_STAGES: stages,
            EMBEDDING: (TapPoint(self.classifier_name, "input"),),
        }

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        stage = [Bottleneck(in_planes, planes, stride)]
        stage += [Bottleneck(EXPANSION * planes, planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        # RepDistiller models/resnetv2.py: Kaiming normal (fan-out, ReLU) for convs, BN weight 1
        # and bias 0, nn.Linear at PyTorch's default; zero_init_residual is off by default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


def resnet50(num_classes: int, in_channels: int = 3) -> BottleneckResNet:
    """RepDistiller's `ResNet50` (bottleneck blocks 3/4/6/3, 3×3 stride-1 stem)."""
    return BottleneckResNet(RESNET50_BLOCKS, num_classes, in_channels)
