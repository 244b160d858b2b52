"""The LaTeX table compiled with pdflatex to a PDF cropped to the table, and that PDF as PNG.

``table --format pdf`` (and ``png``) shows the table exactly as ``\\input{NAME.tex}`` typesets
it in a paper, caption and notes included. The wrapper document needs only what the table
needs (booktabs); it collects the float into a box instead of placing it on a page, and sets
the PDF page to the box's size (pdfTeX's \\pdfpagewidth/\\pdfpageheight), so no cropping tool
(pdfcrop, the standalone class) is required. pdftoppm (poppler-utils) rasterises the PDF.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kdbench.errors import UserError

# A paper's text width: NeurIPS/ICLR/ICML single column is 5.5 in; wider tables widen the page.
TEXT_WIDTH_PT = 5.5 * 72.27
MARGIN_PT = 12
PNG_DPI = 200

WRAPPER = r"""\documentclass{article}
\usepackage{booktabs}
\pagestyle{empty}
\makeatletter
\newsavebox\kdbenchbox
% The table float, typeset as LaTeX's \@xfloat would (same resets), into a box.
\renewenvironment{table}[1][]{\global\setbox\kdbenchbox\vbox\bgroup
  \hsize=WIDTHpt \linewidth\hsize \columnwidth\hsize \textwidth\hsize
  \@parboxrestore\@floatboxreset\def\@captype{table}}{\par\egroup}
\makeatother
\begin{document}
\input{table.tex}
\pdfpagewidth=\dimexpr\wd\kdbenchbox+2\dimexpr MARGINpt\relax\relax
\pdfpageheight=\dimexpr\ht\kdbenchbox+\dp\kdbenchbox+2\dimexpr MARGINpt\relax\relax
\hoffset=-1in \voffset=-1in
\shipout\vbox{\kern MARGINpt\moveright MARGINpt\box\kdbenchbox}
\end{document}
"""


def require_tools(png: bool) -> None:
    """pdflatex (and pdftoppm for a PNG) must be installed: checked before anything is written."""
    missing = [tool for tool in ("pdflatex",) + (("pdftoppm",) if png else ())
               if shutil.which(tool) is None]
    if missing:
        raise UserError(f"the PDF/PNG of the table needs {' and '.join(missing)} (TeX Live: "
                        "apt install texlive-latex-base texlive-latex-recommended; "
                        "poppler-utils for pdftoppm); the .tex output needs neither")


def compile_table(latex: str) -> bytes:
    """PDF bytes of one rendered table (``tables.render_latex``'s output)."""
    require_tools(png=False)
    width = TEXT_WIDTH_PT
    with tempfile.TemporaryDirectory(prefix="kdbench-table-") as folder:
        root = Path(folder)
        (root / "table.tex").write_text(latex)
        for _ in range(2):  # a second pass only when the table is wider than the text
            log = _pdflatex(root, width)
            overfull = [float(x) for x in re.findall(r"Overfull \\hbox \((\d+(?:\.\d+)?)pt too wide", log)]
            if not overfull:
                break
            width += max(overfull) + 2
        return (root / "doc.pdf").read_bytes()


def _pdflatex(root: Path, width: float) -> str:
    (root / "doc.tex").write_text(WRAPPER.replace("WIDTH", f"{width:.2f}")
                                  .replace("MARGIN", str(MARGIN_PT)))
    try:
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                               "doc.tex"], cwd=root, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        raise UserError("pdflatex did not finish compiling the table within 120 s") from None
    log = (root / "doc.log").read_text(errors="replace") if (root / "doc.log").exists() else done.stdout
    if done.returncode != 0 or not (root / "doc.pdf").exists():
        errors = [line for line in log.splitlines() if line.startswith("!")]
        raise UserError("pdflatex could not compile the table: "
                        + (errors[0] if errors else f"exit code {done.returncode}"))
    return log


def rasterise(pdf: bytes, dpi: int = PNG_DPI) -> bytes:
    """The PDF's (single) page as PNG bytes, via pdftoppm."""
    require_tools(png=True)
    with tempfile.TemporaryDirectory(prefix="kdbench-table-") as folder:
        root = Path(folder)
        (root / "table.pdf").write_bytes(pdf)
        subprocess.run(["pdftoppm", "-png", "-r", str(dpi), "-singlefile", "table.pdf", "table"],
                       cwd=root, check=True, capture_output=True, timeout=120)
        return (root / "table.png").read_bytes()
