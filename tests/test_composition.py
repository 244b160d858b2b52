"""Compositions (kdbench/composition.py): "a+b" is a's terms plus b's, with a's CE weight,
both configs settable, its own run id and source hash, and the contract."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import composition, registry
from kdbench.sweep import Sweep, config_axes
from kdbench.errors import UserError
from kdbench.method import (
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
)
from kdbench.spec import RunSpec
from kdbench.testing import check_method
from kdbench.methods.at import AT, at_loss
from kdbench.methods.kd import KD, kd_loss

PROGRESS = Progress(0, 2, 0, 1, 0)


def features(seed: int, requires_grad: bool) -> Features:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator).requires_grad_(requires_grad)
    return Features(logits=draw(4, 5), stages=[draw(4, 3, 4, 4), draw(4, 6, 2, 2)])


def test_composed_loss_is_the_sum_of_the_parts_computed_independently() -> None:
    method = registry.get("kd+at")()
    s, t = features(0, True), features(1, False)
    batch = Batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    terms = method.loss(s, t, batch, PROGRESS)
    # Independently, from the parts' pure loss functions and their default weights (KD first:
    # its own α = 0.9; AT added: β = 1000).
    assert set(terms) == {"kd", "at"}
    assert torch.allclose(terms["kd"], 0.9 * kd_loss(s.logits, t.logits, 4.0))
    assert torch.allclose(terms["at"], 1000.0 * at_loss(s.stages, t.stages, 2.0))
    assert method.ce_weight == KD().ce_weight == 0.1  # the first part's


def test_crd_plus_kd_is_crd_alone_plus_the_kd_term() -> None:
    from kdbench.methods.crd import CRD

    shapes = FeatureShapes((), (6,), 5)
    composed = registry.get("crd+kd")()
    alone = CRD()
    for method in (composed, alone):
        torch.manual_seed(0)  # the same embeddings and memory banks
        method.build(shapes, shapes, 20)
        method.observe_training_set(torch.arange(20) % 5)
    s = Features(torch.randn(4, 5), embedding=torch.randn(4, 6))
    t = Features(torch.randn(4, 5), embedding=torch.randn(4, 6))
    batch = Batch(torch.zeros(4, 3, 8, 8), torch.arange(4) % 5, torch.arange(4))
    torch.manual_seed(1)  # the same negatives
    terms = composed.loss(s, t, batch, PROGRESS)
    torch.manual_seed(1)
    expected = alone.loss(s, t, batch, PROGRESS)
    assert set(terms) == {"crd", "kd"}
    assert torch.equal(terms["crd"], expected["crd"])
    assert torch.allclose(terms["kd"], 1.0 * kd_loss(s.logits, t.logits, 4.0))
    assert composed.ce_weight == alone.ce_weight == 1.0  # RepDistiller's -r 1
    assert torch.equal(composed.parts[0].student_memory, alone.student_memory)


def test_added_kd_weighs_one_as_repdistillers_crd_plus_kd() -> None:
    composed = registry.get("at+kd")
    method = composed()
    s, t = features(0, True), features(1, False)
    batch = Batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    terms = method.loss(s, t, batch, PROGRESS)
    assert torch.allclose(terms["kd"], 1.0 * kd_loss(s.logits, t.logits, 4.0))
    assert method.ce_weight == 1.0  # AT's
    assert composed.Config().to_json()["kd.alpha"] == 1.0
    assert registry.get("kd+at").Config().to_json()["kd.alpha"] == 0.9  # first: KD's own default


def test_composition_declares_the_union_of_its_parts() -> None:
    composed = registry.get("kd+at")
    assert composed.name == "kd+at" and issubclass(composed, Method)
    assert composed.student_taps == KD.student_taps | AT.student_taps
    assert composed.uses_teacher
    assert composed.display_name == "KD + AT" and registry.get("crd+kd").display_name == "CRD + KD"
    assert registry.get("crd+kd")().configured_display_name() == "CRD + KD"
    assert registry.get("crd+kd").fidelity == "authors' code"  # CRD's (KD: "paper")
    assert KD.paper in composed.paper and AT.paper in composed.paper
    assert "kd+at" not in registry.names()  # made on demand, not registered


def test_config_is_set_per_part_from_the_command_line_and_round_trips() -> None:
    sweep = Sweep(tuple(config_axes(["crd+kd.kd.temperature=2", "crd+kd.crd.negatives=64"], ["crd+kd"])))
    (variant,) = sweep.variants("crd+kd")
    assert variant.config == {"kd.temperature": 2.0, "crd.negatives": 64}
    composed = registry.get("crd+kd")
    built = composed.Config.from_json(variant.config)
    assert built.parts[0].negatives == 64 and built.parts[1].temperature == 2.0
    assert built.parts[1].alpha == 1.0  # unset fields keep the part's starting value
    assert composed.Config.from_json(built.to_json()) == built
    assert composed(built).parts[1].config.temperature == 2.0


def test_bad_settings_are_one_line_user_errors() -> None:
    with pytest.raises(UserError, match="has no field 'kd.temprature'"):
        config_axes(["crd+kd.kd.temprature=2"], ["crd+kd"])
    # KD's γ is its CE weight, which a composition with KD added does not use.
    with pytest.raises(UserError, match="cross-entropy weight is not used"):
        config_axes(["crd+kd.kd.gamma=0.5"], ["crd+kd"])
    # A part's field keeps the range its method declares.
    with pytest.raises(UserError, match=r"crd\+kd\.kd\.temperature must be > 0, got 0\.0"):
        config_axes(["crd+kd.kd.temperature=0"], ["crd+kd"])
    with pytest.raises(UserError, match="appears twice"):
        registry.get("kd+kd")
    with pytest.raises(UserError, match="did you mean"):
        registry.get("kd+att")
    with pytest.raises(UserError, match="two or more methods"):
        registry.get("kd+")


def test_own_run_id() -> None:
    ids = {RunSpec("synthetic/tiny", name, 0).id for name in ("crd", "kd", "crd+kd", "kd+crd")}
    assert len(ids) == 4


def test_source_hash_covers_every_part_file(tmp_path, monkeypatch) -> None:
    module = tmp_path / "third_party_part.py"
    source = '''
from dataclasses import dataclass
import torch.nn.functional as F
from kdbench.method import Method, MethodConfig

@dataclass(frozen=True)
class Config(MethodConfig):
    weight: float = {weight}

class LogitL1(Method):
    name = "logit_l1"
    paper = "test double"
    Config = Config

    def loss(self, s, t, batch, progress):
        return {{"l1": self.config.weight * F.l1_loss(s.logits, t.logits)}}
'''
    module.write_text(source.format(weight=1.0))
    monkeypatch.syspath_prepend(str(tmp_path))
    part = importlib.import_module("third_party_part").LogitL1
    composed = composition.compose("kd+logit_l1", [KD, part])
    before = registry.source_sha256(composed)
    assert before not in {registry.source_sha256(KD), registry.source_sha256(part)}
    module.write_text(source.format(weight=2.0))  # a change in the added part's file only
    assert registry.source_sha256(composed) != before
    sys.modules.pop("third_party_part")


# --- gradient rules, stages and term names, on test doubles --------------------------------------

@dataclass(frozen=True)
class NoConfig(MethodConfig):
    pass


class Head(Method):
    """A part with a trainable module (a linear map of the logits) and a pre-training stage."""

    name = "head"
    paper = "test double"
    Config = NoConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        self.head = nn.Linear(student_shapes.num_classes, teacher_shapes.num_classes)

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return {"match": F.mse_loss(self.head(s.logits), t.logits)}

    def pretrain_stages(self) -> list[PretrainStage]:
        return [PretrainStage("init", 1, lambda s, t, batch: {"h": self.head(t.logits).square().mean()},
                              [self.head])]


class DoubledHead(Head):
    """A part with its own gradient rule: twice the plain gradient for the student."""

    name = "doubled"

    def backward(self, terms, student_parameters, progress) -> None:
        total = torch.stack(list(terms.values())).sum()
        own = [p for p in self.head.parameters()]
        grads = torch.autograd.grad(total, student_parameters + own)
        for parameter, grad in zip(student_parameters, grads):
            parameter.grad = 2 * grad
        for parameter, grad in zip(own, grads[len(student_parameters):]):
            parameter.grad = grad


def shapes() -> FeatureShapes:
    return FeatureShapes(stages=(), embedding=(), num_classes=5)


def test_one_gradient_rule_governs_the_student_and_the_other_parts_get_plain_gradients() -> None:
    torch.manual_seed(0)
    method = composition.compose("doubled+head", [DoubledHead, Head])()
    method.build(shapes(), shapes(), 8)
    student = nn.Linear(3, 5)
    images = torch.randn(4, 3)
    teacher_logits = torch.randn(4, 5)
    batch = Batch(images, torch.zeros(4, dtype=torch.long), torch.arange(4))

    def terms() -> dict[str, Tensor]:
        logits = student(images)
        own = method.loss(Features(logits), Features(teacher_logits), batch, PROGRESS)
        return {"ce": F.cross_entropy(logits, batch.labels), **own}

    found = terms()
    assert set(found) == {"ce", "match", "head.match"}  # the added part's clashing name, prefixed
    plain = torch.autograd.grad(torch.stack(list(found.values())).sum(),
                                list(student.parameters()) + list(method.parts[1].head.parameters()))
    method.backward(terms(), list(student.parameters()), PROGRESS)
    for parameter, grad in zip(student.parameters(), plain[:2]):
        assert torch.allclose(parameter.grad, 2 * grad)  # DoubledHead's rule
    for parameter, grad in zip(method.parts[1].head.parameters(), plain[2:]):
        assert torch.allclose(parameter.grad, grad)  # plain gradient for the other part's module
    assert all(p.grad is not None for p in method.parts[0].head.parameters())


def test_two_gradient_rules_cannot_be_composed() -> None:
    class OtherRule(DoubledHead):
        name = "other"

    with pytest.raises(UserError, match="own gradient rule"):
        composition.compose("doubled+other", [DoubledHead, OtherRule])


def test_stages_of_every_part_with_clashing_names_prefixed() -> None:
    method = composition.compose("doubled+head", [DoubledHead, Head])()
    method.build(shapes(), shapes(), 8)
    stages = method.pretrain_stages()
    assert [stage.name for stage in stages] == ["init", "head.init"]
    assert stages[1].modules == [method.parts[1].head]
    assert method.trainable_modules() == [method.parts[0].head, method.parts[1].head]


def test_parts_are_checkpointed_with_the_composition() -> None:
    method = composition.compose("doubled+head", [DoubledHead, Head])()
    method.build(shapes(), shapes(), 8)
    assert {"parts.0.head.weight", "parts.1.head.weight"} <= set(method.state_dict())


@pytest.mark.parametrize("name", ["kd+at", "crd+kd"])
def test_contract(name: str) -> None:
    check_method(name)
