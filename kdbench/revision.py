"""Which kdbench made a file: the commit of kdbench's own checkout, or its installed version.

Not the current directory's git: a table written from a paper's repository would otherwise
record the paper's commit as kdbench's. Torch-free (tables use it).
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import kdbench


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=10)


def checkout_root() -> Path | None:
    """The git work tree kdbench is imported from, if it is kdbench's own checkout.

    kdbench's checkout has the package at its top (``<root>/kdbench/__init__.py``, tracked).
    A non-editable install inside some other repository (a paper's ``.venv/``) sits in
    site-packages: git would find the paper's work tree above it, whose top is not the
    package's parent.
    """
    root = Path(kdbench.__file__).resolve().parent.parent
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None
        tracked = _git(root, "ls-files", "--error-unmatch", "kdbench/__init__.py")
    except (OSError, subprocess.SubprocessError):
        return None
    return root if tracked.returncode == 0 else None


def kdbench_revision() -> str:
    """``<commit>[ with uncommitted changes]`` from kdbench's checkout, else the installed
    distribution's version and, for a pip install from git, the commit pip recorded
    (PEP 610 ``direct_url.json``)."""
    root = checkout_root()
    if root is not None:
        try:
            head = _git(root, "rev-parse", "HEAD").stdout.strip()
            dirty = _git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip()
        except (OSError, subprocess.SubprocessError):
            head, dirty = "", ""
        if head:
            return head + (" with uncommitted changes" if dirty else "")
    try:
        distribution = metadata.distribution("kdbench")
    except metadata.PackageNotFoundError:
        return f"kdbench {kdbench.__version__} (not installed, no git checkout)"
    commit = None
    direct_url = distribution.read_text("direct_url.json")
    if direct_url:
        try:
            commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id")
        except ValueError:
            commit = None
    return (f"kdbench {distribution.version} (installed"
            + (f" from git commit {commit}" if commit else ", no git checkout") + ")")
