"""Records -> the numbers of a comparison table: mean, sample std, n, CI, significance.

This is a pure function of the stored records (``kdbench.store``): pandas and scipy only, no
torch, so a table can be rebuilt on a laptop from results copied off a cluster.

The table's model
-----------------
- A *column* is a setting (``cifar100/wrn_40_2-wrn_16_2``): one teacher -> student pair.
- A *row* is the teacher ("teacher"), the student trained alone ("vanilla", shown as Student)
  or a method. Runs of one method whose specs differ in anything but the seed (a config field,
  a recipe override, the teacher seed) are different experiments: they become separate rows,
  keyed by the fields that differ (``kd[T=2]``, ``kd[T=4]``, the names ``methods=`` takes),
  never pooled. A row's printed title (``Summary.titles``) is the records'
  ``method_display_name`` ("KD", "CRD + KD"; the method's name for records made before it
  existed) with the differing fields at their resolved values, "KD (T = 2)", and can be
  renamed (``labels=``). Because the
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

Effect sizes
------------
Beside the test, each method's difference to the Student comes with its confidence interval
(Welch: t_{(1+c)/2, df_W} * sqrt(s_a^2/n_a + s_b^2/n_b) with the Welch-Satterthwaite df; with
``paired=True`` the paired interval over the shared seeds, so the interval always matches the
test) and Hedges' g, the difference in units of the pooled within-cell std, times Hedges'
small-sample correction J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)) (Hedges 1981,
J. Educ. Stat. 6:107-128; df = n_a + n_b - 2), which removes the upward bias of d at
a few seeds (J = 0.90 at 5 + 5 seeds).

Versions and fidelity
---------------------
A record names the code that made it (``provenance.method_source_sha256`` and
``provenance.training_version``). A cell never averages records of two versions silently:
``summarize`` refuses unless ``pool_versions=True``, and then marks the cell; a row whose cells
come from different versions (one per column) is marked too. A row built from a method whose
declared fidelity is "reading of the paper" gets a footnote (``Summary.footnotes``).

Teachers
--------
A student record names the teacher weights it distilled from
(``provenance.teacher_weights_sha256``), a teacher record its own (``teacher_weights``). A
column whose records name two weights of one teacher (a teacher retrained between its students)
is refused like two code versions, and with ``pool_versions=True`` tabulated with a note.
Records that name none (older ones, methods without a teacher) are not judged. The same holds
for the data (``provenance.data_sha256``, kdbench.data.fingerprint): a column trained on two
copies of its dataset is refused.
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

from kdbench import selection as selection_module
from kdbench.errors import UserError
from kdbench.rows import STUDENT, TEACHER, base as _base, label_rows, row_titles
from kdbench.spec import RunSpec, record_precision
from kdbench.staleness import code_version, short, teacher_weights_of

# The exact string of kdbench.method.FIDELITY_READING (interfaces.md); not imported, since
# kdbench.method imports torch and tables must not.
FIDELITY_READING = "reading of the paper"

METRIC_ALIASES = {"last": "top1_last", "best": "top1_best"}
METRICS = ("top1_last", "top1_best", "top5_last", "top5_best")
# The same, on the held-out validation split of a run that has one (kdbench/validation.py).
VAL_METRICS = tuple(f"val_{metric}" for metric in METRICS)

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
    delta_ci_low, delta_ci_high, hedges_g, rank, best_row, p_vs_student, p_vs_student_holm,
    n_vs_student, p_vs_best, p_vs_best_holm, n_vs_best, published, published_source,
    published_outside_2std, reading (the row's method is a "reading of the paper"),
    versions (the method versions behind the cell), version_mark, selected_variant and
    selection_score (with ``select_on``: the variant's row key and its mean on the split it
    was chosen on), values, run_ids, failed_run_ids.
    ``runs``: one row per record behind the table (setting, row, seed, run_id, status, value,
    error, git_commit, finished_at, version, ...). ``columns``: one row per setting (dataset,
    teacher, student, epochs, teacher_epochs, train_subset, recipe_source, expected_seeds,
    teacher_checkpoint, teacher_checkpoint_file). ``comparisons``: the tests of the table's
    family, one row per pair (setting, row_a, row_b, kinds, p, p_holm, n_pairs).
    ``titles``: row key -> printed title. ``footnotes``: one line per row built from a
    "reading of the paper". ``pooled_versions``: cells that pool several method versions.
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
    titles: dict[str, str] = field(default_factory=dict)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)
    footnotes: list[str] = field(default_factory=list)
    pooled_versions: int = 0  # cells averaging records of more than one method version
    # What --select-on chose (kdbench/selection.py); None: every variant is a row.
    selection: "selection_module.Selection | None" = None

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


def welch_interval(a: Sequence[float], b: Sequence[float],
                   confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of mean(a) - mean(b) without assuming equal variances (Welch 1947):
    difference -+ t_{(1+c)/2, df_W} * sqrt(s_a^2/n_a + s_b^2/n_b). NaN where undefined."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return math.nan, math.nan
    var_a, var_b = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(var_a + var_b)
    difference = float(a.mean() - b.mean())
    if se == 0:
        return difference, difference
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (a.size - 1) + var_b ** 2 / (b.size - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    return difference - half, difference + half


def paired_interval(a: Sequence[float], b: Sequence[float],
                    confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the mean per-pair difference a - b (aligned values)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        return math.nan, math.nan
    half = ci_halfwidth(float(d.std(ddof=1)), int(d.size), confidence)
    return float(d.mean()) - half, float(d.mean()) + half


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean(a) - mean(b)) / pooled std, times Hedges' exact small-sample correction J(df).

    J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)) with df = n_a + n_b - 2 (Hedges 1981),
    computed through log-gamma so that it stays finite for any n. NaN when a side has fewer
    than two values or there is no spread.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return math.nan
    df = a.size + b.size - 2
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / df)
    if pooled == 0:
        return math.nan
    correction = math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)
    return float(correction * (a.mean() - b.mean()) / pooled)


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
    role): two runs with equal variants differ only by seed. ``version`` names the code that
    made the run (``method_version``).
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
        checkpoint = spec.get("teacher_checkpoint") or provenance.get("teacher_checkpoint_sha256")
        teacher_run, teacher_weights = _teacher_of(record, role)
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
            **{metric: _as_float(metrics.get(metric)) for metric in METRICS + VAL_METRICS},
            "held_out": spec.get("held_out"),
            "validation": (json.dumps(record["validation"], sort_keys=True)
                           if isinstance(record.get("validation"), Mapping) else None),
            "error": _error_text(error),
            "git_commit": provenance.get("git_commit"),
            "finished_at": provenance.get("finished_at"),
            "precision": record_precision(record),
            "display_name": record.get("method_display_name"),
            "fidelity": provenance.get("fidelity"),
            "fidelity_note": provenance.get("fidelity_note"),
            "version": method_version(record),
            "resolved_config": json.dumps(record.get("config") or {}, sort_keys=True),
            "resolved_recipe": json.dumps(recipe, sort_keys=True),
            "train_subset": setting.get("train_subset"),
            "teacher_checkpoint": checkpoint,
            "teacher_checkpoint_file": provenance.get("teacher_checkpoint_file"),
            "teacher_run": teacher_run,
            "teacher_weights": teacher_weights,
            "data": provenance.get("data_sha256"),
        })
    columns = ["run_id", "status", "setting", "dataset", "teacher_arch", "student_arch",
               "recipe_source", "role", "method", "seed", "variant", "epochs", *METRICS,
               *VAL_METRICS, "held_out", "validation", "error", "git_commit", "finished_at", "precision", "display_name", "fidelity",
               "fidelity_note", "version", "resolved_config", "resolved_recipe",
               "train_subset", "teacher_checkpoint", "teacher_checkpoint_file", "teacher_run",
               "teacher_weights", "data"]
    return pd.DataFrame(rows, columns=columns)


def _teacher_of(record: Mapping[str, Any], role: str) -> tuple[str | None, str | None]:
    """The id of the teacher run behind a record (a teacher's own) and the sha256 of the
    weights it names (a teacher's own; a student's: those it distilled from, if recorded)."""
    if role == "teacher":
        weights = record.get("teacher_weights")
        return record.get("id"), weights.get("sha256") if isinstance(weights, Mapping) else None
    try:
        teacher_run = RunSpec.from_json(record["spec"]).teacher_spec().id
    except Exception:  # a record too old or damaged to rebuild its spec: nothing to compare
        return None, None
    return teacher_run, teacher_weights_of(record)


def method_version(record: Mapping[str, Any]) -> str:
    """The code a record's numbers came from, as one printable string (kdbench.staleness:
    the method's source hash and the engine's ``training_version``; a record that lacks one
    cannot be shown to match, so it counts as a version of its own)."""
    return code_version(record).describe()


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
    labels: Mapping[str, str] | None = None,
    pool_versions: bool = False,
    select_on: str | None = None,
) -> Summary:
    """Aggregate records into the cells of a table (see the module docstring for the rules).

    ``settings``: names or glob patterns (None: all). ``methods``: method names or variant
    labels, in the order the rows should appear (None: all, alphabetical); Teacher and Student
    always come first. ``published``: the parsed published.json, to attach published numbers.
    ``precision``: only the student runs made at this precision ("fp32", "bf16"; None: all);
    teachers are fp32 for every precision. ``labels``: {row key or method: printed title}.
    ``pool_versions``: allow a cell to average records of different method versions (marked).
    ``select_on``: "val" or "test": one row per method, its variant chosen per setting on the
    validation split or on the test set (kdbench/selection.py); ``methods`` then names methods.
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
    selection = None
    if select_on is not None:
        runs = selection_module.protocol_runs(runs, select_on)
        if methods and any("[" in wanted for wanted in methods):
            raise UserError(f"--select-on {select_on} chooses each method's variant: name methods "
                            f"(kd), not variants ({', '.join(m for m in methods if '[' in m)})")
    runs["row"] = label_rows(runs)
    if select_on is not None:
        runs, selection = selection_module.select_variants(runs, select_on, metric)
    # Titles from every run of the chosen settings, as the keys are: a row picked alone keeps
    # the fields that set it apart from its siblings ("KD (T = 4)").
    titles = row_titles(runs, labels)
    rows = _choose_rows(runs, methods)
    runs = runs[runs["row"].isin(rows)].copy()
    _refuse_ambiguity(runs, chosen)
    titles = {row: titles[row] for row in rows}
    runs["value"] = runs[metric]
    runs["setting"] = pd.Categorical(runs["setting"], chosen, ordered=True)
    runs["row"] = pd.Categorical(runs["row"], rows, ordered=True)
    runs = runs.sort_values(["setting", "row", "seed", "run_id"]).reset_index(drop=True)
    runs["setting"] = runs["setting"].astype(str)
    runs["row"] = runs["row"].astype(str)

    notes: list[str] = []
    if selection is not None:
        notes += selection_module.notes(selection, titles)
    pooled = _check_versions(runs, titles, pool_versions, notes)
    _check_teachers(runs, titles, pool_versions, notes)
    _check_data(runs, titles, pool_versions, notes)
    columns = _columns(runs, chosen)
    cells = _cells(runs, chosen, rows, columns, titles, confidence, notes)
    _mark_versions(cells, runs, notes)
    comparisons = _significance(cells, runs, chosen, paired, titles, notes)
    _effect_sizes(cells, runs, paired, confidence)
    _rank(cells, chosen, decimals)
    _mark_selection(cells, selection)
    footnotes = _reading_footnotes(cells, runs, titles)
    sources = (_attach_published(cells, published, metric, notes) if published is not None
               else {})
    n_tests = int(np.isfinite(comparisons["p"]).sum()) if not comparisons.empty else 0
    return Summary(cells=cells, runs=runs, columns=columns, settings=list(chosen), rows=rows,
                   metric=metric, test=PAIRED if paired else WELCH, alpha=alpha,
                   confidence=confidence, decimals=decimals, n_tests=n_tests, notes=notes,
                   published_sources=sources, titles=titles, comparisons=comparisons,
                   footnotes=footnotes, pooled_versions=pooled, selection=selection)


