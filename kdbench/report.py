"""``kdbench table``: stored records -> a paper table (LaTeX, Markdown, CSV, PDF, PNG) and figure.

The CLI registers the subcommand with ``add_table_arguments(parser)`` and runs it with
``table_command(args)``. Everything here reads records and writes tables; it never writes
under the results' ``runs/`` folder, and imports no torch, so tables can be rebuilt on a
laptop from results copied off a cluster.

Outputs of ``--out tables/NAME`` (``--format``, or the suffix of --out):
  latex     NAME.tex, with its Markdown twin NAME.md (for READMEs)
  markdown  NAME.md
  csv       NAME.csv: every number behind the table, unrounded
  pdf       NAME.pdf: the LaTeX table compiled by pdflatex, cropped to the table
  png       NAME.png: that PDF rasterised (pdftoppm), for READMEs and slides
  figure    NAME.figure.png and NAME.figure.pdf: every seed as a dot, mean ± spread
  all       all of the above
and always NAME.provenance.md: the command, kdbench's commit, and the run ids behind every
cell, so a committed table can be traced back and regenerated. With ``--power`` the
Markdown gets the power analysis and NAME.power.csv its numbers. With ``--orderings``,
NAME.orderings.md holds the rank agreement with the published tables (kdbench.orderings) and
NAME.orderings.csv every comparison and discordant pair.

Every output is rendered in memory first and written only when all of them succeeded: a
missing pdflatex or matplotlib is one line and exit code 2, with nothing written. Generated
files are overwritten: tables are meant to be regenerated.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kdbench.aggregate import METRICS, Summary, load_published, summarize
from kdbench.errors import UserError
from kdbench.orderings import (Orderings, column_means, compare_orderings,
                               render_orderings_csv, render_orderings_markdown)
from kdbench.power import PowerAnalysis, TARGET_POWER, power_analysis
from kdbench.revision import kdbench_revision
from kdbench.rows import parse_labels
from kdbench.store import Store
from kdbench.tables import (Layout, render_csv, render_latex, render_markdown,
                            render_power_csv, render_power_markdown)

SUFFIXES = {"markdown": ".md", "latex": ".tex", "csv": ".csv", "pdf": ".pdf", "png": ".png"}
FIGURE = "figure"
FIGURE_SUFFIXES = (".figure.png", ".figure.pdf")
FORMAT_OF_SUFFIX = {suffix: name for name, suffix in SUFFIXES.items()}
FORMAT_ALIASES = {"md": "markdown", "tex": "latex"}
ALL_FORMATS = ("latex", "markdown", "csv", "pdf", "png", FIGURE)
FILE_ONLY = ("pdf", "png", FIGURE)


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``table`` subcommand's options (validated in ``table_command``, as UserErrors)."""
    parser.add_argument("--results", default="results", metavar="DIR",
                        help="results directory holding runs/*.json (default: results)")
    parser.add_argument("--settings", metavar="LIST",
                        help="comma list of setting names or glob patterns, e.g. 'cifar100/*' "
                             "(default: every setting in the results)")
    parser.add_argument("--methods", metavar="LIST",
                        help="comma list of methods (or variant keys such as 'kd[T=2]') in "
                             "row order; Teacher and Student always come first "
                             "(default: all, alphabetical)")
    parser.add_argument("--metric", default="last",
                        help="last (top-1 at the last epoch, default), best (top-1 at the best "
                             f"epoch), or one of {', '.join(METRICS)}")
    parser.add_argument("--format", metavar="FMT",
                        help="markdown, latex, csv, pdf (the table through pdflatex), png (that "
                             "PDF as an image), figure (NAME.figure.png and .pdf); a comma list "
                             "or 'all' with --out. Default: from --out's suffix, else markdown "
                             "on stdout")
    parser.add_argument("--out", metavar="PATH",
                        help="write here instead of stdout; NAME.tex also writes NAME.md, and "
                             "every --out writes NAME.provenance.md (command, commit, run ids)")
    parser.add_argument("--delta", action="store_true",
                        help="add a column per setting with the difference to the Student "
                             "(with --ci: its 95%% interval and Hedges' g)")
    parser.add_argument("--paired", action="store_true",
                        help="paired t-test over shared seeds instead of Welch's t-test "
                             "(when runs of a seed share data order and initialisation)")
    parser.add_argument("--ci", action="store_true",
                        help="show the 95%% t confidence half-width instead of the std")
    parser.add_argument("--compare-published", action="store_true",
                        help="add the published number per cell (kdbench/published.json) where "
                             "it was read at the table's epoch, marked where it lies more than "
                             "2 std from ours")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="family-wise significance level, Holm-corrected (default 0.05)")
    parser.add_argument("--decimals", type=int, default=2,
                        help="digits after the point (default 2)")
    parser.add_argument("--label", action="append", metavar="ROW=TEXT",
                        help="print a row under another title, e.g. --label kd=KD or "
                             "--label 'kd[T=2]=KD (T = 2)'; a method name renames all its "
                             "variants (repeatable)")
    parser.add_argument("--tex-label", metavar="LABEL",
                        help="the LaTeX \\label (default: tab:NAME from --out)")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="only the runs made at this precision (default: all; bf16 runs "
                             "are other experiments than fp32 ones and get rows of their own)")
    parser.add_argument("--pool-versions", action="store_true",
                        help="average a cell's records even when they come from different "
                             "versions of the method's code or the engine (marked and stated "
                             "in the caption; default: refuse)")
    parser.add_argument("--select-on", choices=["val", "test"],
                        help="one row per method: per setting, its variant (of a sweep) with the "
                             "best mean accuracy over seeds on the held-out validation split "
                             "(val: runs made with run --select-on val), reported by its test "
                             "accuracy; or on the test set itself (test: optimistic, so "
                             "labelled). The caption states the protocol and the search space")
    parser.add_argument("--power", action="store_true",
                        help=f"for each comparison, the smallest gap detectable with power "
                             f"{TARGET_POWER:g} at the table's n, alpha and Holm family, from "
                             "the pooled spread of each setting")
    parser.add_argument("--gap", type=float, metavar="G",
                        help="with --power (implied): the power at a true gap of G points and "
                             "the seeds per cell needed to detect it")
    parser.add_argument("--orderings", action="store_true",
                        help="Kendall's tau-b between each column's ordering of the methods and "
                             "each published table's (kdbench/published.json), beside the "
                             "published settings' agreement with each other")


