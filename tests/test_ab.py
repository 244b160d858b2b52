"""AB (methods/ab.py): the alternative L2 loss by hand and against the authors' weighting, its
zero, the connectors, the initialisation stage's trainable set, the contract and a run."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.method import PREACT_STAGES, Batch, FeatureShapes, Features, Progress
from kdbench.models import build_model
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.taps import FeatureTaps
from kdbench.testing import check_method
from kdbench.train import parameters_feeding, train
from kdbench.methods.ab import AB, ab_loss, alternative_l2, connector

SOURCE = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.5, -0.5])
TARGET = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, 1.0])


def test_alternative_l2_hand_computed() -> None:
    # Off neurons (t ≤ 0): −2 is past the margin (0), −0.5 is within it ((−0.5 + 1)² = 0.25),
    # 0.5 is on the wrong side ((0.5 + 1)² = 2.25). On neurons (t > 0): 2 is past the margin
    # (0), 0.5 within it ((0.5 − 1)² = 0.25), −0.5 on the wrong side ((−0.5 − 1)² = 2.25).
    assert alternative_l2(SOURCE, TARGET, 1.0).item() == pytest.approx(5.0)


def test_zero_once_every_response_is_past_the_margin_on_the_teachers_side() -> None:
    teacher = torch.randn(2, 3, 4, 4)
    past = torch.where(teacher > 0, 1.5, -1.5)
    assert alternative_l2(past, teacher, 1.0).item() == 0.0
    assert alternative_l2(teacher.clone(), teacher, 1.0).item() > 0.0  # equal values: inside it


def test_weighting_equals_the_authors_script() -> None:
    torch.manual_seed(0)
    student = [torch.randn(4, 2, 8, 8), torch.randn(4, 3, 4, 4), torch.randn(4, 5, 2, 2)]
    teacher = [torch.randn_like(s) for s in student]
    # cifar10_AB_distillation.py: deepest / B, middle / B / 2, shallowest / B / 4, then / 1000 * 3.
    authors = (alternative_l2(student[2], teacher[2], 1.0) / 4
               + alternative_l2(student[1], teacher[1], 1.0) / 4 / 2
               + alternative_l2(student[0], teacher[0], 1.0) / 4 / 4) / 1000 * 3
    method = AB()
    shapes = FeatureShapes((), (), 5, preact_stages=tuple(tuple(s.shape[1:]) for s in student))
    method.build(shapes, shapes, 8)
    terms = method.boundary_terms(Features(torch.zeros(4, 5), preact_stages=student),
                                  Features(torch.zeros(4, 5), preact_stages=teacher))
    assert terms["activation_boundary"].item() == pytest.approx(authors.item(), rel=1e-6)
    assert ab_loss(student, teacher, 1.0).item() == pytest.approx(authors.item() * 1000 / 3, rel=1e-6)


def test_connectors_by_shape() -> None:
    assert isinstance(connector((4, 8, 8), (4, 8, 8)), torch.nn.Identity)
    width = connector((4, 8, 8), (16, 8, 8))
    conv, bn = width
    assert conv.kernel_size == (1, 1) and conv.bias is None and isinstance(bn, torch.nn.BatchNorm2d)
    torch.manual_seed(0)
    std = connector((64, 8, 8), (256, 8, 8))[0].weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / 256), rel=0.05)  # He normal, fan-out
    assert connector((4, 8, 8), (16, 4, 4))(torch.zeros(2, 4, 8, 8)).shape == (2, 16, 4, 4)


def test_initialisation_trains_the_feature_layers_and_the_connectors_not_the_classifier() -> None:
    student = build_model("wrn_10_1", 5, 3)
    taps = FeatureTaps(student, frozenset({PREACT_STAGES}))
    shapes = FeatureShapes((), (), 5, preact_stages=((32, 8, 8), (64, 4, 4), (64, 4, 4)))
    teacher_shapes = FeatureShapes((), (), 5, preact_stages=((32, 8, 8), (128, 4, 4), (128, 4, 4)))
    method = AB()
    method.build(shapes, teacher_shapes, 8)
    (stage,) = method.pretrain_stages()
    assert stage.student_role == PREACT_STAGES and stage.modules == [method.connectors]
    feeding = parameters_feeding(student, taps, stage.student_up_to_stage, torch.randn(2, 3, 16, 16),
                                 stage.student_role)
    named = {id(p): name for name, p in student.named_parameters()}
    trained = {named[id(p)] for p in feeding}
    assert {"bn1.weight", "bn1.bias", "conv1.weight"} <= trained  # the final BN included
    assert not {"fc.weight", "fc.bias"} & trained
    assert method.trainable_modules() == []
    progress = Progress(0, 2, 0, 1, 1)
    assert method.loss(Features(torch.zeros(2, 5)), Features(torch.zeros(2, 5)),
                       Batch(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.arange(2)),
                       progress) == {}
    taps.remove()


def test_contract() -> None:
    check_method("ab")


def test_two_epoch_run_after_the_initialisation(results_with_teacher) -> None:
    record = train(RunSpec("synthetic/tiny", "ab", 0), Store(results_with_teacher))
    stages = [entry["stage"] for entry in record["history"]]
    # 30 initialisation epochs × synthetic/tiny's pretrain_scale 0.05 → 2, then 2 main epochs.
    assert stages == ["boundaries", "boundaries", "main", "main"]
    first, last = record["history"][0], record["history"][1]
    assert set(first["terms"]) == {"activation_boundary"}
    assert last["terms"]["activation_boundary"] < first["terms"]["activation_boundary"]
    assert set(record["history"][2]["terms"]) == {"ce"}
    assert all(math.isfinite(entry["loss"]) for entry in record["history"])