def _mark_selection(cells: pd.DataFrame, selection: "selection_module.Selection | None") -> None:
    """Each cell's chosen variant and its score (CSV columns; empty without --select-on)."""
    cells["selected_variant"] = None
    cells["selection_score"] = math.nan
    if selection is None or cells.empty:
        return
    chosen = selection.choices.set_index(["setting", "method"])
    for index, cell in cells.iterrows():
        key = (cell["setting"], cell["method"])
        if key in chosen.index:
            cells.loc[index, "selected_variant"] = chosen.loc[key, "chosen"]
            cells.loc[index, "selection_score"] = chosen.loc[key, "score"]


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


def _check_versions(runs: pd.DataFrame, titles: Mapping[str, str], pool_versions: bool,
                    notes: list[str]) -> int:
    """Refuse (or, asked to, allow and count) cells whose done records differ in version."""
    done = runs[runs["status"] == "done"]
    pooled = 0
    for (setting, row), group in done.groupby(["setting", "row"], sort=False):
        versions = group["version"].value_counts()
        if len(versions) < 2:
            continue
        listing = "; ".join(f"{count} from {version}" for version, count in versions.items())
        if not pool_versions:
            raise UserError(
                f"{setting}, {titles[row]}: its {len(group)} records come from {len(versions)} "
                f"versions of the code ({listing}); a mean over them mixes two experiments. "
                "Retrain the stale runs (run --retrain-stale), keep only one version's records "
                "in the results, or pass --pool-versions to average them anyway (marked)")
        pooled += 1
        notes.append(f"{setting}, {titles[row]}: pooled over {len(versions)} code versions "
                     f"(--pool-versions): {listing}")
    return pooled


