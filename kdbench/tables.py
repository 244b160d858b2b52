"""Render an ``aggregate.Summary`` as LaTeX (booktabs), Markdown, CSV, or a bar chart.

No statistics happen here: every number comes from the Summary, so all formats show the same
values. LaTeX and Markdown share one layout (``_grid``, ``caption``) and differ only in their
markup (``LatexMarkup``, ``MarkdownMarkup``). No torch; matplotlib is imported only when a
plot is asked for, since it is an optional extra (``pip install kdbench[plot]``).

Marks (explained in every caption):
  bold        the best mean of the column (Teacher excluded), underline the second best;
  dagger      differs from the Student, double dagger: differs from the column's best, both at
              the Holm-corrected level alpha;
  section     (with published numbers) the published number lies more than 2 std from ours.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from tabulate import tabulate

from kdbench.aggregate import PAIRED, STUDENT, TEACHER, Summary
from kdbench.errors import UserError


@dataclass(frozen=True)
class Layout:
    """What a table shows besides mean and spread."""

    delta: bool = False  # a Δ column per setting: mean minus the Student's mean
    ci: bool = False  # the t confidence half-width instead of the std after the ±
    published: bool = False  # a "pub." column per setting with the published number


# ---------------------------------------------------------------------------------------------
# Markup: the only place LaTeX and Markdown differ
# ---------------------------------------------------------------------------------------------

class LatexMarkup:
    pm = r" $\pm$ "
    arrow = r" $\rightarrow$ "
    delta = r"$\Delta$"
    alpha = r"$\alpha$"
    dash = "--"
    missing = "--"
    _glyphs = {"student": r"\dagger", "best": r"\ddagger", "published": r"\S"}
    symbols = {key: f"${glyph}$" for key, glyph in _glyphs.items()}

    # The ten characters LaTeX treats specially (LaTeX Companion, 2nd ed., 7.1).
    _SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}
    # pdflatex without extra packages cannot typeset these: spell them in LaTeX.
    _UNICODE = {"±": r"$\pm$", "→": r"$\rightarrow$", "Δ": r"$\Delta$", "α": r"$\alpha$",
                "–": "--", "—": "---", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                "…": "...", "’": "'", "‘": "`", "“": "``", "”": "''", "<": r"\textless{}",
                ">": r"\textgreater{}", "|": r"\textbar{}"}

    def escape(self, text: str) -> str:
        out = []
        for char in str(text):
            if char in self._SPECIAL:
                out.append(self._SPECIAL[char])
            elif char in self._UNICODE:
                out.append(self._UNICODE[char])
            elif ord(char) > 126 or char in "\n\r\t":
                # An error message may hold anything; an unknown glyph would stop pdflatex.
                out.append(" " if char in "\n\r\t" else "?")
            else:
                out.append(char)
        return "".join(out)

    def marks(self, keys: Sequence[str]) -> str:
        return f"$^{{{''.join(self._glyphs[key] for key in keys)}}}$" if keys else ""

    def bold(self, text: str) -> str:
        return rf"\textbf{{{text}}}"

    def underline(self, text: str) -> str:
        return rf"\underline{{{text}}}"

    def small(self, text: str) -> str:
        return rf"{{\scriptsize {text}}}"

    def math_n(self, n: str) -> str:
        return f"$n$ = {n}"


class MarkdownMarkup:
    pm = " ± "
    arrow = " → "
    delta = "Δ"
    alpha = "α"
    dash = "–"
    missing = "—"
    symbols = {"student": "†", "best": "‡", "published": "§"}

    def escape(self, text: str) -> str:
        # A pipe would end the table cell; newlines would end the row.
        return re.sub(r"\s+", " ", str(text)).replace("|", r"\|")

    def marks(self, keys: Sequence[str]) -> str:
        return "".join(self.symbols[key] for key in keys)

    def bold(self, text: str) -> str:
        return f"**{text}**"

    def underline(self, text: str) -> str:
        # GitHub's sanitiser keeps <ins> (rendered underlined) and strips <u>.
        return f"<ins>{text}</ins>"

    def small(self, text: str) -> str:
        return text

    def math_n(self, n: str) -> str:
        return f"n = {n}"


Markup = LatexMarkup | MarkdownMarkup
LATEX = LatexMarkup()
MARKDOWN = MarkdownMarkup()


# ---------------------------------------------------------------------------------------------
# The shared layout
# ---------------------------------------------------------------------------------------------

def uniform_seeds(summary: Summary) -> list[int] | None:
    """The seeds every non-Teacher cell has, complete, when they all have the same; else None.

    Then n goes once into the caption; otherwise every cell states its own n.
    """
    cells = summary.cells[summary.cells["method"] != TEACHER]
    if cells.empty:
        return None
    seed_sets = {tuple(seeds) for seeds in cells["seeds"]}
    complete = (cells["n"] == cells["n_expected"]).all() and (cells["n_failed"] == 0).all()
    if len(seed_sets) == 1 and complete and cells["n"].iloc[0] > 0:
        return list(next(iter(seed_sets)))
    return None


def _teacher_uniform_n(summary: Summary) -> int | None:
    teachers = summary.cells[summary.cells["method"] == TEACHER]
    if teachers.empty:
        return None
    counts = set(teachers["n"])
    complete = (teachers["n_failed"] == 0).all()
    return counts.pop() if len(counts) == 1 and complete else None


def column_headers(summary: Summary, mk: Markup) -> list[str]:
    """``teacher → student`` per setting; the setting's name where that is ambiguous."""
    columns = summary.columns
    several_datasets = columns["dataset"].nunique() > 1
    headers = []
    for _, column in columns.iterrows():
        if column["teacher_arch"] and column["student_arch"]:
            text = mk.escape(column["teacher_arch"]) + mk.arrow + mk.escape(column["student_arch"])
            if several_datasets:
                text = mk.escape(column["dataset"]) + ": " + text
        else:
            text = mk.escape(column["setting"])
        headers.append(text)
    if len(set(headers)) < len(headers):
        headers = [mk.escape(name) for name in columns["setting"]]
    return headers


