"""Render an ``aggregate.Summary`` as LaTeX (booktabs), Markdown or CSV, with its caption.

No statistics happen here: every number comes from the Summary, so all formats show the same
values. LaTeX and Markdown share one layout (``_grid``, ``caption``) and differ only in their
markup (``LatexMarkup``, ``MarkdownMarkup``). No torch. The figure is ``kdbench.figure``; the
compiled PDF is ``kdbench.latex_pdf``.

Marks (explained in every caption that uses them):
  bold        the best mean of the column (Teacher excluded), underline the second best;
  up/down     significantly better / worse than the Student (Holm-corrected at alpha): the
              direction is part of the mark, since a lone dagger on a worse method reads as
              praise;
  double dagger  significantly below the column's best;
  diamond     the row's cells come from more than one version of the code (``--pool-versions``
              or one version per column), listed under the table;
  asterisk    (on a row title) the method is kdbench's reading of a paper, see the footnote;
  section     (with published numbers) the published number lies more than 2 std from ours.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
from tabulate import tabulate

from kdbench.aggregate import PAIRED, STUDENT, TEACHER, Summary, source_epoch
from kdbench.datasets import display_name, facts
from kdbench.power import MOST_SEEDS, PowerAnalysis


@dataclass(frozen=True)
class Layout:
    """What a table shows besides mean and spread."""

    delta: bool = False  # a Δ column per setting: mean minus the Student's mean
    ci: bool = False  # the t confidence half-width instead of the std after the ±; with
    # delta, also the interval of Δ and a Hedges' g column
    published: bool = False  # a "pub." column per setting with the published number

    @property
    def effect_sizes(self) -> bool:
        return self.delta and self.ci


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
    percent = r"\%"
    _glyphs = {"better": r"\uparrow", "worse": r"\downarrow", "best": r"\ddagger",
               "version": r"\diamond", "published": r"\S", "reading": "*"}
    symbols = {key: f"${glyph}$" for key, glyph in _glyphs.items()}

    # The ten characters LaTeX treats specially (LaTeX Companion, 2nd ed., 7.1).
    _SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}
    # pdflatex without extra packages cannot typeset these: spell them in LaTeX.
    _UNICODE = {"±": r"$\pm$", "→": r"$\rightarrow$", "Δ": r"$\Delta$", "α": r"$\alpha$",
                "–": "--", "—": "---", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                "…": r"\ldots{}", "’": "'", "‘": "`", "“": "``", "”": "''", "<": r"\textless{}",
                ">": r"\textgreater{}", "|": r"\textbar{}", "↑": r"$\uparrow$",
                "↓": r"$\downarrow$", "‡": r"$\ddagger$", "◊": r"$\diamond$", "§": r"\S{}",
                "\u202f": r"\,", "\u00a0": "~", "−": r"$-$", "∈": r"$\in$", "²": r"$^2$",
                "³": r"$^3$", "‖": r"$\|$", "≠": r"$\neq$", "≈": r"$\approx$", "·": r"$\cdot$",
                "∞": r"$\infty$", "√": r"$\surd$", "∑": r"$\sum$", "′": "'",
                # Greek, as method notes write their symbols (LaTeX has no \omicron and no
                # capitals that look Latin).
                **{letter: f"$\\{name}$" for letter, name in zip(
                    "αβγδεζηθικλμνξπρστυφχψωςΓΔΘΛΞΠΣΥΦΨΩ",
                    ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
                     "kappa", "lambda", "mu", "nu", "xi", "pi", "rho", "sigma", "tau", "upsilon",
                     "phi", "chi", "psi", "omega", "varsigma", "Gamma", "Delta", "Theta",
                     "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega"])}}

    def escape(self, text: str) -> str:
        out = []
        for char in str(text):
            if char in self._SPECIAL:
                out.append(self._SPECIAL[char])
            elif char in self._UNICODE:
                out.append(self._UNICODE[char])
            elif char in "\n\r\t":
                out.append(" ")
            elif not " " <= char <= "~":
                # An error message may hold anything; an unknown glyph or a control character
                # would stop pdflatex. A letter with an accent keeps its base letter (é → e:
                # canonical decomposition, marks dropped); anything else is "?" — never a
                # compatibility decomposition, which would print 10⁴ as 104.
                base = "".join(part for part in unicodedata.normalize("NFD", char)
                               if not unicodedata.combining(part))
                out.append(base if len(base) == 1 and base.isascii() and base.isalpha() else "?")
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

    def signed(self, value: float, digits: int) -> str:
        # A hyphen is not a minus sign: typeset the minus in math mode (the issue's "negative
        # deltas as a math minus"); "+" is the same glyph in text and math.
        text = f"{value:+.{digits}f}"
        return r"$-$" + text[1:] if text.startswith("-") else text

    def thousands(self, number: int) -> str:
        return f"{number:,}".replace(",", r"\,")


class MarkdownMarkup:
    pm = " ± "
    arrow = " → "
    delta = "Δ"
    alpha = "α"
    dash = "–"
    missing = "—"
    percent = "%"
    symbols = {"better": "↑", "worse": "↓", "best": "‡", "version": "◊", "published": "§",
               "reading": "*"}

    def escape(self, text: str) -> str:
        # A pipe would end the table cell; newlines would end the row.
        return re.sub(r"\s+", " ", str(text)).replace("|", r"\|")

    def marks(self, keys: Sequence[str]) -> str:
        # A bare * could open emphasis in GitHub's renderer: escape it.
        return "".join(r"\*" if key == "reading" else self.symbols[key] for key in keys)

    def bold(self, text: str) -> str:
        return f"**{text}**"

    def underline(self, text: str) -> str:
        # GitHub's sanitiser keeps <ins> (rendered underlined) and strips <u>.
        return f"<ins>{text}</ins>"

    def small(self, text: str) -> str:
        return text

    def math_n(self, n: str) -> str:
        return f"n = {n}"

    def signed(self, value: float, digits: int) -> str:
        return f"{value:+.{digits}f}"

    def thousands(self, number: int) -> str:
        # A narrow no-break space, the SI digit-group separator, which never breaks a line.
        return f"{number:,}".replace(",", "\u202f")


Markup = LatexMarkup | MarkdownMarkup
LATEX = LatexMarkup()
MARKDOWN = MarkdownMarkup()


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"


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
                text = mk.escape(display_name(column["dataset"])) + ": " + text
        else:
            text = mk.escape(column["setting"])
        headers.append(text)
    if len(set(headers)) < len(headers):
        headers = [mk.escape(name) for name in columns["setting"]]
    return headers


def row_title(summary: Summary, row: str, mk: Markup) -> str:
    """The row's printed title, with the reading-of-the-paper mark where it applies."""
    text = mk.escape(summary.titles.get(row, row))
    reading = summary.cells.loc[summary.cells["row"] == row, "reading"]
    if not reading.empty and bool(reading.any()):
        text += mk.marks(["reading"])
    return text


