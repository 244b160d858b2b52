"""timm's networks, an optional extra (``pip install 'kdbench[timm]'``): the ``kdbench.models``
family ``timm``, names ``timm.<model>`` for any ``timm.list_models()`` name
(``timm.resnet18``, ``timm.mobilenetv2_100``, ``timm.convnext_atto`` ...).

The network is timm's own (``timm.create_model(model, pretrained=False, num_classes=...,
in_chans=...)``), its class and parameter names untouched, so a timm state_dict loads into it
(``--teacher-checkpoint``). Its role map comes from timm's own ``feature_info`` (timm's
description of each network's feature stages, the idea kdbench's roles follow):
- ``stages`` and ``postact_stages``: the modules of ``feature_info`` below the stem (reduction
  of at least 4: a stem at stride 2 is no stage, as in kdbench's own networks), their outputs
  as timm's ``features_only`` returns them (after the stage's activation, where it has one);
- ``embedding``: the input of the classifier that timm's ``pretrained_cfg["classifier"]`` names
  (the pooled vector);
- ``preact_stages``: not mapped. ``feature_info`` names no pre-activation tensor nor the BN
  before a ReLU, and guessing one per architecture would be no longer timm's map: a method that
  needs them (OFD, AB, ReviewKD's teacher) is refused before training, naming the role.
Every ``inplace`` flag is cleared (forward hooks keep references to tapped tensors).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, STAGES
from kdbench.models.family import ModelFamily, Parsed
from kdbench.roles import TapPoint

PREFIX = "timm."
INSTALL = "pip install 'kdbench[timm]'"


def role_map(model: nn.Module) -> dict[str, tuple[TapPoint, ...]]:
    stages = tuple(TapPoint(info["module"]) for info in model.feature_info if info["reduction"] >= 4)
    points: dict[str, tuple[TapPoint, ...]] = {STAGES: stages, POSTACT_STAGES: stages}
    classifier = model.pretrained_cfg.get("classifier")
    if isinstance(classifier, str):
        points[EMBEDDING] = (TapPoint(classifier, "input"),)
    return points


def build(model_name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                              in_chans=in_channels)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    points = role_map(model)
    # An attribute, not a subclass or a wrapper: the module stays timm's own class with timm's
    # parameter names (roles.feature_points calls it like a method).
    model.feature_points = partial(dict, points)
    return model


def _parse(name: str) -> Parsed | str:
    model = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    if not model:
        return "a timm network is named timm.<model>, e.g. timm.resnet18"
    try:
        import timm
    except ImportError:
        return f"timm networks need the timm package ({INSTALL})"
    if not timm.is_model(model):
        return f"timm {timm.__version__} has no model {model!r} (timm.list_models() names them)"
    return Parsed(f"timm.{model}", partial(build, model))


FAMILY = ModelFamily("timm.<model>", _parse)
