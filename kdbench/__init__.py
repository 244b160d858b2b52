"""kdbench: knowledge-distillation methods compared over seeds, with the statistics."""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _methods_of_a_checkout() -> None:
    """The built-in methods are the repository's top-level folder methods/, installed as
    kdbench.methods (pyproject.toml's package-dir), so nothing generic lands in site-packages.
    An installed kdbench holds kdbench/methods/ itself, and an editable install maps the name to
    the folder; a checkout that is only on sys.path (a SLURM --snapshot, PYTHONPATH) cannot, so
    there that folder beside this package is registered as kdbench.methods: a checkout's kdbench
    runs its own checkout's methods, never another copy's."""
    package = Path(__file__).resolve().parent
    folder = package.parent / "methods"
    if ((package / "methods").is_dir() or not (folder / "__init__.py").is_file()
            or not (package.parent / "pyproject.toml").is_file()):
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.methods", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["methods"] = module


_methods_of_a_checkout()
