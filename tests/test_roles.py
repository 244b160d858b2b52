"""Feature roles: each family's tap points against the role's definition, and the taps.

Every family's roles (kdbench/method.py) are checked against a computation written here from
the family's definition (its module docstring and forward), with functional BN/ReLU, not
through the hooks: on a model whose BatchNorms have random affine parameters and running
statistics (at initialisation BN is nearly the identity in eval mode, and bn(x) ≈ x would
hide a tap on the wrong side of it). The manual forward also has to reproduce the logits, so it
is the model's own forward. Tiny inputs, smallest architectures: a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, ROLES, STAGES, Features
from kdbench.models import FAMILY_EXAMPLES, KNOWN_ARCHITECTURES, build_model
from kdbench.roles import TapPoint, check_points, feature_points
from kdbench.taps import FeatureTaps
from kdbench.train import shapes_of


def randomise_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.empty(size).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.empty(size).uniform_(0.5, 2.0, generator=generator))
    return model.eval()


def bn(module: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """Eval-mode batch norm written out with the module's parameters."""
    return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias,
                        training=False, eps=module.eps)


def wrn_roles(model, x: Tensor) -> tuple[dict[str, list[Tensor]], Tensor]:
    """WideResNet.forward: conv1, block1..3, then relu(bn1(·)), pool, fc. Stage k's output is
    activated by the next stage's first block (PreActBlock: relu1(bn1(x))) or by bn1/relu."""
    s1 = model.block1(model.conv1(x))
    s2 = model.block2(s1)
    s3 = model.block3(s2)
    norms = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    preact = [bn(norm, s) for norm, s in zip(norms, (s1, s2, s3))]
    postact = [F.relu(p) for p in preact]
    embedding = postact[-1].mean(dim=(2, 3))
    return ({STAGES: [s1, s2, s3], PREACT_STAGES: preact, POSTACT_STAGES: postact,
             EMBEDDING: [embedding]}, model.fc(embedding))


def resnet_roles(model, x: Tensor) -> tuple[dict[str, list[Tensor]], Tensor]:
    """CifarResNet.forward, its last block of each stage written out: relu(bn2(conv2(relu(bn1(
    conv1(h))))) + shortcut(h))."""
    h = F.relu(bn(model.bn1, model.conv1(x)))
    stages, preact = [], []
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in list(layer)[:-1]:
            h = block(h)
        last = layer[-1]
        shortcut = h if last.downsample is None else bn(last.downsample[1], last.downsample[0](h))
        residual = bn(last.bn2, last.conv2(F.relu(bn(last.bn1, last.conv1(h)))))
        preact.append(residual + shortcut)
        h = F.relu(preact[-1])
        stages.append(h)
    embedding = h.mean(dim=(2, 3))
    return ({STAGES: stages, PREACT_STAGES: preact, POSTACT_STAGES: stages,
             EMBEDDING: [embedding]}, model.fc(embedding))


def vgg_roles(model, x: Tensor) -> tuple[dict[str, list[Tensor]], Tensor]:
    """VGG.forward at 32 px: group g = its convs and BNs; ReLU after it; max pools after groups
    0, 1, 2 (not 3 below 64 px)."""
    h = F.max_pool2d(F.relu(model.block0(x)), 2)
    stages, preact = [], []
    for group in (1, 2, 3, 4):
        preact.append(getattr(model, f"block{group}")(h))
        stages.append(F.relu(preact[-1]))
        h = F.max_pool2d(stages[-1], 2) if group in (1, 2) else stages[-1]
    embedding = h.mean(dim=(2, 3))
    return ({STAGES: stages, PREACT_STAGES: preact, POSTACT_STAGES: stages,
             EMBEDDING: [embedding]}, model.classifier(embedding))


DEFINITIONS = {"wrn": wrn_roles, "resnet": resnet_roles, "resnet_x4": resnet_roles, "vgg": vgg_roles}

# "The BN before the ReLU" of each pre-activation stage: RepDistiller's get_bn_before_relu
# (models/wrn.py, resnet.py, vgg.py), as our module names.
BN_BEFORE_RELU = {
    "wrn_16_1": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
    "resnet8": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    "resnet20": ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"],
    "resnet8x4": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    "vgg8": ["block1.1", "block2.1", "block3.1", "block4.1"],
    "vgg13": ["block1.4", "block2.4", "block3.4", "block4.4"],
}


