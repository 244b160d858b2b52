"""The model zoo: sizes against the published ones, shapes, stage taps, naming errors.

Fast by design (batches of 2, the smallest architecture of each family where the size does not
matter): the whole file runs in a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.errors import UserError
from kdbench.models import (
    FAMILY_EXAMPLES,
    KNOWN_ARCHITECTURES,
    UnknownArchitecture,
    architecture_family,
    build_model,
    is_architecture,
)
from kdbench.models.vgg import CONFIGS as VGG_CONFIGS


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


@pytest.mark.parametrize("name", FAMILY_EXAMPLES.values())
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_output_is_logits(name: str, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels)
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


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
        expected_stages = 4 if architecture_family(name) == "vgg" else 3
        assert len(model.stage_names) == expected_stages, name
        assert all(stage in modules for stage in model.stage_names), name
        assert isinstance(modules[model.classifier_name], nn.Linear), name


@pytest.mark.parametrize("name", FAMILY_EXAMPLES.values())
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
    assert embeddings[0].shape == (2, last.shape[1])
    torch.testing.assert_close(embeddings[0], last.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", FAMILY_EXAMPLES.values())
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
    ],
)
def test_family(name: str, family: str) -> None:
    assert is_architecture(name)
    assert architecture_family(name) == family


def test_family_examples_cover_every_family() -> None:
    assert {architecture_family(n) for n in KNOWN_ARCHITECTURES} == set(FAMILY_EXAMPLES)
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
