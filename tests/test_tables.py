"""tables.py and the ``table`` command: every format shows the numbers the records give.

Expected numbers are recomputed here with pandas/scipy straight from the record files; the
LaTeX output is compiled with pdflatex and read back with pdftotext.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from kdbench.aggregate import summarize
from kdbench.errors import UserError
from kdbench.report import add_table_arguments, table_command
from kdbench.store import load_records
from kdbench.figure import render_figure
from kdbench.tables import Layout, render_csv, render_latex, render_markdown

# tests/ is on sys.path under pytest's default (rootdir-relative) import mode.
from test_aggregate import A, B, STUDENTS, TEACHERS, write_records

MEAN_STD_MD = re.compile(r"(\d+\.\d+) ± (\d+\.\d+)")
MEAN_STD_TEX = re.compile(r"(\d+\.\d+) \$\\pm\$ (\d+\.\d+)")


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_records(tmp_path / "results", STUDENTS, TEACHERS)


def expected_cells(root: Path) -> pd.DataFrame:
    """mean/std(ddof=1)/n per (setting, row) with plain pandas, from the record files."""
    records = load_records(root)
    flat = pd.DataFrame([{
        "setting": r["spec"]["setting"],
        "row": "Teacher" if r["spec"]["role"] == "teacher"
        else ("Student" if r["spec"]["method"] == "vanilla" else r["spec"]["method"]),
        "value": (r["metrics"] or {}).get("top1_last") if r["status"] == "done" else None,
    } for r in records]).dropna()
    return flat.groupby(["setting", "row"])["value"].agg(["mean", "std", "count"])


def run_table(argv: list[str], capsys: pytest.CaptureFixture | None = None) -> str:
    parser = argparse.ArgumentParser()
    add_table_arguments(parser)
    code = table_command(parser.parse_args(argv), ["python", "-m", "kdbench", "table", *argv])
    assert code == 0
    return capsys.readouterr().out if capsys else ""


def markdown_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells
    rows["__header__"] = header
    return rows


def latex_rows(text: str) -> dict[str, list[str]]:
    body = text.split(r"\midrule", 1)[1].split(r"\bottomrule")[0]
    rows = {}
    for line in body.splitlines():
        line = line.strip()
        if line.endswith(r"\\"):
            cells = [cell.strip() for cell in line[:-2].split(" & ")]
            rows[cells[0]] = cells
    return rows


def column_of(setting: str, summary_settings: list[str], width: int = 1) -> int:
    return 1 + summary_settings.index(setting) * width


# ---------------------------------------------------------------------------------------------
# Numbers in every format
# ---------------------------------------------------------------------------------------------

def test_markdown_numbers_equal_pandas(results: Path, capsys: pytest.CaptureFixture) -> None:
    text = run_table(["--results", str(results)], capsys)
    rows = markdown_rows(text)
    settings = sorted([A, B])
    for (setting, row), expected in expected_cells(results).iterrows():
        cell = rows[row][column_of(setting, settings)]
        if expected["count"] == 1:
            assert cell == f"{expected['mean']:.2f}"  # the teacher: no ±, no test
            continue
        mean, std = MEAN_STD_MD.search(cell).groups()
        assert mean == f"{expected['mean']:.2f}" and std == f"{expected['std']:.2f}"
        assert f"n = {int(expected['count'])}" in cell  # seeds differ: n in every cell
    assert "n = 4 of 5" in rows["kd"][column_of(B, settings)]
    assert "seed 4 failed" in text and "no record for seed 4" in text


def test_latex_numbers_marks_and_escaping(results: Path) -> None:
    summary = summarize(load_records(results))
    text = render_latex(summary, Layout())
    assert text.isascii()  # pdflatex-safe: ± → $\pm$, → → $\rightarrow$
    assert r"wrn\_40\_2 $\rightarrow$ wrn\_16\_2" in text
    rows = latex_rows(text)
    settings = summary.settings
    for (setting, row), expected in expected_cells(results).iterrows():
        cell = rows[row][column_of(setting, settings)]
        if expected["count"] == 1:
            assert cell == f"{expected['mean']:.2f}"
            continue
        mean, std = MEAN_STD_TEX.search(cell).groups()
        assert (mean, std) == (f"{expected['mean']:.2f}", f"{expected['std']:.2f}")
    kd_a = rows["kd"][column_of(A, settings)]
    at_a = rows["at"][column_of(A, settings)]
    assert kd_a.startswith(r"\textbf{74.92 $\pm$ 0.19}")
    assert at_a.startswith(r"\underline{74.08 $\pm$ 0.19}")
    assert r"\textbf" not in rows["Student"][column_of(A, settings)]
    # kd and at beat the Student (up arrow: the direction is in the mark); at is also below
    # kd, the column's best: both marks, Holm-corrected.
    assert r"$^{\uparrow}$" in kd_a and r"$^{\uparrow\ddagger}$" in at_a
    assert r"\caption{" in text and "Holm" in text and "Welch" in text
    assert "last epoch" in text and "240 epochs" in text


def test_csv_holds_the_raw_numbers(results: Path) -> None:
    summary = summarize(load_records(results))
    frame = pd.read_csv(io.StringIO(render_csv(summary)))
    expected = expected_cells(results)
    for _, line in frame.iterrows():
        ref = expected.loc[(line["setting"], line["title"])]
        assert line["mean"] == pytest.approx(ref["mean"], abs=1e-12)
        assert line["n"] == ref["count"]
        if ref["count"] > 1:
            assert line["std"] == pytest.approx(ref["std"], abs=1e-12)
    # The p-value of kd vs Student in column A, from scipy directly on the raw values.
    kd = frame[(frame["setting"] == A) & (frame["row"] == "kd")].iloc[0]
    direct = stats.ttest_ind(STUDENTS[A]["kd"], STUDENTS[A]["vanilla"], equal_var=False)
    assert kd["p_vs_student"] == pytest.approx(direct.pvalue, rel=1e-12)
    assert 0 <= kd["p_vs_student_holm"] <= 1 and kd["p_vs_student_holm"] >= kd["p_vs_student"]
    kd_b = frame[(frame["setting"] == B) & (frame["row"] == "kd")].iloc[0]
    assert (kd_b["n"], kd_b["n_failed"], kd_b["n_expected"]) == (4, 1, 5)
    assert kd_b["seeds"] == "0;1;2;3"


def test_marks_with_ties_and_single_method_columns(tmp_path: Path) -> None:
    tie, lone, pair = "synthetic/tie", "synthetic/lone", "synthetic/pair"
    write_records(tmp_path, {
        tie: {"vanilla": [70.0, 70.2], "m1": [71.0, 71.2], "m2": [71.2, 71.0],
              "m3": [70.5, 70.7]},
        lone: {"vanilla": [60.0, 61.0]},
        pair: {"vanilla": [50.0, 50.5], "m1": [52.0, 52.5]},
    }, {tie: 75.0, lone: 65.0, pair: 55.0})
    summary = summarize(load_records(tmp_path))
    col = {setting: column_of(setting, summary.settings) for setting in summary.settings}
    for rows, bold, under in [
        (latex_rows(render_latex(summary)), r"\textbf{", r"\underline{"),
        (markdown_rows(render_markdown(summary)), "**", "<ins>"),
    ]:
        # A tie at the shown precision (71.10 and 71.10): both bold, the next one underlined.
        assert rows["m1"][col[tie]].startswith(bold) and rows["m2"][col[tie]].startswith(bold)
        assert rows["m3"][col[tie]].startswith(under)
        assert bold not in rows["Student"][col[tie]] and under not in rows["Student"][col[tie]]
        assert bold not in rows["Teacher"][col[tie]]  # the teacher is never ranked
        # One row to rank: it is the best, and nothing is second.
        assert rows["Student"][col[lone]].startswith(bold)
        assert under not in rows["Student"][col[lone]]
        assert rows["m1"][col[lone]] in ("--", "—")  # not run there
        # Two rows: best and second.
        assert rows["m1"][col[pair]].startswith(bold)
        assert rows["Student"][col[pair]].startswith(under)


def test_delta_ci_and_published_columns(results: Path) -> None:
    summary = summarize(load_records(results),
                        published={"sources": {"x": {"short": "X 2020", "epoch": "last",
                                                     "aggregate": "1 run"}},
                                   "settings": {A: {"source": "x",
                                                    "top1": {"kd": 70.0, "vanilla": 73.2}}}})
    text = render_markdown(summary, Layout(delta=True, ci=True, published=True))
    rows = markdown_rows(text)
    # --delta --ci: Δ with its interval, and Hedges' g, per setting.
    assert rows["__header__"][1:5] == ["resnet56 → resnet20", "Δ", "g", "pub."]
    kd_a = rows["kd"][5:9]
    values, student = STUDENTS[A]["kd"], STUDENTS[A]["vanilla"]
    half = stats.t.ppf(0.975, 4) * pd.Series(values).std() / math.sqrt(5)
    assert MEAN_STD_MD.search(kd_a[0]).group(2) == f"{half:.2f}"
    delta = sum(values) / 5 - sum(student) / 5
    va, vb = pd.Series(values).var() / 5, pd.Series(student).var() / 5
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 4)
    low, high = (delta - stats.t.ppf(0.975, df) * math.sqrt(va + vb),
                 delta + stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    assert kd_a[1] == f"{delta:+.2f} [{low:+.2f}, {high:+.2f}]"
    assert kd_a[2].startswith("+") and float(kd_a[2]) > 5  # 1.78 points at std 0.2: huge
    assert kd_a[3] == "70.00§"  # 4.9 points from ours: far outside 2 std
    assert rows["Student"][8] == "73.20"  # within 2 std: no mark
    assert rows["Student"][6] == "—" and rows["at"][4] == "—"  # no Δ for Student; no pub.
    assert "95% t confidence interval" in text and "X 2020" in text
    assert "95% confidence interval (Welch" in text and "Hedges' g" in text


# ---------------------------------------------------------------------------------------------
# LaTeX compiles, and the PDF shows the numbers
# ---------------------------------------------------------------------------------------------

HAVE_LATEX = all(shutil.which(tool) for tool in ("pdflatex", "pdftotext", "pdftoppm"))
needs_latex = pytest.mark.skipif(not HAVE_LATEX, reason="pdflatex/poppler-utils not installed "
                                                        "(CI installs them)")


@needs_latex
def test_latex_compiles_and_the_pdf_shows_the_numbers(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables" / "cifar.tex"
    run_table(["--results", str(results), "--out", str(out), "--delta", "--compare-published"])
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        "\\input{tables/cifar.tex}\n\\end{document}\n")
    compiled = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                               "doc.tex"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert compiled.returncode == 0, compiled.stdout[-3000:]
    pdf_text = subprocess.run(["pdftotext", "doc.pdf", "-"], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout
    for (_, _), expected in expected_cells(results).iterrows():
        assert f"{expected['mean']:.2f}" in pdf_text
        if expected["count"] > 1:
            assert f"{expected['std']:.2f}" in pdf_text
    assert "Holm" in pdf_text and "74.92" in pdf_text and "±" in pdf_text


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@needs_latex
def test_one_command_writes_every_format(results: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tables" / "kd.tex"
    run_table(["--results", str(results), "--settings", "cifar100/*", "--format", "all",
               "--out", str(out)])
    written = capsys.readouterr()
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["kd.csv", "kd.figure.pdf", "kd.figure.png", "kd.md", "kd.pdf", "kd.png",
                     "kd.provenance.md", "kd.tex"]
    for png in ("kd.png", "kd.figure.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for pdf in ("kd.pdf", "kd.figure.pdf"):
        assert (out.parent / pdf).read_bytes()[:5] == b"%PDF-"
    # kd.pdf is the table (its text is the caption and the numbers), the figure has its name.
    table_text = subprocess.run(["pdftotext", str(out.parent / "kd.pdf"), "-"], check=True,
                                capture_output=True, text=True).stdout
    assert "Table 1:" in table_text and "74.92" in table_text
    tex = out.read_text()
    assert r"\label{tab:kd}" in tex and r"$^{\uparrow}$" in tex and "($n$ = 4 of 5)" in tex
    assert "cifar100" in tex and "240 epochs" in tex and "last epoch" in tex
    provenance = (out.parent / "kd.provenance.md").read_text()
    assert "python -m kdbench table --results" in provenance and "--format all" in provenance
    for record in load_records(results):
        assert record["id"] in provenance  # every run behind every cell, failed ones too
    assert "0123abc" in provenance
    assert "seed 4 failed" in written.err  # reported on the terminal as well


def test_tex_out_brings_its_markdown_twin(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.tex"
    run_table(["--results", str(results), "--out", str(out), "--paired"])
    assert sorted(p.name for p in tmp_path.glob("t.*")) == ["t.md", "t.provenance.md", "t.tex"]
    assert "paired t-test" in (tmp_path / "t.md").read_text()
    # Regenerating overwrites the generated files; the records stay as they were.
    before = sorted(p.read_bytes() for p in (results / "runs").iterdir())
    run_table(["--results", str(results), "--out", str(out)])
    assert sorted(p.read_bytes() for p in (results / "runs").iterdir()) == before


def test_uniform_seeds_put_n_in_the_caption(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    write_records(tmp_path, {A: {"vanilla": [73.0, 73.2, 73.1], "kd": [74.0, 74.4, 74.2]}},
                  {A: 75.6})
    text = run_table(["--results", str(tmp_path)], capsys)
    assert "over n = 3 student seeds (0–2)" in text
    assert "distils the same teacher, a single run" in text
    assert "(n =" not in markdown_rows(text)["kd"][1]


def test_user_errors(results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (["--results", str(tmp_path / "nowhere")], "does not exist"),
        (["--results", str(tmp_path)], "holds no run records"),
        (["--results", str(results), "--format", "html"], "unknown format 'html'"),
        (["--results", str(results), "--format", "png"], "needs --out"),
        (["--results", str(results), "--out", str(tmp_path / "x.docx")], "suffix"),
        (["--results", str(results), "--settings", "imagenet/*"], "no records for setting"),
        (["--results", str(results), "--metric", "median"], "unknown metric"),
        (["--results", str(results), "--alpha", "1.5"], "alpha"),
        (["--results", str(results), "--out", str(results / "runs" / "t.md")], "refusing"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            run_table(argv)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match="matplotlib"):
        render_figure(summarize(load_records(results)), "png")
    # --format all without matplotlib: one clear line, and nothing written, not even the
    # outputs that need no matplotlib (the issue: "writes half the outputs and no provenance").
    out = tmp_path / "half" / "t"
    with pytest.raises(UserError, match="matplotlib"):
        run_table(["--results", str(results), "--format", "all", "--out", str(out)])
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_failed_only_cell_is_shown_as_failed(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    write_records(tmp_path, {A: {"vanilla": [73.0, 73.2], "kd": [None, None]}})
    text = run_table(["--results", str(tmp_path)], capsys)
    assert "failed (n = 0 of 2)" in markdown_rows(text)["kd"][1]
    assert text.count("failed (run") == 2


def test_records_without_teacher_or_variants_in_other_settings(tmp_path: Path) -> None:
    # A method run on one setting only: a dash elsewhere, and a note, not a crash.
    write_records(tmp_path, {A: {"vanilla": [73.0, 73.2], "kd": [74.0, 74.2]},
                             B: {"vanilla": [69.0, 69.2]}})
    summary = summarize(load_records(tmp_path))
    rows = markdown_rows(render_markdown(summary))
    assert rows["kd"][column_of(B, summary.settings)] == "—"
    assert any("resnet56-resnet20, kd: no runs" in note for note in summary.notes)


def builtin_texts() -> list[str]:
    """What a table may print from the built-ins: each method's title, paper and fidelity
    note, each setting's description and recipe source."""
    from kdbench import registry, settings

    texts = []
    for name in registry.names():
        method = registry.get(name)
        texts += [method(method.Config()).configured_display_name(), str(method.paper or ""),
                  str(method.fidelity_note or "")]
    for setting in settings.SETTINGS.values():
        texts += [setting.description or "", setting.recipe_source or ""]
    return texts


