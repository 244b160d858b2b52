"""kdbench's methods beside RepDistiller's own code (HobbitLong/RepDistiller, the CRD authors'
benchmark), on identical tensors and identical weights.

RepDistiller is imported at run time from the checkout named by KDBENCH_REPDISTILLER (its
``distiller_zoo/``, ``crd/`` and ``models/`` packages, under aliases: peer_helpers.py); the
module is skipped when the variable is unset. Nothing of it is copied here: what this file
writes itself is RepDistiller's *wiring*, the few lines of ``helper/loops.py``
(``train_distill``), ``helper/pretrain.py`` (``init``) and ``train_student.py`` that pick the
features, build the modules and weight the loss, each cited where it is reproduced.

Each test builds random features of the shapes RepDistiller's CIFAR-100 networks produce
(``NETWORKS``, checked against its models in ``test_feature_shapes_are_repdistillers``), copies
the weights of every trainable module from RepDistiller's module into kdbench's, and compares
the loss *with each codebase's default CIFAR-100 weight* and its gradients with respect to the
student's features and every module parameter. fp32 throughout: kdbench's losses compute in
fp32 (``.float()``) whatever they are given. Tolerance: the largest elementwise error within
RTOL of the largest magnitude of RepDistiller's tensor. tests/peers/RESULTS-repdistiller.md
lists what was compared, the errors seen, and the differences (options used here where
kdbench's default is not RepDistiller's).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from peer_helpers import (
    assert_close,
    assert_gradients_close,
    copy_state,
    import_peer_module,
    import_peer_package,
    leaf,
    peer_checkout,
)

ROOT = peer_checkout("KDBENCH_REPDISTILLER", "distiller_zoo/", "RepDistiller (HobbitLong/RepDistiller)")
zoo = import_peer_package(ROOT, "distiller_zoo", "repdistiller_distiller_zoo")
rd_models = import_peer_package(ROOT, "models", "repdistiller_models")
rd_util = import_peer_module(ROOT, "models", "repdistiller_models", "util")
rd_criterion = import_peer_module(ROOT, "crd", "repdistiller_crd", "criterion")
rd_memory = import_peer_module(ROOT, "crd", "repdistiller_crd", "memory")

from kdbench.method import PREACT_STAGES, STAGES, Batch, FeatureShapes, Features, Progress  # noqa: E402
from kdbench.methods.ab import AB  # noqa: E402
from kdbench.methods.at import AT  # noqa: E402
from kdbench.methods.cc import CC, CCConfig  # noqa: E402
from kdbench.methods.crd import CRD, CRDConfig  # noqa: E402
from kdbench.methods.fitnet import FitNet, FitNetConfig  # noqa: E402
from kdbench.methods.fsp import FSP  # noqa: E402
from kdbench.methods.ft import FT, FTConfig  # noqa: E402
from kdbench.methods.kd import KD  # noqa: E402
from kdbench.methods.kdsvd import KDSVD, KDSVDConfig  # noqa: E402
from kdbench.methods.nst import NST  # noqa: E402
from kdbench.methods.pkt import PKT, PKTConfig  # noqa: E402
from kdbench.methods.rkd import RKD  # noqa: E402
from kdbench.methods.sp import SP  # noqa: E402
from kdbench.methods.vid import VID  # noqa: E402
from kdbench.models import build_model  # noqa: E402
from kdbench.taps import FeatureTaps  # noqa: E402
from kdbench.train import parameters_feeding  # noqa: E402

RTOL = 1e-5
PROGRESS = Progress(epoch=0, epochs=1, step=0, steps_per_epoch=1, pretrain_epochs=0)
NUM_CLASSES = 100

# RepDistiller's `model(x, is_feat=True)` at 32 px, per sample: [f0 (stem), f1, f2, f3 (stage
# outputs), f4 (pooled embedding)] (models/wrn.py, models/resnet.py forward).
NETWORKS = {
    "wrn_40_2": ((16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)),
    "wrn_16_2": ((16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)),
    "wrn_40_1": ((16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)),
    "resnet32x4": ((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)),
    "resnet8x4": ((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)),
}


def feature_maps(network: str, batch: int, seed: int) -> list[Tensor]:
    """Random [f0, …, f4] of ``network``'s shapes. Stage outputs are signed on the
    pre-activation WRNs (raw residual sums) and non-negative on the post-activation ResNets
    (after the ReLU); the embedding, an average of ReLU outputs, is non-negative on both."""
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, *shape, generator=generator) for shape in NETWORKS[network]]
    if network.startswith("resnet"):
        maps[:4] = [m.relu() for m in maps[:4]]
    maps[4] = maps[4].relu()
    return maps


def shapes_of(network: str) -> FeatureShapes:
    shapes = NETWORKS[network]
    return FeatureShapes(stages=shapes[1:4], embedding=shapes[4], num_classes=NUM_CLASSES,
                         preact_stages=shapes[1:4], postact_stages=shapes[1:4])


def kdbench_features(maps: list[Tensor], role: str = "stages") -> Features:
    """kdbench's Features of one network from RepDistiller's list: f1..f3 as ``role``, f4 as
    the embedding (the tap mapping ``test_taps_are_repdistillers_features`` checks)."""
    features = Features(logits=torch.zeros(maps[0].shape[0], NUM_CLASSES), embedding=maps[4])
    setattr(features, role, list(maps[1:4]))
    return features


def batch_of(size: int) -> Batch:
    return Batch(torch.zeros(size, 3, 32, 32), torch.zeros(size, dtype=torch.long), torch.arange(size))


def total(terms: dict[str, Tensor]) -> Tensor:
    """What Method.backward back-propagates: the sum of the terms."""
    return torch.stack(list(terms.values())).sum()


def train_mode(method: nn.Module, modules: list[nn.Module]) -> None:
    """The engine's modes (kdbench/train.py start_epoch): the method in eval, the modules the
    stage trains in train mode."""
    method.eval()
    for module in modules:
        module.train()


# --- the features: where kdbench's taps are RepDistiller's feature lists --------------------------


def test_feature_shapes_are_repdistillers() -> None:
    """NETWORKS is what RepDistiller's CIFAR networks return (one 32-px image each)."""
    torch.manual_seed(0)
    for name, expected in NETWORKS.items():
        model = rd_models.model_dict[name](num_classes=NUM_CLASSES).eval()
        with torch.no_grad():
            feats, _ = model(torch.randn(1, 3, 32, 32), is_feat=True)
        assert [tuple(f.shape[1:]) for f in feats] == list(expected), name