def format_value(cell: pd.Series | None, summary: Summary, layout: Layout, mk: Markup,
                 show_n: bool) -> str:
    """``mean ± spread`` with emphasis, significance marks and, when needed, n."""
    if cell is None:
        return mk.missing
    digits = summary.decimals
    n, expected = int(cell["n"]), int(cell["n_expected"])
    if n == 0:
        return mk.small(f"failed ({mk.math_n(f'0 of {expected}')})")
    text = f"{cell['mean']:.{digits}f}"
    spread = cell["ci_halfwidth"] if layout.ci else cell["std"]
    if math.isfinite(spread):
        text += f"{mk.pm}{spread:.{digits}f}"
    if cell["rank"] == 1:
        text = mk.bold(text)
    elif cell["rank"] == 2:
        text = mk.underline(text)
    marks = [kind for kind in ("student", "best") if cell[f"p_vs_{kind}_holm"] < summary.alpha]
    text += mk.marks(marks)
    if n < expected:  # failed or missing seeds: say so in the cell, never a silent smaller n
        text += " " + mk.small(f"({mk.math_n(f'{n} of {expected}')})")
    elif show_n:
        text += " " + mk.small(f"({mk.math_n(str(n))})")
    return text


def format_delta(cell: pd.Series | None, summary: Summary, mk: Markup) -> str:
    if cell is None or cell["method"] == STUDENT or not math.isfinite(cell["delta"]):
        return mk.missing
    return f"{cell['delta']:+.{summary.decimals}f}"


def format_published(cell: pd.Series | None, summary: Summary, mk: Markup) -> str:
    if cell is None or "published" not in cell or not math.isfinite(cell["published"]):
        return mk.missing
    text = f"{cell['published']:.2f}"
    if cell["published_outside_2std"]:
        text += mk.marks(["published"])
    return text


