"""The method contract (kdbench/testing.py) on every registered method, and on broken ones.

Parametrised over ``registry.names()``: built-ins and any installed third-party plugin. A method
registered in pyproject.toml whose module does not exist yet (being written) is skipped with a
reason; one whose module exists but fails to import is a failure.

The second half feeds the checker deliberately broken methods: a contract test that passes
everything would prove nothing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import registry
from kdbench.method import (
    EMBEDDING,
    FIDELITY_PAPER,
    POSTACT_STAGES,
    PREACT_STAGES,
    ROLES,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
)
from kdbench.testing import check_method, check_method_class


def module_exists(target: str) -> bool:
    module = target.partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


@pytest.mark.parametrize("name", registry.names())
def test_registered_method_meets_the_contract(name: str) -> None:
    try:
        registry.get(name)
    except registry.BrokenPlugin as error:
        targets = [r.target for r in registry.registrations()[name]]
        if not any(module_exists(target) for target in targets):
            pytest.skip(f"{name}: registered as {', '.join(targets)} but its module does not exist "
                        f"yet ({error})")
    check_method(name)  # a module that exists but fails to import fails here, with its error


# --- the checker catches broken methods ----------------------------------------------------------


@dataclass(frozen=True)
class EmptyConfig(MethodConfig):
    pass


class Double(Method):
    """What every test double declares besides its name, taps and loss."""

    paper = "test double"
    display_name = "Test double"
    fidelity = FIDELITY_PAPER
    fidelity_note = "a test double of the contract checker"
    Config = EmptyConfig


class LogitL2(Double):
    """A correct little method (logit matching); the broken ones below each change one thing."""

    name = "logit_l2"

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        return {"l2": F.mse_loss(s.logits, t.logits)}


def test_a_correct_method_passes() -> None:
    check_method_class(LogitL2)


class EveryRole(Method):
    """Reads every feature role of both networks, and the teacher's pre-activation BNs: the
    contract on it runs each family's whole role map through taps, shapes and gradients."""

    name = "every_role"
    paper = "test double"
    display_name = "Every role"
    fidelity = FIDELITY_PAPER
    fidelity_note = "a test double"
    Config = EmptyConfig
    student_taps = ROLES
    teacher_taps = ROLES

    def build(self, student_shapes, teacher_shapes, num_train):
        for shapes in (student_shapes, teacher_shapes):
            stages = shapes.stages
            if not (len(stages) == len(shapes.preact_stages) == len(shapes.postact_stages)
                    == len(shapes.preact_norms)) or not stages or not shapes.embedding:
                raise ValueError(f"roles missing from {shapes}")
            # A student may name no BN (the ShuffleNets, as RepDistiller); every teacher of the
            # contract's pairs and settings does.
            if any((norm is None and shapes is teacher_shapes)
                   or (norm is not None and len(norm[0]) != stage[0])
                   for norm, stage in zip(shapes.preact_norms, shapes.preact_stages)):
                raise ValueError("a pre-activation stage without its BN's (weight, bias)")
        self.head = nn.Linear(4, 4)
        with torch.no_grad():  # any use of the norms will do; a method like OFD builds on them
            self.head.bias.fill_(sum(teacher_shapes.preact_norms[-1][1]) / teacher_shapes.preact_stages[-1][0])

    def loss(self, s, t, batch, progress):
        def summary(f: Features) -> Tensor:
            # The deepest map of each stage role and the embedding, one number per sample each.
            return torch.stack([f.stages[-1].mean(dim=(1, 2, 3)), f.preact_stages[-1].mean(dim=(1, 2, 3)),
                                f.postact_stages[-1].mean(dim=(1, 2, 3)), f.embedding.mean(dim=1)], dim=1)

        return {"l2": F.mse_loss(self.head(summary(s)), summary(t))}


def test_a_method_reading_every_role_passes() -> None:
    check_method_class(EveryRole)


