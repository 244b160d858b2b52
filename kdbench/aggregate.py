"""Records -> the numbers of a comparison table: mean, sample std, n, CI, significance.

This is a pure function of the stored records (``kdbench.store``): pandas and scipy only, no
torch, so a table can be rebuilt on a laptop from results copied off a cluster.

The table's model
-----------------
- A *column* is a setting (``cifar100/wrn_40_2-wrn_16_2``): one teacher -> student pair.
- A *row* is the teacher ("teacher"), the student trained alone ("vanilla", shown as Student)
  or a method. Runs of one method whose specs differ in anything but the seed (a config field,
  a recipe override, the teacher seed) are different experiments: they become separate rows,
  labelled with the fields that differ (``kd[T=2]``, ``kd[T=4]``), never pooled. Because the
  Student row is the reference of every comparison, a setting with two different Student
  variants is refused until ``methods=`` names one.
- A *cell* aggregates the seeds of one row in one column: mean, sample std (ddof = 1), n, a
  t-based confidence half-width. Failed runs and seeds that other rows of the column have but
  this one lacks are counted (``n_failed``, ``n_missing``) and reported in ``Summary.notes``:
  a cell is never averaged over a silently smaller n.

Significance
------------
Each method is tested against the Student and against the column's best row (highest mean,
Teacher excluded): two-sided Welch's t-test over seeds (unequal variances; Welch 1947,
Biometrika 34:28-35; ``scipy.stats.ttest_ind(equal_var=False)``), or, with ``paired=True``, the
paired t-test over the seeds both cells share (``scipy.stats.ttest_rel``), which removes the
variation the seed explains when runs share data order and initialisation by seed. A test
needs two values per side and non-zero spread; otherwise its p-value is NaN ("not testable")
and it is left out of the correction. Each unordered pair of cells is tested once (a method
that is the column's best is compared with the Student once, not twice). All p-values of the
table form one family, adjusted by Holm's step-down procedure (Holm 1979, "A simple
sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70), which controls
the family-wise error rate at alpha without assuming independence.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from kdbench.errors import UserError
from kdbench.spec import record_precision

# Row keys. The Teacher and Student rows use the spec's own vocabulary: a teacher record has
# role "teacher"; the student trained alone is method "vanilla" (kdbench.spec, specs/methods.md).
TEACHER = "teacher"
STUDENT = "vanilla"
ROW_TITLES = {TEACHER: "Teacher", STUDENT: "Student"}

METRIC_ALIASES = {"last": "top1_last", "best": "top1_best"}
METRICS = ("top1_last", "top1_best", "top5_last", "top5_best")

WELCH = "welch"
PAIRED = "paired"

# Spec fields that place a run in a cell; every other spec field (config, overrides,
# teacher_seed, teacher_checkpoint, ...) makes a run a different experiment (a row variant).
CELL_FIELDS = ("setting", "method", "seed", "role")


@dataclass(frozen=True)
class Summary:
    """Everything a renderer needs; all numbers are plain floats in DataFrames.

    ``cells``: one row per (setting, row) in display order, columns: setting, row, title,
    method, n, n_failed, n_missing, n_expected, seeds, mean, std, ci_halfwidth, delta,
    rank, best_row, p_vs_student, p_vs_student_holm, n_vs_student, p_vs_best,
    p_vs_best_holm, n_vs_best, published, published_source, published_outside_2std,
    values, run_ids, failed_run_ids.
    ``runs``: one row per record behind the table (setting, row, seed, run_id, status, value,
    error, git_commit, finished_at). ``columns``: one row per setting (dataset, teacher,
    student, epochs, recipe_source, expected_seeds).
    """

    cells: pd.DataFrame
    runs: pd.DataFrame
    columns: pd.DataFrame
    settings: list[str]
    rows: list[str]
    metric: str
    test: str
    alpha: float
    confidence: float
    decimals: int
    n_tests: int
    notes: list[str] = field(default_factory=list)
    published_sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cell(self, setting: str, row: str) -> pd.Series:
        hit = self.cells[(self.cells["setting"] == setting) & (self.cells["row"] == row)]
        if hit.empty:
            raise KeyError((setting, row))
        return hit.iloc[0]

    def column(self, setting: str) -> pd.Series:
        return self.columns.set_index("setting").loc[setting]


# ---------------------------------------------------------------------------------------------
# Statistics (small, separately tested functions)
# ---------------------------------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, NaN kept as NaN and left out of the family.

    With the m finite p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value is
    p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) (Holm 1979; the "adjusted p-value" form of
    Wright 1992, Biometrics 48:1005-1013). Rejecting where p~ < alpha is Holm's procedure.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def welch_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch's t-test p-value; NaN when it is undefined.

    Undefined: fewer than two values on a side (no variance estimate) or both samples without
    spread (t = 0/0). scipy returns NaN there too, with a warning we do not want on a table.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value over aligned values; NaN when it is undefined.

    Undefined: fewer than two pairs, or differences without spread (the t statistic is
    infinite or 0/0: a constant shift over seeds says nothing about seed-to-seed noise).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or np.ptp(a - b) == 0:
        return math.nan
    return float(stats.ttest_rel(a, b).pvalue)


def ci_halfwidth(std: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of the t confidence interval of a mean: t_{(1+c)/2, n-1} * s / sqrt(n).

    The t quantile, not 1.96: with 3-5 seeds the normal approximation would understate the
    interval by 20-60 %.
    """
    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n))


