"""The model zoo: sizes against the published ones, shapes, stage taps, naming errors.

Fast by design (batches of 2, the smallest architecture of each family where the size does not
matter): the whole file runs in a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import UserError
from kdbench.models import (
    FAMILY_EXAMPLES,
    FAMILY_EXAMPLES_EXCLUDED,
    KNOWN_ARCHITECTURES,
    UnknownArchitecture,
    architecture_family,
    build_model,
    is_architecture,
)
from kdbench.method import POSTACT_STAGES, PREACT_STAGES, ROLES, STAGES
from kdbench.models.vgg import CONFIGS as VGG_CONFIGS
from kdbench.roles import feature_points
from kdbench.taps import FeatureTaps
from kdbench.train import shapes_of

# One architecture of every family: FAMILY_EXAMPLES, and the family too slow for the method
# contract (resnet50), which the model tests still cover.
EVERY_FAMILY = [*FAMILY_EXAMPLES.values(), *FAMILY_EXAMPLES_EXCLUDED]
FOUR_STAGE_FAMILIES = {"vgg", "mobilenetv2", "resnet50"}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, size: int = 32, in_channels: int = 3) -> int:
    """2 × multiply-accumulates of every conv and linear layer for one image.

    The spec's "forward FLOPs" (specs/methods.md) are twice the MACs: wrn_40_2 has 0.328 G MACs
    and the spec says 0.655 G.
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            per_output = module.in_channels // module.groups * kernel
            macs += output[0].numel() * per_output
        else:
            macs += module.in_features * module.out_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [layer.register_forward_hook(count) for layer in layers]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_channels, size, size))
    for handle in handles:
        handle.remove()
    return 2 * macs


# --- closed-form parameter counts, derived from the definitions (not from the code) ----------


def wrn_parameters(depth: int, k: int, classes: int, in_channels: int = 3) -> int:
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    total = 9 * in_channels * 16  # stem conv, no bias
    for a, b in zip(widths[:-1], widths[1:]):
        # first block: BN(a), conv a→b, BN(b), conv b→b, 1×1 projection if the width changes
        total += 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)
        total += (n - 1) * (2 * b + 9 * b * b + 2 * b + 9 * b * b)
    return total + 2 * widths[3] + widths[3] * classes + classes  # final BN, fc


def resnet_parameters(
    depth: int, widths: tuple[int, ...], classes: int, in_channels: int = 3
) -> int:
    n = (depth - 2) // 6
    total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv + BN
    for stage, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        projection = a != b or stage > 0  # stages 2 and 3 have stride 2
        total += 9 * a * b + 2 * b + 9 * b * b + 2 * b + ((a * b + 2 * b) if projection else 0)
        total += (n - 1) * (2 * (9 * b * b + 2 * b))
    return total + widths[3] * classes + classes


def vgg_parameters(depth: int, classes: int, in_channels: int = 3) -> int:
    total, a = 0, in_channels
    for group in VGG_CONFIGS[depth]:
        for b in group:
            total += 9 * a * b + b + 2 * b  # conv with bias, BN
            a = b
    return total + 512 * classes + classes


# (name, published parameters in millions for 100 classes, closed-form count)
PUBLISHED_SIZES = [
    # specs/methods.md (RepDistiller's architectures)
    ("wrn_40_2", 2.25, wrn_parameters(40, 2, 100)),
    ("wrn_16_2", 0.70, wrn_parameters(16, 2, 100)),
    ("resnet32x4", 7.43, resnet_parameters(32, (32, 64, 128, 256), 100)),
    ("resnet8x4", 1.23, resnet_parameters(8, (32, 64, 128, 256), 100)),
    # the commonly quoted sizes of RepDistiller's resnet56 and of its vgg13 / vgg8 (with BN)
    ("resnet56", 0.86, resnet_parameters(56, (16, 16, 32, 64), 100)),
    ("vgg13", 9.46, vgg_parameters(13, 100)),
    ("vgg8", 3.96, vgg_parameters(8, 100)),
]


@pytest.mark.parametrize(("name", "published_millions", "closed_form"), PUBLISHED_SIZES)
def test_parameter_count_matches_published(
    name: str, published_millions: float, closed_form: int
) -> None:
    count = num_parameters(build_model(name, num_classes=100))
    assert count == closed_form
    # The published figures truncate to two decimals: wrn_40_2 has 2,255,156 parameters, quoted
    # as 2.25 M (rounding would give 2.26), and vgg8 has 3,965,028, quoted as 3.96 M.
    assert int(count / 1e4) / 100 == pytest.approx(published_millions)