class UndeclaredRole(EveryRole):
    """Reads the post-activation stages it did not declare: they are empty."""

    student_taps = frozenset({STAGES, PREACT_STAGES, EMBEDDING})

    def build(self, student_shapes, teacher_shapes, num_train):
        self.head = nn.Linear(4, 4)


def test_unknown_method_is_a_clear_failure() -> None:
    with pytest.raises(AssertionError, match="does not load"):
        check_method("no_such_method_anywhere")


@dataclass(frozen=True)
class PlainConfig:  # not a MethodConfig: no to_json / from_json for run specs and records
    weight: float = 1.0


class PlainDataclassConfig(LogitL2):
    Config = PlainConfig


@dataclass(frozen=True)
class TupleOfTuplesConfig(MethodConfig):
    layers: tuple[tuple[int, int], ...] = ((1, 2),)  # comes back from JSON as lists


class NoRoundTrip(LogitL2):
    Config = TupleOfTuplesConfig


class DetachedLoss(LogitL2):
    def loss(self, s, t, batch, progress):
        return {"l2": F.mse_loss(s.logits.detach(), t.logits) + 0 * s.logits.sum()}


class NonScalarLoss(LogitL2):
    def loss(self, s, t, batch, progress):
        return {"l2": (s.logits - t.logits).pow(2)}


class UnusedProjection(Double):
    """Builds a projection that its loss never uses: no gradient reaches it."""

    name = "unused_projection"
    student_taps = frozenset({EMBEDDING})
    teacher_taps = frozenset({EMBEDDING})

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        self.projection = nn.Linear(student_shapes.embedding[0], teacher_shapes.embedding[0])

    def loss(self, s, t, batch, progress):
        return {"l2": F.mse_loss(s.logits, t.logits)}


class LeakyStage(Double):
    """A pre-training stage "up to stage 0" whose loss uses the logits: it reaches parameters
    beyond stage 0 that the stage does not train."""

    name = "leaky_stage"
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})

    def build(self, student_shapes, teacher_shapes, num_train):
        self.scale = nn.Parameter(torch.ones(()))

    def pretrain_stages(self) -> list[PretrainStage]:
        def loss(s, t, batch):
            return {"leak": self.scale * (s.stages[0].mean() + s.logits.pow(2).mean())}

        return [PretrainStage("leak", 1, loss, [self], student_up_to_stage=0)]

    def trainable_modules(self) -> list[nn.Module]:
        return []

    def loss(self, s, t, batch, progress):
        return {"l2": F.mse_loss(s.logits, t.logits)}


class FixedStageCount(Double):
    """Pairs stages by position and so breaks when teacher and student have different counts."""

    name = "fixed_stage_count"
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})

    def loss(self, s, t, batch, progress):
        if len(s.stages) != len(t.stages):
            raise ValueError(f"{len(s.stages)} student stages vs {len(t.stages)} teacher stages")
        return {"l2": sum(F.mse_loss(a.mean(1), b.mean(1)) for a, b in zip(s.stages, t.stages))}


class MaskedMean(LogitL2):
    """RKD's normaliser as the authors write it, d[d > 0].mean(): a boolean index."""

    def loss(self, s, t, batch, progress):
        gaps = (s.logits - t.logits).abs()
        return {"l1": gaps[gaps > 0].mean()}


class ItemInLoss(LogitL2):
    """A Python `if` on a tensor inside the step."""

    def loss(self, s, t, batch, progress):
        l2 = F.mse_loss(s.logits, t.logits)
        return {"l2": l2 if l2 > 0 else l2.detach()}


class SyncingBackward(LogitL2):
    """A custom backward that logs its gradient norm with .item() every step."""

    def backward(self, terms, student_parameters, progress):
        super().backward(terms, student_parameters, progress)
        self.last_norm = float(torch.stack([p.grad.norm() for p in student_parameters if p.grad is not None]).sum())


class StaleDeclaration(LogitL2):
    host_syncs = {"aten._linalg_eigh": "declared for a decomposition the loss no longer makes"}