def dense_ranks(means: Mapping[str, float], decimals: int) -> dict[str, int]:
    """Rank rows by mean, highest first, comparing means at the precision shown.

    Rows whose means print the same get the same rank (both bold when tied for best), and the
    next distinct value is rank 2 (dense ranking), so "second" always means the second-highest
    number a reader sees. NaN means get no rank.
    """
    shown = {row: round(mean, decimals) for row, mean in means.items() if math.isfinite(mean)}
    levels = sorted(set(shown.values()), reverse=True)
    return {row: levels.index(value) + 1 for row, value in shown.items()}


def resolve_metric(name: str) -> str:
    """``last``/``best`` or a metrics key (top1_last, top5_best, ...) -> the metrics key."""
    metric = METRIC_ALIASES.get(name, name)
    if metric not in METRICS:
        raise UserError(f"unknown metric {name!r}; choose last, best or one of "
                        f"{', '.join(METRICS)}")
    return metric


def load_published() -> dict[str, Any]:
    """The published numbers shipped with the package (kdbench/published.json)."""
    text = resources.files("kdbench").joinpath("published.json").read_text()
    return json.loads(text)


# ---------------------------------------------------------------------------------------------
# Records -> runs
# ---------------------------------------------------------------------------------------------

def runs_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record with the fields a table needs, flattened.

    ``variant`` is the canonical JSON of the spec minus the cell fields (setting, method, seed,
    role): two runs with equal variants differ only by seed.
    """
    rows = []
    for record in records:
        spec = record.get("spec") or {}
        setting = record.get("setting") or {}
        if not isinstance(setting, Mapping):  # a record that kept only the name
            setting = {"name": setting}
        metrics = record.get("metrics") or {}
        error = record.get("error") or {}
        provenance = record.get("provenance") or {}
        role = spec.get("role", "student")
        variant = {key: value for key, value in spec.items() if key not in CELL_FIELDS}
        if role == "teacher":
            recipe = setting.get("teacher_recipe") or setting.get("recipe") or {}
        else:
            recipe = setting.get("recipe") or {}
        overrides = spec.get("overrides") or {}
        name = setting.get("name") or spec.get("setting")
        rows.append({
            "run_id": record["id"],
            "status": record.get("status"),
            "setting": name,
            "dataset": setting.get("dataset") or str(name).split("/")[0],
            "teacher_arch": setting.get("teacher"),
            "student_arch": setting.get("student"),
            "recipe_source": setting.get("recipe_source"),
            "role": role,
            "method": spec.get("method"),
            "seed": spec.get("seed"),
            "variant": json.dumps(variant, sort_keys=True),
            "epochs": overrides.get("epochs", recipe.get("epochs")),
            **{metric: _as_float(metrics.get(metric)) for metric in METRICS},
            "error": _error_text(error),
            "git_commit": provenance.get("git_commit"),
            "finished_at": provenance.get("finished_at"),
            "precision": record_precision(record),
        })
    columns = ["run_id", "status", "setting", "dataset", "teacher_arch", "student_arch",
               "recipe_source", "role", "method", "seed", "variant", "epochs", *METRICS,
               "error", "git_commit", "finished_at", "precision"]
    return pd.DataFrame(rows, columns=columns)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _error_text(error: Mapping[str, Any]) -> str:
    if not error:
        return ""
    text = f"{error.get('type', 'error')}: {error.get('message', '')}".strip().rstrip(":")
    first_line = text.splitlines()[0] if text else ""
    return first_line[:120]


def select_settings(available: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """Settings matching exact names or glob patterns, in the order the patterns are given.

    ``None`` or empty: every setting with records, sorted. A pattern matching nothing is a
    user error naming the settings the records do have.
    """
    names = sorted(set(available))
    if not patterns:
        return names
    chosen: dict[str, None] = {}
    for pattern in patterns:
        matches = sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))
        if not matches:
            near = difflib.get_close_matches(pattern, names, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UserError(f"no records for setting {pattern!r}{hint}; the results hold: "
                            f"{', '.join(names)}")
        for name in matches:
            chosen.setdefault(name, None)
    return list(chosen)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _show(value: Any) -> str:
    if value is _UNSET:
        return "default"
    if isinstance(value, str):
        return value
    return json.dumps(value)


_UNSET = object()


def label_rows(runs: pd.DataFrame) -> pd.Series:
    """Row key of each run: teacher, vanilla, a method name, or ``method[field=value,...]``.

    A method gets variant labels only when some setting holds more than one variant of it;
    the label lists the fields that differ *within* a setting (union over settings), so the
    same experiment lines up in one row across columns.
    """
    base = np.where(runs["role"] == "teacher", TEACHER, runs["method"].astype(str))
    base = pd.Series(base, index=runs.index)
    labels = base.copy()
    for name, group in runs.groupby(base, sort=False):
        varying: set[str] = set()
        for _, in_setting in group.groupby("setting"):
            flats = [_flatten(json.loads(v)) for v in in_setting["variant"].unique()]
            if len(flats) > 1:
                keys = set().union(*flats)
                varying |= {k for k in keys if len({_show(f.get(k, _UNSET)) for f in flats}) > 1}
        if not varying:
            continue
        short = _short_names(sorted(varying))
        for index, variant in group["variant"].items():
            flat = _flatten(json.loads(variant))
            parts = [f"{short[key]}={_show(flat.get(key, _UNSET))}" for key in sorted(varying)]
            labels[index] = f"{name}[{','.join(parts)}]"
    return labels


def _short_names(keys: list[str]) -> dict[str, str]:
    """``config.T`` -> ``T`` and ``overrides.epochs`` -> ``epochs`` where that is unambiguous."""
    tails = [key.split(".")[-1] for key in keys]
    return {key: tail if tails.count(tail) == 1 else key for key, tail in zip(keys, tails)}


def _base(row: str) -> str:
    return row.split("[", 1)[0]


def row_title(row: str) -> str:
    """Display name: Teacher, Student, or the method/variant label."""
    base = _base(row)
    return ROW_TITLES.get(base, base) + row[len(base):]


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------

def summarize(
    records: Iterable[Mapping[str, Any]],
    *,
    metric: str = "top1_last",
    settings: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    paired: bool = False,
    alpha: float = 0.05,
    confidence: float = 0.95,
    decimals: int = 2,
    published: Mapping[str, Any] | None = None,
    precision: str | None = None,
) -> Summary:
    """Aggregate records into the cells of a table (see the module docstring for the rules).

    ``settings``: names or glob patterns (None: all). ``methods``: method names or variant
    labels, in the order the rows should appear (None: all, alphabetical); Teacher and Student
    always come first. ``published``: the parsed published.json, to attach published numbers.
    ``precision``: only the student runs made at this precision ("fp32", "bf16"; None: all);
    teachers are fp32 for every precision.
    """
    metric = resolve_metric(metric)
    if not 0 < alpha < 1:
        raise UserError(f"alpha must lie in (0, 1), got {alpha}")
    runs = runs_frame(records)
    if runs.empty:
        raise UserError("no records to aggregate")
    runs = runs[runs["setting"].notna()]
    if precision is not None:  # teachers are trained in fp32 for every precision (kdbench.spec)
        runs = runs[(runs["precision"] == precision) | (runs["role"] == "teacher")]
        if not (runs["role"] != "teacher").any():
            raise UserError(f"no student runs made at precision {precision}")
    chosen = select_settings(runs["setting"].unique().tolist(), settings)
    runs = runs[runs["setting"].isin(chosen)].copy()
    if ((runs["role"] != "teacher") & (runs["method"] == TEACHER)).any():
        raise UserError(f"a student method is named {TEACHER!r}, which is the Teacher row's name")
    runs["row"] = label_rows(runs)
    rows = _choose_rows(runs, methods)
    runs = runs[runs["row"].isin(rows)].copy()
    _refuse_ambiguity(runs, chosen)
    runs["value"] = runs[metric]
    runs["setting"] = pd.Categorical(runs["setting"], chosen, ordered=True)
    runs["row"] = pd.Categorical(runs["row"], rows, ordered=True)
    runs = runs.sort_values(["setting", "row", "seed", "run_id"]).reset_index(drop=True)
    runs["setting"] = runs["setting"].astype(str)
    runs["row"] = runs["row"].astype(str)

    notes: list[str] = []
    columns = _columns(runs, chosen)
    cells = _cells(runs, chosen, rows, columns, confidence, notes)
    n_tests = _significance(cells, runs, chosen, paired, notes)
    _rank(cells, chosen, decimals)
    sources = _attach_published(cells, published, metric) if published is not None else {}
    return Summary(cells=cells, runs=runs, columns=columns, settings=list(chosen), rows=rows,
                   metric=metric, test=PAIRED if paired else WELCH, alpha=alpha,
                   confidence=confidence, decimals=decimals, n_tests=n_tests, notes=notes,
                   published_sources=sources)


def _choose_rows(runs: pd.DataFrame, methods: Sequence[str] | None) -> list[str]:
    """Row keys in display order: Teacher variants, Student variants, then the methods."""
    present = sorted(runs["row"].unique(), key=lambda row: (_base(row), row))
    teachers = [row for row in present if _base(row) == TEACHER]
    students = [row for row in present if _base(row) == STUDENT]
    others = [row for row in present if _base(row) not in (TEACHER, STUDENT)]
    if not methods:
        return teachers + students + others
    picked: list[str] = []
    for wanted in methods:
        matches = [row for row in present if row == wanted or _base(row) == wanted]
        if not matches:
            choices = sorted({_base(row) for row in others} | set(others))
            near = difflib.get_close_matches(wanted, choices, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UserError(f"no records for method {wanted!r} in the chosen settings{hint}; "
                            f"they hold: {', '.join(choices) or 'only teacher/vanilla runs'}")
        picked += [row for row in matches if row not in picked]
    # Naming a Teacher/Student variant selects it; otherwise those rows all stay.
    teachers = [row for row in teachers if row in picked] or teachers
    students = [row for row in students if row in picked] or students
    return teachers + students + [row for row in picked if row not in teachers + students]


def _refuse_ambiguity(runs: pd.DataFrame, settings: Sequence[str]) -> None:
    """Two Student variants in a column, or two runs in one cell for one seed: refuse.

    The Student is the reference of Δ and of every test, so it must be one experiment.
    Two records for one (row, seed) can only share a variant if their ids were made by
    different id schemes (copied records); averaging both would double-count a seed.
    """
    for setting in settings:
        in_setting = runs[runs["setting"] == setting]
        students = sorted(in_setting.loc[in_setting["row"].map(_base) == STUDENT, "row"].unique())
        if len(students) > 1:
            raise UserError(f"setting {setting} has {len(students)} different Student (vanilla) "
                            f"experiments: {', '.join(students)}; {_how_to_choose(students)}")
        for (row, seed), group in in_setting.groupby(["row", "seed"]):
            if len(group) > 1:
                raise UserError(f"setting {setting}, {row}, seed {seed}: {len(group)} records "
                                f"of the same experiment ({', '.join(group['run_id'])}); "
                                "remove the stale ones from the results")


def _how_to_choose(students: Sequence[str]) -> str:
    """Which flag separates the experiments: --precision where they differ in precision (a
    bf16 and an fp32 grid), --methods with a variant label where they differ otherwise (the
    label names the fields that differ)."""
    keys = {part.split("=", 1)[0] for row in students if "[" in row
            for part in row.split("[", 1)[1].rstrip("]").split(",")}
    if keys == {"precision"}:
        return "choose one with --precision fp32 or --precision bf16"
    advice = (f"choose one with --methods, e.g. --methods '{students[0]}' (and the method rows "
              "of the same experiment)")
    return advice + (", and --precision" if "precision" in keys else "")


def _columns(runs: pd.DataFrame, settings: Sequence[str]) -> pd.DataFrame:
    """Per setting: dataset, architectures, the students' epochs, expected seeds."""
    out = []
    for setting in settings:
        in_setting = runs[runs["setting"] == setting]
        students = in_setting[in_setting["row"].map(_base) != TEACHER]
        teachers = in_setting[in_setting["row"].map(_base) == TEACHER]
        source = students if not students.empty else teachers
        out.append({
            "setting": setting,
            "dataset": _one(in_setting["dataset"]),
            "teacher_arch": _one(in_setting["teacher_arch"]),
            "student_arch": _one(in_setting["student_arch"]),
            "recipe_source": _one(in_setting["recipe_source"]),
            "epochs": _one(source["epochs"]),
            "teacher_epochs": _one(teachers["epochs"]),
            "expected_seeds": sorted(int(s) for s in students["seed"].dropna().unique()),
        })
    return pd.DataFrame(out)


