"""CIFAR ResNets: resnetN (widths 16/32/64) and resnetNx4 (widths 64/128/256, 32-wide stem).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2: a 3×3 conv
stem, three stages of n post-activation basic blocks (N = 6n + 2 layers) at 32, 16 and 8 px,
global average pooling and a linear classifier. Where the paper uses parameter-free shortcuts
("option A"), we follow RepDistiller's `models/resnet.py` (the CIFAR-100 numbers our tables
compare against): a 1×1 conv + BN projection wherever the width or stride changes. Its
"x4" variants (resnet8x4, resnet32x4) use stage widths 64/128/256 after a 32-wide stem, so their
first stage also starts with a projection.

Feature roles (`feature_points`, kdbench/method.py), for stage k's last block
`layer{k}.<last>`, whose output is relu2(bn2(conv2(·)) + shortcut):
- `stages`: the stage's output, *after* that ReLU (the output of `layer{k}`): RepDistiller's
  features f1..f3.
- `preact_stages`: the residual sum before it, the *input* of `layer{k}.<last>.relu2`:
  RepDistiller's `preact=True` features. The BN before the ReLU is `layer{k}.<last>.bn2`, the
  residual branch's last BN (RepDistiller's `get_bn_before_relu`, from OFD's code).
- `postact_stages`: the same tensors as `stages` (a post-activation network; the MHGD
  authors' sensing points in their ResNet, TF1 `nets/ResNet.py`).
- `embedding`: the input of `fc`, the global average of the stage-3 output.

Parametrised modules carry RepDistiller's names (`conv1`, `layer1.0.downsample.0`, `fc`, …), so
its published teacher checkpoints load with `load_state_dict`. No operation is in-place
(RepDistiller's `out += residual` and `ReLU(inplace=True)` are replaced), because forward hooks
keep references to stage outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus shortcut, then ReLU (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Projection shortcut when the shape changes, as RepDistiller's `_make_layer` does.
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        # A module (not F.relu) so that a hook can read the pre-activation as its input.
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """A CIFAR ResNet; `forward` returns logits only (features come from hooks)."""

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3")
    classifier_name: str = "fc"

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        """`widths` = (stem, stage 1, stage 2, stage 3) channels."""
        super().__init__()
        # "6n+2 stacked weighted layers": n two-conv blocks in each of 3 stages, plus the stem
        # conv and the classifier (He et al. 2016, Sec. 4.2).
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        num_blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(widths[0], widths[1], num_blocks, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], num_blocks, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], num_blocks, stride=2)
        # Adaptive instead of RepDistiller's fixed AvgPool2d(8): identical at 32 px, and also
        # global at 28 px (Fashion-MNIST) or any other size.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        """Where each role's tensors are (module docstring)."""
        last_blocks = [f"{stage}.{len(self.get_submodule(stage)) - 1}" for stage in self.stage_names]
        stages = tuple(TapPoint(name) for name in self.stage_names)
        return {
            STAGES: stages,
            PREACT_STAGES: tuple(TapPoint(f"{block}.relu2", "input", norm=f"{block}.bn2")
                                 for block in last_blocks),
            POSTACT_STAGES: stages,
            EMBEDDING: (TapPoint(self.classifier_name, "input"),),
        }

    def _init_weights(self) -> None:
        # RepDistiller models/resnet.py: Kaiming normal (fan-out, ReLU) for convs, BN weight 1
        # and bias 0; it leaves nn.Linear at PyTorch's default init, and so do we.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


# Stage widths (stem, stage 1, stage 2, stage 3).
# resnetN: 16/16/32/64 (He et al. 2016, Sec. 4.2).
WIDTHS = (16, 16, 32, 64)
# resnetNx4: 32/64/128/256 (RepDistiller models/resnet.py, resnet8x4 and resnet32x4).
WIDTHS_X4 = (32, 64, 128, 256)


def cifar_resnet(
    depth: int, num_classes: int, in_channels: int = 3, x4: bool = False
) -> CifarResNet:
    """resnet`depth` (or resnet`depth`x4 when `x4`), e.g. `cifar_resnet(32, 100, x4=True)`."""
    return CifarResNet(depth, WIDTHS_X4 if x4 else WIDTHS, num_classes, in_channels)