def _check_teachers(runs: pd.DataFrame, titles: Mapping[str, str], pool_versions: bool,
                    notes: list[str]) -> None:
    """Refuse (or, asked to, allow and note) a column whose done records name more than one
    set of weights for one teacher run: some of its students distilled a teacher retrained
    after them, and their comparison with the others is not one experiment."""
    _refuse_mixed(runs, ["setting", "teacher_run"], "teacher_weights", titles, pool_versions, notes,
                  mixed="its records name {count} different weights of one teacher",
                  advice="the teacher was retrained between its students. `kdbench run "
                         "--retrain-stale` retrains the students of other weights than the "
                         "stored teacher's",
                  noted="its records name different weights of one teacher")


def _check_data(runs: pd.DataFrame, titles: Mapping[str, str], pool_versions: bool,
                notes: list[str]) -> None:
    """Refuse (or, asked to, allow and note) a column whose done records were trained on
    different data (``provenance.data_sha256``: another copy of the dataset, another subset):
    its rows would not be one experiment. Records that name none are not judged."""
    _refuse_mixed(runs, ["setting"], "data", titles, pool_versions, notes,
                  mixed="its records were trained on {count} different copies of the data",
                  advice="keep the records of one copy in the results",
                  noted="its records were trained on different data")


def _refuse_mixed(runs: pd.DataFrame, by: list[str], column: str, titles: Mapping[str, str],
                  pool_versions: bool, notes: list[str], mixed: str, advice: str, noted: str) -> None:
    """Per group of ``by`` (the setting first), the done records that name a checksum in
    ``column`` must name one; records naming none are not judged."""
    done = runs[(runs["status"] == "done") & runs[column].notna()]
    for key, group in done.groupby(by, sort=False):
        count = group[column].nunique()
        if count < 2:
            continue
        setting, listing = key[0], _by_checksum(group, column, titles)
        if not pool_versions:
            raise UserError(f"{setting}: {mixed.format(count=count)} ({listing}); {advice}; or pass "
                            "--pool-versions to tabulate them anyway (noted)")
        notes.append(f"{setting}: {noted} (--pool-versions): {listing}")