def _grid(summary: Summary, layout: Layout, mk: Markup) -> tuple[list[str], list[list[str]]]:
    """Sub-column names per setting, and the body rows (title first)."""
    sub = ["mean"] + (["delta"] if layout.delta else []) + (["pub"] if layout.published else [])
    by_key = {(c["setting"], c["row"]): c for _, c in summary.cells.iterrows()}
    seeds = uniform_seeds(summary)
    teacher_n = _teacher_uniform_n(summary)
    body = []
    for row in summary.rows:
        title = summary.cells.loc[summary.cells["row"] == row, "title"]
        line = [mk.escape(title.iloc[0] if not title.empty else row)]
        for setting in summary.settings:
            cell = by_key.get((setting, row))
            is_teacher = cell is not None and cell["method"] == TEACHER
            show_n = (teacher_n is None) if is_teacher else (seeds is None)
            for kind in sub:
                if kind == "mean":
                    line.append(format_value(cell, summary, layout, mk, show_n))
                elif kind == "delta":
                    line.append(format_delta(cell, summary, mk))
                else:
                    line.append(format_published(cell, summary, mk))
        body.append(line)
    return sub, body


def _seed_list(seeds: Sequence[int], mk: Markup) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}{mk.dash}{seeds[-1]}"
    return ", ".join(map(str, seeds))


def caption(summary: Summary, layout: Layout, mk: Markup) -> str:
    """The protocol in words: data, epochs, last/best, n, spread, marks, test, correction."""
    columns = summary.columns
    metric = "Top-1" if summary.metric.startswith("top1") else "Top-5"
    datasets = ", ".join(mk.escape(d) for d in pd.unique(columns["dataset"].dropna()))
    epochs = pd.unique(columns["epochs"].dropna().astype(str))
    if len(epochs) == 1:
        trained = f"trained for {mk.escape(epochs[0])} epochs"
    else:
        trained = "trained for " + "; ".join(
            f"{mk.escape(e)} epochs ({mk.escape(s)})"
            for s, e in zip(columns["setting"], columns["epochs"].astype(str)))
    teacher_epochs = pd.unique(columns["teacher_epochs"].dropna().astype(str))
    if len(teacher_epochs) == 1 and list(teacher_epochs) != list(epochs):
        trained += f" (teachers {mk.escape(teacher_epochs[0])})"
    recipes = pd.unique(columns["recipe_source"].dropna())
    if len(recipes) == 1:
        recipe = f", {mk.escape(recipes[0])}"
    else:  # say which recipe each column followed (MHGD's authors' recipe vs the common one)
        used_by = {source: ", ".join(columns.loc[columns["recipe_source"] == source, "setting"])
                   for source in recipes}
        recipe = ", recipes: " + "; ".join(
            mk.escape(f"{source} ({names})") for source, names in used_by.items())
    if summary.metric.endswith("last"):
        when = "at the last epoch"
    else:
        when = ("at the best epoch (the highest test accuracy during training: optimistic, "
                "chosen on the test set)")
    percent = mk.escape("%")
    parts = [f"{metric} accuracy ({percent}) on {datasets}, students {trained}{recipe}, {when}."]
    if "precision" in summary.runs:
        arithmetic = set(summary.runs.loc[summary.runs["role"] != "teacher", "precision"].dropna())
        if arithmetic == {"bf16"}:
            parts.append("Students' networks in bf16 autocast (losses in fp32; teachers trained in fp32).")
        elif arithmetic == {"fp32"}:
            parts.append("Arithmetic: fp32.")

    if layout.ci:
        spread = (f"mean{mk.pm}half-width of the {summary.confidence:.0%} t confidence interval"
                  .replace("%", r"\%" if mk is LATEX else "%"))
    else:
        spread = f"mean{mk.pm}sample std (ddof = 1)"
    seeds = uniform_seeds(summary)
    if seeds is not None:
        over = f"over {mk.math_n(str(len(seeds)))} seeds ({_seed_list(seeds, mk)})"
    else:
        over = "over seeds, n in each cell"
    parts.append(f"Cells: {spread} {over}.")
    teacher_n = _teacher_uniform_n(summary)
    if teacher_n == 1:
        parts.append("Teacher: a single run.")
    elif teacher_n:
        parts.append(f"Teacher: {teacher_n} runs.")
    incomplete = summary.cells[(summary.cells["n"] < summary.cells["n_expected"])
                               | (summary.cells["n_failed"] > 0)]
    if not incomplete.empty:
        parts.append(f"({mk.math_n('k of K')}): only k of the column's K seeds finished "
                     "(failed or missing runs are listed below, never averaged in).")
    parts.append("Bold: best, underlined: second best per column (Teacher excluded; equal "
                 "shown values share the mark).")

    test = ("paired t-test over the seeds both cells share" if summary.test == PAIRED
            else "Welch's t-test over seeds")
    if summary.n_tests:
        parts.append(
            f"{mk.symbols['student']}: differs from Student, {mk.symbols['best']}: differs "
            f"from the column's best, two-sided {test}, Holm-corrected over the "
            f"{summary.n_tests} tests of the table, {mk.alpha} = {summary.alpha:g}.")
    else:
        parts.append(f"No difference is testable ({test} needs 2 or more runs per cell, with "
                     "spread).")
    if layout.delta:
        parts.append(f"{mk.delta}: difference of means to Student.")
    if layout.published:
        if summary.published_sources:
            cited = "; ".join(
                mk.escape(f"{info.get('short', key)}: {info.get('epoch', '?')} epoch, "
                          f"{info.get('aggregate', '?')}")
                for key, info in summary.published_sources.items())
            parts.append(f"pub.: published number ({cited}); {mk.symbols['published']}: more "
                         "than 2 std from our mean.")
        else:
            parts.append("pub.: no published numbers for these settings and metric.")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

