"""Whether a results directory or an output file can be written: checked before training or
rendering, so a mistake in a path fails in seconds, not after hours of work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kdbench.errors import UserError


def check_could_create(path: Path, what: str) -> None:
    """Fail when ``path`` (a directory or file to be made, parents included) could not be
    created, without creating anything: its nearest existing ancestor must be a writable
    directory (resolving a plan, --dry-run, table --out)."""
    if path.is_dir():
        ancestor = path
    else:
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if path.exists() and not path.is_dir() and what.endswith("directory"):
            raise UserError(f"{what} {path} is a file")
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} is not writable: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable: no permission to write in {ancestor}")


def check_results_dir(results: Path) -> None:
    """Create the results directory and write a file in it: what permissions alone do not tell
    (a full disk, a quota, a network file system's own rules) fails here, still before
    training."""
    if results.exists() and not results.is_dir():
        raise UserError(f"results directory {results} is a file")
    try:
        results.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"results directory {results} is not writable: {error.strerror or error}") from None