def _one(values: pd.Series) -> Any:
    """The single value of a column, or the distinct values joined when they differ."""
    distinct = [v for v in pd.unique(values.dropna())]
    if not distinct:
        return None
    if len(distinct) == 1:
        return distinct[0]
    return "/".join(str(v) for v in sorted(distinct, key=str))


def _cells(runs: pd.DataFrame, settings: Sequence[str], rows: Sequence[str],
           columns: pd.DataFrame, confidence: float, notes: list[str]) -> pd.DataFrame:
    out = []
    expected_by_setting = dict(zip(columns["setting"], columns["expected_seeds"]))
    for setting in settings:
        in_setting = runs[runs["setting"] == setting]
        student = in_setting[in_setting["row"].map(_base) == STUDENT]
        if student.empty:
            notes.append(f"{setting}: no Student (vanilla) runs, so no difference or test "
                         "against it")
        for row in rows:
            group = in_setting[in_setting["row"] == row]
            if group.empty:
                notes.append(f"{setting}, {row_title(row)}: no runs")
                continue
            done = group[(group["status"] == "done") & group["value"].notna()]
            failed = group[~group.index.isin(done.index)]
            present = {int(s) for s in group["seed"]}
            expected = (sorted(present) if _base(row) == TEACHER
                        else sorted(set(expected_by_setting[setting]) | present))
            missing = [s for s in expected if s not in present]
            values = done["value"].to_numpy(dtype=float)
            n = int(values.size)
            std = float(np.std(values, ddof=1)) if n >= 2 else math.nan
            for _, run in failed.iterrows():
                why = run["error"] or ("no metric in the record" if run["status"] == "done"
                                       else f"status {run['status']}")
                notes.append(f"{setting}, {row_title(row)}: seed {run['seed']} failed "
                             f"(run {run['run_id']}: {why}); not in the mean")
            if missing:
                notes.append(f"{setting}, {row_title(row)}: no record for seed"
                             f"{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))}")
            out.append({
                "setting": setting,
                "row": row,
                "title": row_title(row),
                "method": _base(row),
                "n": n,
                "n_failed": int(len(failed)),
                "n_missing": len(missing),
                "n_expected": len(expected),
                "seeds": [int(s) for s in done["seed"]],
                "mean": float(values.mean()) if n else math.nan,
                "std": std,
                "ci_halfwidth": ci_halfwidth(std, n, confidence),
                "values": [float(v) for v in values],
                "run_ids": list(group["run_id"]),
                "failed_run_ids": list(failed["run_id"]),
            })
    cells = pd.DataFrame(out)
    student_mean = (cells[cells["method"] == STUDENT].set_index("setting")["mean"]
                    if not cells.empty else pd.Series(dtype=float))
    cells["delta"] = cells["mean"] - cells["setting"].map(student_mean).astype(float)
    return cells


