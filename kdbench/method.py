"""The plugin interface every distillation method implements.

A method is one file: a pure loss function, a frozen ``Config`` dataclass whose defaults cite
their source, and a thin ``Method`` subclass (mdistiller's shape). What a method needs from the
networks is *declared* (``student_taps``/``teacher_taps``, by role), never special-cased in the
training loop, so adding a method touches one file and one entry-point line.

The engine (``kdbench.train``) calls, in order:

1. ``method = MethodClass(config)``
2. ``method.build(student_shapes, teacher_shapes, num_train)`` after a dry forward pass, to
   create extra trainable modules (regressors, attention networks, projections) of the right
   size;
3. for each ``PretrainStage`` in ``method.pretrain_stages(student)``: the stage's own epochs
   over its own trainable parameters with its own loss;
4. each training step of the main stage: ``terms = method.loss(s, t, batch, progress)`` and
   ``method.backward(terms, student_parameters, progress)``; the engine adds the ``ce`` term
   weighted by ``method.ce_weight``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import Tensor, nn

# Feature roles a method can ask for. They name *what* a feature is, not where it lives in a
# particular architecture; each model maps them to its own modules (``feature_points()`` in
# models/*.py, kdbench/roles.py), and each family's docstring says which tensor each one is.
# Output of the last block of every stage, shallow to deep, list[(B, C, H, W)]: what
# RepDistiller returns as feat[1:-1] (and AT's authors pass to at_loss). On pre-activation
# WRNs the raw residual sum; on post-activation nets (ResNet, VGG) after the ReLU.
STAGES = "stages"
# Each stage output before its final activation: RepDistiller's ``preact=True`` features
# (bn(residual sum) on WRNs, the residual sum on ResNets, the group's last BN on VGG).
PREACT_STAGES = "preact_stages"
# Each stage output after its activation: relu(bn(residual sum)) on pre-activation WRNs (the
# MHGD authors' sensing points, their TF2 nets/WResNet.py); equal to STAGES on post-activation
# nets.
POSTACT_STAGES = "postact_stages"
EMBEDDING = "embedding"  # the pooled penultimate vector, the classifier's input: (B, D)
ROLES = frozenset({STAGES, PREACT_STAGES, POSTACT_STAGES, EMBEDDING})

# Where a method's definition comes from (``Method.fidelity``), shown by ``kdbench list``,
# stored in every record and footnoted in tables: the authors' released code, the paper alone
# (the authors' code unavailable or not followed), or kdbench's reading of a paper whose
# details are not public (every open choice named in the method's file).
FIDELITY_AUTHORS_CODE = "authors' code"
FIDELITY_PAPER = "paper"
FIDELITY_READING = "reading of the paper"
FIDELITIES = (FIDELITY_AUTHORS_CODE, FIDELITY_PAPER, FIDELITY_READING)


@dataclass
class Features:
    """What the engine hands a method for one network on one batch. A role the method did not
    ask for is empty (``[]`` / None): no hook collected it."""

    logits: Tensor
    stages: list[Tensor] = field(default_factory=list)
    embedding: Tensor | None = None
    preact_stages: list[Tensor] = field(default_factory=list)
    postact_stages: list[Tensor] = field(default_factory=list)


# (weight, bias) of a BatchNorm, as floats: what OFD (Heo et al., ICCV 2019) reads from the
# teacher's "BN before the ReLU" to build its margin.
NormParameters = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class FeatureShapes:
    """Shapes (without the batch dimension) from a dry forward pass, for ``build``. Roles the
    method did not ask for have empty tuples."""

    stages: tuple[tuple[int, ...], ...]
    embedding: tuple[int, ...]
    num_classes: int
    preact_stages: tuple[tuple[int, ...], ...] = ()
    postact_stages: tuple[tuple[int, ...], ...] = ()
    # Per pre-activation stage, the (weight, bias) of the BN the architecture names as the one
    # before the ReLU (TapPoint.norm), or None where it names none; one entry per preact stage.
    preact_norms: tuple[NormParameters | None, ...] = ()


@dataclass
class Batch:
    images: Tensor  # normalised and augmented, (B, C, H, W)
    labels: Tensor  # (B,) int64
    index: Tensor  # (B,) positions in the training set (for methods that keep a memory bank)


@dataclass(frozen=True)
class Progress:
    """Where training is. ``epoch`` counts the main (student) stage from 0."""

    epoch: int
    epochs: int
    step: int  # step within the epoch
    steps_per_epoch: int
    pretrain_epochs: int  # epochs spent in pre-training stages before the main stage

    @property
    def fraction(self) -> float:
        return (self.epoch + self.step / max(self.steps_per_epoch, 1)) / max(self.epochs, 1)


@dataclass
class PretrainStage:
    """A stage run before the main one, with its own epochs, trainable set and loss.

    FitNets' stage 1 trains the student up to its guided layer plus the regressor;
    MHGD's stage 1 trains the attention networks alone on the teacher.
    """

    name: str
    epochs: int
    # (s, t, batch) -> named loss terms; ``s`` is None when the student is not run.
    loss: Callable[[Features | None, Features, Batch], dict[str, Tensor]]
    modules: list[nn.Module]  # the method's modules trained in this stage
    # Train the student parameters that feed stage output ``k`` (FitNets' "up to the guided
    # layer"); None: the student is neither run nor trained.
    student_up_to_stage: int | None = None
    # The role whose ``k``-th tensor that is: stage outputs, or another per-stage role (AB's
    # initialisation trains everything that feeds the deepest pre-activation output, which on
    # pre-activation WRNs includes the final BN that no stage output depends on).
    student_role: str = STAGES
    # Whether the stage follows the setting's learning-rate schedule (scaled to its own epochs)
    # or keeps the initial rate constant.
    lr_schedule: str = "constant"
    # The stage optimiser's weight decay; None: the setting's. MHGD's stage 1 sets 0 because its
    # loss carries its own L2 term (the reference regularises the attention network only so).
    weight_decay: float | None = None
    # The stage optimiser's initial learning rate; None: the setting's. RepDistiller trains FT's
    # paraphraser at 0.01 whatever the student's rate (helper/pretrain.py).
    lr: float | None = None


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field, declared with ``bounded``: ``low``/``high``
    (None: unbounded), each included unless ``low_open``/``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value``, or None when it lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'<' if self.high_open else '<='} {self.high:g}"
        return None


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)


def bounded(default: Any, valid: Range) -> Any:
    """A config field with a valid range, checked when a config is made (``--set``, JSON):
    ``temperature: float = bounded(4.0, POSITIVE)``."""
    return field(default=default, metadata={"valid": valid})


def field_problem(config_class: type["MethodConfig"], key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``key``: every number must be finite, and lie in
    the field's declared Range if it has one. None when it is fine."""
    numbers = [value] if isinstance(value, (int, float)) else (
        list(value) if isinstance(value, (tuple, list)) else [])
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if not math.isfinite(number):
            return f"must be a finite number, got {number}"
        valid = config_class.valid_range(key)
        wrong = valid.problem(number) if valid is not None else None
        if wrong:
            return f"{wrong}, got {number}"
    return None


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config. Fields must be JSON scalars or lists of them.

    Every numeric field must be finite; a field declared with ``bounded`` must lie in its
    range. A subclass with its own ``__post_init__`` calls ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        prefix = getattr(type(self), "method_name", None) or type(self).__name__
        for item in dataclasses.fields(self):
            wrong = field_problem(type(self), item.name, getattr(self, item.name))
            if wrong:
                raise ValueError(f"{prefix}.{item.name} {wrong}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MethodConfig":
        """Inverse of ``to_json``: JSON has no tuples, so tuple fields come back as lists."""
        types = cls.field_types()
        unknown = set(data) - set(types)
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        values = {
            key: tuple(value) if typing.get_origin(types[key]) is tuple else value
            for key, value in data.items()
        }
        return cls(**values)

    @classmethod
    def field_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def valid_range(cls, key: str) -> "Range | None":
        """The Range field ``key`` was declared with (``bounded``), None if it has none."""
        return next((f.metadata.get("valid") for f in dataclasses.fields(cls) if f.name == key), None)


class Method(nn.Module):
    """Base class of every distillation method. Subclasses are ``nn.Module``s so that their
    extra trainable modules are saved, restored and moved to the device with them."""

    name: ClassVar[str]  # the registry/CLI name (= the file name of a built-in)
    paper: ClassVar[str]  # citation shown by ``kdbench list``
    # The row title papers print ("KD", "FitNets", "CRD + KD"): tables label rows with it.
    display_name: ClassVar[str]
    # One of FIDELITIES, and one line saying what was read and what was chosen. Declared by
    # every method; the contract (kdbench.testing) fails one that does not.
    fidelity: ClassVar[str]
    fidelity_note: ClassVar[str]
    # Modules beyond the defining file's own package whose code the method runs (a composition
    # defined in kdbench/ names its parts'): they enter the method's source hash
    # (kdbench/sources.py), so a record says exactly which code produced it.
    source_modules: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    student_taps: ClassVar[frozenset[str]] = frozenset()
    teacher_taps: ClassVar[frozenset[str]] = frozenset()
    uses_teacher: ClassVar[bool] = True
    # Operations (as kdbench.host_sync names them, e.g. "aten._linalg_eigh") that this method
    # issues every step although they make the host wait for the GPU, each with why it cannot
    # do without. The contract test fails a step that synchronises in any other way, and a
    # declaration the step never uses.
    host_syncs: ClassVar[Mapping[str, str]] = {}
    # Config values this method takes when its terms are *added* to another method's (the b
    # of a composition "a+b", kdbench/composition.py), each with its source: a weight tuned
    # for the method alone need not be the one it is added with.
    added_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()

    def configured_display_name(self) -> str:
        """The row title of this method with its config: ``display_name``, unless an option
        makes it another method in the papers' tables (KD with logit standardisation is
        "KD + LS"). Records store it as ``method_display_name``."""
        return getattr(type(self), "display_name", None) or self.name

    @property
    def ce_weight(self) -> float:
        """Weight of the engine's cross-entropy term (KD uses γ = 0.1, for example)."""
        return 1.0

    def build(
        self,
        student_shapes: FeatureShapes,
        teacher_shapes: FeatureShapes | None,
        num_train: int,
    ) -> None:
        """Create extra trainable modules sized from a dry forward pass. Default: none."""

    def observe_training_set(self, labels: Tensor) -> None:
        """Called once after ``build`` (and after the method is on the run's device) with the
        labels of the whole training set, (num_train,) int64 on that device, indexed like
        ``Batch.index``. For methods whose sampling depends on the classes of samples not in
        the batch (a memory bank's negatives from other classes). Default: nothing."""

    def pretrain_stages(self) -> list[PretrainStage]:
        return []

    def loss(
        self, s: Features, t: Features | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        """Named loss terms, already weighted. The engine adds ``ce``."""
        return {}

    def backward(
        self, terms: Mapping[str, Tensor], student_parameters: list[nn.Parameter], progress: Progress
    ) -> None:
        """Turn the loss terms into gradients. Default: back-propagate their sum.

        Override for a custom gradient rule (MHGD clips each transfer gradient to the CE
        gradient's norm); the optimiser then adds weight decay and steps."""
        torch.stack([term for term in terms.values()]).sum().backward()

    def trainable_modules(self) -> list[nn.Module]:
        """Extra modules trained with the student in the main stage. Default: all children."""
        return list(self.children())

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def metadata_problems(method_class: type) -> list[str]:
    """What is wrong with a method's declared ``display_name``/``fidelity``/``fidelity_note``
    (empty: nothing). Each must be a non-empty single line: they end up in table rows,
    captions and one-line listings."""
    problems = []
    for attribute in ("display_name", "fidelity_note"):
        value = getattr(method_class, attribute, None)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"declares no `{attribute}` (a non-empty string)")
        elif "\n" in value:
            problems.append(f"`{attribute}` must be one line, got {value!r}")
    fidelity = getattr(method_class, "fidelity", None)
    if fidelity not in FIDELITIES:
        problems.append(f"fidelity = {fidelity!r}: must be one of "
                        + ", ".join(repr(choice) for choice in FIDELITIES)
                        + " (kdbench.method.FIDELITY_*)")
    return problems


class InvalidValue(ValueError):
    """A value of the right type outside what its field allows (not finite, out of range)."""


def parse_config_value(config_class: type[MethodConfig], key: str, raw: str) -> Any:
    """Parse ``raw`` (from ``--set method.key=raw``) to the field's declared type and check it.

    Raises KeyError for an unknown field, ValueError for a value of the wrong type and
    InvalidValue for one outside the field's valid values (``field_problem``)."""
    value = _parse_typed(config_class, key, raw)
    wrong = field_problem(config_class, key, value)
    if wrong:
        raise InvalidValue(wrong)
    return value


def _parse_typed(config_class: type[MethodConfig], key: str, raw: str) -> Any:
    types = config_class.field_types()
    if key not in types:
        raise KeyError(key)
    wanted = types[key]
    origin = typing.get_origin(wanted)
    if wanted is bool:
        lowered = raw.strip().lower()
        if lowered in {"true", "1", "yes"}:
            return True
        if lowered in {"false", "0", "no"}:
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if wanted in (int, float):
        try:
            value = wanted(raw)
        except ValueError:
            raise ValueError(f"expected {'an int' if wanted is int else 'a float'}, got {raw!r}") from None
        return value
    if wanted is str:
        return raw
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(wanted) or (str,)
        items = [part for part in raw.split(",") if part.strip()]
        return tuple(item_type(part) for part in items)
    if origin is typing.Union or str(origin) == "types.UnionType":
        options = [option for option in typing.get_args(wanted) if option is not type(None)]
        if raw.strip().lower() in {"none", "null"}:
            return None
        for option in options:
            try:
                return option(raw)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"cannot parse {raw!r} as {wanted}")
    raise ValueError(f"field type {wanted} cannot be set from the command line")


def iter_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())