@pytest.mark.parametrize("network", ["wrn_16_2", "resnet8x4"])
def test_taps_are_repdistillers_features(network: str) -> None:
    """Same weights (RepDistiller's state dict loads into kdbench's model by name), eval mode:
    STAGES = feat[1:-1], PREACT_STAGES = feat[1:-1] with preact=True, EMBEDDING = feat[-1];
    POSTACT_STAGES = relu(preact) on the pre-activation WRN (≠ its feat[1:-1]) and = STAGES on
    the ResNet."""
    torch.manual_seed(0)
    theirs = rd_models.model_dict[network](num_classes=NUM_CLASSES)
    with torch.no_grad():  # non-trivial BN statistics and affine maps, so eval BN is not identity
        for module in theirs.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    ours = build_model(network, NUM_CLASSES)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = theirs(images, is_feat=True)
        preact, _ = theirs(images, is_feat=True, preact=True)
        taps = FeatureTaps(ours, {"stages", "preact_stages", "postact_stages", "embedding"})
        features = taps.pop(ours(images))
        taps.remove()
    check = f"taps {network}"
    assert_close(check, "logits", features.logits, logits)
    assert_close(check, "embedding = feat[-1]", features.embedding, feats[-1])
    expected_postact = [f.relu() for f in preact[1:-1]] if network.startswith("wrn") else feats[1:-1]
    for k in range(3):
        assert_close(check, f"stages[{k}] = feat[{k + 1}]", features.stages[k], feats[k + 1])
        assert_close(check, f"preact_stages[{k}] = feat[{k + 1}] (preact)", features.preact_stages[k],
                     preact[k + 1])
        assert_close(check, f"postact_stages[{k}]", features.postact_stages[k], expected_postact[k])
    if network.startswith("wrn"):  # post-activation ≠ the stage outputs RepDistiller's KDSVD reads
        assert not torch.allclose(features.postact_stages[0], feats[1])


