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

The ImageNet networks of the KD papers' ImageNet tables are `torchvision.resnet18`, `.resnet34`,
`.resnet50`, `.mobilenet_v2` (torchvision's own, kdbench/models/torchvision_models.py) and
`mobilenet_v1` (mdistiller's); with the `timm` extra, `timm.<model>` names any timm network.

Every architecture comes through the `kdbench.models` entry-point group (kdbench/plugins.py),
the built-ins exactly as a third party's (pyproject.toml): an entry point is a factory
(num_classes, in_channels) -> nn.Module for its own name, or a `ModelFamily` for the names it
is a prefix of (`wrn` for `wrn_40_2`, `torchvision` for `torchvision.resnet18`;
kdbench/models/family.py). Nothing is imported before a name is asked for.

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
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from kdbench.errors import UserError
from kdbench.models.family import ModelFactory, ModelFamily, Parsed
from kdbench.models.mobilenetv2 import MobileNetV2
from kdbench.models.resnet_bottleneck import BottleneckResNet
from kdbench.models.resnet_cifar import CifarResNet
from kdbench.models.shufflenet_v1 import ShuffleNetV1
from kdbench.models.shufflenet_v2 import ShuffleNetV2
from kdbench.models.vgg import VGG
from kdbench.models.wrn import WideResNet
from kdbench.plugins import BrokenPlugin, PluginGroup

__all__ = [
    "FAMILY_EXAMPLES",
    "FAMILY_EXAMPLES_EXCLUDED",
    "FIXED_ARCHITECTURES",
    "IMAGENET_ARCHITECTURES",
    "KNOWN_ARCHITECTURES",
    "MODELS",
    "Architecture",
    "BottleneckResNet",
    "CifarResNet",
    "MobileNetV2",
    "ModelFactory",
    "ModelFamily",
    "Parsed",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "UnknownArchitecture",
    "VGG",
    "WideResNet",
    "architecture_family",
    "build_model",
    "is_architecture",
    "resolve",
]

GROUP = "kdbench.models"
MODELS = PluginGroup(GROUP, "model")


class UnknownArchitecture(UserError):
    """An architecture name that is not in the zoo (the message suggests the nearest ones)."""


# RepDistiller's fixed networks (model_dict's ResNet50, MobileNetV2, ShuffleV1, ShuffleV2),
# registered by name (pyproject.toml). The name is also the family.
FIXED_ARCHITECTURES: tuple[str, ...] = ("resnet50", "mobilenetv2", "shufflenet_v1", "shufflenet_v2")

# The architectures of RepDistiller's CIFAR-100 tables and model_dict; build_model also accepts
# any other valid depth/width of the wrn, resnet and vgg families.
KNOWN_ARCHITECTURES: tuple[str, ...] = (
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    *FIXED_ARCHITECTURES,
)  # fmt: skip

# The ImageNet networks of the KD papers' ImageNet tables (kdbench/models/torchvision_models.py,
# mobilenet_v1.py); timm's (``timm.<model>``) come with the optional extra.
IMAGENET_ARCHITECTURES: tuple[str, ...] = (
    "torchvision.resnet18", "torchvision.resnet34", "torchvision.resnet50",
    "torchvision.mobilenet_v2", "mobilenet_v1",
)

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

# RepDistiller's model_dict spellings of the fixed networks, for the error's hint.
REPDISTILLER_SPELLINGS: dict[str, str] = {
    "ResNet50": "resnet50",
    "MobileNetV2": "mobilenetv2",
    "ShuffleV1": "shufflenet_v1",
    "ShuffleV2": "shufflenet_v2",
}


@dataclass(frozen=True)
class Architecture:
    """A resolved architecture name: its family, its factory and the entry point behind it."""

    name: str
    family: str
    build: ModelFactory
    entry: str  # the kdbench.models entry point (the name itself, or its family's prefix)


def _is_model_entry(loaded: object) -> str | None:
    if isinstance(loaded, ModelFamily) or callable(loaded):
        return None
    return "is neither a model factory (num_classes, in_channels) -> nn.Module nor a ModelFamily"


def _family_entries(name: str) -> list[str]:
    """The entry points whose names are proper prefixes of ``name``, longest first."""
    return sorted((entry for entry in MODELS.names() if name.startswith(entry) and name != entry),
                  key=len, reverse=True)


@lru_cache(maxsize=None)
def resolve(name: str) -> Architecture:
    """``name`` as the ``kdbench.models`` group knows it: an entry point of that exact name (a
    factory), else the family whose entry-point name is the longest prefix of ``name`` (only
    that family's module is imported). Raises UnknownArchitecture or BrokenPlugin (UserErrors)."""
    reason = None
    if name in MODELS:
        loaded = MODELS.load_checked(name, _is_model_entry)
        if not isinstance(loaded, ModelFamily):
            return Architecture(name, name, loaded, name)
        reason = f"{name!r} names a family ({loaded.pattern}), not one network"
    else:
        for entry in _family_entries(name):
            loaded = MODELS.load_checked(entry, _is_model_entry)
            if not isinstance(loaded, ModelFamily):
                continue
            parsed = loaded.parse(name)
            if isinstance(parsed, Parsed):
                return Architecture(name, parsed.family, parsed.build, entry)
            reason = parsed
            break
    raise UnknownArchitecture(_unknown_message(name, reason))


def _unknown_message(name: str, reason: str | None) -> str:
    if name in REPDISTILLER_SPELLINGS:
        return (f"unknown architecture {name!r} (RepDistiller's spelling); "
                f"did you mean {REPDISTILLER_SPELLINGS[name]}?")
    reason = reason or ("no kdbench.models entry point names it or a prefix of it: "
                        f"{', '.join(MODELS.names())}")
    known = [*KNOWN_ARCHITECTURES, *IMAGENET_ARCHITECTURES,
             *(entry for entry in MODELS.names() if entry not in KNOWN_ARCHITECTURES)]
    nearest = difflib.get_close_matches(name.strip().lower(), known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(nearest)}?" if nearest else (
        f"known: {', '.join(KNOWN_ARCHITECTURES + IMAGENET_ARCHITECTURES)}"
    )
    return f"unknown architecture {name!r} ({reason}); {hint}"


def is_architecture(name: str) -> bool:
    """Whether `name` is a valid architecture name."""
    try:
        resolve(name)
    except UserError:
        return False
    return True


def architecture_family(name: str) -> str:
    """"wrn", "resnet", "resnet_x4", "vgg", the name of a fixed network ("resnet50",
    "mobilenetv2", …) or a plugin family's own ("torchvision.resnet"); raises
    UnknownArchitecture for other names."""
    return resolve(name).family


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised `name` with `num_classes` outputs for `in_channels`-channel input.

    Raises UnknownArchitecture (a UserError) for a name that is not in the zoo, BrokenPlugin for
    a model plugin that does not import or does not build an nn.Module.
    """
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"need num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}"
        )
    architecture = resolve(name)
    model = architecture.build(num_classes, in_channels)
    if not isinstance(model, nn.Module):
        raise BrokenPlugin(f"model {name!r} (entry point {architecture.entry!r}, "
                           f"{MODELS.origin(architecture.entry)}) built a "
                           f"{type(model).__name__}, not an nn.Module")
    return model


def build_shapeless(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """``name`` built on the meta device: its modules and role map, no memory and no
    initialisation (for checks made before training, e.g. that it maps a method's roles)."""
    with torch.device("meta"):
        return build_model(name, num_classes, in_channels)