def significance_marks(cell: pd.Series, summary: Summary) -> list[str]:
    """better/worse than the Student (by the sign of Δ), below the best; Holm at alpha."""
    marks = []
    if cell["p_vs_student_holm"] < summary.alpha:
        marks.append("better" if cell["delta"] > 0 else "worse")
    if cell["p_vs_best_holm"] < summary.alpha:
        marks.append("best")
    return marks


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
    marks = significance_marks(cell, summary)
    if cell.get("version_mark", False):
        marks.append("version")
    text += mk.marks(marks)
    if n < expected:  # failed or missing seeds: say so in the cell, never a silent smaller n
        text += " " + mk.small(f"({mk.math_n(f'{n} of {expected}')})")
    elif show_n:
        text += " " + mk.small(f"({mk.math_n(str(n))})")
    return text


def format_delta(cell: pd.Series | None, summary: Summary, layout: Layout, mk: Markup) -> str:
    """Δ to the Student; with ``--ci`` also its interval, ``+1.61 [+1.02, +2.20]``."""
    if cell is None or cell["method"] == STUDENT or not math.isfinite(cell["delta"]):
        return mk.missing
    digits = summary.decimals
    text = mk.signed(cell["delta"], digits)
    if layout.ci and math.isfinite(cell.get("delta_ci_low", math.nan)):
        text += (f" [{mk.signed(cell['delta_ci_low'], digits)}, "
                 f"{mk.signed(cell['delta_ci_high'], digits)}]")
    return text


