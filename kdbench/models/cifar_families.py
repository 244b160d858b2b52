"""The CIFAR families named by a pattern: ``wrn_<depth>_<k>``, ``resnet<N>`` / ``resnet<N>x4``
and ``vgg<N>`` (RepDistiller's ``model_dict`` spellings), registered as the ``kdbench.models``
entry points ``wrn``, ``resnet`` and ``vgg``.

A name is canonical (no leading zeros, lower case) because it enters run ids.
"""

from __future__ import annotations

import re
from functools import partial

from kdbench.models.family import ModelFamily, Parsed
from kdbench.models.resnet_cifar import cifar_resnet
from kdbench.models.vgg import CONFIGS as VGG_CONFIGS
from kdbench.models.vgg import vgg
from kdbench.models.wrn import wide_resnet

_WRN = re.compile(r"wrn_([0-9]+)_([0-9]+)")
_RESNET = re.compile(r"resnet([0-9]+)(x4)?")
_VGG = re.compile(r"vgg([0-9]+)")
LEADING_ZEROS = "numbers must not have leading zeros"


def _canonical_int(text: str) -> int | None:
    """The integer ``text`` spells, or None if it has leading zeros (a non-canonical name)."""
    value = int(text)
    return value if str(value) == text else None


def _parse_wrn(name: str) -> Parsed | str:
    match = _WRN.fullmatch(name)
    if not match:
        return "not a wrn_<depth>_<k> name"
    depth, width = _canonical_int(match[1]), _canonical_int(match[2])
    if depth is None or width is None:
        return LEADING_ZEROS
    if (depth - 4) % 6 != 0 or depth < 10:
        return "a WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...)"
    if width < 1:
        return "a WRN widen factor must be >= 1"
    return Parsed("wrn", lambda classes, channels: wide_resnet(depth, width, classes, channels))


def _parse_resnet(name: str) -> Parsed | str:
    match = _RESNET.fullmatch(name)
    if not match:
        return "not a resnet<N> or resnet<N>x4 name"
    depth = _canonical_int(match[1])
    if depth is None:
        return LEADING_ZEROS
    if (depth - 2) % 6 != 0 or depth < 8:
        return "a CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"
    x4 = bool(match[2])
    return Parsed("resnet_x4" if x4 else "resnet",
                  lambda classes, channels: cifar_resnet(depth, classes, channels, x4=x4))


def _parse_vgg(name: str) -> Parsed | str:
    match = _VGG.fullmatch(name)
    depth = _canonical_int(match[1]) if match else None
    if depth is None or depth not in VGG_CONFIGS:
        return f"a VGG depth must be one of {', '.join(map(str, sorted(VGG_CONFIGS)))}"
    return Parsed("vgg", partial(vgg, depth))


WRN = ModelFamily("wrn_<depth>_<k>", _parse_wrn)
RESNET = ModelFamily("resnet<N>, resnet<N>x4", _parse_resnet)
VGG = ModelFamily("vgg<N>", _parse_vgg)
