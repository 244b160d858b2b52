"""The model zoo: architecture name → nn.Module that maps images to logits.

Names follow RepDistiller's `model_dict` (the benchmark our tables compare against):
`wrn_<depth>_<k>` (depth = 6n + 4), `resnet<N>` and `resnet<N>x4` (N = 6n + 2), and
`vgg<N>` (N in 8, 11, 13, 16, 19; always with batch norm, as RepDistiller's `vgg13` is
`vgg13_bn`). A name is canonical — no leading zeros, lower case — because it enters run ids.
RepDistiller's four fixed networks of its cross-family table are, in lower case:
`mobilenetv2` (its `MobileNetV2`, i.e. `mobile_half`), `shufflenet_v1` (`ShuffleV1`),
`shufflenet_v2` (`ShuffleV2`) and `resnet50` (`ResNet50`, the bottleneck ResNet-50 with a
CIFAR stem). Each is a family of one; `resnet50` names that network, not the 50-layer member
of the basic-block CIFAR family (6·8 + 2), which RepDistiller does not have either.

Every model returns logits only and declares, in `feature_points()`, where each feature role
(kdbench/method.py: stages, pre- and post-activation stages, embedding) lives: per role, the
modules (dotted paths in `named_modules()`) whose output or input is each of its tensors
(kdbench/roles.py `TapPoint`), which forward hooks tap. Each family's module docstring says
exactly which tensor each role is. `stage_names` (the modules whose output is each stage's
output) and `classifier_name` (the final nn.Linear, whose input is the pooled embedding) stay
for compatibility.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from kdbench.errors import UserError
from kdbench.models.mobilenetv2 import MobileNetV2, mobilenetv2
from kdbench.models.resnet_bottleneck import BottleneckResNet, resnet50
from kdbench.models.resnet_cifar import CifarResNet, cifar_resnet
from kdbench.models.shufflenet_v1 import ShuffleNetV1, shufflenet_v1
from kdbench.models.shufflenet_v2 import ShuffleNetV2, shufflenet_v2
from kdbench.models.vgg import CONFIGS as VGG_CONFIGS
from kdbench.models.vgg import VGG, vgg
from kdbench.models.wrn import WideResNet, wide_resnet

__all__ = [
    "FAMILY_EXAMPLES",
    "FAMILY_EXAMPLES_EXCLUDED",
    "FIXED_ARCHITECTURES",
    "KNOWN_ARCHITECTURES",
    "BottleneckResNet",
    "CifarResNet",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "UnknownArchitecture",
    "VGG",
    "WideResNet",
    "architecture_family",
    "build_model",
    "is_architecture",
]


class UnknownArchitecture(UserError):
    """An architecture name that is not in the zoo (the message suggests the nearest ones)."""


# RepDistiller's fixed networks (model_dict's ResNet50, MobileNetV2, ShuffleV1, ShuffleV2):
# name -> builder(num_classes, in_channels). The name is also the family.
FIXED_ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "shufflenet_v1": shufflenet_v1,
    "shufflenet_v2": shufflenet_v2,
}

# The architectures of RepDistiller's CIFAR-100 tables and model_dict; build_model also accepts
# any other valid depth/width of the wrn, resnet and vgg families.
KNOWN_ARCHITECTURES: tuple[str, ...] = (
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    *FIXED_ARCHITECTURES,
)  # fmt: skip

# The smallest architecture of each family in KNOWN_ARCHITECTURES: what one-step tests run
# (the method contract, kdbench/testing.py, runs every method on each, as student and teacher).
FAMILY_EXAMPLES: dict[str, str] = {
    "wrn": "wrn_16_1",
    "resnet": "resnet8",
    "resnet_x4": "resnet8x4",
    "vgg": "vgg8",
}
# RepDistiller's fixed networks are families of one, left out of the contract's pairs; every
# method still meets their feature shapes through their settings (kdbench/testing.py, step 3),
# and tests/test_models.py checks them and their feature roles. Measured on a 2-core CPU:
# - resnet50 (23.7 M parameters): its three pairs cost kd's contract 5.7 s, fitnet's 14 s and
#   mhgd's 53 s, where another family's cost at most 1 s, 2 s and 5.6 s;
# - mobilenetv2: as an untrained teacher in eval mode (the contract's) its logits are ~1e-9
#   (RepDistiller's fan-out init of the depthwise convs shrinks every block until BN has
#   statistics), so dist's Pearson terms get no gradient from it;
# - shufflenet_v1, shufflenet_v2: they name no BN before the ReLU (as RepDistiller), and ofd
#   needs a teacher's; the three add about 10 s to mhgd's contract and 18 s to crg's.
FAMILY_EXAMPLES_EXCLUDED: tuple[str, ...] = (
    "resnet50", "mobilenetv2", "shufflenet_v1", "shufflenet_v2",
)

_WRN = re.compile(r"wrn_([0-9]+)_([0-9]+)")
_RESNET = re.compile(r"resnet([0-9]+)(x4)?")
_VGG = re.compile(r"vgg([0-9]+)")


@dataclass(frozen=True)
class _Parsed:
    family: str
    depth: int
    width: int = 1  # WRN widen factor; unused elsewhere


def _canonical_int(text: str) -> int | None:
    """The integer `text` spells, or None if it has leading zeros (a non-canonical name)."""
    value = int(text)
    return value if str(value) == text else None


def _parse(name: str) -> _Parsed | str:
    """The parsed name, or a one-phrase reason why it is not an architecture."""
    if name in FIXED_ARCHITECTURES:  # before the patterns: resnet50 would match resnet<N>
        return _Parsed(name, 0)
    if match := _WRN.fullmatch(name):
        depth, width = _canonical_int(match[1]), _canonical_int(match[2])
        if depth is None or width is None:
            return "numbers must not have leading zeros"
        if (depth - 4) % 6 != 0 or depth < 10:
            return "a WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...)"
        if width < 1:
            return "a WRN widen factor must be >= 1"
        return _Parsed("wrn", depth, width)
    if match := _RESNET.fullmatch(name):
        depth = _canonical_int(match[1])
        if depth is None:
            return "numbers must not have leading zeros"
        if (depth - 2) % 6 != 0 or depth < 8:
            return "a CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"
        return _Parsed("resnet_x4" if match[2] else "resnet", depth)
    if match := _VGG.fullmatch(name):
        depth = _canonical_int(match[1])
        if depth is None or depth not in VGG_CONFIGS:
            return f"a VGG depth must be one of {', '.join(map(str, sorted(VGG_CONFIGS)))}"
        return _Parsed("vgg", depth)
    return (f"not a wrn_<depth>_<k>, resnet<N>, resnet<N>x4 or vgg<N> name, nor one of "
            f"{', '.join(FIXED_ARCHITECTURES)}")


# RepDistiller's model_dict spellings of the fixed networks, for the error's hint.
REPDISTILLER_SPELLINGS: dict[str, str] = {
    "ResNet50": "resnet50",
    "MobileNetV2": "mobilenetv2",
    "ShuffleV1": "shufflenet_v1",
    "ShuffleV2": "shufflenet_v2",
}


def _resolve(name: str) -> _Parsed:
    parsed = _parse(name)
    if isinstance(parsed, _Parsed):
        return parsed
    if name in REPDISTILLER_SPELLINGS:
        raise UnknownArchitecture(f"unknown architecture {name!r} (RepDistiller's spelling); "
                                  f"did you mean {REPDISTILLER_SPELLINGS[name]}?")
    nearest = difflib.get_close_matches(name.strip().lower(), KNOWN_ARCHITECTURES, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(nearest)}?" if nearest else (
        f"known: {', '.join(KNOWN_ARCHITECTURES)}"
    )
    raise UnknownArchitecture(f"unknown architecture {name!r} ({parsed}); {hint}")


def is_architecture(name: str) -> bool:
    """Whether `name` is a valid architecture name."""
    return isinstance(_parse(name), _Parsed)


def architecture_family(name: str) -> str:
    """"wrn", "resnet", "resnet_x4", "vgg", or the name of a fixed network ("resnet50",
    "mobilenetv2", …); raises UnknownArchitecture for other names."""
    return _resolve(name).family


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised `name` with `num_classes` outputs for `in_channels`-channel input.

    Raises UnknownArchitecture (a UserError) for a name that is not in the zoo.
    """
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"need num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}"
        )
    parsed = _resolve(name)
    if parsed.family in FIXED_ARCHITECTURES:
        return FIXED_ARCHITECTURES[parsed.family](num_classes, in_channels)
    if parsed.family == "wrn":
        return wide_resnet(parsed.depth, parsed.width, num_classes, in_channels)
    if parsed.family in ("resnet", "resnet_x4"):
        return cifar_resnet(parsed.depth, num_classes, in_channels, x4=parsed.family == "resnet_x4")
    return vgg(parsed.depth, num_classes, in_channels)