def collect(model: nn.Module, roles, x: Tensor) -> tuple[Features, Tensor]:
    taps = FeatureTaps(model, roles)
    try:
        logits = model(x)
        return taps.pop(logits), logits
    finally:
        taps.remove()


def as_lists(features: Features) -> dict[str, list[Tensor]]:
    return {STAGES: features.stages, PREACT_STAGES: features.preact_stages,
            POSTACT_STAGES: features.postact_stages,
            EMBEDDING: [features.embedding] if features.embedding is not None else []}


@pytest.mark.parametrize("family", list(DEFINITIONS))
def test_each_role_is_its_definition(family: str) -> None:
    torch.manual_seed(0)
    model = randomise_batch_norms(build_model(FAMILY_EXAMPLES[family], num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, expected_logits = DEFINITIONS[family](model, x)
        features, logits = collect(model, ROLES, x)
    torch.testing.assert_close(logits, expected_logits)  # the definition is the model's forward
    tapped = as_lists(features)
    for role in ROLES:
        assert len(tapped[role]) == len(expected[role]), role
        for got, want in zip(tapped[role], expected[role]):
            torch.testing.assert_close(got, want, msg=lambda m: f"{family} {role}: {m}")
    # The roles are told apart where the family's definition tells them apart.
    assert all(p.amin() < 0 for p in features.preact_stages)  # before the ReLU
    assert all(p.amin() >= 0 for p in features.postact_stages)
    if family == "wrn":  # pre-activation: the stage output is neither
        assert not any(torch.allclose(a, b) for a, b in zip(features.stages, features.postact_stages))
        assert any(s.amin() < 0 for s in features.stages)
    else:
        assert all(torch.equal(a, b) for a, b in zip(features.stages, features.postact_stages))


@pytest.mark.parametrize("name", list(BN_BEFORE_RELU))
def test_preact_norms_are_the_bn_before_the_relu(name: str) -> None:
    model = randomise_batch_norms(build_model(name, num_classes=5), seed=1)
    with torch.no_grad():
        features, _ = collect(model, {PREACT_STAGES}, torch.randn(2, 3, 32, 32))
    shapes = shapes_of(features, model)
    assert len(shapes.preact_norms) == len(BN_BEFORE_RELU[name])
    for norm, module_name in zip(shapes.preact_norms, BN_BEFORE_RELU[name]):
        module = model.get_submodule(module_name)
        assert isinstance(module, nn.BatchNorm2d)
        assert norm == (tuple(module.weight.tolist()), tuple(module.bias.tolist()))
    if name.startswith(("wrn", "vgg")):  # there the BN's output *is* the pre-activation stage
        outputs: list[Tensor] = []
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: outputs.append(o))
                 for n in BN_BEFORE_RELU[name]]
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            features, _ = collect(model, {PREACT_STAGES}, x)
        for hook in hooks:
            hook.remove()
        for output, preact in zip(outputs, features.preact_stages, strict=True):
            assert torch.equal(output, preact)


def test_every_known_architecture_maps_every_role() -> None:
    for name in KNOWN_ARCHITECTURES:
        model = build_model(name, num_classes=10)
        points = feature_points(model)
        assert set(points) == ROLES, name
        check_points(model, points)
        count = len(model.stage_names)
        assert [len(points[role]) for role in (STAGES, PREACT_STAGES, POSTACT_STAGES)] == [count] * 3
        assert len(points[EMBEDDING]) == 1
        # Every pre-activation names its BN, except on the ShuffleNets, where RepDistiller names
        # none (their get_bn_before_relu raises; tests/test_models.py checks their maps).
        named = [point.norm is not None for point in points[PREACT_STAGES]]
        assert named == [not name.startswith("shufflenet")] * count, name


