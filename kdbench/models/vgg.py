"""CIFAR VGG with batch norm: vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan & Zisserman, "Very Deep Convolutional Networks", ICLR 2015 (configurations A, B, D,
E), in the CIFAR form of RepDistiller's `models/vgg.py` (the numbers our tables compare
against; its training script maps `vgg13` etc. to the `_bn` variants): five groups of 3×3 conv +
BN + ReLU, max-pooling between groups, global average pooling instead of the fully connected
head, and one linear layer 512 → classes. RepDistiller adds the 8-layer configuration "S" (one
conv per group) for vgg8.

Group g (`block{g}`) ends with its BN; the ReLU after it is the module `relu{g}`. Between
groups 0→1, 1→2 and 2→3 there is a 2×2 max pool; between groups 3→4 only for inputs of at
least 64 px (RepDistiller pools there only at 64 px, TinyImageNet), so at 32 px groups 3 and 4
both run at 4×4, and at 28 px at 3×3. The final pool is adaptive, so any input of at least
16 px works.

Feature roles (`feature_points`, kdbench/method.py), for groups 1–4:
- `stages`: the post-ReLU outputs (`relu1`..`relu4`), RepDistiller's features f1..f4. Its f0
  (group 0, full resolution) plays the stem's role, like f0 of its ResNets and WRNs, which are
  not stages either: so "stage 2" (FitNets' hint layer) is group 2 here as in RepDistiller, and
  AT's attention maps cover the same four groups as its `feat[1:-1]`.
- `preact_stages`: the outputs of `block1`..`block4`, each ending with its last BN, before the
  ReLU: RepDistiller's `preact=True` features; that BN (`block{g}.<last>`) is its
  `get_bn_before_relu`.
- `postact_stages`: the same tensors as `stages` (a post-activation network).
- `embedding`: the input of `classifier`.

Parametrised modules carry RepDistiller's names (`block0.0`, `block0.1`, …, `classifier`), so
its published teacher checkpoints load with `load_state_dict`. No operation is in-place.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint

# Output channels of each conv in each of the five groups.
# A/B/D/E: Simonyan & Zisserman 2015, Table 1 (vgg11/13/16/19); S (vgg8): RepDistiller.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

# RepDistiller applies the max pool between groups 3 and 4 only for 64-px inputs.
POOL3_MIN_SIZE = 64


def conv_group(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv3×3-BN-ReLU repeated, without the last ReLU (the model owns it, as `relu{g}`).

    Convs keep their bias although BN follows, as in RepDistiller (it counts in the
    published parameter totals and keeps its checkpoints loadable).
    """
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """A CIFAR VGG with BN; `forward` returns logits only (features come from hooks)."""

    stage_names: tuple[str, ...] = ("relu1", "relu2", "relu3", "relu4")
    classifier_name: str = "classifier"

    def __init__(
        self, config: tuple[tuple[int, ...], ...], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(config) != 5:
            raise ValueError(f"a VGG config has 5 conv groups, got {len(config)}")
        group_inputs = (in_channels,) + tuple(group[-1] for group in config[:-1])
        self.block0 = conv_group(group_inputs[0], config[0])
        self.block1 = conv_group(group_inputs[1], config[1])
        self.block2 = conv_group(group_inputs[2], config[2])
        self.block3 = conv_group(group_inputs[3], config[3])
        self.block4 = conv_group(group_inputs[4], config[4])
        self.relu0 = nn.ReLU()
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(config[4][-1], num_classes)
        self._init_weights()

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        """Where each role's tensors are (module docstring)."""
        groups = ("block1", "block2", "block3", "block4")
        stages = tuple(TapPoint(name) for name in self.stage_names)
        return {
            STAGES: stages,
            PREACT_STAGES: tuple(TapPoint(group, norm=f"{group}.{len(self.get_submodule(group)) - 1}")
                                 for group in groups),
            POSTACT_STAGES: stages,
            EMBEDDING: (TapPoint(self.classifier_name, "input"),),
        }

    def _init_weights(self) -> None:
        # RepDistiller models/vgg.py: conv weights N(0, 2 / (k·k·out_channels)) (= Kaiming
        # normal, fan-out) and bias 0; BN weight 1, bias 0; linear weight N(0, 0.01), bias 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3 = x.shape[-2] >= POOL3_MIN_SIZE
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if pool3:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


def vgg(depth: int, num_classes: int, in_channels: int = 3) -> VGG:
    """vgg`depth` with BN, `depth` in CONFIGS (8, 11, 13, 16, 19)."""
    if depth not in CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    return VGG(CONFIGS[depth], num_classes, in_channels)
