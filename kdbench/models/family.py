"""What a ``kdbench.models`` entry point names: a factory, or a family of named architectures.

A model plugin registers, in its pyproject.toml::

    [project.entry-points."kdbench.models"]
    mynet = "mypkg.nets:mynet"          # a factory: mynet(num_classes, in_channels) -> nn.Module
    mynets = "mypkg.nets:FAMILY"        # a ModelFamily: every name "mynets..." it accepts

A factory builds one architecture, the entry point's name. A family names many by a pattern
(``wrn_<depth>_<k>``, ``torchvision.<model>``): a name that no entry point registers exactly is
offered to the family whose entry-point name is its longest prefix, and to no other, so only
that family's module is imported. Either way the module returned maps images to logits and
declares ``feature_points()`` (kdbench/roles.py), which ``python -m kdbench.testing --model
NAME`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

ModelFactory = Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> model


@dataclass(frozen=True)
class Parsed:
    """A name a family accepts: its sub-family (what ``architecture_family`` returns) and the
    factory that builds it."""

    family: str
    build: ModelFactory


@dataclass(frozen=True)
class ModelFamily:
    """Architectures named by a pattern. ``parse(name)`` returns a ``Parsed`` or, for a name
    the family does not accept, a one-phrase reason (shown in the user's error line)."""

    pattern: str  # how its names look, for messages: "wrn_<depth>_<k>"
    parse: Callable[[str], "Parsed | str"]