def render_latex(summary: Summary, layout: Layout = Layout(), label: str = "tab:kdbench") -> str:
    """A complete ``table`` float (booktabs); needs only ``\\usepackage{booktabs}``."""
    mk = LATEX
    sub, body = _grid(summary, layout, mk)
    headers = column_headers(summary, mk)
    width = len(sub)
    names = {"mean": "ours", "delta": mk.delta, "pub": "pub."}
    lines = [
        "% Generated by kdbench (python -m kdbench table); the provenance note beside this",
        "% file names the command, the commit and the runs behind every cell.",
        r"\begin{table}[htbp]",
        r"\centering",
        # Six settings with n in the cells do not fit a page at \small: shrink, but stay
        # within plain LaTeX + booktabs (no \resizebox, which needs graphicx).
        r"\small" if width * len(headers) <= 4 else r"\footnotesize",
        rf"\setlength{{\tabcolsep}}{{{6 if width * len(headers) <= 4 else 3}pt}}",
        rf"\caption{{{caption(summary, layout, mk)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{l{'c' * (width * len(headers))}}}",
        r"\toprule",
    ]
    if width == 1:
        lines.append("Method & " + " & ".join(headers) + r" \\")
    else:
        lines.append(" & " + " & ".join(rf"\multicolumn{{{width}}}{{c}}{{{h}}}"
                                         for h in headers) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}"
                              for i in range(len(headers))))
        lines.append("Method & " + " & ".join([names[k] for k in sub] * len(headers)) + r" \\")
    lines.append(r"\midrule")
    for row, line in zip(summary.rows, body):
        lines.append(" & ".join(line) + r" \\")
        if row.split("[", 1)[0] == STUDENT and row == _last_reference_row(summary):
            lines.append(r"\midrule")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    for note in summary.notes:
        lines.append(rf"\par\smallskip{{\footnotesize\raggedright {mk.escape(note)}\par}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _last_reference_row(summary: Summary) -> str | None:
    """The last Teacher/Student row: the rule under it separates the methods."""
    refs = [row for row in summary.rows if row.split("[", 1)[0] in (TEACHER, STUDENT)]
    others = [row for row in summary.rows if row not in refs]
    return refs[-1] if refs and others else None


def render_markdown(summary: Summary, layout: Layout = Layout()) -> str:
    """A GitHub table with the caption above and the notes below, for READMEs."""
    mk = MARKDOWN
    sub, body = _grid(summary, layout, mk)
    names = {"delta": mk.delta, "pub": "pub."}
    headers = ["Method"]
    for header in column_headers(summary, mk):
        headers += [header if kind == "mean" else names[kind] for kind in sub]
    table = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=["left"] + ["right"] * (len(headers) - 1))
    out = [caption(summary, layout, mk), "", table]
    if summary.notes:
        out += ["", "Notes:", *[f"- {mk.escape(note)}" for note in summary.notes]]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["setting", "dataset", "teacher_arch", "student_arch", "epochs", "metric", "row",
               "title", "n", "n_failed", "n_missing", "n_expected", "seeds", "mean", "std",
               "ci_halfwidth", "confidence", "delta", "rank", "best_row", "test", "alpha",
               "p_vs_student", "p_vs_student_holm", "n_vs_student", "p_vs_best",
               "p_vs_best_holm", "n_vs_best", "published", "published_source",
               "published_outside_2std", "values", "run_ids", "failed_run_ids"]


