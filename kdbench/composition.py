"""Composed methods: ``--methods a+b`` trains with method a and adds method b's loss terms.

RepDistiller's most used switch is ``-a``, the weight of a KD term added to whatever method
``--distill`` names: its loss is ``γ·CE + α·KD + β·method`` (helper/loops.py
``train_distill``), and its CRD+KD row is ``--distill crd -r 1 -a 1 -b 0.8``
(scripts/run_cifar_distill.sh). A composition generalises that to any two (or more)
registered methods without a file per pair. ``a+b`` is the method named "a+b" whose

- loss terms are a's terms plus b's terms (each part computes its terms as it would alone,
  with its own weights); a term name that an earlier part already used is prefixed with the
  part's name (``"b.term"``);
- cross-entropy weight is a's (RepDistiller's single ``-r``, which belongs to the method run
  with ``--distill``); b's CE weight is not used, and setting a field of b that only changes
  b's CE weight is refused (``ComposedConfig.__post_init__``), because it would do nothing;
- config is each part's config, set with ``--set a+b.b.field=value`` (``--set
  crd+kd.kd.alpha=0.9``); an added part starts from its class's ``added_defaults`` (KD's
  weight becomes RepDistiller's ``-a 1`` when KD is added to another method);
- feature taps are the union of the parts' taps; ``build`` builds every part; pre-training
  stages are every part's, in order (a name an earlier part used gets the part's prefix);
  trainable modules are every part's; host syncs are every part's declared ones;
- gradient rule is the default (back-propagate the sum) unless exactly one part has its own
  ``backward``: then that rule turns the terms into the student's (and its own modules')
  gradients, and the other parts' modules get the plain gradient of the summed terms. Two
  parts with their own rules cannot be combined: which rule governs the student is not
  defined, so it is an error.

The composed class is made on demand by the registry (``registry.get("crd+kd")``); it has its
own run id (``RunSpec.method`` is "crd+kd"), the display name "CRD + KD" (the parts' display
names joined by " + "), the least faithful part's fidelity, and a source hash over this file
and every part's code (``source_modules``, kdbench/sources.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from kdbench.errors import UserError
from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    FIDELITY_PAPER,
    FIDELITY_READING,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Range,
    PretrainStage,
    Progress,
    iter_parameters,
)

SEPARATOR = "+"
# From the most to the least faithful: a composition is as faithful as its least faithful part
# (a reading of the paper in it makes the whole row an interpretation).
FIDELITY_ORDER = (FIDELITY_PAPER, FIDELITY_AUTHORS_CODE, FIDELITY_READING)


def is_composition(name: str) -> bool:
    return SEPARATOR in name


def part_names(name: str) -> list[str]:
    """'crd+kd' -> ['crd', 'kd']; a UserError for an empty or repeated part."""
    parts = [part.strip() for part in name.split(SEPARATOR)]
    if len(parts) < 2 or not all(parts):
        raise UserError(f"method {name!r}: a composition names two or more methods joined by "
                        f"'{SEPARATOR}', e.g. crd+kd")
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise UserError(f"method {name!r}: {', '.join(repeated)} appears twice; a method's terms "
                        "are added once (set its weight instead)")
    return parts


def _starting_config(method_class: type[Method], added: bool) -> MethodConfig:
    """A part's default config: its class's defaults, and as an added part its
    ``added_defaults`` on top."""
    config = method_class.Config()
    overrides = dict(getattr(method_class, "added_defaults", {})) if added else {}
    return dataclasses.replace(config, **overrides) if overrides else config


@dataclass(frozen=True)
class ComposedConfig(MethodConfig):
    """The parts' configs, in order. In JSON and on the command line each field is
    ``part.field`` (``kd.alpha``), so records and ``--set`` read the same."""

    parts: tuple[MethodConfig, ...] = ()
    part_classes: ClassVar[tuple[type[Method], ...]] = ()

    def __post_init__(self) -> None:
        classes = type(self).part_classes
        if len(self.parts) != len(classes):
            raise ValueError(f"expected {len(classes)} part configs, got {len(self.parts)}")
        for index, (method_class, config) in enumerate(zip(classes, self.parts)):
            if not isinstance(config, method_class.Config):
                raise ValueError(f"{method_class.name}: expected a {method_class.Config.__name__}, "
                                 f"got {type(config).__name__}")
            if index == 0:
                continue
            # An added part's CE weight is not used (module docstring): a change that only
            # moves it would be silently ignored, so it is refused.
            start = _starting_config(method_class, added=True)
            if config != start and method_class(config).ce_weight != method_class(start).ce_weight:
                composed = SEPARATOR.join(c.name for c in classes)
                raise ValueError(
                    f"{composed}: {method_class.name}'s cross-entropy weight is not used in a "
                    f"composition, whose CE weight is {classes[0].name}'s")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(method_class.name for method_class in cls.part_classes)

    def to_json(self) -> dict[str, Any]:
        return {f"{name}.{key}": value for name, config in zip(self.names(), self.parts)
                for key, value in config.to_json().items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ComposedConfig":
        """Partial data is fine (a RunSpec stores only what the user set); the rest are the
        parts' starting configs. KeyError for a key that is no part's field."""
        names = cls.names()
        grouped: dict[str, dict[str, Any]] = {name: {} for name in names}
        for key, value in data.items():
            name, dot, field_name = key.partition(".")
            if not dot or name not in grouped:
                raise KeyError(key)
            grouped[name][field_name] = value
        parts = []
        for index, (name, method_class) in enumerate(zip(names, cls.part_classes)):
            start = _starting_config(method_class, added=index > 0)
            given = grouped[name]
            if given:
                unknown = set(given) - set(method_class.Config.field_types())
                if unknown:
                    raise KeyError(", ".join(f"{name}.{key}" for key in sorted(unknown)))
                # The part's own from_json types the values (JSON lists back to tuples).
                typed = method_class.Config.from_json({**start.to_json(), **given})
                parts.append(typed)
            else:
                parts.append(start)
        return cls(parts=tuple(parts))

    @classmethod
    def field_types(cls) -> dict[str, type]:
        return {f"{name}.{key}": kind for name, method_class in zip(cls.names(), cls.part_classes)
                for key, kind in method_class.Config.field_types().items()}

    @classmethod
    def valid_range(cls, key: str) -> Range | None:
        """``part.field``'s Range is the part's own (``--set crd+kd.kd.temperature=0`` is
        refused as ``--set kd.temperature=0`` is)."""
        name, _, field_name = key.partition(".")
        for part_name, method_class in zip(cls.names(), cls.part_classes):
            if part_name == name:
                return method_class.Config.valid_range(field_name)
        return None


def _has_own_backward(method_class: type[Method]) -> bool:
    return method_class.backward is not Method.backward


class Composition(Method):
    """Base of every composed method class; ``compose`` makes the subclasses."""

    part_classes: ClassVar[tuple[type[Method], ...]] = ()
    config: ComposedConfig

    def __init__(self, config: ComposedConfig | None = None) -> None:
        super().__init__(config)
        self.parts = nn.ModuleList(method_class(part_config) for method_class, part_config
                                   in zip(self.part_classes, self.config.parts))

    def configured_display_name(self) -> str:
        """The parts' row titles with their configs, joined: "CRD + KD"."""
        return " + ".join(part.configured_display_name() for part in self.parts)

    @property
    def ce_weight(self) -> float:
        return self.parts[0].ce_weight

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        for part in self.parts:
            part.build(student_shapes, teacher_shapes, num_train)

    def observe_training_set(self, labels: Tensor) -> None:
        for part in self.parts:
            part.observe_training_set(labels)

    def pretrain_stages(self) -> list[PretrainStage]:
        stages: list[PretrainStage] = []
        for part in self.parts:
            for stage in part.pretrain_stages():
                if any(existing.name == stage.name for existing in stages):
                    stage = dataclasses.replace(stage, name=f"{part.name}.{stage.name}")
                stages.append(stage)
        return stages

    def loss(self, s: Features, t: Features | None, batch: Batch,
             progress: Progress) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for part in self.parts:
            for name, term in part.loss(s, t, batch, progress).items():
                terms[f"{part.name}.{name}" if name in terms or name == "ce" else name] = term
        return terms

    def backward(self, terms: Mapping[str, Tensor], student_parameters: list[nn.Parameter],
                 progress: Progress) -> None:
        ruled = [part for part in self.parts if _has_own_backward(type(part))]
        if not ruled:
            super().backward(terms, student_parameters, progress)
            return
        (rule,) = ruled  # compose() refuses two rules
        # The other parts' modules: the plain gradient of the summed terms, taken before the
        # rule's own backward frees the graph.
        others = [p for part in self.parts if part is not rule
                  for p in iter_parameters(part.trainable_modules()) if p.requires_grad]
        grads: tuple[Tensor | None, ...] = ()
        if others:
            total = torch.stack([term for term in terms.values()]).sum()
            grads = torch.autograd.grad(total, others, retain_graph=True, allow_unused=True)
        rule.backward(terms, student_parameters, progress)
        for parameter, grad in zip(others, grads):
            if grad is not None:
                parameter.grad = grad if parameter.grad is None else parameter.grad + grad

    def trainable_modules(self) -> list[nn.Module]:
        return [module for part in self.parts for module in part.trainable_modules()]