@pytest.mark.parametrize("name", FAMILY_EXAMPLES.values())
def test_role_shapes_and_nothing_overwritten(name: str) -> None:
    """Every tapped tensor keeps its value through the rest of the forward and the backward
    (the zoo has no in-place op), and each pre/post-activation stage has its stage's shape."""
    model = build_model(name, num_classes=10)
    taps = FeatureTaps(model, ROLES)
    logits = model(torch.randn(2, 3, 32, 32))
    features = taps.pop(logits)
    taps.remove()
    tensors = [t for role in as_lists(features).values() for t in role]
    snapshots = [t.detach().clone() for t in tensors]
    # Use all of them so that their graphs are part of the backward.
    (logits.sum() + sum(t.mean() for t in tensors)).backward()
    assert all(torch.equal(t, s) for t, s in zip(tensors, snapshots))
    shapes = shapes_of(features, model)
    assert shapes.preact_stages == shapes.stages == shapes.postact_stages


def test_hooks_only_for_the_requested_roles() -> None:
    model = build_model("wrn_16_1", num_classes=10)
    taps = FeatureTaps(model, {POSTACT_STAGES})
    assert len(taps._handles) == 3
    features = taps.pop(model(torch.randn(2, 3, 16, 16)))
    assert features.stages == [] and features.preact_stages == [] and features.embedding is None
    assert len(features.postact_stages) == 3
    assert taps.pop(features.logits).postact_stages == []  # popped: cleared
    taps.remove()
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    shapes = shapes_of(features, model)
    assert shapes.stages == () and shapes.preact_stages == () and shapes.preact_norms == ()


# --- model plugins: in-place modules, roles by stage_names only, broken maps ------------------


class InPlaceNet(nn.Module):
    """A plugin-style model whose BN is followed by an in-place ReLU (torchvision's style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    def feature_points(self) -> dict[str, tuple[TapPoint, ...]]:
        return {STAGES: (TapPoint("relu"),), PREACT_STAGES: (TapPoint("bn", norm="bn"),),
                POSTACT_STAGES: (TapPoint("relu", "input"),), EMBEDDING: (TapPoint("fc", "input"),)}


def test_tensors_an_in_place_op_overwrites_are_cloned() -> None:
    torch.manual_seed(0)
    model = InPlaceNet()
    x = torch.randn(2, 3, 8, 8)
    taps = FeatureTaps(model, ROLES)
    assert taps.clones
    features = taps.pop(model(x))
    bn_output = model.bn(model.conv(x))
    torch.testing.assert_close(features.preact_stages[0], bn_output)  # not relu'd in place
    torch.testing.assert_close(features.postact_stages[0], bn_output)  # the ReLU's input, kept
    torch.testing.assert_close(features.stages[0], F.relu(bn_output))
    assert features.preact_stages[0].amin() < 0
    (grad,) = torch.autograd.grad(features.preact_stages[0].sum(), model.bn.bias)
    torch.testing.assert_close(grad, torch.full((4,), 2 * 8 * 8.0))  # d/dβ of Σ bn(x): B·H·W
    assert not FeatureTaps(build_model("resnet8", 10), ROLES).clones  # the zoo needs no copies


class StageNamesOnly(nn.Module):
    """A model plugin that predates roles: it names stage_names and classifier_name only."""

    stage_names = ("conv",)
    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_a_model_with_stage_names_only_serves_stages_and_embedding() -> None:
    model = StageNamesOnly()
    x = torch.randn(2, 3, 8, 8)
    features, _ = collect(model, {STAGES, EMBEDDING}, x)
    torch.testing.assert_close(features.stages[0], model.conv(x))
    torch.testing.assert_close(features.embedding, model.conv(x).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match=r"StageNamesOnly maps no tap points for the roles \['preact_stages'\]"):
        FeatureTaps(model, {PREACT_STAGES})


def test_a_broken_map_fails_when_the_taps_are_installed() -> None:
    model = InPlaceNet()
    with pytest.raises(ValueError, match="no module 'nowhere'"):
        check_points(model, {STAGES: (TapPoint("nowhere"),)})
    with pytest.raises(ValueError, match="norm 'conv' is not a BatchNorm"):
        check_points(model, {PREACT_STAGES: (TapPoint("bn", norm="conv"),)})
    with pytest.raises(ValueError, match="read must be one of"):
        TapPoint("bn", "inputs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown feature roles"):
        FeatureTaps(model, {"stage"})