def _significance(cells: pd.DataFrame, runs: pd.DataFrame, settings: Sequence[str],
                  paired: bool, notes: list[str]) -> int:
    """Fill p-values vs Student and vs the column's best; Holm over the whole table."""
    for name in ("p_vs_student", "p_vs_student_holm", "p_vs_best", "p_vs_best_holm"):
        cells[name] = math.nan
    # Values per side behind a test: the smaller sample for Welch, the shared seeds if paired.
    cells["n_vs_student"] = 0
    cells["n_vs_best"] = 0
    cells["best_row"] = None
    done = runs[(runs["status"] == "done") & runs["value"].notna()]
    pairs: dict[tuple[str, frozenset[str]], tuple[float, int]] = {}
    links: list[tuple[int, str, tuple[str, frozenset[str]]]] = []
    for setting in settings:
        column = cells[(cells["setting"] == setting) & (cells["method"] != TEACHER)
                       & (cells["n"] > 0)]
        if column.empty:
            continue
        best = column.loc[column["mean"].idxmax(), "row"]  # ties: the first in row order
        cells.loc[cells["setting"] == setting, "best_row"] = best
        student = column[column["method"] == STUDENT]
        for index, cell in column.iterrows():
            targets = []
            if not student.empty and cell["method"] != STUDENT:
                targets.append(("student", student.iloc[0]["row"]))
            if cell["row"] != best:
                targets.append(("best", best))
            for kind, other in targets:
                key = (setting, frozenset((cell["row"], other)))
                if key not in pairs:
                    pairs[key] = _test(done, setting, cell["row"], other, paired, notes)
                links.append((index, kind, key))
    keys = list(pairs)
    adjusted = dict(zip(keys, holm([pairs[key][0] for key in keys])))
    for index, kind, key in links:
        cells.loc[index, f"p_vs_{kind}"] = pairs[key][0]
        cells.loc[index, f"p_vs_{kind}_holm"] = adjusted[key]
        cells.loc[index, f"n_vs_{kind}"] = pairs[key][1]
    return int(sum(math.isfinite(pairs[key][0]) for key in keys))