def table_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``kdbench table``; ``argv`` (default ``sys.argv``) is recorded in the provenance."""
    results = Path(getattr(args, "results", "results"))
    store = Store(results)
    if not results.is_dir():
        raise UserError(f"results directory {results} does not exist")
    records = list(store.records())
    if not records:
        raise UserError(f"{results} holds no run records (looked for {store.runs_dir}/*.json)")
    out = Path(args.out) if getattr(args, "out", None) else None
    formats = resolve_formats(getattr(args, "format", None), out)
    if getattr(args, "decimals", 2) not in range(0, 7):
        raise UserError(f"--decimals must be 0 to 6, got {args.decimals}")
    gap = getattr(args, "gap", None)
    if gap is not None and not (math.isfinite(gap) and gap > 0):
        raise UserError(f"--gap must be a positive number of points, got {gap}")
    want_power = getattr(args, "power", False) or gap is not None
    compare = getattr(args, "compare_published", False)
    summary = summarize(
        records,
        metric=getattr(args, "metric", "last") or "last",
        settings=_split(getattr(args, "settings", None)),
        methods=_split(getattr(args, "methods", None)),
        paired=getattr(args, "paired", False),
        alpha=getattr(args, "alpha", 0.05),
        decimals=getattr(args, "decimals", 2),
        published=load_published() if compare else None,
        precision=getattr(args, "precision", None),
        labels=parse_labels(getattr(args, "label", None)),
        pool_versions=getattr(args, "pool_versions", False),
        select_on=getattr(args, "select_on", None),
    )
    layout = Layout(delta=getattr(args, "delta", False), ci=getattr(args, "ci", False),
                    published=compare)
    power = power_analysis(summary, gap) if want_power else None
    orderings = (compare_orderings(column_means(summary.cells.to_dict("records")), load_published())
                 if getattr(args, "orderings", False) else None)
    corrupt = store.corrupt_records()
    if out is None:
        fmt = formats[0]
        if fmt == "markdown":
            sys.stdout.write(render_markdown(summary, layout, power))
        else:
            sys.stdout.write(render_latex(summary, layout) if fmt == "latex"
                             else render_csv(summary))
            if power is not None:
                sys.stdout.write("\n" + render_power_markdown(power, summary) + "\n")
        if orderings is not None:
            sys.stdout.write("\n" + render_orderings_markdown(orderings, summary.titles) + "\n")
        for _, reason in corrupt:  # on stderr: the table on stdout stays clean to redirect
            print(f"warning: skipped {reason}", file=sys.stderr)
        return 0
    corrupt = [path for path, _ in corrupt]
    provenance = Provenance(
        command=command_line(sys.argv if argv is None else argv),
        commit=kdbench_revision(),
        results=str(results),
        corrupt_files=[str(path) for path in corrupt],
    )
    label = getattr(args, "tex_label", None) or default_label(out)
    for path in write_tables(summary, layout, out, formats, provenance, label=label,
                             power=power, orderings=orderings):
        print(f"wrote {path}")
    if power is not None:
        print(render_power_markdown(power, summary))
    if orderings is not None:
        print(render_orderings_markdown(orderings, summary.titles))
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    for _, reason in store.corrupt_records():
        print(f"warning: skipped {reason}", file=sys.stderr)
    return 0


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items or None


def _figure_out(out: Path) -> bool:
    return out.name.lower().endswith(FIGURE_SUFFIXES)


def resolve_formats(requested: str | None, out: Path | None) -> list[str]:
    """Formats to produce: from --format (a comma list, or 'all'), else from --out's suffix."""
    if requested:
        names = []
        for item in _split(requested) or []:
            item = FORMAT_ALIASES.get(item.lower(), item.lower())
            expanded = list(ALL_FORMATS) if item == "all" else [item]
            for name in expanded:
                if name not in SUFFIXES and name != FIGURE:
                    raise UserError(f"unknown format {item!r}; choose from "
                                    f"{', '.join([*SUFFIXES, FIGURE])} or all")
                if name not in names:
                    names.append(name)
        if not names:
            raise UserError("--format is empty")
    elif out is not None:
        suffix = out.suffix.lower()
        if _figure_out(out):
            names = [FIGURE]
        elif suffix in FORMAT_OF_SUFFIX:
            names = [FORMAT_OF_SUFFIX[suffix]]
        else:
            raise UserError(f"cannot tell the format of {out} from its suffix; use one of "
                            f"{', '.join([*FORMAT_OF_SUFFIX, *FIGURE_SUFFIXES])} or give --format")
    else:
        names = ["markdown"]
    if out is None:
        if len(names) > 1:
            raise UserError("several formats need --out (a base path such as tables/NAME)")
        if names[0] in FILE_ONLY:
            raise UserError(f"--format {names[0]} needs --out PATH")
    elif len(names) == 1 and names[0] != FIGURE:
        known = FORMAT_OF_SUFFIX.get(out.suffix.lower())
        if _figure_out(out) or (known and known != names[0]):
            raise UserError(f"--format {names[0]} does not match --out {out}")
    return names


