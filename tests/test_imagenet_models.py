"""The ImageNet networks of the KD papers' ImageNet tables (issue 18): torchvision's ResNets and
MobileNetV2 with their role maps, mdistiller's MobileNetV1, timm's networks through
``feature_info``, and ``--teacher-checkpoint`` from torchvision's weights or a state_dict.

Images are 64 px (strides 4, 8, 16, 32 give 16, 8, 4, 2): the maps are what they are at 224,
a quarter of the side, and the tests stay within seconds on two cores."""

from __future__ import annotations

import pytest
import torch
import torchvision

from kdbench.cli import main
from kdbench.data import shape_of
from kdbench.errors import UserError
from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, ROLES, STAGES
from kdbench.models import architecture_family, build_model, is_architecture
from kdbench.settings import get as get_setting
from kdbench.taps import FeatureTaps
from kdbench.teachers import load_state_dict_for, resolve_checkpoint
from kdbench.testing import architecture_shapes, check_model

SIZE = 64
CLASSES = 10

# (kdbench name, torchvision builder, stage channels): He et al. 2016 Table 1 (64, 128, 256,
# 512; x4 for the bottleneck; resnet34 is resnet18's BasicBlock with more blocks), Sandler et al. 2018 Table 2 (the last block of each of the
# resolutions 1/4 ... 1/32: 24, 32, 96, 320 channels).
TORCHVISION = [
    ("torchvision.resnet18", torchvision.models.resnet18, (64, 128, 256, 512)),
    ("torchvision.resnet50", torchvision.models.resnet50, (256, 512, 1024, 2048)),
    ("torchvision.mobilenet_v2", torchvision.models.mobilenet_v2, (24, 32, 96, 320)),
]