def _test(done: pd.DataFrame, setting: str, row_a: str, row_b: str, paired: bool,
          notes: list[str]) -> tuple[float, int]:
    """(p-value, number of values per side or pairs) for one pair of cells."""
    in_setting = done[done["setting"] == setting]
    a = in_setting[in_setting["row"] == row_a].set_index("seed")["value"]
    b = in_setting[in_setting["row"] == row_b].set_index("seed")["value"]
    if not paired:
        return welch_pvalue(a.to_numpy(), b.to_numpy()), int(min(len(a), len(b)))
    shared = a.index.intersection(b.index).sort_values()
    if len(shared) < max(len(a), len(b)):
        notes.append(f"{setting}: {row_title(row_a)} vs {row_title(row_b)} paired over the "
                     f"{len(shared)} seeds both have")
    return paired_pvalue(a[shared].to_numpy(), b[shared].to_numpy()), int(len(shared))


def _rank(cells: pd.DataFrame, settings: Sequence[str], decimals: int) -> None:
    """rank 1 = best (bold), 2 = second (underlined); Teacher excluded, as in KD papers."""
    cells["rank"] = math.nan
    for setting in settings:
        column = cells[(cells["setting"] == setting) & (cells["method"] != TEACHER)]
        ranks = dense_ranks(dict(zip(column.index, column["mean"])), decimals)
        for index, rank in ranks.items():
            cells.loc[index, "rank"] = rank