def _base(out: Path) -> Path:
    """--out without its format suffix: tables/x.tex, tables/x.figure.png -> tables/x."""
    name = out.name
    for suffix in FIGURE_SUFFIXES:
        if name.lower().endswith(suffix):
            return out.with_name(name[: -len(suffix)])
    return out.with_suffix("") if out.suffix.lower() in FORMAT_OF_SUFFIX else out


def output_paths(out: Path, formats: Sequence[str]) -> dict[str, Path]:
    """Where each output goes; LaTeX brings its Markdown twin (the issue: .tex writes a .md).

    One text format goes to --out as given (``tables/x.txt`` stays x.txt) unless --out has no
    suffix; several formats share --out's base name with their own suffixes. The figure is
    always NAME.figure.png and NAME.figure.pdf, so it never takes the table's PDF/PNG name.
    """
    base = _base(out)
    paths: dict[str, Path] = {}
    if len(formats) == 1 and formats[0] != FIGURE and out.suffix:
        paths[formats[0]] = out
    wanted = list(formats)
    if "latex" in wanted and "markdown" not in wanted:
        wanted.append("markdown")
    for name in wanted:
        if name == FIGURE:
            for suffix in FIGURE_SUFFIXES:
                paths[f"figure{suffix[len('.figure'):]}"] = base.with_name(base.name + suffix)
        else:
            paths.setdefault(name, base.with_name(base.name + SUFFIXES[name]))
    return paths


def provenance_path(out: Path) -> Path:
    base = _base(out)
    return base.with_name(base.name + ".provenance.md")


def power_path(out: Path) -> Path:
    base = _base(out)
    return base.with_name(base.name + ".power.csv")


def orderings_paths(out: Path) -> dict[str, Path]:
    base = _base(out)
    return {"orderings.md": base.with_name(base.name + ".orderings.md"),
            "orderings.csv": base.with_name(base.name + ".orderings.csv")}


def default_label(out: Path) -> str:
    stem = _base(out).name
    return "tab:" + (re.sub(r"[^A-Za-z0-9:_-]+", "-", stem).strip("-") or "kdbench")


@dataclass(frozen=True)
class Provenance:
    """Where a table came from: enough to trace and regenerate it."""

    command: str
    commit: str
    results: str
    corrupt_files: list[str]


def check_requirements(formats: Sequence[str]) -> None:
    """Every tool the outputs need is there, before anything is rendered or written."""
    if FIGURE in formats:
        from kdbench.figure import require_matplotlib

        require_matplotlib()
    if "pdf" in formats or "png" in formats:
        from kdbench.latex_pdf import require_tools

        require_tools(png="png" in formats)