def compose(name: str, classes: list[type[Method]]) -> type[Composition]:
    """The Method class named ``name`` ("crd+kd") that composes ``classes`` in order."""
    ruled = [method_class.name for method_class in classes if _has_own_backward(method_class)]
    if len(ruled) > 1:
        raise UserError(f"method {name!r}: {' and '.join(ruled)} each have their own gradient rule "
                        "(backward); a composition can follow at most one")
    config_class = dataclasses.make_dataclass(
        "Config", [("parts", tuple, dataclasses.field(default_factory=lambda: tuple(
            _starting_config(c, added=index > 0) for index, c in enumerate(classes))))],
        bases=(ComposedConfig,), frozen=True, namespace={"part_classes": tuple(classes)})
    config_class.__qualname__ = f"Composition[{name}].Config"
    # A part that declares no fidelity fails the contract on its own; here it ranks last.
    ranks = [FIDELITY_ORDER.index(f) if (f := getattr(c, "fidelity", None)) in FIDELITY_ORDER
             else len(FIDELITY_ORDER) - 1 for c in classes]
    worst = max(ranks)
    display = " + ".join(getattr(c, "display_name", None) or c.name for c in classes)
    host_syncs: dict[str, str] = {}
    for method_class in classes:
        for op, why in method_class.host_syncs.items():
            host_syncs.setdefault(op, f"{method_class.name}: {why}")
    namespace = {
        "name": name,
        "paper": "; ".join(f"{c.name}: {c.paper}" for c in classes),
        "Config": config_class,
        "part_classes": tuple(classes),
        "student_taps": frozenset().union(*(c.student_taps for c in classes)),
        "teacher_taps": frozenset().union(*(c.teacher_taps for c in classes)),
        "uses_teacher": any(c.uses_teacher for c in classes),
        "host_syncs": host_syncs,
        "display_name": display,
        "fidelity": FIDELITY_ORDER[worst],
        "fidelity_note": (f"{classes[0].name}'s terms and CE weight plus "
                          + ", ".join(f"{c.name}'s terms" for c in classes[1:])
                          + " (RepDistiller's -a); "
                          + "; ".join(f"{c.name}: {getattr(c, 'fidelity', None) or 'not declared'}"
                                      for c in classes)),
        # The parts' code enters the composition's source hash (kdbench/sources.py) beside
        # this file's.
        "source_modules": tuple(dict.fromkeys(c.__module__ for c in classes)),
        "__module__": __name__,
        "__doc__": f"The composition {name}: {', '.join(c.name for c in classes)} (kdbench/composition.py).",
    }
    composed = type(f"Composition[{name}]", (Composition,), namespace)
    return composed