@pytest.mark.parametrize("network", ["wrn_16_2", "resnet8x4"])
def test_initialisation_stages_train_repdistillers_feature_modules(network: str) -> None:
    """What FSP's and AB's initialisation train of the student. RepDistiller: the parameters of
    ``get_feat_modules()`` (pretrain.py; the rest of model_s stays in eval(), line 13). kdbench:
    every parameter the stage's deepest tensor depends on (train.py ``parameters_feeding``):
    stage 3's output for FSP, its pre-activation for AB. The same sets, except AB on the
    pre-activation WRN, whose deepest pre-activation is bn1(s_3): kdbench also trains that
    final BN, RepDistiller leaves it out of get_feat_modules (and in eval mode)."""
    theirs = rd_models.model_dict[network](num_classes=NUM_CLASSES)
    feature_ids = {id(p) for p in theirs.get_feat_modules().parameters()}
    theirs_names = {name for name, p in theirs.named_parameters() if id(p) in feature_ids}
    ours = build_model(network, NUM_CLASSES)
    sample = torch.randn(2, 3, 32, 32)
    for role, method_class in ((STAGES, FSP), (PREACT_STAGES, AB)):
        method = method_class()
        method.build(shapes_of(network), shapes_of(network), 0)
        (stage,) = method.pretrain_stages()
        assert (stage.student_role, stage.student_up_to_stage) == (role, 2)
        taps = FeatureTaps(ours, {role})
        feeding = {id(p) for p in parameters_feeding(ours, taps, stage.student_up_to_stage, sample, role)}
        taps.remove()
        ours_names = {name for name, p in ours.named_parameters() if id(p) in feeding}
        if role == PREACT_STAGES and network.startswith("wrn"):
            assert ours_names - theirs_names == {"bn1.weight", "bn1.bias"}
            assert theirs_names <= ours_names
        else:
            assert ours_names == theirs_names, (role, ours_names ^ theirs_names)


# --- losses on feature maps, no trainable module -------------------------------------------------