def test_parameter_count_follows_channels_and_classes() -> None:
    assert num_parameters(build_model("wrn_16_1", 10, in_channels=1)) == wrn_parameters(
        16, 1, 10, 1
    )
    assert num_parameters(build_model("resnet20", 7, in_channels=1)) == resnet_parameters(
        20, (16, 16, 32, 64), 7, 1
    )
    assert num_parameters(build_model("vgg11", 3, in_channels=1)) == vgg_parameters(11, 3, 1)


@pytest.mark.parametrize(
    ("name", "spec_gflops"),
    # specs/methods.md, forward FLOPs at 32×32 with 100 classes
    [("wrn_40_2", 0.655), ("wrn_16_2", 0.202), ("resnet32x4", 2.166), ("resnet8x4", 0.354)],
)
def test_flops_match_spec(name: str, spec_gflops: float) -> None:
    flops = forward_flops(build_model(name, num_classes=100))
    assert flops / 1e9 == pytest.approx(spec_gflops, rel=0.03)


@pytest.mark.parametrize(
    ("name", "in_channels", "size"),
    [(name, in_channels, size)
     for name in FAMILY_EXAMPLES.values() for in_channels in (1, 3) for size in (28, 32)]
    + [("resnet50", 1, 16)],  # 23.7 M parameters: one case (3 channels at 32 px run below)
)
def test_output_is_logits(name: str, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels)
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


# resnet50's gradients are checked against RepDistiller's forward below.
@pytest.mark.parametrize("name", FAMILY_EXAMPLES.values())
def test_backward_reaches_every_parameter(name: str) -> None:
    model = build_model(name, num_classes=5)
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()  # 16 px: the smallest we support
    assert all(p.grad is not None for p in model.parameters())


