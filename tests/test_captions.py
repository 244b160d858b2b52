"""What a paper needs around the numbers: captions, row titles, marks, footnotes, the figure,
the table's PDF, and provenance (issues 13, 16, 19).

Records are built by hand (tests/test_aggregate.make_record) with the fields train.py writes
(interfaces.md). LaTeX is compiled with the real pdflatex and read back with pdftotext.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from kdbench import latex_pdf
from kdbench.aggregate import summarize
from kdbench.datasets import DATASETS
from kdbench.errors import UserError
from kdbench.figure import build_figure, figure_caption
from kdbench.report import add_table_arguments, table_command
from kdbench.revision import kdbench_revision
from kdbench.store import Store, load_records
from kdbench.tables import LATEX, MARKDOWN, Layout, caption, render_latex, render_markdown

from test_aggregate import A, STUDENTS, TEACHERS, make_record, write_records

QUICK = "fashion_mnist/quick"
HAVE_LATEX = all(shutil.which(tool) for tool in ("pdflatex", "pdftotext", "pdftoppm"))
needs_latex = pytest.mark.skipif(not HAVE_LATEX, reason="pdflatex/poppler-utils not installed "
                                                        "(CI installs them)")


def run_table(argv: list[str], capsys: pytest.CaptureFixture | None = None) -> str:
    parser = argparse.ArgumentParser()
    add_table_arguments(parser)
    assert table_command(parser.parse_args(argv), ["kdbench", "table", *argv]) == 0
    return capsys.readouterr().out if capsys else ""


def quick_records(root: Path, *, epochs: int = 3, methods: dict | None = None,
                  **kwargs) -> Path:
    """A fashion_mnist/quick-like grid: 10 000-image subset, teacher trained 8 epochs."""
    store = Store(root)
    store.write(make_record(QUICK, "vanilla", 0, 87.9, role="teacher", epochs=8,
                            train_subset=10000))
    for method, (name, values) in (methods or {
            "vanilla": (None, [79.6, 79.3, 78.9, 79.5, 80.2]),
            "kd": ("KD", [81.4, 81.6, 81.1, 80.6, 81.2]),
            "mhgd": ("MHGD", [77.2, 78.1, 77.9, 77.5, 76.9])}).items():
        for seed, value in enumerate(values):
            store.write(make_record(QUICK, method, seed, value, display_name=name, epochs=epochs,
                                    train_subset=10000, **kwargs))
    return root


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def test_caption_names_the_data_the_subset_the_split_and_the_teacher(tmp_path: Path) -> None:
    summary = summarize(load_records(quick_records(tmp_path)))
    text = caption(summary, Layout(), MARKDOWN)
    assert "on the test split of Fashion-MNIST (10\u202f000 images)" in text
    assert "on 10\u202f000 of the 60\u202f000 training images" in text
    assert "Students trained for 3 epochs" in text and "Teacher trained for 8 epochs." in text
    assert "over n = 5 student seeds (0–4)" in text
    assert "distils the same teacher, a single run" in text
    assert "fashion_mnist" not in text  # the dataset's printed name, not its key
    latex = caption(summary, Layout(), LATEX)
    assert r"10\,000 of the 60\,000 training images" in latex


def test_caption_grammar_in_the_singular(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed, (student, kd) in enumerate([(70.0, 71.0), (70.4, 71.6)]):
        store.write(make_record("cifar100/wrn_40_2-wrn_16_2", "vanilla", seed, student, epochs=1))
        store.write(make_record("cifar100/wrn_40_2-wrn_16_2", "kd", seed, kd, epochs=1))
    text = caption(summarize(load_records(tmp_path)), Layout(), MARKDOWN)
    assert "Students trained for 1 epoch," in text and "1 epochs" not in text
    assert "Holm-corrected over the one test of the table" in text  # kd is best: one pair
    assert "CIFAR-100" in text


def test_marks_show_the_direction(tmp_path: Path) -> None:
    """A significantly *worse* method must not carry the mark of a better one."""
    summary = summarize(load_records(quick_records(tmp_path)))
    rows = {line.split("|")[1].strip(): line for line in
            render_markdown(summary).splitlines() if line.startswith("| ")}
    assert "↑" in rows["KD"] and "↓" not in rows["KD"]
    assert "↓" in rows["MHGD"] and "↑" not in rows["MHGD"]
    assert "†" not in render_markdown(summary)
    latex = render_latex(summary)
    assert r"$^{\downarrow\ddagger}$" in latex and r"$^{\uparrow}$" in latex
    assert "significantly better/worse than the Student" in caption(summary, Layout(), MARKDOWN)


def test_latex_minus_header_and_caption_spacing(tmp_path: Path) -> None:
    summary = summarize(load_records(quick_records(tmp_path)))
    latex = render_latex(summary, Layout(delta=True, ci=True))
    mhgd = next(line for line in latex.splitlines() if line.startswith("MHGD &"))
    delta = summary.cell(QUICK, "mhgd")["delta"]
    assert delta < 0
    assert f"& $-${-delta:.2f} [$-$" in mhgd  # a math minus, never a hyphen, before a number
    assert not any(f" -{digit}" in latex or f"[-{digit}" in latex for digit in "0123456789")
    assert "ours" not in latex and "Method & Top-1 & $\\Delta$ & $g$" in latex
    head = latex.split(r"\toprule")[0]
    assert head.index(r"\setlength{\belowcaptionskip}") < head.index(r"\caption{")


def test_titles_labels_and_variants_in_print(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = quick_records(tmp_path)
    store = Store(root)
    for seed, value in enumerate([81.0, 81.3, 80.9, 81.2, 81.1]):
        store.write(make_record(QUICK, "kd", seed, value, config={"T": 2.0}, display_name="KD",
                                epochs=3, train_subset=10000))
    text = run_table(["--results", str(root), "--label", "mhgd=MHGD (ours)"], capsys)
    titles = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert titles[1:] == ["Teacher", "Student", "KD (T = 2)", "KD (T = default)",
                          "MHGD (ours)"]
    with pytest.raises(UserError, match="ROW=TEXT"):
        run_table(["--results", str(root), "--label", "tab:main"])


def test_reading_of_the_paper_footnote_in_markdown_and_latex(tmp_path: Path) -> None:
    root = quick_records(tmp_path, methods={
        "vanilla": (None, [79.6, 79.3, 78.9]),
        "crg": ("CRG", [80.0, 80.4, 79.9])})
    for record in load_records(root):  # the crg records declare their fidelity
        if record["spec"]["method"] == "crg":
            record["provenance"].update(fidelity="reading of the paper",
                                        fidelity_note="abstract and objective only")
            Store(root).write(record)
    summary = summarize(load_records(root))
    markdown = render_markdown(summary)
    assert "| CRG\\*" in markdown
    assert "\\* CRG: kdbench's reading of the paper" in markdown
    assert "abstract and objective only" in markdown
    latex = render_latex(summary)
    assert "CRG$^{*}$ &" in latex and r"$^{*}$\,CRG: kdbench's reading" in latex
    assert "kdbench's reading of the paper (below)" in latex  # the caption explains the *


def test_version_mark_and_pool_versions(tmp_path: Path) -> None:
    root = quick_records(tmp_path)
    store = Store(root)
    for record in load_records(root):
        if record["spec"]["method"] == "kd" and record["spec"]["seed"] >= 3:
            record["provenance"]["method_source_sha256"] = "b" * 64
            store.write(record)
    with pytest.raises(UserError, match="--pool-versions"):
        run_table(["--results", str(root)])
    summary = summarize(load_records(root), pool_versions=True)
    markdown = render_markdown(summary)
    kd = next(line for line in markdown.splitlines() if line.startswith("| KD"))
    assert "◊" in kd
    assert "◊: the row's results come from more than one version" in markdown
    assert "1 cell average records of several versions: --pool-versions" in markdown
    assert r"$^{\uparrow\diamond}$" in render_latex(summary)


def test_a_given_teacher_replaces_the_teachers_epochs(tmp_path: Path) -> None:
    checksum = "0123456789abcdef" * 4
    store = Store(tmp_path)
    store.write(make_record(QUICK, "vanilla", 0, 88.4, role="teacher", epochs=8,
                            teacher_checkpoint=checksum, teacher_checkpoint_file="wrn16.pt"))
    for seed in range(3):
        for method, value in (("vanilla", 79.0), ("kd", 81.0)):
            store.write(make_record(QUICK, method, seed, value + 0.3 * seed, epochs=3,
                                    teacher_checkpoint=checksum))
    text = caption(summarize(load_records(tmp_path)), Layout(), MARKDOWN)
    assert "Teacher: the given checkpoint (wrn16.pt, sha256 0123456789ab…)" in text
    assert "trained for 8 epochs" not in text


def test_published_protocol_is_stated(results_dir: Path) -> None:
    summary = summarize(load_records(results_dir), published={
        "sources": {"m": {"short": "mdistiller", "epoch": "best",
                          "aggregate": "best epoch, mean of 5"}},
        "settings": {A: {"source": "m", "top1": {"kd": 75.0}}}})
    text = render_markdown(summary, Layout(published=True))
    assert "no published numbers for these settings read at this table's epoch" in text
    assert "published numbers of mdistiller are best-epoch" in text


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    return write_records(tmp_path / "results", STUDENTS, TEACHERS)


def test_dataset_facts_match_the_loaders() -> None:
    from kdbench import data

    for name, (train, _) in data.DATASET_SIZES.items():
        assert DATASETS[name].train_images == train
    synthetic = data.synthetic()
    assert DATASETS["synthetic"].test_images == len(synthetic.test_labels)


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------

def test_figure_shows_every_seed_the_teacher_and_no_bars(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PathCollection
    from matplotlib.patches import Rectangle

    summary = summarize(load_records(write_records(tmp_path, STUDENTS, TEACHERS)))
    figure = build_figure(summary)
    panels = figure.axes
    assert len(panels) == 2
    for axes, setting in zip(panels, summary.settings):
        plotted = sorted(float(y) for collection in axes.collections
                         if isinstance(collection, PathCollection)  # the scatter, not error bars
                         for _, y in collection.get_offsets())
        seeds = sorted(v for values in summary.cells.loc[
            (summary.cells["setting"] == setting) & (summary.cells["method"] != "teacher"),
            "values"] for v in values)
        assert plotted == pytest.approx(seeds)  # every seed, once, at its value
        teacher = summary.cell(setting, "teacher")["mean"]
        assert [line.get_ydata()[0] for line in axes.lines
                if line.get_linestyle() == "--"] == pytest.approx([teacher])
        low, high = axes.get_ylim()
        assert low <= min(seeds) and high >= teacher
        assert not [p for p in axes.patches if isinstance(p, Rectangle)]  # points, not bars
        assert "Teacher" in "".join(text.get_text() for text in axes.texts)
    words = figure_caption(summary, Layout())
    assert "Welch's t-test" in words and "Holm over 6 tests" in words and "ddof = 1" in words
    assert "CIFAR-100 test split" in words


# ---------------------------------------------------------------------------------------------
# PDF, PNG, and what is checked before writing
# ---------------------------------------------------------------------------------------------

@needs_latex
def test_pdf_is_the_table_and_the_figure_has_its_own_name(tmp_path: Path) -> None:
    root = quick_records(tmp_path / "results")
    out = tmp_path / "tables" / "quick.pdf"
    run_table(["--results", str(root), "--out", str(out), "--delta"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["quick.pdf", "quick.provenance.md"]
    text = subprocess.run(["pdftotext", "-layout", str(out), "-"], check=True,
                          capture_output=True, text=True).stdout
    mhgd = summarize(load_records(root)).cell(QUICK, "mhgd")["delta"]
    assert "Table 1:" in text and "Fashion-MNIST" in text
    assert f"\u2212{-mhgd:.2f}" in text  # the math minus reads back as U+2212, not "-"
    info = subprocess.run(["pdfinfo", str(out)], check=True, capture_output=True,
                          text=True).stdout
    assert "Pages:           1" in info  # cropped to the table: one page, not an A4 sheet
    width, height = map(float, info.split("Page size:")[1].split("pts")[0].split(" x "))
    assert width < 500 and height < 500
    run_table(["--results", str(root), "--format", "figure,png", "--out", str(out)])
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["quick.figure.pdf", "quick.figure.png", "quick.pdf", "quick.png",
                     "quick.provenance.md"]


def test_missing_pdflatex_is_one_line_and_nothing_is_written(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = quick_records(tmp_path / "results")
    monkeypatch.setattr(latex_pdf.shutil, "which", lambda tool: None)
    out = tmp_path / "tables" / "quick"
    with pytest.raises(UserError, match="needs pdflatex"):
        run_table(["--results", str(root), "--format", "latex,pdf", "--out", str(out)])
    assert not out.parent.exists()


# ---------------------------------------------------------------------------------------------
# Power in the outputs
# ---------------------------------------------------------------------------------------------

def test_power_goes_to_the_markdown_and_a_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = quick_records(tmp_path / "results")
    out = tmp_path / "tables" / "quick.md"
    printed = run_table(["--results", str(root), "--out", str(out), "--power", "--gap", "0.5"],
                        capsys)
    assert "Power: Two-sided Welch's t-test" in out.read_text()
    power_csv = (out.parent / "quick.power.csv").read_text().splitlines()
    assert power_csv[0].startswith("setting,comparison,") and len(power_csv) == 1 + 3
    assert "seeds for gap 0.5" in printed
    with pytest.raises(UserError, match="--gap must be a positive"):
        run_table(["--results", str(root), "--gap", "-1"])


# ---------------------------------------------------------------------------------------------
# Provenance: kdbench's own commit
# ---------------------------------------------------------------------------------------------

def test_provenance_records_kdbench_commit_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git not installed")
    kdbench_root = Path(__file__).resolve().parents[1]
    if subprocess.run([git, "-C", str(kdbench_root), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("kdbench is not a git checkout here")
    ours = subprocess.run([git, "-C", str(kdbench_root), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    paper = tmp_path / "paper"  # a user's paper repository, where the table is written
    paper.mkdir()
    env = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b", "PATH": "/usr/bin:/bin"}
    subprocess.run([git, "init", "-q"], cwd=paper, check=True, env=env)
    subprocess.run([git, "commit", "-q", "--allow-empty", "-m", "paper"], cwd=paper,
                   check=True, env=env)
    theirs = subprocess.run([git, "rev-parse", "HEAD"], cwd=paper, capture_output=True,
                            text=True, check=True).stdout.strip()
    root = quick_records(tmp_path / "results")
    monkeypatch.chdir(paper)
    run_table(["--results", str(root), "--out", "tables/quick.md"])
    note = (paper / "tables" / "quick.provenance.md").read_text()
    line = next(l for l in note.splitlines() if "kdbench commit of the table" in l)
    assert ours in line and theirs not in line


def test_revision_without_a_checkout_is_the_installed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdbench import revision

    monkeypatch.setattr(revision, "checkout_root", lambda: None)
    text = kdbench_revision()
    assert text.startswith("kdbench 0.1.0 (")
