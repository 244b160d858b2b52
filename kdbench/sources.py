"""Which files are a method's code, and one hash over them: a record names the code that made it.

A method's code is the file that defines its class and, transitively, every module of the same
top-level package that the file uses: ``methods/fitnet.py`` runs ``methods/kd.py``'s loss, so
editing either changes what a fitnet run computes. The kdbench modules it uses are part of it
too (``methods/mhgd.py`` computes with ``kdbench/spectral.py``), as leaves — what they use in
turn is the engine's — except the plugin interface ``kdbench/method.py``: the engine and the
interface are versioned by ``kdbench.train.TRAINING_VERSION``, and hashing them into every
method would call every result stale at each edit of a docstring there. A class names further
modules in ``Method.source_modules`` (a composition built in kdbench/ names its parts').

A file is labelled by its module's dotted name as a path (``methods/kd.py``), never by where
it is installed, so that two machines (or a SLURM snapshot of the code) hash the same code to
the same value. The built-in methods are the repository's ``methods/`` folder installed as the
package ``kdbench.methods`` (pyproject.toml): they count as their own package, not the engine's,
and keep the labels and hashes they had when that folder was installed as a top-level package
``methods`` — their files are hashed as they read with their imports of each other spelt
``from methods.x import``, as they were then, so the move (issue 19) made no result stale.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

from kdbench.store import sha256_file

ENGINE_PACKAGE = "kdbench"
INTERFACE_MODULE = "kdbench.method"  # versioned with the engine, never hashed into a method
BUILT_IN_METHODS = "kdbench.methods"  # the repository's methods/ folder (pyproject package-dir)
BUILT_IN_FOLDER = "methods"  # its name in the repository, and its package name before issue 19
UNKNOWN = "unknown"  # no source file (a class defined in an interactive session)

# An import of a sibling built-in method, as the files spell it since they install as
# kdbench.methods; hashed as the ``from methods.`` they were written with before.
_SIBLING_IMPORT = re.compile(rb"^([ \t]*)from kdbench\.methods\.", re.MULTILINE)


def _is_built_in(name: str) -> bool:
    return name == BUILT_IN_METHODS or name.startswith(BUILT_IN_METHODS + ".")


def _top_package(module: ModuleType) -> str:
    if _is_built_in(module.__name__):
        return BUILT_IN_METHODS
    return module.__name__.partition(".")[0]


def _label(module: ModuleType, path: Path) -> str:
    name = module.__name__
    if _is_built_in(name):  # its path in the repository: methods/kd.py
        name = BUILT_IN_FOLDER + name[len(BUILT_IN_METHODS):]
    parts = name.split(".")
    if path.name == "__init__.py":
        parts.append("__init__")
    return "/".join(parts) + ".py"


def file_sha256(label: str, path: Path) -> str:
    """The sha256 of a file of a method's code; a built-in method's file as it reads with its
    sibling imports spelt ``from methods.x`` (the module docstring says why)."""
    if not label.startswith(BUILT_IN_FOLDER + "/"):
        return sha256_file(path)
    return hashlib.sha256(_SIBLING_IMPORT.sub(rb"\1from methods.", path.read_bytes())).hexdigest()


def _modules_used(module: ModuleType) -> list[ModuleType]:
    """Modules of ``module``'s own top-level package, and kdbench modules other than the
    interface, that its globals come from. A kdbench module is a leaf: nothing is followed
    from it."""
    package = _top_package(module)
    if package == ENGINE_PACKAGE:
        return []
    used = []
    for value in vars(module).values():
        if inspect.ismodule(value):
            candidate = value
        elif inspect.isclass(value) or inspect.isfunction(value):
            candidate = sys.modules.get(getattr(value, "__module__", "") or "")
        else:
            continue
        if candidate is None:
            continue
        engine = _top_package(candidate) == ENGINE_PACKAGE and candidate.__name__ not in (
            ENGINE_PACKAGE, INTERFACE_MODULE)  # kdbench.methods is not the engine's (_top_package)
        if _top_package(candidate) == package or engine:
            used.append(candidate)
    return used


def source_files(method_class: type) -> dict[str, Path]:
    """label → path of every file of the method's code (see the module docstring)."""
    roots = [sys.modules.get(method_class.__module__)]
    roots += [importlib.import_module(name) for name in getattr(method_class, "source_modules", ())]
    files: dict[str, Path] = {}
    seen: set[str] = set()
    pending = [module for module in roots if module is not None]
    while pending:
        module = pending.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        try:
            path = inspect.getsourcefile(module)
        except TypeError:  # a built-in module
            path = None
        if path is None:
            continue
        files[_label(module, Path(path))] = Path(path)
        pending.extend(_modules_used(module))
    return dict(sorted(files.items()))


def file_hashes(method_class: type) -> dict[str, str]:
    """label → sha256 of each file of the method's code."""
    return {label: file_sha256(label, path) for label, path in source_files(method_class).items()}


def combined_sha256(hashes: dict[str, str]) -> str:
    """One hash for a method's files. A single file's hash is that file's sha256 (what records
    stored before methods spanning several files were hashed as one, so their hashes stay
    comparable); several: the sha256 of their sorted "label sha256" lines."""
    if not hashes:
        return UNKNOWN
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    lines = "".join(f"{label} {digest}\n" for label, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def source_sha256(method_class: type) -> str:
    return combined_sha256(file_hashes(method_class))
