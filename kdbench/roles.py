"""Where each feature role lives in a model: tap points, declared once per architecture.

A model declares ``feature_points() -> dict[role, tuple[TapPoint, ...]]`` (timm's
``feature_info`` idea): for every role (kdbench.method.ROLES) the modules whose output, or
input, is that role's tensor, shallow to deep. ``kdbench.taps`` installs hooks on exactly these
points, and only for the roles a method asked for. A model that predates roles and names only
``stage_names`` and ``classifier_name`` still serves the ``stages`` and ``embedding`` roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from kdbench.method import EMBEDDING, STAGES

READS = ("output", "input")


@dataclass(frozen=True)
class TapPoint:
    """One tensor of a role: the ``read`` ("output" or "input") of the module named ``module``
    (a dotted name in ``named_modules()``).

    ``norm``, for a pre-activation stage: the dotted name of the BatchNorm the architecture
    names as "the BN before the ReLU" (RepDistiller's ``get_bn_before_relu``, which OFD, Heo et
    al. ICCV 2019, reads the teacher's statistics from), or None where there is none."""

    module: str
    read: Literal["output", "input"] = "output"
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.read not in READS:
            raise ValueError(f"TapPoint.read must be one of {READS}, got {self.read!r}")


def feature_points(model: nn.Module) -> dict[str, tuple[TapPoint, ...]]:
    """The model's role map: its ``feature_points()``, or, for a model that only names
    ``stage_names`` and ``classifier_name``, the two roles those define."""
    declared = getattr(model, "feature_points", None)
    if callable(declared):
        return dict(declared())
    points: dict[str, tuple[TapPoint, ...]] = {}
    if hasattr(model, "stage_names"):
        points[STAGES] = tuple(TapPoint(name) for name in model.stage_names)
    if hasattr(model, "classifier_name"):
        points[EMBEDDING] = (TapPoint(model.classifier_name, "input"),)
    return points


def check_points(model: nn.Module, points: dict[str, tuple[TapPoint, ...]]) -> None:
    """Raise ValueError naming the model, role and point when a point names no module, or a
    ``norm`` is not a BatchNorm: a broken map fails when the taps are installed, not mid-run."""
    modules = dict(model.named_modules())
    where = type(model).__name__
    for role, role_points in points.items():
        for point in role_points:
            if point.module not in modules:
                raise ValueError(f"{where}.feature_points()[{role!r}]: no module {point.module!r}")
            if point.norm is not None and not isinstance(
                    modules.get(point.norm), nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"{where}.feature_points()[{role!r}]: norm {point.norm!r} is not "
                                 "a BatchNorm module")
