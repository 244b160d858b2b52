"""A method's code for its source hash (kdbench/sources.py): its file and the files of its own
package that it uses, never the engine's; one file hashes as itself."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

import pytest

from kdbench import registry, sources
from kdbench.store import sha256_file

REPO = Path(__file__).resolve().parents[1]


def test_fitnet_hash_covers_the_kd_loss_it_runs() -> None:
    fitnet = registry.get("fitnet")
    files = sources.source_files(fitnet)
    assert files == {"methods/fitnet.py": REPO / "methods" / "fitnet.py",
                     "methods/kd.py": REPO / "methods" / "kd.py"}
    # A built-in file hashes as it read when methods/ installed as the top-level package
    # ``methods`` (kdbench/sources.py): fitnet's import of kd spelt that way.
    def as_before(path: Path) -> str:
        text = path.read_bytes().replace(b"from kdbench.methods.kd ", b"from methods.kd ")
        return hashlib.sha256(text).hexdigest()

    assert b"from kdbench.methods.kd import" in (REPO / "methods" / "fitnet.py").read_bytes()
    lines = "".join(f"{label} {as_before(path)}\n" for label, path in sorted(files.items()))
    assert registry.source_sha256(fitnet) == hashlib.sha256(lines.encode()).hexdigest()


def test_kdbench_modules_a_method_computes_with_are_its_code_but_not_the_interface() -> None:
    assert set(sources.source_files(registry.get("mhgd"))) == {"methods/mhgd.py", "kdbench/spectral.py"}
    assert "kdbench/method.py" not in sources.source_files(registry.get("kd"))


def test_a_single_file_method_hashes_as_its_file() -> None:
    kd = registry.get("kd")
    assert registry.source_sha256(kd) == sha256_file(REPO / "methods" / "kd.py")


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """pkg/method.py defines a method that uses pkg/losses.py (which uses pkg/deep/terms.py)
    and kdbench; pkg/unused.py is never imported by it."""
    root = tmp_path / "pkg"
    (root / "deep").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "deep" / "__init__.py").write_text("")
    (root / "deep" / "terms.py").write_text("def square(x):\n    return x * x\n")
    (root / "losses.py").write_text("from pkg.deep import terms\n\ndef loss(x):\n    return terms.square(x)\n")
    (root / "unused.py").write_text("VALUE = 1\n")
    (root / "method.py").write_text(
        "from kdbench.method import Method\nfrom pkg.losses import loss\n\n"
        "class Made(Method):\n    name = 'made'\n    paper = 'p'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [name for name in sys.modules if name == "pkg" or name.startswith("pkg.")]:
        del sys.modules[name]


def test_the_closure_follows_its_package_not_the_engine(package: Path) -> None:
    made = importlib.import_module("pkg.method").Made
    assert set(sources.source_files(made)) == {"pkg/method.py", "pkg/losses.py", "pkg/deep/terms.py"}
    before = sources.source_sha256(made)
    (package / "unused.py").write_text("VALUE = 2\n")
    assert sources.source_sha256(made) == before  # not its code
    (package / "deep" / "terms.py").write_text("def square(x):\n    return x ** 2\n")
    assert sources.source_sha256(made) != before  # its code, two imports away


def test_declared_source_modules_enter_the_hash(package: Path) -> None:
    made = importlib.import_module("pkg.method").Made
    composed = type("Composed", (made,), {"source_modules": ("pkg.unused",), "__module__": "pkg.method"})
    assert "pkg/unused.py" in sources.source_files(composed)