@pytest.mark.parametrize(("name", "reference", "channels"), TORCHVISION, ids=lambda v: getattr(v, "__name__", v))
def test_torchvision_networks_are_torchvisions_and_load_its_state_dicts(name, reference, channels) -> None:
    """torchvision's own network and ours, with torchvision's state_dict loaded strictly, give
    the same logits (our blocks only move the final ReLU into a module and drop in-place ops)."""
    torch.manual_seed(0)
    theirs = reference(num_classes=CLASSES).eval()
    ours = build_model(name, CLASSES, 3)
    ours.load_state_dict(theirs.state_dict())  # strict: the same parameter and buffer names
    ours.eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-5, atol=1e-5)
    shapes = architecture_shapes(name, CLASSES, 3, SIZE)
    assert [s[0] for s in shapes.stages] == list(channels)
    assert [s[1:] for s in shapes.stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert shapes.embedding == (channels[-1] if "resnet" in name else 1280,)


@pytest.mark.parametrize("name", ["torchvision.resnet18", "torchvision.resnet50", "mobilenet_v1"])
def test_pre_activation_stages_are_the_stages_before_their_relu(name) -> None:
    """A post-activation network's stage output is ReLU(pre-activation): the two maps name the
    same place, one on each side of the final ReLU (mdistiller's feats / preact_feats)."""
    torch.manual_seed(0)
    model = build_model(name, CLASSES, 3).eval()
    taps = FeatureTaps(model, {STAGES, PREACT_STAGES, POSTACT_STAGES})
    with torch.no_grad():
        features = taps.pop(model(torch.randn(2, 3, SIZE, SIZE)))
    for pre, stage, post in zip(features.preact_stages, features.stages, features.postact_stages):
        assert (pre < 0).any()  # a pre-activation map: the ReLU is still to come
        torch.testing.assert_close(pre.relu(), stage, rtol=0, atol=0)
        assert post is stage or torch.equal(post, stage)


def test_mobilenet_v1_is_the_papers_and_mdistillers() -> None:
    """Howard et al. 2017: 1.0 MobileNet-224 has 4.2 million parameters (Table 8); stages at
    strides 4, 8, 16, 32 with 128, 256, 512, 1024 channels (Table 1; mdistiller's feat1..4);
    module names as mdistiller's mobilenetv1.py (model.<i>.<j>, fc), so its checkpoints load."""
    model = build_model("mobilenet_v1", 1000, 3)
    assert round(sum(p.numel() for p in model.parameters()) / 1e5) == 42
    keys = model.state_dict().keys()
    assert {"model.0.0.weight", "model.0.1.running_mean", "model.13.3.weight", "model.13.4.bias",
            "fc.weight", "fc.bias"} <= set(keys)
    convs = [key for key in keys if key.endswith(".weight") and model.get_parameter(key).dim() == 4]
    assert len(convs) == 1 + 13 * 2  # the stem, then a depthwise and a pointwise conv per block
    shapes = architecture_shapes("mobilenet_v1", 1000, 3, SIZE)
    assert shapes.stages == ((128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2))
    assert shapes.embedding == (1024,)
    assert architecture_family("mobilenet_v1") == "mobilenet_v1"


@pytest.mark.parametrize("name", ["torchvision.resnet18", "torchvision.mobilenet_v2", "mobilenet_v1"])
def test_the_model_contract_holds_for_the_imagenet_networks(name) -> None:
    check_model(name, image_size=32)


def test_torchvision_names_are_checked() -> None:
    assert architecture_family("torchvision.resnet34") == "torchvision.resnet"
    assert not is_architecture("torchvision.resnet101")  # not one kdbench maps
    with pytest.raises(UserError, match="kdbench maps torchvision.resnet18"):
        build_model("torchvision.vgg11", 10)


# --- timm: an optional extra ------------------------------------------------------------------

def stages_and_embedding(name: str) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Shapes of the roles every network maps (a timm one maps no pre-activation stages)."""
    model = build_model(name, CLASSES, 3).eval()
    taps = FeatureTaps(model, {STAGES, EMBEDDING})
    with torch.no_grad():
        features = taps.pop(model(torch.zeros(2, 3, SIZE, SIZE)))
    return [tuple(t.shape[1:]) for t in features.stages], tuple(features.embedding.shape[1:])


def test_timm_networks_come_with_the_role_map_of_their_feature_info() -> None:
    timm = pytest.importorskip("timm", reason="the kdbench[timm] extra is not installed")
    model = build_model("timm.resnet18", CLASSES, 3)
    assert type(model) is timm.models.resnet.ResNet  # timm's own class, not a wrapper
    reductions = [info["reduction"] for info in model.feature_info if info["reduction"] >= 4]
    stages, embedding = stages_and_embedding("timm.resnet18")
    assert [SIZE // r for r in reductions] == [s[1] for s in stages] == [16, 8, 4, 2]
    assert [s[0] for s in stages] == [64, 128, 256, 512]
    assert embedding == (512,)
    # No pre-activation map: feature_info names none (timm_models.py says why).
    assert set(model.feature_points()) == {STAGES, POSTACT_STAGES, EMBEDDING}
    check_model("timm.resnet18", image_size=32)
    # A timm state_dict is a teacher checkpoint for the same name.
    torch.manual_seed(1)
    theirs = timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
    model.load_state_dict(theirs.state_dict())
    with pytest.raises(UserError, match="has no model 'no_such_net'"):
        build_model("timm.no_such_net", CLASSES)


def test_a_timm_mobilenet_maps_its_stages_too() -> None:
    pytest.importorskip("timm", reason="the kdbench[timm] extra is not installed")
    stages, _ = stages_and_embedding("timm.mobilenetv2_100")
    assert [s[0] for s in stages] == [24, 32, 96, 320]  # as torchvision's (above)
    assert set(ROLES) - set(build_model("timm.mobilenetv2_100", CLASSES).feature_points()) == {PREACT_STAGES}


# --- --teacher-checkpoint -----------------------------------------------------------------------

def test_torchvision_weights_are_read_from_the_hub_cache_never_downloaded(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # what set_dir() sets
    setting = get_setting("imagenet/resnet34-resnet18")
    expected = tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    with pytest.raises(UserError, match="not in the torch hub cache") as missing:
        resolve_checkpoint("torchvision:resnet34", setting)
    assert str(expected) in str(missing.value)
    with pytest.raises(UserError, match="the teacher of imagenet/resnet34-resnet18 is torchvision.resnet34"):
        resolve_checkpoint("torchvision:resnet50", setting)
    with pytest.raises(UserError, match="no weights 'V9'"):
        resolve_checkpoint("torchvision:resnet34.V9", setting)
    # Through the CLI: one line, exit 2, nothing written.
    code = main(["run", "--methods", "kd", "--setting", "imagenet/resnet34-resnet18",
                 "--teacher-checkpoint", "torchvision:resnet34", "--seeds", "1",
                 "--results", str(tmp_path / "results"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not in the torch hub cache" in err[0]
    # Where torchvision put them (its file name), they are used.
    expected.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34().state_dict(), expected)
    assert resolve_checkpoint("torchvision:resnet34", setting) == expected
    state = load_state_dict_for(expected, setting.teacher, shape_of(setting.dataset))
    assert set(state) == set(build_model("torchvision.resnet34", 1000).state_dict())
