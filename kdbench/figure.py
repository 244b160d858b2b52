"""The paper figure of a table: every seed as a dot, mean ± spread, the teacher as a line.

One panel per setting (each with its own accuracy axis: settings differ by tens of points).
Points without bars: a bar's length claims a distance from zero, so bars on a zoomed axis
exaggerate gaps (the issue's "starts at y = 76"), while dots on a zoomed axis are read by
position only; the axis is labelled and every seed is visible, so no gap can hide in a mean.
The caption under the panels states n, the spread, the data, the test and its correction.

matplotlib is an optional extra (``pip install 'kdbench[plot]'``); ``require_matplotlib`` lets
the ``table`` command check for it before writing anything. No pyplot: no global state, no
GUI backend.
"""

from __future__ import annotations

import io
import math
import textwrap

from kdbench.aggregate import PAIRED, STUDENT, TEACHER, Summary
from kdbench.datasets import display_name
from kdbench.errors import UserError
from kdbench.tables import (MARKDOWN, Layout, _teacher_uniform_n, column_headers, plural,
                            significance_marks, uniform_seeds)

FORMATS = ("png", "pdf")
# Colour-blind-safe qualitative palette (Okabe & Ito 2008, "Color Universal Design").
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
             "#000000")


def require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UserError("the figure needs matplotlib, an optional extra: "
                        "pip install 'kdbench[plot]' (or pip install matplotlib)") from None


