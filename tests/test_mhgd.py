"""MHGD (methods/mhgd.py): graphs, losses, gradient rule, stages; the decomposition it uses is
tested in tests/test_spectral.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import POSTACT_STAGES, Batch, FeatureShapes, Features, Progress
from kdbench.models import build_model
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.taps import FeatureTaps
from kdbench.spectral import align_to_teacher, right_singular_vectors
from kdbench.train import shapes_of, train
from kdbench.worker import run_job
from kdbench.methods.mhgd import (
    MHGD,
    TRANSFER,
    AttentionNetwork,
    clip_transfer_gradients,
    graph_kl,
    transfer_bound_factor,
)

# MHGD reads the post-activation stage outputs only (its taps).
WRN_SHAPES = FeatureShapes(stages=(), embedding=(), num_classes=10,
                           postact_stages=((16, 16, 16), (32, 8, 8), (64, 4, 4)))


def features(stages: list[torch.Tensor]) -> Features:
    return Features(logits=torch.zeros(stages[0].shape[0], 10), postact_stages=stages)


def random_stages(shapes: FeatureShapes, batch: int, requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.randn(batch, *shape).relu().requires_grad_(requires_grad) for shape in shapes.postact_stages]


def built(student: FeatureShapes = WRN_SHAPES, teacher: FeatureShapes = WRN_SHAPES) -> MHGD:
    method = MHGD()
    method.build(student, teacher, num_train=100)
    return method


# --- the decomposition ----------------------------------------------------------------------------

def test_loss_gradients_finite_for_all_zero_feature_maps():
    method = built()
    teacher = features(random_stages(WRN_SHAPES, 6))
    for student_stages in ([torch.zeros(6, *shape, requires_grad=True) for shape in WRN_SHAPES.postact_stages],
                           [torch.zeros(6, *shape).index_fill(0, torch.tensor([0, 3]), 1.0).requires_grad_(True)
                            for shape in WRN_SHAPES.postact_stages]):
        terms = method.loss(features(student_stages), teacher, None, Progress(0, 2, 0, 1, 1))
        grads = torch.autograd.grad(terms[TRANSFER], student_stages)
        assert torch.isfinite(terms[TRANSFER]) and all(torch.isfinite(g).all() for g in grads)
    zero_teacher = features([torch.zeros(6, *shape) for shape in WRN_SHAPES.postact_stages])
    stage = method.pretrain_stages()[0]
    total = sum(stage.loss(None, zero_teacher, None).values())
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(p.grad).all() for p in method.attention.parameters())


# --- alignment, graphs, KL ------------------------------------------------------------------------

def test_graph_shapes_are_modules_heads_batch_batch():
    method = built()
    vectors = method.teacher_vectors(features(random_stages(WRN_SHAPES, 5)))
    assert method.graph_logits(vectors).shape == (2, 8, 5, 5)


def test_stage_counts_that_differ_pair_the_last_points_and_project_widths():
    vgg = build_model("vgg8", 10)
    wrn = build_model("wrn_16_1", 10)
    shapes = {}
    for name, model in (("vgg", vgg), ("wrn", wrn)):
        taps = FeatureTaps(model, MHGD.student_taps)
        with torch.no_grad():
            shapes[name] = shapes_of(taps.pop(model.eval()(torch.randn(2, 3, 16, 16))))
    method = built(student=shapes["wrn"], teacher=shapes["vgg"])
    assert method.teacher_points == [1, 2, 3] and method.student_points == [0, 1, 2]
    assert sorted(method.projections) == ["0", "1", "2"]  # 16/32/64 → 256/512/512
    teacher = features(random_stages(shapes["vgg"], 4))
    student = features(random_stages(shapes["wrn"], 4, requires_grad=True))
    vectors = method.student_vectors(student, method.teacher_vectors(teacher))
    assert [v.shape for v in vectors] == [(4, 256), (4, 512), (4, 512)]
    assert method.graph_logits(vectors).shape == (2, 8, 4, 4)


def test_sensing_points_are_the_post_activation_outputs_of_both_networks():
    """On a pre-activation WRN the sensing points are relu(bn(stage output)) (spec §1), computed
    here from the model's modules, not the raw residual sums AT reads."""
    torch.manual_seed(6)
    model = build_model("wrn_10_1", 10).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # not the near-identity of its init
                module.running_mean.normal_(0, 0.5)
                module.bias.normal_(0, 0.5)
    taps = FeatureTaps(model, MHGD.teacher_taps)
    images = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        t = taps.pop(model(images))
        method = built(student=shapes_of(t), teacher=shapes_of(t))
        s1 = model.block1(model.conv1(images))
        s2 = model.block2(s1)
        s3 = model.block3(s2)
        sensed = [F.relu(model.block2.layer[0].bn1(s1)), F.relu(model.block3.layer[0].bn1(s2)),
                  F.relu(model.bn1(s3))]
        expected = [right_singular_vectors(m, 1)[..., 0] for m in sensed]
        raw = [right_singular_vectors(m, 1)[..., 0] for m in (s1, s2, s3)]
        got = method.teacher_vectors(t)
    assert MHGD.student_taps == MHGD.teacher_taps == {POSTACT_STAGES}
    for ours, theirs, residual in zip(got, expected, raw):
        torch.testing.assert_close(ours, theirs)
        assert not torch.allclose(ours.abs(), residual.abs(), atol=1e-3)


