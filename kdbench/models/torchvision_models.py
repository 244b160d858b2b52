"""torchvision's ImageNet networks, as the KD papers' ImageNet tables use them: the
``kdbench.models`` family ``torchvision`` (names ``torchvision.resnet18``, ``.resnet34``,
``.resnet50``, ``.mobilenet_v2``).

Each network is torchvision's own class, built by torchvision's own code (its initialisation,
its parameter names), so torchvision's pretrained state_dicts load with ``load_state_dict``
and a teacher can be one of them (``--teacher-checkpoint torchvision:resnet34``,
kdbench/teachers.py). Two departures, neither touching a parameter:
- no operation is in place (forward hooks keep references to tapped tensors): every module's
  ``inplace`` flag is cleared, and the ResNet blocks below are torchvision's with an
  out-of-place forward whose final ReLU is a module of its own (``relu_out``), so that the
  pre-activation residual sum is that module's input;
- ``in_channels`` other than 3 replaces the first convolution (initialised as torchvision
  initialises it).

ResNets (He et al., CVPR 2016; torchvision's V1.5 bottleneck, stride on the 3×3 conv, which is
also mdistiller's ``mdistiller/models/imagenet/resnet.py``). Feature roles
(kdbench/method.py), for stage k's last block ``layer{k}.<last>``:
- ``stages``: the outputs of ``layer1``..``layer4`` (after the block's final ReLU):
  mdistiller's ImageNet ``feats[1:]``, what its AT distils (its ``feats[0]`` is the stem, not
  a stage);
- ``preact_stages``: the residual sum before that ReLU, the input of ``layer{k}.<last>.relu_out``
  (mdistiller's ``preact_feats[1:]``, what its OFD distils; its ImageNet blocks apply the
  ReLU at the start of the next block instead, which gives the same tensors); the BN before the ReLU is the block's last BN
  (``bn2`` / ``bn3``), as mdistiller's ``get_bn_before_relu``;
- ``postact_stages``: the same tensors as ``stages`` (a post-activation network);
- ``embedding``: the input of ``fc``, the global average of the stage-4 output.

MobileNetV2 (Sandler et al., CVPR 2018; torchvision's definition, ReLU6, width 1.0): the stage
outputs are the last block of each resolution, stride 4, 8, 16 and 32 (``features.3``,
``.6``, ``.13``, ``.17``: 24, 32, 96 and 320 channels), the same groups as kdbench's CIFAR
MobileNetV2 (RepDistiller's f1..f4) and as timm's ``feature_info`` for ``mobilenetv2_100``;
they are linear bottlenecks, so ``preact_stages`` and ``postact_stages`` are the same tensors
and the BN before the (absent) ReLU is the block's projection BN ``conv.3``; the embedding is
the input of ``classifier`` (the pooled 1280-vector, before its dropout).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import resnet as tv_resnet

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, STAGES
from kdbench.models.family import ModelFamily, Parsed
from kdbench.roles import TapPoint

PREFIX = "torchvision."


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock, out of place, with its final ReLU as the module ``relu_out``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu_out(out + identity)


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck, out of place, with its final ReLU as the module ``relu_out``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + identity)


class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet with the blocks above; logits only, roles in ``feature_points``."""

    stage_names = ("layer1", "layer2", "layer3", "layer4")
    classifier_name = "fc"

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        stages = tuple(TapPoint(name) for name in self.stage_names)
        preact = []
        for name in self.stage_names:
            last = f"{name}.{len(self.get_submodule(name)) - 1}"
            norm = "bn3" if isinstance(self.get_submodule(last), Bottleneck) else "bn2"
            preact.append(TapPoint(f"{last}.relu_out", "input", norm=f"{last}.{norm}"))
        return {STAGES: stages, PREACT_STAGES: tuple(preact), POSTACT_STAGES: stages,
                EMBEDDING: (TapPoint(self.classifier_name, "input"),)}


class MobileNetV2(tv_mobilenetv2.MobileNetV2):
    """torchvision's MobileNetV2; logits only, roles in ``feature_points``."""

    stage_names = ("features.3", "features.6", "features.13", "features.17")
    classifier_name = "classifier"

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        stages = tuple(TapPoint(name) for name in self.stage_names)
        preact = tuple(TapPoint(name, norm=f"{name}.conv.3") for name in self.stage_names)
        return {STAGES: stages, PREACT_STAGES: preact, POSTACT_STAGES: preact,
                EMBEDDING: (TapPoint(self.classifier_name, "input"),)}


def not_in_place(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


def first_conv_for(conv: nn.Conv2d, in_channels: int, nonlinearity: str | None) -> nn.Conv2d:
    """``conv`` with ``in_channels`` inputs, initialised as torchvision initialises it."""
    if in_channels == conv.in_channels:
        return conv
    replaced = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, bias=conv.bias is not None)
    if nonlinearity is None:  # MobileNetV2: kaiming_normal_(mode="fan_out"), leaky_relu's gain
        nn.init.kaiming_normal_(replaced.weight, mode="fan_out")
    else:
        nn.init.kaiming_normal_(replaced.weight, mode="fan_out", nonlinearity=nonlinearity)
    return replaced


def resnet(block: type, layers: list[int]) -> Callable[[int, int], ResNet]:
    def build(num_classes: int, in_channels: int = 3) -> ResNet:
        model = ResNet(block, layers, num_classes=num_classes)
        model.conv1 = first_conv_for(model.conv1, in_channels, "relu")
        model.relu = nn.ReLU()
        return not_in_place(model)

    return build


def mobilenet_v2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    model = MobileNetV2(num_classes=num_classes)
    model.features[0][0] = first_conv_for(model.features[0][0], in_channels, None)
    return not_in_place(model)


# torchvision.models.resnet18/34/50: BasicBlock [2, 2, 2, 2] and [3, 4, 6, 3], Bottleneck
# [3, 4, 6, 3] (He et al. 2016, Table 1).
BUILDERS: dict[str, tuple[str, Callable[[int, int], nn.Module]]] = {
    "resnet18": ("torchvision.resnet", resnet(BasicBlock, [2, 2, 2, 2])),
    "resnet34": ("torchvision.resnet", resnet(BasicBlock, [3, 4, 6, 3])),
    "resnet50": ("torchvision.resnet", resnet(Bottleneck, [3, 4, 6, 3])),
    "mobilenet_v2": ("torchvision.mobilenet_v2", mobilenet_v2),
}


def _parse(name: str) -> Parsed | str:
    model = name[len(PREFIX):] if name.startswith(PREFIX) else None
    if model not in BUILDERS:
        return f"kdbench maps {', '.join(PREFIX + known for known in BUILDERS)}"
    family, build = BUILDERS[model]
    return Parsed(family, build)


FAMILY = ModelFamily("torchvision.<resnet18|resnet34|resnet50|mobilenet_v2>", _parse)
