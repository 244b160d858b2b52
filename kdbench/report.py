"""``kdbench table``: stored records -> a paper table (LaTeX, Markdown, CSV) or a bar chart.

The CLI registers the subcommand with ``add_table_arguments(parser)`` and runs it with
``table_command(args)``. Everything here reads records and writes tables; it never writes
under the results' ``runs/`` folder, and imports no torch, so tables can be rebuilt on a
laptop from results copied off a cluster.

``--out tables/NAME.tex`` also writes ``tables/NAME.md`` (for READMEs) and
``tables/NAME.provenance.md``: the command, the kdbench commit, and the run ids behind every
cell, so a committed table can be traced back and regenerated. Generated files are
overwritten: tables are meant to be regenerated.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdbench.aggregate import METRICS, Summary, load_published, row_title, summarize
from kdbench.errors import UserError
from kdbench.store import Store
from kdbench.tables import Layout, render_csv, render_latex, render_markdown, render_plot

SUFFIXES = {"markdown": ".md", "latex": ".tex", "csv": ".csv", "png": ".png", "pdf": ".pdf"}
FORMAT_OF_SUFFIX = {suffix: name for name, suffix in SUFFIXES.items()}
FORMAT_ALIASES = {"md": "markdown", "tex": "latex"}
ALL_FORMATS = ("latex", "markdown", "csv", "png")
PLOTS = ("png", "pdf")


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``table`` subcommand's options (validated in ``table_command``, as UserErrors)."""
    parser.add_argument("--results", default="results", metavar="DIR",
                        help="results directory holding runs/*.json (default: results)")
    parser.add_argument("--settings", metavar="LIST",
                        help="comma list of setting names or glob patterns, e.g. 'cifar100/*' "
                             "(default: every setting in the results)")
    parser.add_argument("--methods", metavar="LIST",
                        help="comma list of methods (or variant labels such as 'kd[T=2]') in "
                             "row order; Teacher and Student always come first "
                             "(default: all, alphabetical)")
    parser.add_argument("--metric", default="last",
                        help="last (top-1 at the last epoch, default), best (top-1 at the best "
                             f"epoch), or one of {', '.join(METRICS)}")
    parser.add_argument("--format", metavar="FMT",
                        help="markdown, latex, csv, png or pdf; a comma list or 'all' "
                             "(latex,markdown,csv,png) with --out. Default: from --out's "
                             "suffix, else markdown on stdout")
    parser.add_argument("--out", metavar="PATH",
                        help="write here instead of stdout; NAME.tex also writes NAME.md, and "
                             "every --out writes NAME.provenance.md (command, commit, run ids)")
    parser.add_argument("--delta", action="store_true",
                        help="add a column per setting with the difference to the Student")
    parser.add_argument("--paired", action="store_true",
                        help="paired t-test over shared seeds instead of Welch's t-test "
                             "(when runs of a seed share data order and initialisation)")
    parser.add_argument("--ci", action="store_true",
                        help="show the 95%% t confidence half-width instead of the std")
    parser.add_argument("--compare-published", action="store_true",
                        help="add the published number per cell (kdbench/published.json), "
                             "marked where it lies more than 2 std from ours")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="family-wise significance level, Holm-corrected (default 0.05)")
    parser.add_argument("--decimals", type=int, default=2,
                        help="digits after the point (default 2)")
    parser.add_argument("--label", help="LaTeX label (default: tab:NAME from --out)")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="only the runs made at this precision (default: all; bf16 runs "
                             "are other experiments than fp32 ones and get rows of their own)")


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
    )
    layout = Layout(delta=getattr(args, "delta", False), ci=getattr(args, "ci", False),
                    published=compare)
    corrupt = store.corrupt_records()
    if out is None:
        fmt = formats[0]
        text = {"markdown": render_markdown, "latex": render_latex, "csv": render_csv}[fmt]
        sys.stdout.write(text(summary, layout) if fmt != "csv" else text(summary))
        for _, reason in corrupt:  # on stderr: the table on stdout stays clean to redirect
            print(f"warning: skipped {reason}", file=sys.stderr)
        return 0
    corrupt = [path for path, _ in corrupt]
    provenance = Provenance(
        command=command_line(sys.argv if argv is None else argv),
        commit=current_commit(),
        results=str(results),
        corrupt_files=[str(path) for path in corrupt],
    )
    label = getattr(args, "label", None) or default_label(out)
    for path in write_tables(summary, layout, out, formats, provenance, label=label):
        print(f"wrote {path}")
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