def test_width_projection_is_a_1x1_conv_and_bn_on_the_map_before_the_decomposition():
    student_shapes = FeatureShapes(stages=(), embedding=(), num_classes=10,
                                   postact_stages=((8, 8, 8), (16, 4, 4), (32, 2, 2)))
    method = built(student=student_shapes, teacher=WRN_SHAPES)
    projection = method.projections["1"]
    assert sum(p.numel() for p in projection.parameters()) == 16 * 32 + 2 * 32  # no bias
    torch.manual_seed(7)
    student = features(random_stages(student_shapes, 5, requires_grad=True))
    teacher = method.teacher_vectors(features(random_stages(WRN_SHAPES, 5)))
    method.projections.train()
    vectors = method.student_vectors(student, teacher)
    for point in range(3):
        weight, norm = method.projections[str(point)][0].weight, method.projections[str(point)][1]
        mapped = torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], student.postact_stages[point])
        mapped = F.batch_norm(mapped, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        expected = align_to_teacher(right_singular_vectors(mapped, 4), teacher[point])
        torch.testing.assert_close(vectors[point], expected, atol=1e-4, rtol=0)  # fp32 eigh of equal maps


def test_kl_is_zero_when_student_and_teacher_vectors_coincide_and_positive_otherwise():
    torch.manual_seed(3)
    method = built().eval()  # stage 2: the attention networks' BatchNorm in eval mode
    teacher_stages = random_stages(WRN_SHAPES, 6)
    progress = Progress(0, 2, 0, 1, 1)
    same = method.loss(features([s.clone().requires_grad_(True) for s in teacher_stages]),
                       features(teacher_stages), None, progress)[TRANSFER]
    other = method.loss(features(random_stages(WRN_SHAPES, 6, requires_grad=True)),
                        features(teacher_stages), None, progress)[TRANSFER]
    assert abs(same.item()) < 1e-5
    assert other.item() > 1e-3
    logits = torch.randn(2, 8, 6, 6)
    assert graph_kl(logits, logits).abs() < 1e-6 and graph_kl(logits, torch.randn(2, 8, 6, 6)) > 0


# --- stage 1: the estimator -----------------------------------------------------------------------

def test_estimator_loss_drops_when_the_attention_network_trains_on_a_fixed_teacher():
    torch.manual_seed(4)
    method = built()
    teacher = features(random_stages(WRN_SHAPES, 32))
    (stage,) = method.pretrain_stages()
    assert stage.modules == [method.attention] and stage.student_up_to_stage is None
    assert stage.weight_decay == 0.0 and stage.lr_schedule == "constant"
    optimizer = torch.optim.SGD(method.attention.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    method.attention.train()
    losses = []
    for _ in range(40):
        terms = stage.loss(None, teacher, None)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        losses.append(terms["estimator"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_attention_l2_is_the_reference_coefficient_on_the_squared_weights():
    method = built()
    terms = method.pretrain_stages()[0].loss(None, features(random_stages(WRN_SHAPES, 4)), None)
    expected = 5e-4 * sum(p.detach().square().sum() for p in method.attention.parameters())
    torch.testing.assert_close(terms["attention_l2"].detach(), expected)


# --- stage 2: the gradient rule -------------------------------------------------------------------

def test_clip_transfer_gradients_keeps_small_and_bounds_large_per_tensor():
    ce = [torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0]), torch.zeros(2), torch.ones(3)]  # norms 5, 5, 0
    transfer = [torch.tensor([0.3, 0.0]), torch.tensor([0.0, 100.0]), torch.tensor([0.0, 100.0]), None]
    clipped = clip_transfer_gradients([g.clone() for g in ce], transfer, 0.5)
    torch.testing.assert_close(clipped[0], ce[0] + transfer[0])  # under the bound 2.5: kept
    torch.testing.assert_close(clipped[1], ce[1] + torch.tensor([0.0, 2.5]))  # clipped to 2.5
    torch.testing.assert_close(clipped[2], torch.zeros(2))  # zero bound: clipped to zero
    torch.testing.assert_close(clipped[3], ce[3])  # not reached by the transfer term
    assert transfer_bound_factor(0) == 0.5 and transfer_bound_factor(1) == pytest.approx(1 / (1 + math.e ** -1))
    assert transfer_bound_factor(30) == 1.0  # op_util.py: above 1 − 1e-8 it is 1


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_transfer_gradient_never_exceeds_the_ce_bound_per_parameter(epoch):
    torch.manual_seed(5)
    student, teacher = build_model("wrn_10_1", 10), build_model("wrn_10_2", 10).eval()
    student_taps, teacher_taps = FeatureTaps(student, MHGD.student_taps), FeatureTaps(teacher, MHGD.teacher_taps)
    images, labels = torch.randn(32, 3, 16, 16), torch.arange(32) % 10
    with torch.no_grad():
        t = teacher_taps.pop(teacher(images))
        student_shapes = shapes_of(student_taps.pop(student.eval()(images[:2])))
    method = built(student=student_shapes, teacher=shapes_of(t))
    method.eval()
    method.projections.train()
    student.train()
    logits = student(images)
    s = student_taps.pop(logits)
    progress = Progress(epoch, 10, 0, 1, 2)
    terms = {"ce": F.cross_entropy(logits, labels), **method.loss(s, t, Batch(images, labels, labels), progress)}
    parameters = list(student.parameters())
    ce_grads = torch.autograd.grad(terms["ce"], parameters, retain_graph=True)
    transfer_grads = torch.autograd.grad(terms[TRANSFER], parameters, retain_graph=True, allow_unused=True)
    projections = list(method.projections.parameters())
    projection_transfer = torch.autograd.grad(terms[TRANSFER], projections, retain_graph=True)
    method.backward(terms, parameters, progress)
    factor = transfer_bound_factor(epoch)
    clipped = 0
    for parameter, ce_grad, transfer_grad in zip(parameters, ce_grads, transfer_grads):
        added = (parameter.grad - ce_grad).norm()
        assert added <= factor * ce_grad.norm() * (1 + 1e-4) + 1e-12
        if transfer_grad is not None and transfer_grad.norm() > factor * ce_grad.norm():
            clipped += 1
            torch.testing.assert_close(added, factor * ce_grad.norm(), rtol=1e-4, atol=1e-10)
    assert clipped > 0  # the bound was exercised, not trivially met
    # The width projections (wrn_10_1 → wrn_10_2: 16/32/64 → 32/64/128) obey the same rule, their
    # bound being the gradient of their regulariser R = 5e-4·Σv² (CE does not reach them; TF2
    # op_util.py clips every trained variable to ‖∇(CE + R)‖); the raw transfer gradient is far
    # larger, so most tensors are clipped to it exactly.
    assert len(projections) == 9  # 3 × (1×1 conv weight, BN γ, BN β)
    clipped = 0
    for parameter, raw in zip(projections, projection_transfer):
        bound = factor * (2 * 5e-4 * parameter.detach()).norm()
        assert parameter.grad.norm() <= bound * (1 + 1e-4) + 1e-12
        if raw.norm() > bound > 0:
            clipped += 1
            torch.testing.assert_close(parameter.grad.norm(), bound, rtol=1e-4, atol=1e-12)
            assert torch.nn.functional.cosine_similarity(parameter.grad.flatten(), raw.flatten(), dim=0) > 0.9999
    assert clipped >= 3  # the bound was exercised
    for beta in projections[2::3]:  # BN β starts at 0: a zero bound, as in the reference
        assert torch.equal(beta.grad, torch.zeros_like(beta))
    assert all(p.grad is None for p in method.attention.parameters())


# --- through the engine ---------------------------------------------------------------------------

def test_attention_networks_do_not_change_in_the_main_stage(results_with_teacher):
    """Real steps through kdbench.train.train: the attention networks (weights and BatchNorm
    statistics) stay as stage 1 left them; the projections train with the student."""
    store = Store(results_with_teacher)
    spec = RunSpec("synthetic/tiny", "mhgd", 0, overrides={"epochs": 1})
    states = {}

    def on_progress(event):
        if event["event"] == "step" and event["stage"] == "main" and "after_stage_1" not in states:
            # The checkpoint written at the stage boundary holds the method after stage 1.
            states["after_stage_1"] = torch.load(store.checkpoint_path(spec.id), weights_only=False)["method"]

    record = train(spec, store, on_progress=on_progress)
    after = torch.load(store.checkpoint_path(spec.id), weights_only=False)["method"]
    before = states["after_stage_1"]
    attention = [key for key in before if key.startswith("attention.")]
    assert attention and all(torch.equal(before[key], after[key]) for key in attention)
    assert any("running_mean" in key for key in attention)
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("projections."))
    stages = [entry["stage"] for entry in record["history"]]
    assert stages == ["attention", "attention", "main"]  # 40 × pretrain_scale 0.05 = 2 epochs
    assert record["history"][0]["terms"]["estimator"] > record["history"][1]["terms"]["estimator"]


def test_end_to_end_after_the_teacher(results_with_teacher):
    spec = RunSpec("synthetic/tiny", "mhgd", 0)
    outcome = run_job(spec.to_json(), str(results_with_teacher))
    assert outcome["status"] == "done", outcome
    record = Store(results_with_teacher).read(spec.id)
    assert record["status"] == "done"
    assert all(math.isfinite(value) for value in record["metrics"].values())
    main = [entry for entry in record["history"] if entry["stage"] == "main"]
    assert len(main) == 2 and all(math.isfinite(entry["terms"][TRANSFER]) for entry in main)
