"""A table's rows: which runs form one row (its key) and what the row is called in print.

Key: ``teacher``, ``vanilla``, a method name, or ``method[field=value,...]`` when a setting
holds several variants of a method (runs whose specs differ in more than the seed). Keys are
what ``table --methods`` takes; they stay stable, whatever the row is called.

Title: what a paper prints. The method's ``method_display_name`` from its records ("KD",
"FitNets", "CRD + KD"; records made before that field existed fall back to the method's
name), Teacher and Student for the reference rows, and for a variant the fields that differ at
the values the run actually used (the resolved config and recipe of the record, so a default
prints as its number): "KD (T = 2)", "KD (epochs = 5)". A field prints under the symbol papers
use for a field of its name (``FIELD_SYMBOLS``: a ``temperature`` is T, an ``alpha`` α, the
recipe's ``lr`` lr), else under its name; where two fields would print alike, under their
names. A field whose values map one-to-one
onto different display names is left out ("KD + LS" needs no "(logit_standardization =
true)"). ``--label kd=…`` renames a method (its variants keep their field list) or one row.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from kdbench.errors import UserError

# The spec's own vocabulary: a teacher record has role "teacher"; the student trained alone is
# method "vanilla" (kdbench.spec, specs/methods.md).
TEACHER = "teacher"
STUDENT = "vanilla"
REFERENCE_TITLES = {TEACHER: "Teacher", STUDENT: "Student"}

_UNSET = object()

# How papers print a field of this name (a method's config field or a recipe field). Generic
# by field name, never by method: a temperature is T since Hinton et al. 2015 (softmax(z/T)),
# and a field named after a Greek letter is the paper's letter (KD's α/γ weights as
# RepDistiller's -a/-r, DKD's α/β, DIST's β/γ).
FIELD_SYMBOLS = {"temperature": "T", "alpha": "α", "beta": "β", "gamma": "γ", "lr": "lr",
                 "batch_size": "batch size"}


def base(row: str) -> str:
    """The method part of a row key: ``kd[T=2]`` -> ``kd``."""
    return row.split("[", 1)[0]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _show(value: Any) -> str:
    if value is _UNSET:
        return "default"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def varying_fields(runs: pd.DataFrame, bases: pd.Series) -> dict[str, list[str]]:
    """Per method, the spec fields (flattened, e.g. ``config.T``) whose values differ between
    its runs *within* a setting (union over settings), so that one experiment lines up in one
    row across columns."""
    out: dict[str, list[str]] = {}
    for name, group in runs.groupby(bases, sort=False):
        varying: set[str] = set()
        for _, in_setting in group.groupby("setting"):
            flats = [flatten(json.loads(v)) for v in in_setting["variant"].unique()]
            if len(flats) > 1:
                keys = set().union(*flats)
                varying |= {k for k in keys if len({_show(f.get(k, _UNSET)) for f in flats}) > 1}
        if varying:
            out[str(name)] = sorted(varying)
    return out


def short_names(keys: list[str]) -> dict[str, str]:
    """``config.T`` -> ``T`` and ``overrides.epochs`` -> ``epochs`` where that is unambiguous."""
    tails = [key.split(".")[-1] for key in keys]
    return {key: tail if tails.count(tail) == 1 else key for key, tail in zip(keys, tails)}


def printed_names(keys: list[str]) -> dict[str, str]:
    """What a title calls each field: its symbol (``FIELD_SYMBOLS``) where that is unambiguous
    among ``keys``, else its short name (``short_names``)."""
    short = short_names(keys)
    symbols = {key: FIELD_SYMBOLS.get(name, name) for key, name in short.items()}
    taken = list(symbols.values())
    return {key: symbol if taken.count(symbol) == 1 else short[key]
            for key, symbol in symbols.items()}


def search_spaces(runs: pd.DataFrame) -> dict[str, list[tuple[str, list[str]]]]:
    """Per method with variants (``runs`` has a ``row`` column): each field that varies
    between them as a title prints it, with the values it takes, numbers in increasing
    order: {"kd": [("T", ["2", "4"])]}."""
    bases = _bases(runs)
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for method, fields in varying_fields(runs, bases).items():
        members = list(dict.fromkeys(runs.loc[bases == method, "row"]))
        values = {row: _resolved_values(runs[runs["row"] == row].iloc[0], fields) for row in members}
        names = printed_names(fields)
        out[method] = [(names[key], _in_order({values[row][key] for row in members}))
                       for key in fields]
    return out


def _in_order(values: set[str]) -> list[str]:
    def key(text: str) -> tuple[int, float, str]:
        try:
            return (0, float(text), text)
        except ValueError:
            return (1, 0.0, text)

    return sorted(values, key=key)


def _bases(runs: pd.DataFrame) -> pd.Series:
    return pd.Series(np.where(runs["role"] == "teacher", TEACHER, runs["method"].astype(str)),
                     index=runs.index)


def label_rows(runs: pd.DataFrame) -> pd.Series:
    """Row key of each run (see the module docstring)."""
    bases = _bases(runs)
    labels = bases.copy()
    for name, varying in varying_fields(runs, bases).items():
        short = short_names(varying)
        for index, variant in runs.loc[bases == name, "variant"].items():
            flat = flatten(json.loads(variant))
            parts = [f"{short[key]}={_show(flat.get(key, _UNSET))}" for key in varying]
            labels[index] = f"{name}[{','.join(parts)}]"
    return labels


def row_titles(runs: pd.DataFrame, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """Printed title of every row key in ``runs`` (which has a ``row`` column)."""
    bases = _bases(runs)
    varying = varying_fields(runs, bases)
    rows = list(dict.fromkeys(runs["row"]))
    names = {row: _display_name(runs[runs["row"] == row], base(row)) for row in rows}
    labels = dict(labels or {})
    _check_labels(labels, rows)
    titles: dict[str, str] = {}
    for method in dict.fromkeys(base(row) for row in rows):
        members = [row for row in rows if base(row) == method]
        fields = varying.get(method, [])
        values = {row: _resolved_values(runs[runs["row"] == row].iloc[0], fields)
                  for row in members}
        # A method's label renames all its rows alike: then its display names no longer tell
        # variants apart, and the fields must.
        printed = {row: labels.get(method, names[row]) for row in members}
        kept = [key for key in fields if not _explained_by_names(key, members, values, printed)]
        short = printed_names(kept)
        for row in members:
            name = printed[row]
            parts = [f"{short[key]} = {values[row][key]}" for key in kept]
            titles[row] = f"{name} ({', '.join(parts)})" if parts else name
    # Two rows that would print alike (a default and the same value given explicitly): say
    # which is which by their keys rather than print a table with two equal row names.
    for row, text in labels.items():
        if row in titles:
            titles[row] = text
    labelled = {row for row in rows if row in labels or base(row) in labels}
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(titles[row], []).append(row)
    for text, group in groups.items():
        if len(group) < 2:
            continue
        if labelled & set(group):
            raise UserError(f"--label gives two rows the title {text!r} "
                            f"({', '.join(group)}); each row needs its own")
        for row in group:
            titles[row] = f"{text} [{row}]"
    return titles


def _display_name(group: pd.DataFrame, method: str) -> str:
    if method in REFERENCE_TITLES:
        return REFERENCE_TITLES[method]
    names = [name for name in group["display_name"] if isinstance(name, str) and name]
    # One row is one experiment; its records share a name unless the name was changed between
    # versions: the most frequent wins, a version mark says the rest.
    return Counter(names).most_common(1)[0][0] if names else method


def _resolved_values(run: pd.Series, fields: Sequence[str]) -> dict[str, str]:
    """The value each varying field had in the run, as printed."""
    spec = flatten(json.loads(run["variant"]))
    config = json.loads(run["resolved_config"] or "{}")
    recipe = json.loads(run["resolved_recipe"] or "{}")
    out = {}
    for key in fields:
        head, _, tail = key.partition(".")
        if head == "config" and tail in config:
            value = config[tail]
        elif head == "overrides" and tail in recipe:
            value = recipe[tail]
        elif key == "teacher_checkpoint":
            value = "given" if spec.get(key) else "trained"
        else:
            value = spec.get(key, _UNSET)
        out[key] = _printable(value)
    return out


def _printable(value: Any) -> str:
    if value is _UNSET:
        return "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _explained_by_names(key: str, rows: Sequence[str], values: Mapping[str, Mapping[str, str]],
                        names: Mapping[str, str]) -> bool:
    """True when the field's values and the rows' display names split the rows alike."""
    def partition(of: Mapping[str, str]) -> set[frozenset[str]]:
        groups: dict[str, set[str]] = {}
        for row in rows:
            groups.setdefault(of[row], set()).add(row)
        return {frozenset(group) for group in groups.values()}

    by_value = partition({row: values[row][key] for row in rows})
    return len(by_value) > 1 and by_value == partition(dict(names))


_LABEL = re.compile(r"^\s*([^=\[\]\s]+(?:\[[^\]]*\])?)\s*=(.*)$")


def parse_labels(items: Sequence[str] | None) -> dict[str, str]:
    """``--label ROW=TEXT`` values (repeatable) -> {row key or method: title}."""
    labels: dict[str, str] = {}
    for item in items or []:
        match = _LABEL.match(item)
        if not match or not match.group(2).strip():
            raise UserError(f"--label {item!r}: give ROW=TEXT, e.g. --label kd=KD or "
                            "--label 'kd[T=2]=KD (T = 2)' (the LaTeX label is --tex-label)")
        labels[match.group(1)] = match.group(2).strip()
    return labels


def _check_labels(labels: Mapping[str, str], rows: Sequence[str]) -> None:
    known = set(rows) | {base(row) for row in rows}
    unknown = [key for key in labels if key not in known]
    if unknown:
        raise UserError(f"--label {unknown[0]}=...: no such row or method in the table; it "
                        f"has: {', '.join(sorted(known))}")