def format_g(cell: pd.Series | None, mk: Markup) -> str:
    if cell is None or not math.isfinite(cell.get("hedges_g", math.nan)):
        return mk.missing
    return mk.signed(cell["hedges_g"], 2)


def format_published(cell: pd.Series | None, summary: Summary, mk: Markup) -> str:
    if cell is None or "published" not in cell or not math.isfinite(cell["published"]):
        return mk.missing
    text = f"{cell['published']:.2f}"
    if cell["published_outside_2std"]:
        text += mk.marks(["published"])
    return text


def sub_columns(layout: Layout) -> list[str]:
    return (["mean"] + (["delta"] if layout.delta else [])
            + (["g"] if layout.effect_sizes else []) + (["pub"] if layout.published else []))


def _grid(summary: Summary, layout: Layout, mk: Markup) -> tuple[list[str], list[list[str]]]:
    """Sub-column names per setting, and the body rows (title first)."""
    sub = sub_columns(layout)
    by_key = {(c["setting"], c["row"]): c for _, c in summary.cells.iterrows()}
    seeds = uniform_seeds(summary)
    teacher_n = _teacher_uniform_n(summary)
    body = []
    for row in summary.rows:
        line = [row_title(summary, row, mk)]
        for setting in summary.settings:
            cell = by_key.get((setting, row))
            is_teacher = cell is not None and cell["method"] == TEACHER
            show_n = (teacher_n is None) if is_teacher else (seeds is None)
            for kind in sub:
                if kind == "mean":
                    line.append(format_value(cell, summary, layout, mk, show_n))
                elif kind == "delta":
                    line.append(format_delta(cell, summary, layout, mk))
                elif kind == "g":
                    line.append(format_g(cell, mk))
                else:
                    line.append(format_published(cell, summary, mk))
        body.append(line)
    return sub, body


def _seed_list(seeds: Sequence[int], mk: Markup) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}{mk.dash}{seeds[-1]}"
    return ", ".join(map(str, seeds))


def metric_name(summary: Summary) -> str:
    return "Top-1" if summary.metric.startswith("top1") else "Top-5"


# ---------------------------------------------------------------------------------------------
# The caption: the protocol in words
# ---------------------------------------------------------------------------------------------

def caption(summary: Summary, layout: Layout, mk: Markup) -> str:
    """Data and split, training, last/best, n and spread, marks, test, correction."""
    parts = [_what_was_measured(summary, mk), _selection_sentence(summary, mk),
             _how_students_trained(summary, mk)]
    parts += _teacher_sentences(summary, mk)
    if "precision" in summary.runs:
        arithmetic = set(summary.runs.loc[summary.runs["role"] != "teacher", "precision"].dropna())
        if arithmetic == {"bf16"}:
            parts.append("Students' networks in bf16 autocast (losses in fp32; teachers trained in fp32).")
        elif arithmetic == {"fp32"}:
            parts.append("Arithmetic: fp32.")
    parts.append(_cells_sentence(summary, layout, mk))
    incomplete = summary.cells[(summary.cells["n"] < summary.cells["n_expected"])
                               | (summary.cells["n_failed"] > 0)]
    if not incomplete.empty:
        parts.append(f"({mk.math_n('k of K')}): only k of the column's K seeds finished "
                     "(failed or missing runs are listed below, never averaged in).")
    parts.append("Bold: best, underlined: second best per column (Teacher excluded; equal "
                 "shown values share the mark).")
    parts.append(_marks_sentence(summary, mk))
    if layout.delta:
        parts.append(_delta_sentence(summary, layout, mk))
    if layout.published:
        parts.append(_published_sentence(summary, mk))
    if summary.cells.get("version_mark", pd.Series(dtype=bool)).any():
        pooled = (f" ({plural(summary.pooled_versions, 'cell')} average records of several "
                  "versions: --pool-versions)" if summary.pooled_versions else "")
        parts.append(f"{mk.symbols['version']}: the row's results come from more than one "
                     f"version of the method's code or the engine{pooled}; versions below.")
    if summary.footnotes:
        parts.append(f"{mk.symbols['reading']}: kdbench's reading of the paper (below).")
    return " ".join(part for part in parts if part)