def loss_and_stage_gradients_agree(check: str, ours: Tensor, theirs: Tensor, ours_s: list[Tensor],
                                   theirs_s: list[Tensor]) -> None:
    """The two losses, then their gradients w.r.t. each of the five student feature maps."""
    assert_close(check, "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close(check, ours_s, theirs_s, [f"f{k}" for k in range(5)])


def test_sp_agrees() -> None:
    student, teacher = feature_maps("wrn_16_2", 8, 1), feature_maps("wrn_40_2", 8, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    ours = total(SP().loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(8), PROGRESS))
    # loops.py 'similarity': g_s = [feat_s[-2]], loss_kd = sum(criterion_kd(g_s, g_t)); -b 3000.
    theirs = 3000.0 * sum(zoo.Similarity()([theirs_s[-2]], [teacher[-2]]))
    loss_and_stage_gradients_agree("sp", ours, theirs.squeeze(), ours_s, theirs_s)


def test_at_agrees() -> None:
    student, teacher = feature_maps("wrn_16_2", 4, 1), feature_maps("wrn_40_2", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    ours = total(AT().loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(4), PROGRESS))
    # loops.py 'attention': g = feat[1:-1], loss_kd = sum(criterion_kd(g_s, g_t)); -b 1000.
    theirs = 1000.0 * sum(zoo.Attention()(theirs_s[1:-1], teacher[1:-1]))
    loss_and_stage_gradients_agree("at", ours, theirs, ours_s, theirs_s)


def test_nst_agrees() -> None:
    # Different widths (16/32/64 vs 32/64/128): kdbench's channel-Gram path (stages 1-2) and its
    # position-Gram closed form (stage 3) both meet RepDistiller's term-by-term MMD².
    student, teacher = feature_maps("wrn_40_1", 4, 1), feature_maps("wrn_40_2", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    ours = total(NST().loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(4), PROGRESS))
    # loops.py 'nst': g = feat[1:-1], loss_kd = sum(criterion_kd(g_s, g_t)); -b 50.
    theirs = 50.0 * sum(zoo.NSTLoss()(theirs_s[1:-1], teacher[1:-1]))
    loss_and_stage_gradients_agree("nst", ours, theirs, ours_s, theirs_s)


def test_rkd_agrees() -> None:
    student, teacher = feature_maps("wrn_40_1", 8, 1), feature_maps("wrn_40_2", 8, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    ours = total(RKD().loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(8), PROGRESS))
    # loops.py 'rkd': feat[-1], RKDLoss() (w_d 25, w_a 50); -b 1.
    theirs = 1.0 * zoo.RKDLoss()(theirs_s[-1], teacher[-1])
    loss_and_stage_gradients_agree("rkd", ours, theirs, ours_s, theirs_s)


def test_kd_agrees() -> None:
    generator = torch.Generator().manual_seed(3)
    logits_s = torch.randn(8, NUM_CLASSES, generator=generator) * 3
    logits_t = torch.randn(8, NUM_CLASSES, generator=generator) * 3
    ours_s, theirs_s = leaf(logits_s), leaf(logits_s)
    method = KD()
    empty = Features(logits=ours_s)
    ours = total(method.loss(empty, Features(logits=logits_t), batch_of(8), PROGRESS))
    # run_cifar_distill.sh kd: `--kd_T 4 -r 0.1 -a 0.9 -b 0`: loss = 0.1·CE + 0.9·DistillKL(4).
    with warnings.catch_warnings():  # DistillKL's F.kl_div(size_average=False) is deprecated
        warnings.simplefilter("ignore")
        theirs = 0.9 * zoo.DistillKL(4.0)(theirs_s, logits_t)
    assert method.ce_weight == 0.1
    assert_close("kd", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("kd", [ours_s], [theirs_s], ["logits"])


def test_pkt_with_include_self_agrees() -> None:
    """include_self=true is the authors' (and RepDistiller's) row sums; kdbench's default
    (false, the paper's p_{j|i} over j ≠ i) is another loss (RESULTS)."""
    student, teacher = feature_maps("wrn_40_1", 8, 1), feature_maps("wrn_40_2", 8, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    method = PKT(PKTConfig(include_self=True))
    ours = total(method.loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(8), PROGRESS))
    # loops.py 'pkt': feat[-1]; -b 30000.
    theirs = 30000.0 * zoo.PKT()(theirs_s[-1], teacher[-1])
    assert_close("pkt include_self", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("pkt include_self", ours_s, theirs_s, [f"f{k}" for k in range(5)])


def test_fsp_agrees_on_the_stage_pairs_and_lacks_the_stem_pair() -> None:
    """RepDistiller's init loss is sum(FSP(feat[:-1])): pairs (f0,f1), (f1,f2), (f2,f3).
    kdbench has no stem role: its pairs are the last two, and it equals their sum exactly."""
    student, teacher = feature_maps("wrn_16_2", 4, 1), feature_maps("wrn_40_2", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    method = FSP()
    method.build(shapes_of("wrn_16_2"), shapes_of("wrn_40_2"), 0)
    assert len(method.adapters) == 0  # equal widths: no adapter, as the paper and RepDistiller
    (stage,) = method.pretrain_stages()
    train_mode(method, stage.modules)
    ours = total(stage.loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(4)))
    # pretrain.py 'fsp': loss_group = criterion(feat_s[:-1], feat_t[:-1]); loss = sum(loss_group).
    criterion = zoo.FSP([(4, *s) for s in NETWORKS["wrn_16_2"][:4]], [(4, *s) for s in NETWORKS["wrn_40_2"][:4]])
    groups = criterion(theirs_s[:-1], teacher[:-1])
    assert len(groups) == 3
    theirs = groups[1] + groups[2]
    assert_close("fsp", "loss (stage pairs)", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("fsp", ours_s, theirs_s, [f"f{k}" for k in range(5)])
    assert theirs_s[0].grad is None and groups[0].item() > 0  # the stem pair kdbench omits
    assert stage.epochs == 30 and stage.student_up_to_stage == 2  # --init_epochs 30, all stages


# --- losses with trainable modules: weights copied across -------------------------------------


def test_cc_repdistiller_form_agrees() -> None:
    """form=repdistiller; kdbench's default (the paper's Gaussian-kernel form, weight 2000) is
    another loss (RESULTS)."""
    student, teacher = feature_maps("wrn_40_1", 8, 1), feature_maps("wrn_40_2", 8, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    torch.manual_seed(0)
    # train_student.py 'correlation': LinearEmbed(feat[-1] width, --feat_dim 128), both trained.
    embed_s, embed_t = rd_util.LinearEmbed(64, 128), rd_util.LinearEmbed(128, 128)
    method = CC(CCConfig(form="repdistiller"))
    method.build(shapes_of("wrn_40_1"), shapes_of("wrn_40_2"), 0)
    names = copy_state(embed_s, method.embed_student) + copy_state(embed_t, method.embed_teacher)
    # Both embeddings trained with the student, as RepDistiller's trainable_list.
    assert {id(m) for m in method.trainable_modules()} == {id(method.embed_student), id(method.embed_teacher)}
    ours = total(method.loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(8), PROGRESS))
    # loops.py 'correlation': criterion_kd(embed_s(feat_s[-1]), embed_t(feat_t[-1])); -b 0.02.
    theirs = 0.02 * zoo.Correlation()(embed_s(theirs_s[-1]), embed_t(teacher[-1]))
    assert_close("cc repdistiller", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("cc repdistiller", ours_s, theirs_s, [f"f{k}" for k in range(5)])
    assert_gradients_close("cc repdistiller", list(method.embed_student.parameters()) + list(method.embed_teacher.parameters()),
                           list(embed_s.parameters()) + list(embed_t.parameters()), [n for n, _ in names])


def test_vid_agrees() -> None:
    student, teacher = feature_maps("wrn_40_1", 4, 1), feature_maps("wrn_40_2", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    torch.manual_seed(0)
    # train_student.py 'vid': VIDLoss(s, t, t) per pair of feat[1:-1] widths.
    criteria = nn.ModuleList(zoo.VIDLoss(s[0], t[0], t[0])
                             for s, t in zip(NETWORKS["wrn_40_1"][1:4], NETWORKS["wrn_40_2"][1:4]))
    method = VID()
    method.build(shapes_of("wrn_40_1"), shapes_of("wrn_40_2"), 0)
    for criterion, gaussian in zip(criteria, method.gaussians):
        # The initial variance parameter is the same number (softplus⁻¹(5 − 1e-5)).
        assert_close("vid", "initial log_scale", gaussian.log_scale, criterion.log_scale, rtol=1e-7)
    names = [name for criterion, gaussian in zip(criteria, method.gaussians)
             for name, _ in copy_state(criterion, gaussian, reshape=True)]  # 1×1 conv → linear
    train_mode(method, method.trainable_modules())
    ours = total(method.loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(4), PROGRESS))
    # loops.py 'vid': sum(c(f_s, f_t) for feat[1:-1]); -b 1.
    theirs = 1.0 * sum(c(s, t) for s, t, c in zip(theirs_s[1:-1], teacher[1:-1], criteria))
    assert_close("vid", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("vid", ours_s, theirs_s, [f"f{k}" for k in range(5)])
    assert_gradients_close("vid", list(method.gaussians.parameters()), list(criteria.parameters()), names)


@pytest.mark.parametrize("student_shape, teacher_shape", [
    ((32, 16, 16), (64, 16, 16)),  # wrn_40_1 → wrn_40_2 hint layer: 1×1 conv
    ((8, 8, 8), (12, 4, 4)),  # the student's map twice the teacher's: 3×3 conv, stride 2
    ((8, 4, 4), (12, 8, 8)),  # half of it: 4×4 transposed conv, stride 2
    ((8, 6, 6), (12, 4, 4)),  # larger otherwise: a "valid" 3×3 conv
], ids=["1x1", "stride2", "transposed", "valid"])
def test_fitnet_single_stage_with_relu_agrees(student_shape, teacher_shape) -> None:
    """stages=1, regressor_relu=always is RepDistiller's hint (ConvReg with BN + ReLU, trained
    with the student, weight 100); kdbench's defaults (the paper's two stages, ReLU matched to
    the hint) differ (RESULTS)."""
    generator = torch.Generator().manual_seed(4)
    student = [torch.randn(4, *student_shape, generator=generator) for _ in range(2)]
    teacher = [torch.randn(4, *teacher_shape, generator=generator) for _ in range(2)]
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    torch.manual_seed(0)
    # train_student.py 'hint': ConvReg(feat_s[hint_layer].shape, feat_t[hint_layer].shape).
    regress = rd_util.ConvReg((4, *student_shape), (4, *teacher_shape))
    method = FitNet(FitNetConfig(stages=1, regressor_relu="always"))
    shapes = lambda shape: FeatureShapes(stages=(shape, shape), embedding=(1,), num_classes=NUM_CLASSES)  # noqa: E731
    method.build(shapes(student_shape), shapes(teacher_shape), 0)
    names = copy_state(regress, method.regressor)
    train_mode(method, method.trainable_modules())
    regress.train()
    s_features = Features(logits=torch.zeros(4, NUM_CLASSES), stages=ours_s)
    ours = total(method.loss(s_features, Features(logits=torch.zeros(4, NUM_CLASSES), stages=teacher),
                             batch_of(4), PROGRESS))
    # loops.py 'hint': criterion_kd(module_list[1](feat_s[hint_layer]), feat_t[hint_layer]); -b 100.
    theirs = 100.0 * zoo.HintLoss()(regress(theirs_s[1]), teacher[1])
    check = f"fitnet {student_shape}->{teacher_shape}"
    assert_close(check, "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close(check, ours_s, theirs_s, ["stage 0", "guided stage 1"])
    assert_gradients_close(check, list(method.regressor.parameters()), list(regress.parameters()),
                           [n for n, p in names if "running" not in n and "num_batches" not in n])
    for (name, reference), mine in zip(regress.named_buffers(), method.regressor.buffers()):
        assert_close(check, f"BN {name} after the forward", mine.float(), reference.float())


@pytest.mark.parametrize("student_net", ["wrn_40_1", "wrn_16_2"])
def test_ab_initialisation_agrees(student_net: str) -> None:
    """AB's loss is only an initialisation in both (RepDistiller: init() on the preact features,
    then loss_kd = 0). wrn_40_1: connectors (1×1 conv + BN) where widths differ; wrn_16_2:
    identities. RepDistiller's connector conv has a bias, kdbench's none: in train-mode BN it
    cancels, so it is given a non-zero value here and the loss must still agree."""
    student, teacher = feature_maps(student_net, 4, 1), feature_maps("wrn_40_2", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    torch.manual_seed(0)
    # train_student.py 'abound': Connector(feat_s[1:-1] shapes, feat_t[1:-1] shapes), on
    # preact=True features; ABLoss(3).
    connector = rd_util.Connector([(4, *s) for s in NETWORKS[student_net][1:4]],
                                  [(4, *t) for t in NETWORKS["wrn_40_2"][1:4]])
    method = AB()
    method.build(shapes_of(student_net), shapes_of("wrn_40_2"), 0)
    ours_parameters, theirs_parameters, names = [], [], []
    for theirs_module, ours_module in zip(connector.connectors, method.connectors):
        if isinstance(ours_module, nn.Identity):
            assert len(list(theirs_module.parameters())) == 0  # RepDistiller's nn.Sequential()
            continue
        conv, norm = ours_module
        with torch.no_grad():
            theirs_module.conv.bias.normal_()
            conv.weight.copy_(theirs_module.conv.weight)
        copy_state(theirs_module.bn, norm)
        ours_parameters += [conv.weight, norm.weight, norm.bias]
        theirs_parameters += [theirs_module.conv.weight, theirs_module.bn.weight, theirs_module.bn.bias]
        names += ["conv.weight", "bn.weight", "bn.bias"]
    (stage,) = method.pretrain_stages()
    train_mode(method, stage.modules)
    connector.train()  # pretrain.py: init_modules.train()
    ours = total(stage.loss(kdbench_features(ours_s, "preact_stages"),
                            kdbench_features(teacher, "preact_stages"), batch_of(4)))
    # pretrain.py 'abound': loss = sum(criterion(init_modules[0](feat_s[1:-1]), feat_t[1:-1])).
    theirs = sum(zoo.ABLoss(3)(connector(theirs_s[1:-1]), teacher[1:-1]))
    check = f"ab {student_net}"
    assert_close(check, "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close(check, ours_s, theirs_s, [f"f{k}" for k in range(5)])
    # 5e-5: their bias (≈ 1) is added and then subtracted again by BN, which costs fp32 digits.
    assert_gradients_close(check, ours_parameters, theirs_parameters, names, rtol=5e-5)
    for theirs_module in connector.connectors:
        if len(list(theirs_module.parameters())):  # the bias BN removes gets no gradient
            assert theirs_module.conv.bias.grad.abs().max() <= 1e-5 * theirs_module.conv.weight.grad.abs().max()
    assert stage.epochs == 30 and method.loss(None, None, batch_of(4), PROGRESS) == {}


def test_ft_repdistiller_variant_agrees() -> None:
    """factor=attention, reconstruction=mse, translator_bn, 30 epochs at lr 0.01, β 200:
    RepDistiller's FT; kdbench's defaults are the FT authors' code (RESULTS)."""
    student, teacher = feature_maps("wrn_40_1", 4, 1), feature_maps("wrn_40_2", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    torch.manual_seed(0)
    # train_student.py 'factor': Paraphraser(feat_t[-2].shape), Translator(feat_s[-2].shape, feat_t[-2].shape).
    paraphraser = rd_util.Paraphraser((4, *NETWORKS["wrn_40_2"][3]))
    translator = rd_util.Translator((4, *NETWORKS["wrn_40_1"][3]), (4, *NETWORKS["wrn_40_2"][3]))
    method = FT(FTConfig(factor="attention", reconstruction="mse", translator_bn=True,
                         paraphraser_lr=0.01, paraphraser_epochs=30, beta=200.0))
    method.build(shapes_of("wrn_40_1"), shapes_of("wrn_40_2"), 0)
    paraphraser_names = copy_state(paraphraser, method.paraphraser)
    translator_names = copy_state(translator, method.translator)

    # Stage 1, pretrain.py 'factor': the paraphraser alone, nn.MSELoss()(rec(f_t), f_t), lr 0.01
    # for RepDistiller's ResNet/WRN students, --init_epochs 30.
    (stage,) = method.pretrain_stages()
    assert (stage.epochs, stage.lr, stage.student_up_to_stage) == (30, 0.01, None)
    train_mode(method, stage.modules)
    paraphraser.train()
    ours = total(stage.loss(None, kdbench_features(teacher), batch_of(4)))
    _, reconstruction = paraphraser(teacher[-2])
    theirs = nn.MSELoss()(reconstruction, teacher[-2])
    assert_close("ft paraphraser", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("ft paraphraser", list(method.paraphraser.parameters()),
                           list(paraphraser.parameters()), [n for n, _ in paraphraser_names])

    # Stage 2, loops.py 'factor': 200 · FactorTransfer()(translator(feat_s[-2]),
    # paraphraser(feat_t[-2], is_factor=True)), paraphraser in eval, translator trained.
    train_mode(method, method.trainable_modules())
    paraphraser.eval(), translator.train()
    ours = total(method.loss(kdbench_features(ours_s), kdbench_features(teacher), batch_of(4), PROGRESS))
    theirs = 200.0 * zoo.FactorTransfer()(translator(theirs_s[-2]), paraphraser(teacher[-2], is_factor=True))
    assert_close("ft", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("ft", ours_s, theirs_s, [f"f{k}" for k in range(5)])
    trained = [n for n, _ in translator_names if "running" not in n and "num_batches" not in n]
    assert_gradients_close("ft", list(method.translator.parameters()), list(translator.parameters()), trained)
    for (name, reference), mine in zip(translator.named_buffers(), method.translator.buffers()):
        assert_close("ft", f"translator BN {name} after the forward", mine.float(), reference.float())


# --- CRD: embeddings, NCE criterion, memory bank ------------------------------------------------


@pytest.mark.parametrize("num_train, negatives", [(64, 16), (1000, 8)], ids=["dense", "gathered"])
def test_crd_agrees_over_two_steps(monkeypatch, num_train: int, negatives: int) -> None:
    """Two steps with the same indices given to both (the positive in column 0, as
    RepDistiller's CIFAR100InstanceSample returns them): the loss, the gradients (the backward
    runs after both codebases updated their memory in place), the banks and the normalisation
    constants after each step. (64, 16) takes kdbench's dense-product scores, (1000, 8) its
    gathered rows."""
    # ContrastMemory moves its (unused when indices are given) alias sampler to CUDA in its
    # constructor; there is no GPU here, so that one call is made a no-op.
    monkeypatch.setattr(rd_memory.AliasMethod, "cuda", lambda self: None)
    batch = 4
    opt = SimpleNamespace(s_dim=64, t_dim=128, feat_dim=128, nce_k=negatives, nce_t=0.07, nce_m=0.5,
                          n_data=num_train)
    torch.manual_seed(0)
    theirs_module = rd_criterion.CRDLoss(opt)
    method = CRD(CRDConfig(negatives=negatives))
    method.build(shapes_of("wrn_40_1"), shapes_of("wrn_40_2"), num_train)
    names = (copy_state(theirs_module.embed_s, method.embed_student)
             + copy_state(theirs_module.embed_t, method.embed_teacher))
    with torch.no_grad():  # memory_v1 is updated with the student's vectors, memory_v2 the teacher's
        method.student_memory.copy_(theirs_module.contrast.memory_v1)
        method.teacher_memory.copy_(theirs_module.contrast.memory_v2)
    # Both embeddings trained with the student (train_student.py: trainable_list.append(embed_s, embed_t)).
    assert {id(m) for m in method.trainable_modules()} == {id(method.embed_student), id(method.embed_teacher)}
    generator = torch.Generator().manual_seed(5)
    train_mode(method, method.trainable_modules())
    for step in range(2):
        index = torch.randperm(num_train, generator=generator)[:batch]
        others = torch.stack([torch.randperm(num_train - 1, generator=generator)[:negatives] for _ in range(batch)])
        negatives_index = others + (others >= index[:, None]).long()  # any sample but the positive
        contrast_index = torch.cat([index[:, None], negatives_index], dim=1)
        method.contrast_indices = lambda index_, labels, fixed=contrast_index: fixed
        student, teacher = feature_maps("wrn_40_1", batch, 10 + step), feature_maps("wrn_40_2", batch, 20 + step)
        ours_s, theirs_s = leaf(student[-1]), leaf(student[-1])
        s_features = Features(logits=torch.zeros(batch, NUM_CLASSES), embedding=ours_s)
        t_features = Features(logits=torch.zeros(batch, NUM_CLASSES), embedding=teacher[-1])
        labels = torch.zeros(batch, dtype=torch.long)
        ours = total(method.loss(s_features, t_features, Batch(torch.zeros(batch, 3, 32, 32), labels, index),
                                 PROGRESS))
        # loops.py 'crd': criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx); -b 0.8.
        theirs = 0.8 * theirs_module(theirs_s, teacher[-1], index, contrast_index)
        check = f"crd {num_train}/{negatives} step {step}"
        assert_close(check, "loss", ours, theirs.squeeze())
        for parameter in list(method.parameters()) + list(theirs_module.parameters()):
            parameter.grad = None
        ours.backward(), theirs.backward()
        assert_gradients_close(check, [ours_s], [theirs_s], ["f4 (embedding)"])
        assert_gradients_close(check, list(method.embed_student.parameters()) + list(method.embed_teacher.parameters()),
                               list(theirs_module.embed_s.parameters()) + list(theirs_module.embed_t.parameters()),
                               [n for n, _ in names])
        assert_close(check, "student memory", method.student_memory, theirs_module.contrast.memory_v1)
        assert_close(check, "teacher memory", method.teacher_memory, theirs_module.contrast.memory_v2)
        # params[2] (Z_v1) scales out_v1, the student-anchored scores; params[3] the teacher's.
        assert_close(check, "Z", method.normalizers, theirs_module.contrast.params[2:4])


# --- KD-SVD -------------------------------------------------------------------------------------


def canonical_svd(reference):
    """RepDistiller's own ``KDSVD.svd``, its vectors' signs then flipped so that each v sums
    to ≥ 0 (u flipped with it: still a decomposition), kdbench's ``canonical_sign``."""
    original = reference.svd

    def svd(feat, n=1):
        u, s, v = original(feat, n)
        sign = torch.where(v.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
        return u * sign, s, v * sign

    return svd


def test_kdsvd_repdistiller_variant_agrees_up_to_the_teachers_sign() -> None:
    """clip_to_ce=false, batch_mean=true is RepDistiller's KDSVD (plain gradient, sum / B).
    The sensing points are the same tensors on this post-activation pair (resnet32x4 →
    resnet8x4: stages = postact_stages). G changes when one sensing point's teacher vector
    flips sign; RepDistiller takes LAPACK's sign, kdbench a canonical one: with RepDistiller's
    teacher vectors given kdbench's sign (``canonical_svd``), loss and gradients agree; as
    RepDistiller runs, LAPACK's sign is not the same at every point and the loss differs."""
    student, teacher = feature_maps("resnet8x4", 4, 1), feature_maps("resnet32x4", 4, 2)
    ours_s, theirs_s = [leaf(m) for m in student], [leaf(m) for m in student]
    method = KDSVD(KDSVDConfig(clip_to_ce=False, batch_mean=True))
    method.build(shapes_of("resnet8x4"), shapes_of("resnet32x4"), 0)
    assert len(method.projections) == 0  # equal widths: no projection
    train_mode(method, method.trainable_modules())
    ours = total(method.loss(kdbench_features(ours_s, "postact_stages"),
                             kdbench_features(teacher, "postact_stages"), batch_of(4), PROGRESS))
    reference = zoo.KDSVD()
    reference.svd = canonical_svd(reference)
    # loops.py 'kdsvd': g = feat[1:-1], loss_kd = sum(criterion_kd(g_s, g_t)). run_cifar_distill.sh
    # has no KDSVD command (-b defaults to None there): weight 1, kdbench's.
    theirs = sum(reference(theirs_s[1:-1], teacher[1:-1]))
    assert_close("kdsvd (teacher sign canonical)", "loss", ours, theirs)
    ours.backward(), theirs.backward()
    assert_gradients_close("kdsvd (teacher sign canonical)", ours_s, theirs_s, [f"f{k}" for k in range(5)],
                           rtol=1e-4)

    # As RepDistiller runs: LAPACK's signs for the three teacher maps (tall X at stages 1-2,
    # wide X, H·W = 64 < C = 256, at stage 3) are not one sign, and the loss is another number.
    plain = zoo.KDSVD()
    signs = [plain.svd(t, 1)[2].sum(dim=1).sign() for t in teacher[1:-1]]
    assert not all(torch.equal(signs[0], s) for s in signs[1:])
    as_run = sum(plain(student[1:-1], teacher[1:-1])).item()
    assert abs(as_run - ours.item()) > 1e-3 * abs(ours.item())