def render_figure(summary: Summary, fmt: str, layout: Layout = Layout()) -> bytes:
    """The figure as PNG or PDF bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r}; choose from {FORMATS}")
    figure = build_figure(summary, layout)
    buffer = io.BytesIO()
    # No creation date in PDFs: a regenerated, unchanged figure should not show as changed.
    metadata = {"CreationDate": None} if fmt == "pdf" else {}
    figure.savefig(buffer, format=fmt, bbox_inches="tight", dpi=200, metadata=metadata)
    return buffer.getvalue()


def build_figure(summary: Summary, layout: Layout = Layout()):
    """The matplotlib Figure (no pyplot), one panel (Axes) per setting in table order."""
    require_matplotlib()
    from matplotlib.figure import Figure

    cells = summary.cells
    methods = [row for row in summary.rows if row.split("[", 1)[0] != TEACHER]
    colours = {row: OKABE_ITO[i % len(OKABE_ITO)] for i, row in enumerate(methods)}
    headers = column_headers(summary, MARKDOWN)
    widths = [max(2.4, 0.62 * len(methods) + 0.9) for _ in summary.settings]
    figure = Figure(figsize=(max(4.5, sum(widths)), 3.9), layout="constrained")
    panels = figure.subplots(1, len(summary.settings), squeeze=False,
                             gridspec_kw={"width_ratios": widths})[0]
    for axes, setting, header in zip(panels, summary.settings, headers):
        in_setting = cells[cells["setting"] == setting]
        _panel(axes, summary, in_setting, methods, colours, layout)
        dataset = summary.column(setting)["dataset"]
        title = header if ":" in header else f"{display_name(dataset)}: {header}"
        axes.set_title(title, fontsize=9)
    panels[0].set_ylabel(f"{'top-1' if summary.metric.startswith('top1') else 'top-5'} "
                         f"accuracy (%), {'last' if summary.metric.endswith('last') else 'best'} "
                         "epoch", fontsize=8)
    width_chars = int(max(4.5, sum(widths)) * 19)
    figure.text(0.0, 0.0, "\n".join(textwrap.wrap(figure_caption(summary, layout), width_chars)),
                fontsize=7, ha="left", va="top", transform=figure.transFigure)
    return figure


def _panel(axes, summary: Summary, cells, methods, colours, layout: Layout) -> None:
    by_row = {cell["row"]: cell for _, cell in cells.iterrows()}
    shown = [row for row in methods if row in by_row and by_row[row]["n"] > 0]
    lows, highs = [], []
    for x, row in enumerate(shown):
        cell = by_row[row]
        values = list(cell["values"])
        # Seeds side by side in seed order, not jittered at random: the figure is reproducible
        # and the k-th dot of every method is the same seed.
        offsets = [0.0] if len(values) == 1 else [
            -0.16 + 0.32 * i / (len(values) - 1) for i in range(len(values))]
        axes.scatter([x - 0.08 + o for o in offsets], values, s=14, color=colours[row],
                     alpha=0.75, linewidths=0, zorder=3)
        spread = cell["ci_halfwidth"] if layout.ci else cell["std"]
        error = spread if math.isfinite(spread) else 0.0
        axes.errorbar([x + 0.24], [cell["mean"]], yerr=[[error], [error]] if error else None,
                      fmt="_", markersize=12, markeredgewidth=2, color="black", elinewidth=1.2,
                      capsize=3, zorder=4)
        marks = significance_marks(cell, summary)
        top = max(max(values), cell["mean"] + error)
        if marks:
            axes.annotate("".join(MARKDOWN.symbols[m] for m in marks), (x + 0.24, top),
                          xytext=(0, 3), textcoords="offset points", ha="center",
                          va="bottom", fontsize=9)
        lows.append(min(min(values), cell["mean"] - error))
        highs.append(top)
    teacher = [cell for row, cell in by_row.items() if row.split("[", 1)[0] == TEACHER
               and cell["n"] > 0]
    for cell in teacher[:1]:  # one teacher line; teacher variants are named in the table
        axes.axhline(cell["mean"], color="0.35", linestyle="--", linewidth=1, zorder=1)
        axes.annotate(f"Teacher {cell['mean']:.{summary.decimals}f}", (1.0, cell["mean"]),
                      xycoords=("axes fraction", "data"), xytext=(-2, 3),
                      textcoords="offset points", ha="right", va="bottom", fontsize=7,
                      color="0.25")
        lows.append(cell["mean"])
        highs.append(cell["mean"])
    if lows:
        span = max(highs) - min(lows) or 1.0
        axes.set_ylim(min(lows) - 0.08 * span, max(highs) + 0.16 * span)
    titles = []
    for row in shown:
        title = summary.titles.get(row, row)
        if bool(by_row[row].get("reading", False)):
            title += "*"
        titles.append(title)
    axes.set_xticks(range(len(shown)), titles, rotation=30 if len(shown) > 3 else 0,
                    ha="right" if len(shown) > 3 else "center", fontsize=8)
    axes.set_xlim(-0.6, len(shown) - 0.4)
    axes.tick_params(axis="y", labelsize=8)
    axes.grid(axis="y", alpha=0.3)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def figure_caption(summary: Summary, layout: Layout) -> str:
    """The figure's caption, printed under it: n, spread, data, epoch, test, correction."""
    seeds = uniform_seeds(summary)
    n = (f"n = {plural(len(seeds), 'student seed')} per method" if seeds is not None
         else "n student seeds per method as in the table")
    spread = (f"mean ± {summary.confidence:.0%} t confidence interval" if layout.ci
              else "mean ± sample std (ddof = 1)")
    datasets = ", ".join(display_name(d) for d in dict.fromkeys(summary.columns["dataset"]))
    epoch = "last" if summary.metric.endswith("last") else "best (optimistic: chosen on the test set)"
    teacher_n = _teacher_uniform_n(summary)
    teacher = ("dashed line: the teacher (a single run)" if teacher_n == 1
               else "dashed line: the teacher's mean")
    text = (f"Dots: one student seed each ({n}); black: {spread}; {teacher}. "
            f"{datasets} test split, {epoch} epoch.")
    if summary.n_tests:
        test = "paired t-test" if summary.test == PAIRED else "Welch's t-test"
        text += (" ↑/↓: significantly better/worse than the Student, ‡: below the column's "
                 f"best (two-sided {test}, Holm over {plural(summary.n_tests, 'test')}, "
                 f"α = {summary.alpha:g}).")
    if any(summary.cells.get("reading", [])):
        text += " *: kdbench's reading of the paper."
    if STUDENT not in {row.split("[", 1)[0] for row in summary.rows}:
        text += " No Student runs: no comparison to it."
    return text