def _what_was_measured(summary: Summary, mk: Markup) -> str:
    columns = summary.columns
    datasets = [d for d in pd.unique(columns["dataset"].dropna())]
    splits = []
    for dataset in datasets:
        known = facts(dataset)
        size = f" ({mk.thousands(known.test_images)} images)" if known else ""
        splits.append(f"{mk.escape(display_name(dataset))}{size}")
    where = ("the test split of " + splits[0] if len(splits) == 1
             else "the test splits of " + ", ".join(splits[:-1]) + " and " + splits[-1])
    if summary.metric.endswith("last"):
        when = "at the last epoch"
    else:
        when = ("at the best epoch (the highest test accuracy during training: optimistic, "
                "chosen on the test set)")
    return f"{metric_name(summary)} accuracy ({mk.percent}) on {where}, {when}."


def _selection_sentence(summary: Summary, mk: Markup) -> str:
    """With --select-on: the protocol (which split chose, its size and seed) and the search
    space, so that a reader knows the numbers were not tuned on themselves (or that they were)."""
    selection = summary.selection
    if selection is None:
        students = summary.runs[summary.runs["role"] != "teacher"]
        held = students["held_out"].dropna() if "held_out" in students else pd.Series(dtype=float)
        if len(students) and len(held) == len(students) and held.nunique() == 1:
            share = mk.escape(f"{float(held.iloc[0]) * 100:g}\u202f") + mk.percent
            return (f"The students trained without a held-out {share} of the training set "
                    "(the validation split of --select-on val).")
        return ""
    score = f"{metric_name(summary).lower()} " + (
        "at the last epoch" if summary.metric.endswith("last") else "at the best epoch")
    space = _search_space(summary, mk)
    if selection.protocol == "test":
        return (f"Variants chosen on the test set{space} (optimistic: the numbers shown chose "
                f"themselves): per column, each method's variant with the highest mean test "
                f"{score} over seeds.")
    facts = {setting: selection.splits.get(setting, {}) for setting in summary.settings}
    fractions = {fact.get("fraction") for fact in facts.values()}
    fraction = fractions.pop() if len(fractions) == 1 else None
    share = (mk.escape(f"{float(fraction) * 100:g}\u202f") + mk.percent
             if isinstance(fraction, (int, float)) else "a part")

    def split_text(fact: dict) -> str:
        if not fact:
            return "not recorded"
        total = fact["images"] + fact["train_images"]
        return (f"{mk.thousands(fact['images'])} of its {mk.thousands(total)} images, seed "
                f"{fact['seed']}")

    texts = {setting: split_text(fact) for setting, fact in facts.items()}
    if len(set(texts.values())) == 1:
        where = next(iter(texts.values()))
    else:
        where = "; ".join(f"{mk.escape(setting)}: {text}" for setting, text in texts.items())
    return (f"Variants chosen on a held-out {share} of the training set ({where}; the same "
            "fraction of every class, fixed per dataset; the students trained on the rest, the "
            f"teacher on all of it){space}: per column, each method's variant with the highest "
            f"mean validation {score} over seeds, shown by its test accuracy.")


def _search_space(summary: Summary, mk: Markup) -> str:
    """" among KD: T ∈ {2, 4}; Student: lr ∈ {0.01, 0.05}", in row order."""
    selection = summary.selection
    parts = []
    for row in summary.rows:
        fields = selection.spaces.get(row)
        if not fields:
            continue
        values = ", ".join(f"{name} ∈ {{{', '.join(items)}}}" for name, items in fields)
        count = selection.variants.get(row, 0)
        product = math.prod(len(items) for _, items in fields)
        extra = f" ({count} variants)" if len(fields) > 1 or count != product else ""
        parts.append(f"{summary.titles.get(row, row)}: {values}{extra}")
    if not parts:
        return ", each method having one variant"
    return mk.escape(" among " + "; ".join(parts))


def _epochs_text(value: Any) -> str:
    try:
        return plural(int(value), "epoch")
    except (TypeError, ValueError):  # several values joined by aggregate._one ("3/5")
        return f"{value} epochs"