def resolve_formats(requested: str | None, out: Path | None) -> list[str]:
    """Formats to produce: from --format (a comma list, or 'all'), else from --out's suffix."""
    if requested:
        names = []
        for item in _split(requested) or []:
            item = FORMAT_ALIASES.get(item.lower(), item.lower())
            expanded = list(ALL_FORMATS) if item == "all" else [item]
            for name in expanded:
                if name not in SUFFIXES:
                    raise UserError(f"unknown format {item!r}; choose from "
                                    f"{', '.join(SUFFIXES)} or all")
                if name not in names:
                    names.append(name)
        if not names:
            raise UserError("--format is empty")
    elif out is not None:
        suffix = out.suffix.lower()
        if suffix not in FORMAT_OF_SUFFIX:
            raise UserError(f"cannot tell the format of {out} from its suffix; use one of "
                            f"{', '.join(FORMAT_OF_SUFFIX)} or give --format")
        names = [FORMAT_OF_SUFFIX[suffix]]
    else:
        names = ["markdown"]
    if out is None:
        if len(names) > 1:
            raise UserError("several formats need --out (a base path such as tables/NAME)")
        if names[0] in PLOTS:
            raise UserError(f"a {names[0]} plot needs --out PATH")
    elif len(names) == 1:
        known = FORMAT_OF_SUFFIX.get(out.suffix.lower())
        if known and known != names[0]:
            raise UserError(f"--format {names[0]} does not match --out {out}")
    return names


def output_paths(out: Path, formats: Sequence[str]) -> dict[str, Path]:
    """Where each format goes; LaTeX brings its Markdown twin (the issue: .tex writes a .md).

    One format goes to --out as given (``tables/x.txt`` stays x.txt) unless --out has no
    suffix; several formats share --out's base name with their own suffixes.
    """
    known = out.suffix.lower() in FORMAT_OF_SUFFIX
    base = out.with_suffix("") if known else out
    paths: dict[str, Path] = {}
    if len(formats) == 1 and out.suffix:
        paths[formats[0]] = out
    wanted = list(formats)
    if "latex" in wanted and "markdown" not in wanted:
        wanted.append("markdown")
    for name in wanted:
        paths.setdefault(name, base.with_name(base.name + SUFFIXES[name]))
    return paths


def provenance_path(out: Path) -> Path:
    base = out.with_suffix("") if out.suffix.lower() in FORMAT_OF_SUFFIX else out
    return base.with_name(base.name + ".provenance.md")


def default_label(out: Path) -> str:
    stem = out.with_suffix("").name if out.suffix.lower() in FORMAT_OF_SUFFIX else out.name
    return "tab:" + (re.sub(r"[^A-Za-z0-9:_-]+", "-", stem).strip("-") or "kdbench")


@dataclass(frozen=True)
class Provenance:
    """Where a table came from: enough to trace and regenerate it."""

    command: str
    commit: str
    results: str
    corrupt_files: list[str]


def write_tables(summary: Summary, layout: Layout, out: Path, formats: Sequence[str],
                 provenance: Provenance, label: str = "tab:kdbench") -> list[Path]:
    """Write each format and the provenance note; returns the paths written."""
    paths = output_paths(out, formats)
    guarded = Path(provenance.results, "runs").resolve()
    written = []
    for name, path in paths.items():
        if path.resolve().is_relative_to(guarded):
            raise UserError(f"refusing to write {path} inside the records folder {guarded}")
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in PLOTS:
            render_plot(summary, path, layout)
        elif name == "latex":
            path.write_text(render_latex(summary, layout, label=label), encoding="utf-8")
        elif name == "markdown":
            path.write_text(render_markdown(summary, layout), encoding="utf-8")
        else:
            path.write_text(render_csv(summary), encoding="utf-8")
        written.append(path)
    note = provenance_path(out)
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
    if provenance.corrupt_files:
        lines.append(f"- unreadable record files skipped: {', '.join(provenance.corrupt_files)}")
    lines += ["", "## Runs behind every cell", "",
              "| setting | row | seed | status | value | run id | commit |",
              "|---|---|---|---|---|---|---|"]
    for _, run in runs.iterrows():
        value = f"{run['value']:.4f}" if run["value"] == run["value"] else "—"
        lines.append(f"| {run['setting']} | {row_title(run['row']).replace('|', '/')} | "
                     f"{run['seed']} | "
                     f"{run['status']} | {value} | {run['run_id']} | {run['git_commit'] or ''} |")
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


def current_commit() -> str:
    """``git rev-parse HEAD`` of the working directory, flagged when it has local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout with commits; see the records' commits)"
    return head + (" with uncommitted changes" if dirty else "")