def _by_checksum(group: pd.DataFrame, column: str, titles: Mapping[str, str]) -> str:
    """"abc…: 2 records (Teacher, KD); def…: 1 record (AT)", checksums in order of appearance."""
    return "; ".join(
        f"{short(sha)}: {len(of_sha)} record{'s' if len(of_sha) != 1 else ''} "
        f"({', '.join(dict.fromkeys(titles.get(row, row) for row in of_sha['row']))})"
        for sha, of_sha in group.groupby(column, sort=False))


def _how_to_choose(students: Sequence[str]) -> str:
    """Which flag separates the experiments: --precision where they differ in precision (a
    bf16 and an fp32 grid), --methods with a variant label where they differ otherwise (the
    label names the fields that differ)."""
    keys = {part.split("=", 1)[0] for row in students if "[" in row
            for part in row.split("[", 1)[1].rstrip("]").split(",")}
    if keys == {"precision"}:
        return "choose one with --precision fp32 or --precision bf16"
    advice = (f"choose one with --methods, e.g. --methods '{students[0]}' (and the method rows "
              "of the same experiment), or each method's best variant with --select-on val|test")
    return advice + (", and --precision" if "precision" in keys else "")


def _columns(runs: pd.DataFrame, settings: Sequence[str]) -> pd.DataFrame:
    """Per setting: dataset, architectures, epochs, training subset, the teacher's origin."""
    out = []
    for setting in settings:
        in_setting = runs[runs["setting"] == setting]
        students = in_setting[in_setting["row"].map(_base) != TEACHER]
        teachers = in_setting[in_setting["row"].map(_base) == TEACHER]
        source = students if not students.empty else teachers
        # A given checkpoint (--teacher-checkpoint) is evaluated, not trained: its recipe's
        # epochs say nothing about it.
        trained = teachers[teachers["teacher_checkpoint"].isna()]
        checkpoints = sorted({str(c) for c in in_setting["teacher_checkpoint"].dropna()})
        files = sorted({str(f) for f in in_setting["teacher_checkpoint_file"].dropna()})
        subsets = {int(s) for s in in_setting["train_subset"].dropna()}
        out.append({
            "setting": setting,
            "dataset": _one(in_setting["dataset"]),
            "teacher_arch": _one(in_setting["teacher_arch"]),
            "student_arch": _one(in_setting["student_arch"]),
            "recipe_source": _one(in_setting["recipe_source"]),
            "epochs": _one(source["epochs"]),
            "teacher_epochs": _one(trained["epochs"]),
            "train_subset": subsets.pop() if len(subsets) == 1 else None,
            "expected_seeds": sorted(int(s) for s in students["seed"].dropna().unique()),
            "teacher_checkpoint": ", ".join(checkpoints) or None,
            "teacher_checkpoint_file": ", ".join(files) or None,
            "trained_teacher": not trained.empty or not checkpoints,
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
           columns: pd.DataFrame, titles: Mapping[str, str], confidence: float,
           notes: list[str]) -> pd.DataFrame:
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
                notes.append(f"{setting}, {titles[row]}: no runs")
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
                notes.append(f"{setting}, {titles[row]}: seed {run['seed']} failed "
                             f"(run {run['run_id']}: {why}); not in the mean")
            if missing:
                notes.append(f"{setting}, {titles[row]}: no record for seed"
                             f"{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))}")
            out.append({
                "setting": setting,
                "row": row,
                "title": titles[row],
                "method": _base(row),
                "n": n,
                "n_failed": int(len(failed)),
                "n_missing": len(missing),
                "n_expected": len(expected),
                "seeds": [int(s) for s in done["seed"]],
                "mean": float(values.mean()) if n else math.nan,
                "std": std,
                "ci_halfwidth": ci_halfwidth(std, n, confidence),
                "versions": sorted(set(done["version"])),
                "values": [float(v) for v in values],
                "run_ids": list(group["run_id"]),
                "failed_run_ids": list(failed["run_id"]),
            })
    cells = pd.DataFrame(out)
    student_mean = (cells[cells["method"] == STUDENT].set_index("setting")["mean"]
                    if not cells.empty else pd.Series(dtype=float))
    cells["delta"] = cells["mean"] - cells["setting"].map(student_mean).astype(float)
    return cells


def _mark_versions(cells: pd.DataFrame, runs: pd.DataFrame, notes: list[str]) -> None:
    """A cell is marked when its row is built from more than one code version anywhere in the
    table: pooled within the cell (--pool-versions; ``_check_versions`` notes it) or one
    version per column (noted here)."""
    done = runs[runs["status"] == "done"]
    spread = done.groupby("row")["version"].nunique()
    cells["version_mark"] = cells["row"].map(lambda row: bool(spread.get(row, 0) > 1))
    for row, group in cells[cells["version_mark"]].groupby("row", sort=False):
        if all(len(versions) == 1 for versions in group["versions"]):
            per_column = "; ".join(f"{cell['setting']}: {cell['versions'][0]}"
                                   for _, cell in group.iterrows())
            notes.append(f"{group['title'].iloc[0]}: its columns come from different code "
                         f"versions ({per_column})")


def _significance(cells: pd.DataFrame, runs: pd.DataFrame, settings: Sequence[str],
                  paired: bool, titles: Mapping[str, str], notes: list[str]) -> pd.DataFrame:
    """Fill p-values vs Student and vs the column's best; Holm over the whole table.

    Returns the family: one row per tested pair (setting, row_a, row_b, kinds, p, p_holm,
    n_pairs), row_a the method compared, row_b its reference (the Student or the best).
    """
    for name in ("p_vs_student", "p_vs_student_holm", "p_vs_best", "p_vs_best_holm"):
        cells[name] = math.nan
    # Values per side behind a test: the smaller sample for Welch, the shared seeds if paired.
    cells["n_vs_student"] = 0
    cells["n_vs_best"] = 0
    cells["best_row"] = None
    done = runs[(runs["status"] == "done") & runs["value"].notna()]
    pairs: dict[tuple[str, frozenset[str]], dict[str, Any]] = {}
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
                    # Oriented as "method vs reference": the Student is always row_b.
                    a, b = ((other, cell["row"]) if cell["method"] == STUDENT
                            else (cell["row"], other))
                    p, n = _test(done, setting, a, b, paired, titles, notes)
                    pairs[key] = {"setting": setting, "row_a": a, "row_b": b,
                                  "kinds": [], "p": p, "n_pairs": n}
                pairs[key]["kinds"].append(f"vs {kind}")
                links.append((index, kind, key))
    keys = list(pairs)
    adjusted = dict(zip(keys, holm([pairs[key]["p"] for key in keys])))
    for index, kind, key in links:
        cells.loc[index, f"p_vs_{kind}"] = pairs[key]["p"]
        cells.loc[index, f"p_vs_{kind}_holm"] = adjusted[key]
        cells.loc[index, f"n_vs_{kind}"] = pairs[key]["n_pairs"]
    order = {"vs student": 0, "vs best": 1}
    family = [{**pairs[key], "kinds": ", ".join(sorted(pairs[key]["kinds"], key=order.get)),
               "p_holm": adjusted[key]} for key in keys]
    return pd.DataFrame(family, columns=["setting", "row_a", "row_b", "kinds", "p", "p_holm",
                                         "n_pairs"])


def _test(done: pd.DataFrame, setting: str, row_a: str, row_b: str, paired: bool,
          titles: Mapping[str, str], notes: list[str]) -> tuple[float, int]:
    """(p-value, number of values per side or pairs) for one pair of cells."""
    a, b = _sides(done, setting, row_a, row_b)
    if not paired:
        return welch_pvalue(a.to_numpy(), b.to_numpy()), int(min(len(a), len(b)))
    shared = a.index.intersection(b.index).sort_values()
    if len(shared) < max(len(a), len(b)):
        notes.append(f"{setting}: {titles[row_a]} vs {titles[row_b]} paired over the "
                     f"{len(shared)} seeds both have")
    return paired_pvalue(a[shared].to_numpy(), b[shared].to_numpy()), int(len(shared))


def _sides(done: pd.DataFrame, setting: str, row_a: str, row_b: str) -> tuple[pd.Series, pd.Series]:
    """The values of two cells, indexed by seed."""
    in_setting = done[done["setting"] == setting]
    a = in_setting[in_setting["row"] == row_a].set_index("seed")["value"]
    b = in_setting[in_setting["row"] == row_b].set_index("seed")["value"]
    return a, b


def _effect_sizes(cells: pd.DataFrame, runs: pd.DataFrame, paired: bool,
                  confidence: float) -> None:
    """Each method's difference to the Student: its interval (matching the test) and g."""
    cells["delta_ci_low"] = math.nan
    cells["delta_ci_high"] = math.nan
    cells["hedges_g"] = math.nan
    done = runs[(runs["status"] == "done") & runs["value"].notna()]
    students = cells[cells["method"] == STUDENT].set_index("setting")["row"]
    for index, cell in cells.iterrows():
        if cell["method"] in (STUDENT, TEACHER) or cell["setting"] not in students.index:
            continue
        a, b = _sides(done, cell["setting"], cell["row"], students[cell["setting"]])
        if paired:
            shared = a.index.intersection(b.index).sort_values()
            low, high = paired_interval(a[shared].to_numpy(), b[shared].to_numpy(), confidence)
        else:
            low, high = welch_interval(a.to_numpy(), b.to_numpy(), confidence)
        cells.loc[index, ["delta_ci_low", "delta_ci_high"]] = [low, high]
        cells.loc[index, "hedges_g"] = hedges_g(a.to_numpy(), b.to_numpy())


def _reading_footnotes(cells: pd.DataFrame, runs: pd.DataFrame,
                       titles: Mapping[str, str]) -> list[str]:
    """One footnote per row whose method declares itself a "reading of the paper"."""
    cells["reading"] = False
    footnotes = []
    for row, group in runs.groupby("row", sort=False):
        if FIDELITY_READING not in set(group["fidelity"].dropna()):
            continue
        cells.loc[cells["row"] == row, "reading"] = True
        notes = [str(n) for n in pd.unique(group["fidelity_note"].dropna()) if str(n).strip()]
        footnotes.append(f"{titles[row]}: kdbench's reading of the paper, whose full details "
                         "are not public" + (f" ({'; '.join(notes)})" if notes else ""))
    return footnotes


def _rank(cells: pd.DataFrame, settings: Sequence[str], decimals: int) -> None:
    """rank 1 = best (bold), 2 = second (underlined); Teacher excluded, as in KD papers."""
    cells["rank"] = math.nan
    for setting in settings:
        column = cells[(cells["setting"] == setting) & (cells["method"] != TEACHER)]
        ranks = dense_ranks(dict(zip(column.index, column["mean"])), decimals)
        for index, rank in ranks.items():
            cells.loc[index, "rank"] = rank


def published_entries(published: Mapping[str, Any], setting: str) -> list[dict[str, Any]]:
    """A setting's published entries ``{"source", "top1"}``, in order: the entry itself and
    the further sources under its ``also`` (published.json's format: e.g. mdistiller's
    best-epoch DKD numbers beside RepDistiller's last-epoch table), or a plain list of them."""
    entry = published.get("settings", {}).get(setting)
    if not entry:
        return []
    out = []
    for item in (entry if isinstance(entry, list) else [entry]):
        out.append({key: value for key, value in item.items() if key != "also"})
        out += [dict(extra) for extra in item.get("also", [])]
    return out


def source_epoch(info: Mapping[str, Any]) -> str:
    """"last" or "best": the epoch a source's numbers were read at (its ``epoch`` field, or a
    ``metric`` field such as "top1_best")."""
    epoch = str(info.get("epoch") or info.get("metric") or "last")
    return "best" if "best" in epoch else "last"


def _attach_published(cells: pd.DataFrame, published: Mapping[str, Any], metric: str,
                      notes: list[str]) -> dict[str, dict[str, Any]]:
    """Published number per cell, and whether it lies more than 2 std from our mean.

    Like with like: a source's numbers are compared only where the table's metric is read at
    the same epoch (a best-epoch number beside a last-epoch mean would flatter the source by
    the gap between the two; mdistiller reports "best epoch, mean of 5"). Sources left out
    for that reason are named in the notes. 2 std of the seeds is the reviewer's rule of
    thumb: about 95 % of single runs of a normally distributed result fall inside, so a
    published number outside it suggests a different protocol or implementation, not seed
    noise. Published numbers are top-1.
    """
    cells["published"] = math.nan
    cells["published_source"] = None
    cells["published_outside_2std"] = False
    used: dict[str, dict[str, Any]] = {}
    if not metric.startswith("top1"):
        return used
    ours = "best" if metric.endswith("best") else "last"
    sources = published.get("sources", {})
    skipped: dict[str, str] = {}
    for index, cell in cells.iterrows():
        matching = []
        for entry in published_entries(published, cell["setting"]):
            if cell["method"] not in entry.get("top1", {}):
                continue
            info = dict(sources.get(entry["source"], {}))
            if source_epoch(info) == ours:
                matching.append(entry)
            else:
                skipped[entry["source"]] = source_epoch(info)
        for entry in matching[:1]:  # the first source listed for the setting wins
            key = entry["source"]
            info = dict(sources.get(key, {}))
            value = float(entry["top1"][cell["method"]])
            cells.loc[index, "published"] = value
            cells.loc[index, "published_source"] = key
            std = cell["std"]
            cells.loc[index, "published_outside_2std"] = bool(
                math.isfinite(std) and abs(cell["mean"] - value) > 2 * std)
            used[key] = info
    for key, epoch in skipped.items():
        if key in used:
            continue
        info = sources.get(key, {})
        notes.append(f"published numbers of {info.get('short', key)} are {epoch}-epoch "
                     f"({info.get('aggregate', 'aggregate not stated')}); this table is "
                     f"{ours}-epoch, so they are not compared (--metric {epoch} compares them)")
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