def _how_students_trained(summary: Summary, mk: Markup) -> str:
    columns = summary.columns
    epochs = pd.unique(columns["epochs"].dropna().astype(str))
    several = len(columns) > 1
    if len(epochs) == 1:
        trained = f"for {mk.escape(_epochs_text(epochs[0]))}"
    else:
        trained = "for " + "; ".join(
            f"{mk.escape(_epochs_text(e))} ({mk.escape(s)})"
            for s, e in zip(columns["setting"], columns["epochs"]))
    subsets = []
    for _, column in columns.iterrows():
        known = facts(column["dataset"])
        if column["train_subset"] and (known is None or column["train_subset"] < known.train_images):
            total = f" of the {mk.thousands(known.train_images)}" if known else ""
            where = f" ({mk.escape(column['setting'])})" if several else ""
            subsets.append(f"{mk.thousands(int(column['train_subset']))}{total} training "
                           f"images{where}")
    on = (" on " + "; ".join(dict.fromkeys(subsets)) + " (a fixed class-balanced subset)"
          if subsets else "")
    recipes = pd.unique(columns["recipe_source"].dropna())
    if len(recipes) == 1:
        recipe = f", {mk.escape(recipes[0])}"
    elif len(recipes) > 1:  # say which recipe each column followed
        used_by = {source: ", ".join(columns.loc[columns["recipe_source"] == source, "setting"])
                   for source in recipes}
        recipe = ", recipes: " + "; ".join(
            mk.escape(f"{source} ({names})") for source, names in used_by.items())
    else:
        recipe = ""
    return f"Students trained {trained}{on}{recipe}."


def _teacher_sentences(summary: Summary, mk: Markup) -> list[str]:
    """Trained teachers' epochs (when they differ from the students'), or the given checkpoint
    (``--teacher-checkpoint``), by file name where recorded and by checksum."""
    columns = summary.columns
    out = []
    given = columns[columns["teacher_checkpoint"].notna()]
    for _, column in given.iterrows():
        checksums = ", ".join(f"sha256 {c[:12]}…" for c in str(column["teacher_checkpoint"]).split(", "))
        name = f"{column['teacher_checkpoint_file']}, " if column["teacher_checkpoint_file"] else ""
        where = f" ({column['setting']})" if len(columns) > 1 else ""
        out.append(mk.escape(f"Teacher{where}: the given checkpoint ({name}{checksums}), "
                             "evaluated here, not trained."))
    trained = columns[columns["trained_teacher"] & columns["teacher_epochs"].notna()]
    teacher_epochs = pd.unique(trained["teacher_epochs"].astype(str))
    student_epochs = pd.unique(columns["epochs"].dropna().astype(str))
    if len(teacher_epochs) == 1 and list(teacher_epochs) != list(student_epochs):
        which = "Teachers" if len(trained) > 1 else "Teacher"
        out.append(f"{which} trained for {mk.escape(_epochs_text(teacher_epochs[0]))}.")
    elif len(teacher_epochs) > 1:
        out.append("Teachers trained for " + "; ".join(
            f"{mk.escape(_epochs_text(e))} ({mk.escape(s)})"
            for s, e in zip(trained["setting"], trained["teacher_epochs"])) + ".")
    return out


def _cells_sentence(summary: Summary, layout: Layout, mk: Markup) -> str:
    if layout.ci:
        spread = (f"mean{mk.pm}half-width of the {summary.confidence:.0%} t confidence interval"
                  .replace("%", mk.percent))
    else:
        spread = f"mean{mk.pm}sample std (ddof = 1)"
    seeds = uniform_seeds(summary)
    if seeds is not None:
        over = (f"over {mk.math_n(str(len(seeds)))} student "
                f"{'seed' if len(seeds) == 1 else 'seeds'} ({_seed_list(seeds, mk)})")
    else:
        over = "over student seeds, n in each cell"
    teacher_n = _teacher_uniform_n(summary)
    if teacher_n == 1:
        teacher = (" Every student of a column distils the same teacher, a single run: the "
                   "spread is the students' seed-to-seed variation, not the teacher's.")
    elif teacher_n:
        teacher = (f" Teacher: mean of {teacher_n} runs; each row's students distil one of "
                   "them (its teacher seed), so the spread is over student seeds only.")
    else:
        teacher = (" Each row's students distil one teacher, so the spread is over student "
                   "seeds only.")
    return f"Cells: {spread} {over}.{teacher}"