def test_latex_loses_no_glyph_of_the_builtins() -> None:
    """Every character the built-ins print has a LaTeX spelling (before, CC's note became
    "?$\\Delta$???/B?"); an accent keeps its letter; only an unknown glyph becomes "?"."""
    from kdbench.tables import LatexMarkup

    markup = LatexMarkup()
    for text in builtin_texts():
        escaped = markup.escape(text)
        assert escaped.isascii() and escaped.count("?") == text.count("?"), (text, escaped)
    assert markup.escape("‖Δψ‖²") == r"$\|$$\Delta$$\psi$$\|$$^2$"
    assert markup.escape("ε ≠ café 中") == r"$\epsilon$ $\neq$ cafe ?"
    # Never a compatibility decomposition (10⁴ is not 104) nor a control character pdflatex
    # stops at; DEL once made escape recurse forever.
    assert markup.escape("10⁴ ½ x₁ \x7f \x1b[0m") == "10? ? x? ? ?[0m"


@needs_latex
def test_the_escaped_glyphs_compile_and_read_back(tmp_path: Path) -> None:
    from kdbench.tables import LatexMarkup

    text = "‖Δψ‖²/B², ε ≠ 0, αβγδ, Σ, résumé"
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\begin{document}\n"
                                      + LatexMarkup().escape(text) + "\n\\end{document}\n")
    compiled = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stdout[-3000:]
    pdf_text = subprocess.run(["pdftotext", "doc.pdf", "-"], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout
    # pdftotext reads \Delta back as U+2206 and \epsilon as the lunate U+03F5.
    for glyph in ("∆ψ", "αβγδ", "Σ", "ϵ", "resume"):
        assert glyph in pdf_text, (glyph, pdf_text)
