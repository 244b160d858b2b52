"""Pre-activation wide residual networks WRN-d-k for 32-px images.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146: a 3×3 conv stem
with 16 channels, three stages of (d − 4)/6 pre-activation basic blocks with widths 16k, 32k,
64k and strides 1, 2, 2, a final BN + ReLU, global average pooling and one linear layer. The
block (BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus shortcut) and the projection shortcut (a 1×1 conv
applied to the *activated* input, used when the width or the stride changes) follow the
authors' attention-transfer code (szagoruyko/attention-transfer, `resnet.py`) and
RepDistiller's `models/wrn.py`, whose CIFAR-100 numbers our tables are compared against.

Feature roles (`feature_points`, kdbench/method.py). Stage k's output s_k is consumed by a
BN + ReLU: the first BN/ReLU of the next stage's first block (`block2.layer.0.bn1` and
`.relu1`, `block3.layer.0.bn1` and `.relu1`) or, after stage 3, the final `bn1` and `relu`.
- `stages`: s_k itself, the raw residual sum (the outputs of `block1`..`block3`). This is what
  the AT authors' code passes to `at_loss` and what RepDistiller returns as its features f1..f3.
- `preact_stages`: bn(s_k), the outputs of `block2.layer.0.bn1`, `block3.layer.0.bn1` and
  `bn1`: RepDistiller's `preact=True` features, and those BNs are its `get_bn_before_relu`.
- `postact_stages`: relu(bn(s_k)), the outputs of `block2.layer.0.relu1`, `block3.layer.0.relu1`
  and `relu`: the MHGD authors' sensing points in their pre-activation WRN (TF2
  `nets/WResNet.py`, specs/mhgd.md §1). On a WRN these differ from `stages`.
- `embedding`: the input of `fc`, the global average of relu(bn1(s_3)), *not* the average of
  s_3 itself.

Parametrised modules carry RepDistiller's names (`conv1`, `block1.layer.0.convShortcut`, …), so
its published teacher checkpoints load with `load_state_dict`. No operation is in-place: forward
hooks keep references to stage outputs, and the final BN + ReLU must not overwrite them.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.roles import TapPoint


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 with an identity or 1×1-conv projection shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        # RepDistiller names the projection `convShortcut`; kept for checkpoint compatibility.
        self.convShortcut: nn.Conv2d | None = None
        if in_planes != out_planes or stride != 1:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        # The identity shortcut carries the raw input; the projection sees the activated one
        # (Zagoruyko & Komodakis' code and RepDistiller do the same).
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        residual = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return shortcut + residual


class WideStage(nn.Module):
    """`num_blocks` pre-activation blocks; only the first one changes width and stride.

    The blocks live in `self.layer` so that parameter names match RepDistiller's `NetworkBlock`.
    """

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [PreActBlock(in_planes, out_planes, stride)]
        blocks += [PreActBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; `forward` returns logits only (features come from hooks)."""

    stage_names: tuple[str, ...] = ("block1", "block2", "block3")
    classifier_name: str = "fc"

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        # WRN-d-k has (d - 4)/6 two-conv blocks per stage (Zagoruyko & Komodakis 2016,
        # Sec. 2; their code asserts depth = 6n + 4).
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen_factor}")
        num_blocks = (depth - 4) // 6
        # Widths 16, 16k, 32k, 64k (Zagoruyko & Komodakis 2016, Table 1).
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(num_blocks, widths[0], widths[1], stride=1)
        self.block2 = WideStage(num_blocks, widths[1], widths[2], stride=2)
        self.block3 = WideStage(num_blocks, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        # Adaptive instead of RepDistiller's fixed 8×8 average pool: identical at 32 px, and
        # also global at 28 px (Fashion-MNIST) or any other size.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        """Where each role's tensors are (module docstring): stage k's output is activated by
        the next stage's first block (`block{k+1}.layer.0`), the last stage's by `bn1`/`relu`."""
        activations = [("block2.layer.0.bn1", "block2.layer.0.relu1"),
                       ("block3.layer.0.bn1", "block3.layer.0.relu1"),
                       ("bn1", "relu")]
        return {
            STAGES: tuple(TapPoint(name) for name in self.stage_names),
            PREACT_STAGES: tuple(TapPoint(bn, norm=bn) for bn, _ in activations),
            POSTACT_STAGES: tuple(TapPoint(relu) for _, relu in activations),
            EMBEDDING: (TapPoint(self.classifier_name, "input"),),
        }

    def _init_weights(self) -> None:
        # RepDistiller models/wrn.py: conv weights N(0, 2 / (k·k·out_channels)), i.e. Kaiming
        # normal in fan-out mode; BN weight 1, bias 0; linear bias 0 (its weight keeps
        # PyTorch's default uniform init).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.pool(x)))


def wide_resnet(
    depth: int, widen_factor: int, num_classes: int, in_channels: int = 3
) -> WideResNet:
    """WRN-`depth`-`widen_factor`, e.g. `wide_resnet(40, 2, 100)` is RepDistiller's wrn_40_2."""
    return WideResNet(depth, widen_factor, num_classes, in_channels)
