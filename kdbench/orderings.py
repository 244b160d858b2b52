"""Does a table order the methods as the published tables do? ``table --orderings``.

A new setting (another dataset, other networks) cannot reproduce a paper's numbers, only its
ordering of the methods, so that is what is compared: for each column of the table and each
published setting (kdbench/published.json, the primary source of each setting only, so one
comparison is one protocol), Kendall's tau-b between the table's means and the published ones
over the rows both have, the Student included and the Teacher left out (it is no method).
``scipy.stats.kendalltau`` gives tau-b and its p-value (exact for small n without ties).

A tau alone is hard to read: the published orderings themselves change with the teacher and
student. So the same tau is computed between every two published settings of one source
(RepDistiller's settings against each other): a table whose tau lies in that range orders the
methods about as much like the papers as the papers' own settings do like each other.

Pairs ordered the other way (discordant) are listed with both gaps, ours first, so a reader
sees whether a swap is a 0.1-point coin toss or a real reversal. Only rows whose key is a plain
method name are compared: a variant (``kd[T=2]``) or a composition is not the published row.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import dataclass
from statistics import median
from typing import Any, Mapping, Sequence

from scipy import stats
from tabulate import tabulate

from kdbench.rows import TEACHER

SMALLEST_COMMON = 4  # rows in common below which a rank correlation says next to nothing


@dataclass(frozen=True)
class Agreement:
    """One column of the table against one published setting."""

    setting: str  # the table's column
    published_setting: str
    source: str  # the short name of the published source
    rows: tuple[str, ...]  # rows both have, by the table's mean, best first
    tau: float  # Kendall's tau-b
    p: float  # two-sided, scipy.stats.kendalltau
    discordant: tuple[tuple[str, str, float, float], ...]  # (a, b, our a - b, their a - b)


@dataclass(frozen=True)
class Orderings:
    agreements: tuple[Agreement, ...]
    # tau-b between every two published settings of one source, over their common rows
    published_taus: tuple[float, ...]


def kendall(ours: Mapping[str, float], theirs: Mapping[str, float]
            ) -> tuple[float, float, list, tuple[str, ...]]:
    """tau-b and p over the keys both have, the discordant pairs (a, b, ours a-b, theirs a-b)
    with a ahead in ours, and the common keys by our value, best first. Needs two or more
    common keys."""
    common = sorted(set(ours) & set(theirs), key=lambda row: (-ours[row], row))
    tau, p = stats.kendalltau([ours[row] for row in common], [theirs[row] for row in common])
    discordant = [(a, b, ours[a] - ours[b], theirs[a] - theirs[b])
                  for a, b in itertools.combinations(common, 2)
                  if (ours[a] - ours[b]) * (theirs[a] - theirs[b]) < 0]
    return float(tau), float(p), discordant, tuple(common)


def published_orderings(published: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, float]]]:
    """Published setting -> (its source, method -> top-1), the Teacher left out."""
    return {name: (entry["source"], {row: float(value) for row, value in entry["top1"].items()
                                     if row != TEACHER})
            for name, entry in published["settings"].items()}


def compare_orderings(means: Mapping[str, Mapping[str, float]],
                      published: Mapping[str, Any]) -> Orderings:
    """``means``: the table's column -> row key -> mean. Every column against every published
    setting with at least SMALLEST_COMMON rows in common."""
    sources = {name: entry.get("short", name) for name, entry in published["sources"].items()}
    tables = published_orderings(published)
    agreements = []
    for setting, column in means.items():
        ours = {row: value for row, value in column.items()
                if row != TEACHER and math.isfinite(value)}
        for name, (source, theirs) in tables.items():
            if len(set(ours) & set(theirs)) < SMALLEST_COMMON:
                continue
            tau, p, discordant, common = kendall(ours, theirs)
            agreements.append(Agreement(setting, name, sources.get(source, source), common, tau,
                                        p, tuple(discordant)))
    among = []
    for (_, (source_a, a)), (_, (source_b, b)) in itertools.combinations(tables.items(), 2):
        if _family(source_a) == _family(source_b) and len(set(a) & set(b)) >= SMALLEST_COMMON:
            among.append(kendall(a, b)[0])
    return Orderings(tuple(agreements), tuple(among))


def _family(source: str) -> str:
    """RepDistiller's two tables (same-architecture and cross-family) are one codebase and one
    protocol: their settings are compared with each other."""
    return source.split("_")[0]


def render_orderings_markdown(orderings: Orderings, titles: Mapping[str, str]) -> str:
    """A Markdown section: how tau was computed, the reference range, one line per comparison."""
    how = ("Kendall's τ_b between this table's means and each published table's, over the rows "
           "both have (the Student included, the Teacher not; scipy.stats.kendalltau, two-sided "
           "p). Discordant: pairs of rows the two order oppositely, of all pairs.")
    if orderings.published_taus:
        taus = orderings.published_taus
        how += (f" For reference, the published settings of one source against each other "
                f"({len(taus)} pairs): median τ_b {median(taus):.2f}, range "
                f"{min(taus):.2f} to {max(taus):.2f}.")
    rows = []
    for agreement in orderings.agreements:
        pairs = len(agreement.rows) * (len(agreement.rows) - 1) // 2
        worst = max(agreement.discordant, key=lambda pair: abs(pair[2]) + abs(pair[3]),
                    default=None)
        rows.append([agreement.setting, agreement.published_setting, agreement.source,
                     len(agreement.rows), f"{agreement.tau:.2f}", _p(agreement.p),
                     f"{len(agreement.discordant)} of {pairs}",
                     _pair(worst, titles) if worst else "—"])
    table = tabulate(rows, headers=["Setting", "Published setting", "Source", "rows", "τ_b", "p",
                                    "discordant", "largest swap (ours, theirs)"],
                     tablefmt="github", disable_numparse=True)
    medians = []
    for setting in dict.fromkeys(agreement.setting for agreement in orderings.agreements):
        taus = [agreement.tau for agreement in orderings.agreements if agreement.setting == setting]
        medians.append(f"{setting}: median τ_b {median(taus):.2f} over {len(taus)} published "
                       f"settings.")
    return "\n".join([f"Orderings: {how}", "", table, "", *medians])


def render_orderings_csv(orderings: Orderings) -> str:
    """Every comparison and every discordant pair, unrounded."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["setting", "published_setting", "source", "n_rows", "rows", "tau_b", "p",
                     "n_discordant", "discordant"])
    for agreement in orderings.agreements:
        writer.writerow([agreement.setting, agreement.published_setting, agreement.source,
                         len(agreement.rows), ";".join(agreement.rows), repr(agreement.tau),
                         repr(agreement.p), len(agreement.discordant),
                         ";".join(f"{a}>{b}:{ours!r}:{theirs!r}"
                                  for a, b, ours, theirs in agreement.discordant)])
    return buffer.getvalue()


def _pair(pair: tuple[str, str, float, float], titles: Mapping[str, str]) -> str:
    a, b, ours, theirs = pair
    return (f"{titles.get(a, a)} vs {titles.get(b, b)} ({ours:+.2f}, {theirs:+.2f})")


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def column_means(cells: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The table's column -> row key -> mean, from Summary.cells records."""
    means: dict[str, dict[str, float]] = {}
    for cell in cells:
        mean = cell["mean"]
        if mean is not None and math.isfinite(mean):
            means.setdefault(cell["setting"], {})[cell["row"]] = float(mean)
    return means
