"""Choosing each method's variant from a sweep: ``table --select-on val|test``.

A sweep (kdbench/sweep.py) gives a method several variants, each a row of its own
(``kd[temperature=2]``, ``kd[temperature=4]``). A paper reports one number per method: the
variant its authors would have picked. ``--select-on`` picks it per column (setting):

- ``val``: the variant with the highest mean *validation* accuracy over its seeds, among the
  runs that held out the validation split (kdbench/validation.py); the table shows that
  variant's *test* accuracy. The validation images were never trained on, and the test set
  played no part in the choice.
- ``test``: the variant with the highest mean test accuracy, the number shown, among the
  runs trained on the full training set. The test set chose the number it reports, which
  flatters it (the maximum of several noisy means is biased upwards): the caption says so,
  as it does for ``--metric best``.

The score is the table's metric read on the chosen split (``top1_last`` -> ``val_top1_last``),
averaged over a variant's finished seeds; a variant without any finished seed cannot be
chosen unless none of its siblings has one. Ties go to the first variant in row-key order.
Every method takes part, the Student included: with ``--lr 0.01,0.05`` its baseline is tuned
like every method. The Teacher is not chosen (it has no variants of its own here).

Pure pandas on the runs frame of kdbench.aggregate (no torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from kdbench.errors import UserError
from kdbench.rows import TEACHER, base, row_titles, search_spaces

VAL = "val"
TEST = "test"
PROTOCOLS = (VAL, TEST)
METRIC_WORDS = {"top1_last": "top-1 at the last epoch", "top1_best": "top-1 at the best epoch",
                "top5_last": "top-5 at the last epoch", "top5_best": "top-5 at the best epoch"}


@dataclass(frozen=True)
class Selection:
    """What ``--select-on`` chose, for captions, notes and the CSV.

    ``choices``: one row per (setting, method): setting, method, chosen (its variant's row
    key), chosen_title ("KD (T = 4)"), score (its mean on the split chosen on), n (seeds behind
    the score), candidates (list of (title, score, n), in row-key order).
    ``spaces``: method -> [(field as printed, its values)] over every candidate of the table.
    ``variants``: method -> how many variants it was chosen among (in the table).
    ``splits``: setting -> the validation split's facts from the records (``val`` only).
    """

    protocol: str
    metric: str  # the score's metric key, e.g. "val_top1_last"
    choices: pd.DataFrame
    spaces: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    variants: dict[str, int] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise UserError(f"--select-on {protocol}: choose val (a held-out part of the training "
                        "set) or test")


def protocol_runs(runs: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The runs a choice under ``protocol`` may use: the Teacher's, and the students' that
    held out the validation split (``val``) or trained on the full training set (``test``)."""
    check_protocol(protocol)
    students = runs["role"] != TEACHER
    held = runs["held_out"].notna()
    wanted = held if protocol == VAL else ~held
    if not (students & wanted).any():
        if protocol == VAL:
            raise UserError("--select-on val: no student run in these results held out a "
                            "validation split; train them with `kdbench run --select-on val`")
        raise UserError("--select-on test: every student run in these results held out a "
                        "validation split; choose on it with --select-on val")
    return runs[~students | wanted].copy()


def select_variants(runs: pd.DataFrame, protocol: str, metric: str) -> tuple[pd.DataFrame, Selection]:
    """Keep each (setting, method)'s chosen variant, its row key renamed to the method's
    name (so that the row lines up across columns whatever each column chose); ``runs`` has
    the ``row`` column of kdbench.rows.label_rows."""
    score_metric = f"val_{metric}" if protocol == VAL else metric
    titles = row_titles(runs)
    bases = runs["row"].map(base)
    kept = runs["role"] == TEACHER
    choices = []
    students = runs[runs["role"] != TEACHER].assign(base=bases)
    for (setting, method), group in students.groupby(["setting", "base"], sort=False):
        candidates = []
        for row in sorted(group["row"].unique()):
            done = group[(group["row"] == row) & (group["status"] == "done")][score_metric].dropna()
            candidates.append((row, float(done.mean()) if len(done) else math.nan, int(len(done))))
        # max keeps the first of equal keys: ties go to the first row key.
        chosen, score, n = max(candidates, key=lambda c: (math.isfinite(c[1]), np.nan_to_num(c[1], nan=-np.inf)))
        kept |= (runs["setting"] == setting) & (runs["row"] == chosen)
        choices.append({"setting": setting, "method": method, "chosen": chosen,
                        "chosen_title": titles[chosen], "score": score, "n": n,
                        "candidates": [(titles[row], value, count) for row, value, count in candidates]})
    spaces = search_spaces(runs)
    variants = {method: int(runs.loc[bases == method, "row"].nunique()) for method in bases.unique()
                if method != TEACHER}
    splits = split_facts(runs) if protocol == VAL else {}
    selected = runs[kept].copy()
    students = selected["role"] != TEACHER
    selected.loc[students, "row"] = selected.loc[students, "row"].map(base)
    frame = pd.DataFrame(choices, columns=["setting", "method", "chosen", "chosen_title", "score",
                                           "n", "candidates"])
    return selected, Selection(protocol, score_metric, frame, spaces, variants, splits)


def split_facts(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per setting, the validation split its student records state (kdbench.validation's
    HeldOut); where records disagree (made by other code), the distinct values joined."""
    out: dict[str, dict[str, Any]] = {}
    students = runs[(runs["role"] != TEACHER) & runs["validation"].notna()]
    for setting, group in students.groupby("setting", sort=False):
        facts = [json.loads(text) for text in group["validation"].unique()]
        keys = dict.fromkeys(key for fact in facts for key in fact)
        merged = {}
        for key in keys:
            values = list(dict.fromkeys(json.dumps(fact.get(key)) for fact in facts))
            merged[key] = json.loads(values[0]) if len(values) == 1 else "/".join(values)
        out[str(setting)] = merged
    return out


def notes(selection: Selection, titles: Mapping[str, str]) -> list[str]:
    """One line per (setting, method) with several variants: what was chosen, on what, and
    how every candidate scored, so a reader can see how close the choice was."""
    split = "validation" if selection.protocol == VAL else "test"
    metric = selection.metric.removeprefix("val_")
    lines = []
    for _, choice in selection.choices.iterrows():
        if len(choice["candidates"]) < 2:
            continue
        scores = "; ".join(f"{title}: {_score(value)} (n = {n})" for title, value, n in choice["candidates"])
        name = titles.get(choice["method"], choice["method"])
        lines.append(f"{choice['setting']}, {name}: chose {choice['chosen_title']} by mean {split} "
                     f"{METRIC_WORDS.get(metric, metric)} over seeds ({scores})")
    return lines


def _score(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "no finished run"
