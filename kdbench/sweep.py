"""Sweeps: comma lists on the command line expand into variants of a method.

``--set kd.temperature=1,2,4,8`` and the students' recipe flags (``--lr 0.01,0.05``,
``--epochs 60,120``, ``--batch-size 64,128``) each name an *axis*: one field and the values it
takes. A method's variants are the cartesian product of its own config axes and every recipe
axis, in the order the axes were given (the recipe applies to every student, the Student
alone included, so that its baseline is tuned over the same grid). Each variant is its own
RunSpec, so its own run id and table row (kdbench/rows.py titles it "KD (T = 2)").

A single value is an axis of one value: the RunSpec has exactly the config and overrides it
had before sweeps existed, so a run keeps its id.

What a list may not be, each a one-line UserError (exit 2): an item left empty
(``2,,4``, ``2,``), a value listed twice (``2,2.0``), a field set twice (two ``--set`` of
``kd.temperature``). A field whose type is a tuple (a method's list of layers, say) takes
its comma-separated elements as one value, as ``kdbench.method.parse_config_value`` always
read it: it is not a scalar, so it cannot be swept (its commas are its elements).
"""

from __future__ import annotations

import argparse
import itertools
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kdbench.errors import UserError

# The students' recipe fields a flag sets (kdbench.settings.RECIPE_OVERRIDES), by flag.
RECIPE_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr"}


@dataclass(frozen=True)
class Axis:
    """One swept field: a method's config field, or (``method`` None) a recipe field that
    every student run takes."""

    method: str | None
    field: str
    values: tuple[Any, ...]

    @property
    def flag(self) -> str:
        return f"--set {self.method}.{self.field}" if self.method else RECIPE_FLAGS[self.field]


@dataclass(frozen=True)
class Variant:
    config: dict[str, Any]  # RunSpec.config: the method fields the user set
    overrides: dict[str, Any]  # RunSpec.overrides: the recipe fields the user set


@dataclass(frozen=True)
class Sweep:
    axes: tuple[Axis, ...] = ()

    def axes_of(self, method: str) -> list[Axis]:
        """The axes that vary ``method``'s runs: its config's and the recipe's."""
        return [axis for axis in self.axes if axis.method in (None, method)]

    def variants(self, method: str) -> list[Variant]:
        """The cartesian product of ``method``'s axes, the first axis varying slowest."""
        axes = self.axes_of(method)
        out = []
        for values in itertools.product(*(axis.values for axis in axes)):
            chosen = list(zip(axes, values))
            out.append(Variant({axis.field: value for axis, value in chosen if axis.method},
                               {axis.field: value for axis, value in chosen if not axis.method}))
        return out

    def count(self, method: str) -> int:
        return math.prod(len(axis.values) for axis in self.axes_of(method))


def split_list(text: str, what: str) -> list[str]:
    """``"2,4"`` -> ["2", "4"]; an empty item is a UserError naming ``what``."""
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise UserError(f"{what}: an empty item in the list {text!r}; give values separated "
                        "by single commas, e.g. 2,4")
    return items


def refuse_repeats(values: Sequence[Any], items: Sequence[str], what: str) -> None:
    """Two items of one list that mean the same value (``2,2.0``) would be one run twice."""
    for index, value in enumerate(values):
        for earlier in range(index):
            if values[earlier] == value:
                raise UserError(f"{what}: {items[index]!r} is listed twice (as {items[earlier]!r}"
                                "); each value is one variant")


def value_list(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type: a comma list of values, each read by ``parse`` (``--lr 0.01,0.05``)."""
    def read(text: str) -> tuple[Any, ...]:
        items = [item.strip() for item in text.split(",")]
        if any(not item for item in items):
            raise argparse.ArgumentTypeError(f"an empty item in the list {text!r}")
        values = tuple(parse(item) for item in items)
        for index, value in enumerate(values):
            if value in values[:index]:
                raise argparse.ArgumentTypeError(f"{items[index]!r} is listed twice in {text!r}")
        return values

    read.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in errors
    return read


def is_scalar(kind: Any) -> bool:
    """Whether a config field's type holds one value (bool, int, float, str, or one of them
    or None), so that a comma list of it is a sweep rather than its elements."""
    return typing.get_origin(kind) not in (tuple, list) and kind not in (tuple, list)


def config_axes(assignments: Sequence[str], methods: Sequence[str]) -> list[Axis]:
    """``--set METHOD.FIELD=V1,V2`` (repeatable) -> one axis per field, typed and checked by
    the method's Config; every combination of a method's values is a valid config."""
    from kdbench import registry
    from kdbench.method import InvalidValue, parse_config_value

    axes: list[Axis] = []
    for assignment in assignments:
        key, equals, raw = assignment.partition("=")
        method, dot, field = key.partition(".")
        if not equals or not dot or not field:
            raise UserError(f"--set {assignment!r}: expected METHOD.FIELD=VALUE, e.g. kd.temperature=2 "
                            "(or a list, kd.temperature=2,4)")
        if method not in methods:
            raise UserError(f"--set {assignment!r}: method {method!r} is not in --methods ({', '.join(methods)})")
        config_class = registry.get(method).Config
        types = config_class.field_types()
        if field not in types:
            known = ", ".join(types) or "none"
            raise UserError(f"--set {assignment!r}: {method} has no field {field!r} (fields: {known})")
        if any(axis.method == method and axis.field == field for axis in axes):
            raise UserError(f"--set {assignment!r}: {method}.{field} is set twice; give its values "
                            f"as one list, e.g. --set {method}.{field}=2,4")
        items = split_list(raw, f"--set {assignment!r}") if is_scalar(types[field]) and "," in raw else [raw]
        values = []
        for item in items:
            try:
                values.append(parse_config_value(config_class, field, item))
            except InvalidValue as error:
                raise UserError(f"--set {assignment!r}: {method}.{field} {error}") from None
            except ValueError as error:
                raise UserError(f"--set {assignment!r}: {error}") from None
        refuse_repeats(values, items, f"--set {assignment!r}")
        axes.append(Axis(method, field, tuple(values)))
    check_configs(Sweep(tuple(axes)), methods)
    return axes


def check_configs(sweep: Sweep, methods: Sequence[str]) -> None:
    """Each variant's config passes the config's own checks (a field's range, rules across
    fields, a composition's unused CE weight), before anything runs."""
    from kdbench import registry

    for method in methods:
        config_class = registry.get(method).Config
        for variant in sweep.variants(method):
            if not variant.config:
                continue
            try:
                config_class.from_json(variant.config)
            except (TypeError, ValueError) as error:
                which = (" (" + ", ".join(f"{k}={v}" for k, v in variant.config.items()) + ")"
                         if sweep.count(method) > 1 else "")
                raise UserError(f"--set for {method}{which}: {error}") from None


def recipe_axes(values: dict[str, tuple[Any, ...] | None]) -> list[Axis]:
    """The recipe flags' lists (None: not given) as axes, in RECIPE_FLAGS order; the
    learning rates must be positive finite numbers."""
    axes = []
    for field in RECIPE_FLAGS:
        given = values.get(field)
        if given is None:
            continue
        if field == "lr":
            for lr in given:
                if not (math.isfinite(lr) and lr > 0):
                    raise UserError(f"--lr must be a positive finite number, got {lr}")
        axes.append(Axis(None, field, tuple(given)))
    return axes