def _marks_sentence(summary: Summary, mk: Markup) -> str:
    test = ("paired t-test over the seeds both cells share" if summary.test == PAIRED
            else "Welch's t-test over seeds")
    if not summary.n_tests:
        return (f"No difference is testable ({test} needs 2 or more runs per cell, with "
                "spread).")
    family = ("the one test of the table" if summary.n_tests == 1
              else f"the {summary.n_tests} tests of the table")
    s = mk.symbols
    return (f"{s['better']}/{s['worse']}: significantly better/worse than the Student, "
            f"{s['best']}: significantly below the column's best; two-sided {test}, "
            f"Holm-corrected over {family}, {mk.alpha} = {summary.alpha:g}.")


def _delta_sentence(summary: Summary, layout: Layout, mk: Markup) -> str:
    text = f"{mk.delta}: difference of means to the Student"
    if layout.effect_sizes:
        kind = ("paired over the shared seeds" if summary.test == PAIRED
                else "Welch, unequal variances")
        text += (f", with its {summary.confidence:.0%} confidence interval ({kind})"
                 .replace("%", mk.percent))
        text += ("; g: Hedges' g, the difference over the pooled within-cell std with the "
                 "small-sample correction")
    return text + "."


def _published_sentence(summary: Summary, mk: Markup) -> str:
    if not summary.published_sources:
        return ("pub.: no published numbers for these settings read at this table's epoch.")
    cited = "; ".join(
        mk.escape(f"{info.get('short', key)}: {source_epoch(info)} epoch, "
                  f"{info.get('aggregate', '?')}")
        for key, info in summary.published_sources.items())
    return (f"pub.: published number ({cited}), shown only where it was read at the same "
            f"epoch as ours; {mk.symbols['published']}: more than 2 std from our mean.")


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