def csv_frame(summary: Summary) -> pd.DataFrame:
    """Every number behind the table, unrounded; lists joined with ';'."""
    frame = summary.cells.merge(
        summary.columns[["setting", "dataset", "teacher_arch", "student_arch", "epochs"]],
        on="setting", how="left")
    frame["metric"] = summary.metric
    frame["confidence"] = summary.confidence
    frame["test"] = summary.test
    frame["alpha"] = summary.alpha
    for name in ("seeds", "values", "run_ids", "failed_run_ids"):
        frame[name] = frame[name].map(lambda items: ";".join(map(repr_number, items)))
    return frame[[c for c in CSV_COLUMNS if c in frame.columns]]


def repr_number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def render_csv(summary: Summary) -> str:
    return csv_frame(summary).to_csv(index=False)


def render_plot(summary: Summary, path: Path, layout: Layout = Layout()) -> None:
    """Grouped bars: mean ± std (or CI) per row, one group per setting; PNG or PDF by suffix."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError:
        raise UserError("plots need matplotlib, an optional extra: "
                        "pip install 'kdbench[plot]' (or pip install matplotlib)") from None
    cells = summary.cells
    headers = column_headers(summary, MARKDOWN)
    rows = summary.rows
    width = 0.8 / max(1, len(rows))
    figure = Figure(figsize=(max(4.0, 1.0 + 0.35 * len(rows) * len(headers)), 3.6))
    axes = figure.add_subplot()
    lows: list[float] = []
    for i, row in enumerate(rows):
        xs, means, errors = [], [], []
        for j, setting in enumerate(summary.settings):
            hit = cells[(cells["setting"] == setting) & (cells["row"] == row) & (cells["n"] > 0)]
            if hit.empty:
                continue
            cell = hit.iloc[0]
            error = cell["ci_halfwidth"] if layout.ci else cell["std"]
            xs.append(j - 0.4 + width * (i + 0.5))
            means.append(cell["mean"])
            errors.append(error if math.isfinite(error) else 0.0)
            lows.append(cell["mean"] - errors[-1])
        title = cells.loc[cells["row"] == row, "title"]
        axes.bar(xs, means, width, yerr=errors, capsize=2,
                 label=title.iloc[0] if not title.empty else row,
                 hatch="//" if row.split("[", 1)[0] == TEACHER else None)
    axes.set_xticks(range(len(headers)), headers)
    metric = "top-1" if summary.metric.startswith("top1") else "top-5"
    epoch = "last" if summary.metric.endswith("last") else "best"
    spread = f"{summary.confidence:.0%} CI" if layout.ci else "std"
    axes.set_ylabel(f"{metric} accuracy (%), {epoch} epoch")
    axes.set_title(f"mean ± {spread} over seeds (y axis does not start at 0)", fontsize=9)
    if lows:
        # Differences of a point or less are the point of the chart: zoom in on them.
        axes.set_ylim(bottom=max(0.0, math.floor(min(lows)) - 1))
    axes.legend(fontsize=7, ncols=min(4, len(rows)), loc="upper left",
                bbox_to_anchor=(0, -0.12))
    axes.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No creation date in PDFs: a regenerated, unchanged table should not show as changed.
    metadata = {"CreationDate": None} if path.suffix.lower() == ".pdf" else {}
    figure.savefig(path, bbox_inches="tight", dpi=150, metadata=metadata)