class UnknownDeclaration(LogitL2):
    host_syncs = {"aten.linalg_eigh": "a name kdbench.host_sync never reports (no underscore)"}


class DeclaredSync(LogitL2):
    """Declares the boolean index it needs: passes."""

    # Its backward indexes with the same mask again (index_put): both synchronise.
    host_syncs = {"aten.index": "test double: a boolean index, declared",
                  "aten.index_put": "test double: the boolean index's backward, declared"}

    def loss(self, s, t, batch, progress):
        return MaskedMean.loss(self, s, t, batch, progress)


class Undeclared(Method):
    """A method that says nothing about its row title or where its definition comes from."""

    name = "undeclared"
    paper = "test double"
    Config = EmptyConfig

    def loss(self, s, t, batch, progress):
        return LogitL2.loss(self, s, t, batch, progress)


class UnknownFidelity(LogitL2):
    fidelity = "the authors' code"  # not the exact string FIDELITY_AUTHORS_CODE


class EmptyDisplayName(LogitL2):
    display_name = " "


class TwoLineNote(LogitL2):
    fidelity_note = "what was read\nwhat was chosen"


class MultiLineConfiguredName(LogitL2):
    def configured_display_name(self) -> str:
        return "KD\n+ LS"


def test_a_declared_host_sync_passes() -> None:
    check_method_class(DeclaredSync)


@pytest.mark.parametrize("broken, message", [
    (MaskedMean, r"test_contract.py:\d+ \(loss\): aten.index \(indexing with a boolean mask"),
    (ItemInLoss, r"loss\(\) and backward\(\) makes the host wait .*aten._local_scalar_dense"),
    (SyncingBackward, r"\(backward\): aten._local_scalar_dense"),
    (StaleDeclaration, r"declares host_syncs \['aten._linalg_eigh'\] that none of its steps issues"),
    (UnknownDeclaration, "kdbench.host_sync never reports"),
    (Undeclared, r"declares no `display_name`.*declares no `fidelity_note`.*fidelity = None"),
    (UnknownFidelity, r"fidelity = \"the authors' code\": must be one of \"authors' code\", 'paper', "
                      r"'reading of the paper'"),
    (EmptyDisplayName, "declares no `display_name`"),
    (TwoLineNote, "`fidelity_note` must be one line"),
    (MultiLineConfiguredName, "configured_display_name.*must be a non-empty single line"),
    (PlainDataclassConfig, "not a subclass of kdbench.method.MethodConfig"),
    (NoRoundTrip, "round-trip"),
    (DetachedLoss, "do not reach the student"),
    (NonScalarLoss, "must be a scalar"),
    (UnusedProjection, "no gradient reaches method.projection"),
    (LeakyStage, "parameters the stage does not train"),
    (FixedStageCount, "teacher stages"),
    (UndeclaredRole, "raised IndexError: list index out of range"),
])
def test_the_checker_catches(broken: type[Method], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_method_class(broken)


# --- the built-ins' options meet the contract too (a Config subclass with other defaults) ------


def with_defaults(method_class: type[Method], **defaults) -> type[Method]:
    config = dataclass(frozen=True)(type("Variant", (method_class.Config,), {
        "__annotations__": {key: type(value) for key, value in defaults.items()}, **defaults}))
    return type(f"{method_class.__name__}Variant", (method_class,), {"Config": config})


@pytest.mark.parametrize("name, defaults", [
    ("fitnet", {"stages": 1}),  # RepDistiller/mdistiller's single stage, regressor trained with the student
    ("fitnet", {"regressor_relu": "always"}),
    ("at", {"beta_halved": True}),
    ("rkd", {"normalize": True}),
    ("kd", {"logit_standardization": True}),
    ("dkd", {"logit_standardization": True}),
])
def test_builtin_options_meet_the_contract(name: str, defaults: dict) -> None:
    check_method_class(with_defaults(registry.get(name), **defaults), name)