def render_latex(summary: Summary, layout: Layout = Layout(), label: str = "tab:kdbench") -> str:
    """A complete ``table`` float (booktabs); needs only ``\\usepackage{booktabs}``."""
    mk = LATEX
    sub, body = _grid(summary, layout, mk)
    headers = column_headers(summary, mk)
    width = len(sub)
    names = {"mean": metric_name(summary), "delta": mk.delta, "g": "$g$", "pub": "pub."}
    wide = width * len(headers) > 4
    lines = [
        "% Generated by kdbench (python -m kdbench table); the provenance note beside this",
        "% file names the command, the commit and the runs behind every cell.",
        r"\begin{table}[htbp]",
        r"\centering",
        # Six settings with n in the cells do not fit a page at \small: shrink, but stay
        # within plain LaTeX + booktabs (no \resizebox, which needs graphicx).
        r"\footnotesize" if wide else r"\small",
        rf"\setlength{{\tabcolsep}}{{{3 if wide else 6}pt}}",
        # A caption above a table: the standard classes put \abovecaptionskip (10pt) above
        # it and \belowcaptionskip (0pt) below, so the caption would touch \toprule.
        # Local to this float; classes that place captions themselves keep their own skip.
        r"\setlength{\belowcaptionskip}{6pt}",
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
    for note in summary.footnotes:
        lines.append(rf"\par\smallskip{{\footnotesize\raggedright $^{{*}}$\,{mk.escape(note)}\par}}")
    for note in summary.notes:
        lines.append(rf"\par\smallskip{{\footnotesize\raggedright {mk.escape(note)}\par}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _last_reference_row(summary: Summary) -> str | None:
    """The last Teacher/Student row: the rule under it separates the methods."""
    refs = [row for row in summary.rows if row.split("[", 1)[0] in (TEACHER, STUDENT)]
    others = [row for row in summary.rows if row not in refs]
    return refs[-1] if refs and others else None


def render_markdown(summary: Summary, layout: Layout = Layout(),
                    power: PowerAnalysis | None = None) -> str:
    """A GitHub table with the caption above, footnotes and notes below, then the power
    analysis when one is given."""
    mk = MARKDOWN
    sub, body = _grid(summary, layout, mk)
    names = {"delta": mk.delta, "g": "g", "pub": "pub."}
    headers = ["Method"]
    for header in column_headers(summary, mk):
        headers += [header if kind == "mean" else names[kind] for kind in sub]
    table = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=["left"] + ["right"] * (len(headers) - 1))
    out = [caption(summary, layout, mk), "", table]
    if summary.footnotes:
        out += ["", *[r"\* " + mk.escape(note) for note in summary.footnotes]]
    if summary.notes:
        out += ["", "Notes:", *[f"- {mk.escape(note)}" for note in summary.notes]]
    if power is not None:
        out += ["", render_power_markdown(power, summary)]
    return "\n".join(out).rstrip("\n") + "\n"


def render_power_markdown(power: PowerAnalysis, summary: Summary) -> str:
    """The power analysis as a Markdown section: how it was computed, then one row per test."""
    digits = summary.decimals
    gap = power.gap
    headers = ["Setting", "Comparison", "n", "pooled std", "observed Δ",
               f"detectable gap (power {power.target:g})"]
    if gap is not None:
        headers += [f"power at gap {gap:g}", f"seeds for gap {gap:g}"]
    rows = []
    for _, line in power.frame.iterrows():
        n = (f"{line['n_a']} pairs" if power.test == PAIRED
             else f"{line['n_a']}" if line["n_a"] == line["n_b"] else f"{line['n_a']}/{line['n_b']}")
        row = [line["setting"], MARKDOWN.escape(line["comparison"]), n,
               _number(line["pooled_sd"], digits), _number(line["observed_difference"], digits,
                                                            signed=True),
               _number(line["detectable_gap"], digits)]
        if gap is not None:
            row += [_number(line["power_at_gap"], 2), _seeds(line["seeds_needed_for_gap"],
                                                           line["pooled_sd"])]
        rows.append(row)
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    return "\n".join([f"Power: {power.how}", "", table])


def _seeds(needed: Any, sigma: float) -> str:
    """Seeds needed: a count, "more than MOST_SEEDS", or a dash where no spread is known."""
    if not math.isfinite(sigma):
        return "—"
    if needed is None or needed != needed:  # None, or NaN after a DataFrame round trip
        return f"more than {MOST_SEEDS}"
    return str(int(needed))


def _number(value: float, digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—" if value is None or math.isnan(value) else "∞"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


CSV_COLUMNS = ["setting", "dataset", "teacher_arch", "student_arch", "epochs", "metric", "row",
               "title", "n", "n_failed", "n_missing", "n_expected", "seeds", "mean", "std",
               "ci_halfwidth", "confidence", "delta", "delta_ci_low", "delta_ci_high",
               "delta_ci_method", "hedges_g", "rank", "best_row", "test", "alpha",
               "p_vs_student", "p_vs_student_holm", "n_vs_student", "p_vs_best",
               "p_vs_best_holm", "n_vs_best", "published", "published_source",
               "published_outside_2std", "reading", "versions", "version_mark",
               "selected_variant", "selection_score", "values", "run_ids", "failed_run_ids"]


def csv_frame(summary: Summary) -> pd.DataFrame:
    """Every number behind the table, unrounded; lists joined with ';'."""
    frame = summary.cells.merge(
        summary.columns[["setting", "dataset", "teacher_arch", "student_arch", "epochs"]],
        on="setting", how="left")
    frame["metric"] = summary.metric
    frame["confidence"] = summary.confidence
    frame["test"] = summary.test
    frame["alpha"] = summary.alpha
    # The interval of Δ follows the test: Welch's for unpaired runs, the paired one with --paired.
    frame["delta_ci_method"] = summary.test
    for name in ("seeds", "values", "run_ids", "failed_run_ids", "versions"):
        if name in frame:
            frame[name] = frame[name].map(lambda items: ";".join(map(repr_number, items)))
    return frame[[c for c in CSV_COLUMNS if c in frame.columns]]


def repr_number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def render_csv(summary: Summary) -> str:
    return csv_frame(summary).to_csv(index=False)


def render_power_csv(power: PowerAnalysis) -> str:
    return power.frame.to_csv(index=False)