def _attach_published(cells: pd.DataFrame, published: Mapping[str, Any],
                      metric: str) -> dict[str, dict[str, Any]]:
    """Published number per cell, and whether it lies more than 2 std from our mean.

    2 std of the seeds is the reviewer's rule of thumb: about 95 % of single runs of a
    normally distributed result fall inside, so a published number outside it suggests a
    different protocol or implementation, not seed noise. Published numbers are top-1.
    """
    cells["published"] = math.nan
    cells["published_source"] = None
    cells["published_outside_2std"] = False
    used: dict[str, dict[str, Any]] = {}
    if not metric.startswith("top1"):
        return used
    table = published.get("settings", {})
    sources = published.get("sources", {})
    for index, cell in cells.iterrows():
        found = _published_number(table.get(cell["setting"]), sources, cell["method"], metric)
        if found is None:
            continue
        value, source = found
        cells.loc[index, "published"] = value
        cells.loc[index, "published_source"] = source
        std = cell["std"]
        cells.loc[index, "published_outside_2std"] = bool(
            math.isfinite(std) and abs(cell["mean"] - value) > 2 * std)
        used[source] = dict(sources.get(source, {}))
    return used


def _published_number(entry: Mapping[str, Any] | None, sources: Mapping[str, Any], method: str,
                      metric: str) -> tuple[float, str] | None:
    """(number, source) published for ``method`` in a setting's entry of published.json, from
    the first source that reports the table's epoch: a best-epoch number is never compared
    with a last-epoch mean, nor the other way round. A source that names no epoch counts as
    "last" (published.json's first sources all do)."""
    if not entry:
        return None
    epoch = "best" if metric.endswith("_best") else "last"
    for part in [entry, *entry.get("also", [])]:
        source = part.get("source")
        if method in part.get("top1", {}) and sources.get(source, {}).get("epoch", "last") == epoch:
            return float(part["top1"][method]), source
    return None
