"""Packaging (issue 19): the built-in methods install as ``kdbench.methods``, not as a top-level
``methods`` that would clash with a user's module of that name, and the move changed no
method's code hash (records made before it are not stale)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

from kdbench import registry, sources

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    """``python -c code`` in ``cwd``, which is first on its sys.path (as a user's script
    folder or notebook directory is)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_installed_metadata_names_no_top_level_methods_package():
    kdbench = distribution("kdbench")
    # What setuptools derived from [tool.setuptools] packages: a stale install (made before the
    # move) still says "methods" here; reinstall with `pip install -e .`.
    assert kdbench.read_text("top_level.txt").split() == ["kdbench"]
    targets = [entry.value for entry in kdbench.entry_points if entry.group == registry.GROUP]
    assert targets and all(target.startswith("kdbench.methods.") for target in targets), targets


def test_a_users_own_methods_module_does_not_break_kdbench(tmp_path):
    # Before the move, fitnet's `from methods.kd import ...` found this file instead of the
    # built-in package: "No module named 'methods.kd'; 'methods' is not a package".
    (tmp_path / "methods.py").write_text('WHO = "the user"\n')
    out = run_python(
        "import json, methods\n"
        "from kdbench import registry\n"
        "loaded = {name: registry.get(name).__module__ for name in registry.names()}\n"
        "print(json.dumps({'user': methods.WHO, 'loaded': loaded}))\n", tmp_path)
    seen = json.loads(out)
    assert seen["user"] == "the user"
    assert seen["loaded"]["fitnet"] == "kdbench.methods.fitnet"
    assert all(module.startswith("kdbench.methods.") for module in seen["loaded"].values())


def test_code_hashes_are_those_of_the_top_level_methods_layout(tmp_path, monkeypatch):
    """The hashes records store (kdbench.sources) are what they were when methods/ was installed
    as the top-level package ``methods``: that layout is rebuilt here (the files with their
    sibling imports spelt ``from methods.x``, as before the move), imported under that name and
    hashed, independently of the installed kdbench.methods."""
    old = tmp_path / "methods"
    old.mkdir()
    for file in (REPO / "methods").glob("*.py"):
        (old / file.name).write_text(file.read_text().replace("from kdbench.methods.", "from methods."))
    monkeypatch.syspath_prepend(str(tmp_path))  # before the checkout's own methods/ folder
    for name in [name for name in sys.modules if name == "methods" or name.startswith("methods.")]:
        monkeypatch.delitem(sys.modules, name)
    built_in = {name: registration[0].target for name, registration in registry.registrations().items()
                if registration[0].distribution == "kdbench"}
    try:
        before, now = {}, {}
        for name, target in built_in.items():
            module, _, attribute = target.removeprefix("kdbench.").partition(":")
            method = getattr(importlib.import_module(module), attribute)
            assert Path(sys.modules[method.__module__].__file__).parent == old
            before[name] = (sources.source_sha256(method), sources.file_hashes(method))
            now[name] = (registry.source_sha256(registry.get(name)), sources.file_hashes(registry.get(name)))
    finally:  # the old layout's modules must not outlive this test
        for name in [name for name in sys.modules if name == "methods" or name.startswith("methods.")]:
            del sys.modules[name]
    assert "fitnet" in before and "mhgd" in before and "ab" in before
    assert now == before
    # The labels are repository paths, whatever the installed package is called.
    assert set(now["fitnet"][1]) == {"methods/fitnet.py", "methods/kd.py"}


def test_a_checkout_on_sys_path_alone_runs_its_own_methods(tmp_path):
    """A SLURM --snapshot or PYTHONPATH=checkout: no install maps kdbench.methods to the folder
    methods/, so kdbench registers it itself — that copy's methods, not the installed ones."""
    copy = tmp_path / "snapshot"
    for part in ("kdbench", "methods"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    out = run_python(
        "import importlib.util, kdbench\n"  # no torch: finding the modules is the point
        "print(kdbench.__file__); print(importlib.util.find_spec('kdbench.methods.fitnet').origin)\n",
        copy)
    package, fitnet = out.split()
    assert Path(package) == copy / "kdbench" / "__init__.py"
    assert Path(fitnet) == copy / "methods" / "fitnet.py"