def tap(model: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """Run `model` on `x` and return the outputs of the named modules, as hooks see them."""
    modules = dict(model.named_modules())
    outputs: list[torch.Tensor] = []
    handles = [
        modules[n].register_forward_hook(lambda m, i, o: outputs.append(o)) for n in names
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return outputs


STAGE_SHAPES = [
    ("wrn_16_2", 32, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    ("wrn_16_1", 28, [(16, 28, 28), (32, 14, 14), (64, 7, 7)]),
    ("resnet8", 32, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("resnet8x4", 32, [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
    ("resnet8", 28, [(16, 28, 28), (32, 14, 14), (64, 7, 7)]),
    # VGG: groups 1-4; no pool between groups 3 and 4 below 64 px (RepDistiller)
    ("vgg8", 32, [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
    ("vgg8", 28, [(128, 14, 14), (256, 7, 7), (512, 3, 3), (512, 3, 3)]),
    ("vgg8", 64, [(128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]),
    # RepDistiller's cross-family networks: its f1..f4 / f1..f3 at 32 px, and at 28 px
    ("mobilenetv2", 32, [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)]),
    ("mobilenetv2", 28, [(12, 14, 14), (16, 7, 7), (48, 4, 4), (160, 2, 2)]),
    ("shufflenet_v1", 32, [(240, 16, 16), (480, 8, 8), (960, 4, 4)]),
    ("shufflenet_v1", 28, [(240, 14, 14), (480, 7, 7), (960, 4, 4)]),
    ("shufflenet_v2", 32, [(116, 16, 16), (232, 8, 8), (464, 4, 4)]),
    ("resnet50", 32, [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]),
]


@pytest.mark.parametrize(("name", "size", "shapes"), STAGE_SHAPES)
def test_stage_outputs_have_expected_shapes(
    name: str, size: int, shapes: list[tuple[int, ...]]
) -> None:
    model = build_model(name, num_classes=10)
    modules = dict(model.named_modules())
    assert all(stage in modules for stage in model.stage_names)
    assert isinstance(modules[model.classifier_name], nn.Linear)
    features = tap(model, model.stage_names, torch.randn(2, 3, size, size))
    assert [tuple(f.shape[1:]) for f in features] == shapes


def test_every_known_architecture_names_its_taps() -> None:
    for name in KNOWN_ARCHITECTURES:
        model = build_model(name, num_classes=10)
        modules = dict(model.named_modules())
        expected_stages = 4 if architecture_family(name) in FOUR_STAGE_FAMILIES else 3
        assert len(model.stage_names) == expected_stages, name
        assert all(stage in modules for stage in model.stage_names), name
        assert isinstance(modules[model.classifier_name], nn.Linear), name


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_classifier_input_is_pooled_last_feature(name: str) -> None:
    model = build_model(name, num_classes=10).eval()
    embeddings: list[torch.Tensor] = []
    classifier = model.get_submodule(model.classifier_name)
    handle = classifier.register_forward_hook(lambda m, i, o: embeddings.append(i[0]))
    with torch.no_grad():
        (last,) = tap(model, model.stage_names[-1:], torch.randn(2, 3, 32, 32))
    handle.remove()
    if architecture_family(name) == "wrn":
        # pre-activation: the embedding pools relu(bn(last stage output)), not the output itself
        with torch.no_grad():
            last = model.relu(model.bn1(last))
    elif name == "mobilenetv2":  # a 1×1 conv to 1280 channels follows the last stage
        with torch.no_grad():
            last = model.conv2(last)
    elif name == "shufflenet_v2":  # a 1×1 conv to 1024 channels follows the last stage
        with torch.no_grad():
            last = model.relu2(model.bn2(model.conv2(last)))
    assert embeddings[0].shape == (2, last.shape[1])
    torch.testing.assert_close(embeddings[0], last.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_no_in_place_operations(name: str) -> None:
    """Hooks keep references to stage outputs and the embedding: nothing may overwrite them."""
    model = build_model(name, num_classes=10)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    modules = dict(model.named_modules())
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kept.append((output, output.detach().clone()))

    def keep_input(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        kept.append((inputs[0], inputs[0].detach().clone()))

    handles = [modules[n].register_forward_hook(keep) for n in model.stage_names]
    handles.append(modules[model.classifier_name].register_forward_hook(keep_input))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for handle in handles:
        handle.remove()
    assert len(kept) == len(model.stage_names) + 1
    for reference, snapshot in kept:
        assert torch.equal(reference, snapshot)


def test_initialisation_follows_repdistiller() -> None:
    torch.manual_seed(0)
    for name in ("wrn_16_1", "resnet8", "vgg8"):
        model = build_model(name, num_classes=10)
        conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1), name
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    for name in ("wrn_16_1", "vgg8"):  # RepDistiller's ResNet keeps PyTorch's default linear bias
        model = build_model(name, num_classes=10)
        assert torch.equal(model.get_submodule(model.classifier_name).bias, torch.zeros(10))


@pytest.mark.parametrize(
    ("name", "keys"),
    [  # RepDistiller's parameter names, so its published teacher checkpoints load unchanged
        ("wrn_16_2", ["conv1.weight", "block1.layer.0.convShortcut.weight",
                      "block3.layer.1.bn2.weight", "bn1.weight", "fc.bias"]),
        ("resnet8x4", ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                       "layer3.0.downsample.1.weight", "fc.weight"]),
        ("vgg13", ["block0.0.weight", "block0.1.weight", "block0.3.bias",
                   "block4.4.running_var", "classifier.weight"]),
    ],
)  # fmt: skip
def test_parameter_names_match_repdistiller(name: str, keys: list[str]) -> None:
    state = build_model(name, num_classes=100).state_dict()
    assert set(keys) <= set(state)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("wrn_40_2", "wrn"),
        ("wrn_10_3", "wrn"),
        ("resnet56", "resnet"),
        ("resnet1202", "resnet"),
        ("resnet32x4", "resnet_x4"),
        ("resnet20x4", "resnet_x4"),
        ("vgg13", "vgg"),
        ("mobilenetv2", "mobilenetv2"),
        ("shufflenet_v1", "shufflenet_v1"),
        ("shufflenet_v2", "shufflenet_v2"),
        ("resnet50", "resnet50"),  # RepDistiller's bottleneck ResNet50, not a 6n+2 CIFAR ResNet
        ("resnet44", "resnet"),
        ("resnet50x4", "resnet_x4"),
    ],
)
def test_family(name: str, family: str) -> None:
    assert is_architecture(name)
    assert architecture_family(name) == family


def test_family_examples_cover_every_family() -> None:
    families = {architecture_family(n) for n in KNOWN_ARCHITECTURES}
    assert families == set(FAMILY_EXAMPLES) | set(FAMILY_EXAMPLES_EXCLUDED)
    assert not set(FAMILY_EXAMPLES) & set(FAMILY_EXAMPLES_EXCLUDED)
    for family, name in FAMILY_EXAMPLES.items():
        assert architecture_family(name) == family



@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("wrn_41_2", "wrn_40_2"),  # depth not 6n+4
        ("wrn_40_0", "wrn_40_1"),  # widen factor 0
        ("WRN_40_2", "wrn_40_2"),  # names are lower case
        ("resnet33", "resnet32"),  # depth not 6n+2
        ("resnet032", "resnet32"),  # leading zero: not canonical
        ("resnt56", "resnet56"),  # typo
        ("resnet32x2", "resnet32x4"),
        ("vgg12", "vgg13"),
        ("vgg13_bn", "vgg13"),  # BN is implied
        ("MobileNetV2", "mobilenetv2"),  # RepDistiller's model_dict spellings
        ("ShuffleV1", "shufflenet_v1"),
        ("ShuffleV2", "shufflenet_v2"),
        ("ResNet50", "resnet50"),
        ("shufflenet_v3", "shufflenet_v"),
    ],
)
def test_unknown_name_suggests_nearest(name: str, suggestion: str) -> None:
    assert not is_architecture(name)
    with pytest.raises(UnknownArchitecture, match=suggestion) as error:
        build_model(name, num_classes=10)
    assert isinstance(error.value, UserError)
    assert "\n" not in str(error.value)
    with pytest.raises(UnknownArchitecture):
        architecture_family(name)


def test_unrelated_name_lists_known_architectures() -> None:
    with pytest.raises(UnknownArchitecture, match="resnet8x4"):
        build_model("transformer", num_classes=10)


# --- RepDistiller's cross-family networks: MobileNetV2, ShuffleV1, ShuffleV2, ResNet50 ----------
#
# RepDistiller cannot be imported here, so its four networks are rebuilt below from reading its
# models/mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py and resnetv2.py: first as the list of
# parametrised layers its constructors create (name → shape: its state_dict's parameters), which
# gives the parameter counts and the MACs at 32 px; then as its forward passes, transcribed
# into functions that use the weights of our modules, which gives its features and logits.


class RebuiltStateDict:
    """Parameter names and shapes of a network's layers, and its MACs for one 32-px image."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.batch_norms: list[str] = []
        self.macs = 0

    def conv(self, name: str, cin: int, cout: int, kernel: int, side: int, groups: int = 1) -> None:
        """A bias-free conv (all four networks' convs are) whose output is side × side."""
        self.shapes[f"{name}.weight"] = (cout, cin // groups, kernel, kernel)
        self.macs += cout * (cin // groups) * kernel * kernel * side * side

    def bn(self, name: str, channels: int) -> None:
        self.shapes[f"{name}.weight"] = self.shapes[f"{name}.bias"] = (channels,)
        self.batch_norms.append(name)

    def linear(self, name: str, cin: int, cout: int) -> None:
        self.shapes[f"{name}.weight"] = (cout, cin)
        self.shapes[f"{name}.bias"] = (cout,)
        self.macs += cin * cout

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def repdistiller_mobilenetv2(classes: int) -> RebuiltStateDict:
    """mobile_half = mobilenetv2_T_w(T=6, W=0.5): MobileNetV2(T=6, feature_dim, width_mult=0.5)."""
    net = RebuiltStateDict()
    channels, side = int(32 * 0.5), 16  # conv_bn(3, 16, stride 2): Sequential conv, BN, ReLU
    net.conv("conv1.0", 3, channels, 3, side)
    net.bn("conv1.1", channels)
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
               [6, 160, 3, 2], [6, 320, 1, 1]]  # its interverted_residual_setting with T = 6
    for group, (t, c, n, s) in enumerate(setting):
        out = int(c * 0.5)
        for block, stride in enumerate([s] + [1] * (n - 1)):
            hidden, side, name = channels * t, side // stride, f"blocks.{group}.{block}.conv"
            # InvertedResidual.conv: pw conv (0), BN (1), ReLU, dw conv (3), BN (4), ReLU,
            # pw-linear conv (6), BN (7)
            net.conv(f"{name}.0", channels, hidden, 1, side * stride)
            net.bn(f"{name}.1", hidden)
            net.conv(f"{name}.3", hidden, hidden, 3, side, groups=hidden)
            net.bn(f"{name}.4", hidden)
            net.conv(f"{name}.6", hidden, out, 1, side)
            net.bn(f"{name}.7", out)
            channels = out
    net.conv("conv2.0", channels, 1280, 1, side)  # last_channel = 1280 since width_mult <= 1
    net.bn("conv2.1", 1280)
    net.linear("classifier.0", 1280, classes)
    return net


def repdistiller_shufflev1(classes: int) -> RebuiltStateDict:
    """ShuffleV1: cfg out_planes [240, 480, 960], num_blocks [4, 8, 4], groups 3."""
    net = RebuiltStateDict()
    net.conv("conv1", 3, 24, 1, 32)
    net.bn("bn1", 24)
    in_planes, side = 24, 32
    for layer, (planes, blocks) in enumerate(zip([240, 480, 960], [4, 8, 4]), start=1):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            out = planes - (in_planes if i == 0 else 0)  # _make_layer: out_planes - cat_planes
            mid, g = int(out / 4), 1 if in_planes == 24 else 3
            name, side = f"layer{layer}.{i}", side // stride
            net.conv(f"{name}.conv1", in_planes, mid, 1, side * stride, groups=g)
            net.bn(f"{name}.bn1", mid)
            net.conv(f"{name}.conv2", mid, mid, 3, side, groups=mid)
            net.bn(f"{name}.bn2", mid)
            net.conv(f"{name}.conv3", mid, out, 1, side, groups=3)
            net.bn(f"{name}.bn3", out)
            in_planes = planes
    net.linear("linear", 960, classes)
    return net


def repdistiller_shufflev2(classes: int) -> RebuiltStateDict:
    """ShuffleV2 = ShuffleNetV2(net_size=1): channels (116, 232, 464, 1024), blocks (3, 7, 3)."""
    net = RebuiltStateDict()
    net.conv("conv1", 3, 24, 1, 32)
    net.bn("bn1", 24)
    in_channels, side = 24, 32
    for layer, (out, blocks) in enumerate(zip([116, 232, 464], [3, 7, 3]), start=1):
        mid, name, side = out // 2, f"layer{layer}.0", side // 2  # DownBlock(in, out)
        net.conv(f"{name}.conv1", in_channels, in_channels, 3, side, groups=in_channels)
        net.bn(f"{name}.bn1", in_channels)
        net.conv(f"{name}.conv2", in_channels, mid, 1, side)
        net.bn(f"{name}.bn2", mid)
        net.conv(f"{name}.conv3", in_channels, mid, 1, side * 2)
        net.bn(f"{name}.bn3", mid)
        net.conv(f"{name}.conv4", mid, mid, 3, side, groups=mid)
        net.bn(f"{name}.bn4", mid)
        net.conv(f"{name}.conv5", mid, mid, 1, side)
        net.bn(f"{name}.bn5", mid)
        for i in range(1, blocks + 1):  # BasicBlock(out): convs on int(out * 0.5) channels
            half, name = int(out * 0.5), f"layer{layer}.{i}"
            net.conv(f"{name}.conv1", half, half, 1, side)
            net.bn(f"{name}.bn1", half)
            net.conv(f"{name}.conv2", half, half, 3, side, groups=half)
            net.bn(f"{name}.bn2", half)
            net.conv(f"{name}.conv3", half, half, 1, side)
            net.bn(f"{name}.bn3", half)
        in_channels = out
    net.conv("conv2", 464, 1024, 1, side)
    net.bn("bn2", 1024)
    net.linear("linear", 1024, classes)
    return net


def repdistiller_resnet50(classes: int) -> RebuiltStateDict:
    """ResNet50 = ResNet(Bottleneck, [3, 4, 6, 3]), expansion 4, 3×3 stride-1 stem of 64."""
    net = RebuiltStateDict()
    net.conv("conv1", 3, 64, 3, 32)
    net.bn("bn1", 64)
    in_planes, side = 64, 32
    for layer, (planes, blocks, stride) in enumerate(
        zip([64, 128, 256, 512], [3, 4, 6, 3], [1, 2, 2, 2]), start=1
    ):
        for i, block_stride in enumerate([stride] + [1] * (blocks - 1)):
            name = f"layer{layer}.{i}"
            net.conv(f"{name}.conv1", in_planes, planes, 1, side)
            net.bn(f"{name}.bn1", planes)
            side //= block_stride
            net.conv(f"{name}.conv2", planes, planes, 3, side)
            net.bn(f"{name}.bn2", planes)
            net.conv(f"{name}.conv3", planes, 4 * planes, 1, side)
            net.bn(f"{name}.bn3", 4 * planes)
            if block_stride != 1 or in_planes != 4 * planes:
                net.conv(f"{name}.shortcut.0", in_planes, 4 * planes, 1, side)
                net.bn(f"{name}.shortcut.1", 4 * planes)
            in_planes = 4 * planes
    net.linear("linear", 2048, classes)
    return net


# (kdbench name, rebuilt RepDistiller network for 100 classes, its parameter count). Each count
# is the sum of the layers above, by part:
# - MobileNetV2: stem 464, groups 608 + 4 296 + 11 688 + 50 464 + 80 928 + 207 168 + 121 760,
#   conv2 207 360, classifier 128 100;
# - ShuffleV1: stem 120, layer1 38 898 (its first unit, 24 → 216 with 54 mid and an ungrouped
#   first 1×1: 24·54 + 9·54 + 54·216/3 + 2·(54 + 54 + 216) = 6 318, then 3 × 10 860), layer2
#   297 300, layer3 516 840, linear 96 100;
# - ShuffleV2: stem 120, layer1 30 192, layer2 244 180, layer3 501 352, conv2 + bn2 477 184,
#   linear 102 500;
# - ResNet50: stem 1 856, layers 215 808 + 1 219 584 + 7 098 368 + 14 964 736, linear 204 900.
REPDISTILLER_NETWORKS = [
    ("mobilenetv2", repdistiller_mobilenetv2(100), 812_836),
    ("shufflenet_v1", repdistiller_shufflev1(100), 949_258),
    ("shufflenet_v2", repdistiller_shufflev2(100), 1_355_528),
    ("resnet50", repdistiller_resnet50(100), 23_705_252),
]


@pytest.mark.parametrize(("name", "rebuilt", "count"), REPDISTILLER_NETWORKS)
def test_parameters_and_flops_are_repdistillers(
    name: str, rebuilt: RebuiltStateDict, count: int
) -> None:
    """Same parameter names and shapes as RepDistiller's state_dict (its checkpoints load), the
    running statistics of every BN besides, RepDistiller's parameter count for 100 classes, and
    its forward FLOPs at 32 px."""
    model = build_model(name, num_classes=100)
    assert {key: tuple(p.shape) for key, p in model.named_parameters()} == rebuilt.shapes
    buffers = {f"{bn}.{stat}" for bn in rebuilt.batch_norms
               for stat in ("running_mean", "running_var", "num_batches_tracked")}
    assert {key for key, _ in model.named_buffers()} == buffers
    assert rebuilt.parameters == count
    assert num_parameters(model) == count
    assert forward_flops(model) == 2 * rebuilt.macs


# RepDistiller's forward passes (forward(x, is_feat=True) and preact=True), transcribed with its
# operations and pooling, on the weights of our modules. Each returns (f1..fk, their preact=True
# versions, the pooled vector, logits): its feature list minus f0 (the stem) and the pooled one.
RepDistillerForward = tuple[list[Tensor], list[Tensor], Tensor, Tensor]


def repdistiller_shuffle(x: Tensor, groups: int) -> Tensor:
    """Its ShuffleBlock: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]."""
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def forward_mobilenetv2(model: nn.Module, x: Tensor) -> RepDistillerForward:
    out = F.relu(model.conv1[1](model.conv1[0](x)))
    features = []
    for index, group in enumerate(model.blocks):
        for block in group:
            c = block.conv
            y = F.relu(c[1](c[0](out)))
            y = F.relu(c[4](c[3](y)))
            y = c[7](c[6](y))
            residual = c[3].stride == (1, 1) and c[0].in_channels == c[6].out_channels
            out = out + y if residual else y
        if index in (1, 2, 4, 6):  # f1..f4
            features.append(out)
    out = F.relu(model.conv2[1](model.conv2[0](out)))
    pooled = F.avg_pool2d(out, 32 // 16, ceil_mode=True).view(out.size(0), -1)  # H = 32 // 16
    # preact=True changes nothing in RepDistiller's MobileNetV2.
    return features, features, pooled, model.classifier[0](pooled)


def forward_shufflev1(model: nn.Module, x: Tensor) -> RepDistillerForward:
    out = F.relu(model.bn1(model.conv1(x)))
    features, preacts = [], []
    for layer in (model.layer1, model.layer2, model.layer3):
        for unit in layer:
            groups = 1 if unit.conv1.in_channels == 24 else 3
            stride = unit.conv2.stride[0]
            y = repdistiller_shuffle(F.relu(unit.bn1(unit.conv1(out))), groups)
            y = F.relu(unit.bn2(unit.conv2(y)))
            y = unit.bn3(unit.conv3(y))
            residual = F.avg_pool2d(out, 3, stride=2, padding=1) if stride == 2 else out
            preact = torch.cat([y, residual], 1) if stride == 2 else y + residual
            out = F.relu(preact)
        features.append(out)
        preacts.append(preact)
    pooled = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return features, preacts, pooled, model.linear(pooled)


def forward_shufflev2(model: nn.Module, x: Tensor) -> RepDistillerForward:
    out = F.relu(model.bn1(model.conv1(x)))
    features, preacts = [], []
    for layer in (model.layer1, model.layer2, model.layer3):
        down, *units = layer
        left = F.relu(down.bn2(down.conv2(down.bn1(down.conv1(out)))))
        right = F.relu(down.bn3(down.conv3(out)))
        right = F.relu(down.bn5(down.conv5(down.bn4(down.conv4(right)))))
        out = repdistiller_shuffle(torch.cat([left, right], 1), 2)
        for unit in units:
            c = int(out.size(1) * 0.5)
            x1, x2 = out[:, :c, :, :], out[:, c:, :, :]
            y = F.relu(unit.bn1(unit.conv1(x2)))
            y = unit.bn2(unit.conv2(y))
            preact = unit.bn3(unit.conv3(y))
            y = F.relu(preact)
            preact = torch.cat([x1, preact], 1)
            out = repdistiller_shuffle(torch.cat([x1, y], 1), 2)
        features.append(out)
        preacts.append(preact)
    out = F.relu(model.bn2(model.conv2(out)))
    pooled = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return features, preacts, pooled, model.linear(pooled)


def forward_resnet50(model: nn.Module, x: Tensor) -> RepDistillerForward:
    out = F.relu(model.bn1(model.conv1(x)))
    features, preacts = [], []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            y = F.relu(block.bn1(block.conv1(out)))
            y = F.relu(block.bn2(block.conv2(y)))
            y = block.bn3(block.conv3(y))
            preact = y + (block.shortcut(out) if len(block.shortcut) else out)
            out = F.relu(preact)
        features.append(out)
        preacts.append(preact)
    pooled = F.adaptive_avg_pool2d(out, (1, 1)).view(out.size(0), -1)
    return features, preacts, pooled, model.linear(pooled)


REPDISTILLER_FORWARDS = {
    "mobilenetv2": forward_mobilenetv2,
    "shufflenet_v1": forward_shufflev1,
    "shufflenet_v2": forward_shufflev2,
    "resnet50": forward_resnet50,
}


def with_random_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters away from their init, so a BN swapped, skipped or
    applied twice changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return model


# RepDistiller's get_bn_before_relu, as our module names: the BN whose statistics OFD reads
# for each pre-activation stage (None: RepDistiller's raises NotImplementedError for ShuffleNets).
REPDISTILLER_BN_BEFORE_RELU = {
    # blocks[1][-1].conv[-1], blocks[2][-1].conv[-1], blocks[4][-1].conv[-1], blocks[6][-1].conv[-1]
    "mobilenetv2": ["blocks.1.1.conv.7", "blocks.2.2.conv.7", "blocks.4.2.conv.7",
                    "blocks.6.0.conv.7"],
    "shufflenet_v1": [None, None, None],
    "shufflenet_v2": [None, None, None],
    # layer{k}[-1].bn3 for Bottleneck blocks
    "resnet50": ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"],
}


@pytest.mark.parametrize("name", list(REPDISTILLER_FORWARDS))
def test_forward_gradients_and_roles_are_repdistillers(name: str) -> None:
    """Logits, every parameter's gradient and every feature role (through our taps) equal those
    of RepDistiller's forward on the same weights (eval mode: its BN statistics, not the
    batch's): stages its f1..fk, preact_stages its preact=True f1..fk, postact_stages the
    stages (no stage output of these four is followed by an activation it does not already
    include), embedding its pooled vector; and the pre-activations' BNs are its
    get_bn_before_relu."""
    torch.manual_seed(0)
    model = with_random_batch_norms(build_model(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)  # one image is enough in eval mode
    features, preacts, pooled, logits = REPDISTILLER_FORWARDS[name](model, x)
    weights = torch.randn_like(logits)
    reference_grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    taps = FeatureTaps(model, ROLES)
    try:
        ours = model(x)
        tapped = taps.pop(ours)
    finally:
        taps.remove()
    torch.testing.assert_close(ours, logits)
    grads = torch.autograd.grad((ours * weights).sum(), list(model.parameters()))
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected)
    expected_roles = {STAGES: features, PREACT_STAGES: preacts, POSTACT_STAGES: features}
    got_roles = {STAGES: tapped.stages, PREACT_STAGES: tapped.preact_stages,
                 POSTACT_STAGES: tapped.postact_stages}
    for role, expected in expected_roles.items():
        for got, want in zip(got_roles[role], expected, strict=True):
            torch.testing.assert_close(got, want, msg=lambda m: f"{name} {role}: {m}")
    torch.testing.assert_close(tapped.embedding, pooled)
    # The roles differ where the definitions do: a pre-activation has negative entries.
    assert all(p.amin() < 0 for p in tapped.preact_stages)
    if name != "mobilenetv2":  # its stages are linear bottlenecks: all three roles coincide
        assert all(s.amin() >= 0 for s in tapped.stages)
    norms = [point.norm for point in feature_points(model)[PREACT_STAGES]]
    assert norms == REPDISTILLER_BN_BEFORE_RELU[name]
    expected_norms = tuple(
        None if norm is None else (tuple(model.get_submodule(norm).weight.tolist()),
                                   tuple(model.get_submodule(norm).bias.tolist()))
        for norm in norms
    )
    assert shapes_of(tapped, model).preact_norms == expected_norms


def test_initialisation_of_the_cross_family_networks_follows_repdistiller() -> None:
    torch.manual_seed(0)
    # MobileNetV2 and ResNet50 initialise their convs N(0, 2 / (k·k·out_channels)) and BNs to
    # 1/0; MobileNetV2 its linear layer N(0, 0.01) with bias 0, ResNet50 leaves it at PyTorch's
    # default (a bias drawn from U(±1/sqrt(fan_in)), not zero).
    for name in ("mobilenetv2", "resnet50"):
        model = build_model(name, num_classes=10)
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
            if conv.weight.numel() >= 4096:  # enough draws for a 10 % check of the spread
                fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
                std = (2 / fan_out) ** 0.5
                assert conv.weight.std().item() == pytest.approx(std, rel=0.1), name
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    linear = build_model("mobilenetv2", num_classes=10).get_submodule("classifier.0")
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(linear.bias, torch.zeros(10))
    assert build_model("resnet50", num_classes=10).linear.bias.abs().min() > 0
    # The ShuffleNets have no initialisation code: PyTorch's default, Kaiming uniform with
    # a = sqrt(5), i.e. U(±1/sqrt(fan_in)) (std 1/sqrt(3·fan_in)), which a Kaiming normal
    # init (std sqrt(2/fan_out)) would exceed several times.
    for name in ("shufflenet_v1", "shufflenet_v2"):
        model = build_model(name, num_classes=10)
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
            fan_in = conv.weight[0].numel()
            assert conv.weight.abs().max().item() <= fan_in**-0.5, name
            if conv.weight.numel() >= 4096:
                std = (3 * fan_in) ** -0.5
                assert conv.weight.std().item() == pytest.approx(std, rel=0.1), name


def roles_and_gradients(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Logits, every role's tensors and every parameter's gradient of one forward/backward."""
    taps = FeatureTaps(model, ROLES)
    try:
        logits = model(x)
        features = taps.pop(logits)
    finally:
        taps.remove()
    model.zero_grad(set_to_none=True)
    logits.square().sum().backward()
    return [logits, features.embedding, *features.stages, *features.preact_stages,
            *features.postact_stages, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("name", ["mobilenetv2", "shufflenet_v1", "shufflenet_v2"])
def test_channels_last_gives_the_same_roles_and_gradients(name: str) -> None:
    """train.py's channels_last conversion on the depthwise/grouped networks (not in the
    contract's families, whose own check is in tests/test_fast_path.py): the channel shuffle
    keeps the layout, and nothing changes but rounding. In training mode BN over 4 tiny images
    amplifies fp32 rounding past any fixed tolerance in either layout (mobilenetv2's 1×1 maps:
    contiguous fp32 gradients 22 % from fp64), so that mode is compared in fp64; running
    statistics (eval mode) in fp32."""
    torch.manual_seed(0)
    model = with_random_batch_norms(build_model(name, num_classes=5))
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    # 1×1 and depthwise weights are both layouts at once: check all of them, not one
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in converted.parameters() if p.dim() == 4)
    x = torch.randn(4, 3, 16, 16)
    x_last = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    converted.eval()
    expected, got = roles_and_gradients(model, x), roles_and_gradients(converted, x_last)
    stage_count = len(model.stage_names)
    assert any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in got[2:2 + stage_count]), "no stage output is channels_last"
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    exact = copy.deepcopy(model).double().train()
    exact_last = copy.deepcopy(exact).to(memory_format=torch.channels_last)
    expected = roles_and_gradients(exact, x.double())
    got = roles_and_gradients(exact_last, x_last.double())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, b.abs().max().item()))