def render_outputs(summary: Summary, layout: Layout, paths: dict[str, Path], label: str,
                   power: PowerAnalysis | None) -> dict[str, bytes]:
    """Every output in memory, keyed by output name."""
    rendered: dict[str, bytes] = {}
    latex: Callable[[], str] = lambda: render_latex(summary, layout, label=label)
    for name in paths:
        if name == "latex":
            rendered[name] = latex().encode()
        elif name == "markdown":
            rendered[name] = render_markdown(summary, layout, power).encode()
        elif name == "csv":
            rendered[name] = render_csv(summary).encode()
        elif name in ("pdf", "png"):
            from kdbench.latex_pdf import compile_table, rasterise

            if "pdf" not in rendered:
                rendered["pdf"] = compile_table(latex())
            if name == "png":
                rendered["png"] = rasterise(rendered["pdf"])
        else:  # figure.png, figure.pdf
            from kdbench.figure import render_figure

            rendered[name] = render_figure(summary, name.split(".")[1], layout)
    return {name: rendered[name] for name in paths}


def write_tables(summary: Summary, layout: Layout, out: Path, formats: Sequence[str],
                 provenance: Provenance, label: str = "tab:kdbench",
                 power: PowerAnalysis | None = None,
                 orderings: Orderings | None = None) -> list[Path]:
    """Render every format, then write them and the provenance note; returns the paths."""
    paths = output_paths(out, formats)
    extra = {"power": power_path(out)} if power is not None else {}
    if orderings is not None:
        extra.update(orderings_paths(out))
    guarded = Path(provenance.results, "runs").resolve()
    note = provenance_path(out)
    for path in [*paths.values(), *extra.values(), note]:
        if path.resolve().is_relative_to(guarded):
            raise UserError(f"refusing to write {path} inside the records folder {guarded}")
    check_requirements(formats)
    rendered = render_outputs(summary, layout, paths, label, power)
    if power is not None:
        rendered["power"] = render_power_csv(power).encode()
    if orderings is not None:
        rendered["orderings.md"] = (render_orderings_markdown(orderings, summary.titles) + "\n").encode()
        rendered["orderings.csv"] = render_orderings_csv(orderings).encode()
    written = []
    for name, path in {**paths, **extra}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rendered[name])
        written.append(path)
    note.write_text(render_provenance(summary, provenance, [p.name for p in written]), encoding="utf-8")
    written.append(note)
    return written


def render_provenance(summary: Summary, provenance: Provenance, files: Sequence[str]) -> str:
    """The command, the commits, and every run behind every cell (done and failed)."""
    runs = summary.runs
    record_commits = sorted({str(c) for c in runs["git_commit"].dropna() if c})
    finished = sorted(str(t) for t in runs["finished_at"].dropna() if t)
    lines = [
        f"# Provenance of {', '.join(files)}",
        "",
        f"- command: `{provenance.command}`",
        f"- kdbench commit of the table: {provenance.commit}",
        f"- kdbench commits of the records: {', '.join(record_commits) or 'not recorded'}",
        f"- results directory: `{provenance.results}` ({len(runs)} records behind the table"
        + (f", newest finished {finished[-1]}" if finished else "") + ")",
        f"- metric: {summary.metric}; test: {summary.test}, Holm over {summary.n_tests} tests, "
        f"alpha {summary.alpha:g}",
    ]
    if summary.pooled_versions:
        lines.append(f"- --pool-versions: {summary.pooled_versions} cells average records of "
                     "several code versions")
    if provenance.corrupt_files:
        lines.append(f"- unreadable record files skipped: {', '.join(provenance.corrupt_files)}")
    lines += ["", "## Runs behind every cell", "",
              "| setting | row | seed | status | value | run id | commit | code version |",
              "|---|---|---|---|---|---|---|---|"]
    for _, run in runs.iterrows():
        value = f"{run['value']:.4f}" if run["value"] == run["value"] else "—"
        title = summary.titles.get(run["row"], run["row"]).replace("|", "/")
        lines.append(f"| {run['setting']} | {title} | {run['seed']} | {run['status']} | "
                     f"{value} | {run['run_id']} | {run['git_commit'] or ''} | "
                     f"{run['version']} |")
    if summary.footnotes:
        lines += ["", "## Footnotes", "", *[f"- {note}" for note in summary.footnotes]]
    if summary.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in summary.notes]]
    return "\n".join(lines) + "\n"


def command_line(argv: Sequence[str]) -> str:
    """The command as a user would retype it (``python -m kdbench`` for the -m entry)."""
    if not argv:
        return "kdbench table"
    program = Path(argv[0]).name
    if program == "__main__.py":
        head = "python -m kdbench"
    elif program == "kdbench":
        head = "kdbench"
    else:
        head = shlex.quote(argv[0])
    return " ".join([head, shlex.join(list(argv[1:]))]).strip()
