"""What the peer-code tests (tests/peers/test_<peer>.py) share: finding a peer's checkout from an
environment variable, importing its modules from there, and comparing a kdbench value and its
gradients with the peer's on identical inputs.

The peers' code is never copied into kdbench: each test module imports it at run time from the
directory an environment variable names (KDBENCH_MDISTILLER, KDBENCH_DIST, ...), and skips as a
whole, with the reason, when the variable is unset or names no such checkout.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import pytest
import torch
from torch import Tensor


def peer_checkout(variable: str, marker: str, what: str) -> Path:
    """The directory ``$variable`` names, if it holds ``marker`` (a path inside the checkout);
    otherwise the calling test module is skipped with a line that says what to set."""
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set: point it at a checkout of {what} to compare kdbench "
                    f"with it", allow_module_level=True)
    root = Path(value)
    if not (root / marker).is_file():
        pytest.skip(f"{variable}={value} is not a checkout of {what} (no {marker} there)",
                    allow_module_level=True)
    return root


def import_package_module(root: Path, name: str) -> ModuleType:
    """``import name`` with ``root`` first on sys.path (a peer laid out as a package)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def import_file(path: Path, name: str) -> ModuleType:
    """One peer file as a module of its own, without importing its package (whose ``__init__``
    may pull in dependencies the loss itself does not need)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gradients(value: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """d value / d input for each input (zeros where it does not depend on it)."""
    grads = torch.autograd.grad(value, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def max_errors(ours: Sequence[Tensor], theirs: Sequence[Tensor]) -> tuple[float, float]:
    """(max absolute error, that error relative to the peer's largest magnitude) over tensors
    paired in order, computed in float64."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} tensors against {len(theirs)}")
    worst_abs, worst_rel = 0.0, 0.0
    for a, b in zip(ours, theirs):
        if a.shape != b.shape:
            raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.detach().double(), b.detach().double()
        error = (a - b).abs().max().item() if a.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        worst_abs = max(worst_abs, error)
        worst_rel = max(worst_rel, error / scale if scale > 0 else error)
    return worst_abs, worst_rel


def assert_agree(label: str, ours: Sequence[Tensor] | Tensor, theirs: Sequence[Tensor] | Tensor,
                 rtol: float) -> tuple[float, float]:
    """Fail unless every pair agrees to ``rtol`` times the peer tensor's largest magnitude; print
    the errors (``pytest -s`` shows them: the numbers in RESULTS-*.md)."""
    ours = [ours] if isinstance(ours, Tensor) else list(ours)
    theirs = [theirs] if isinstance(theirs, Tensor) else list(theirs)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{label}: non-finite values"
    absolute, relative = max_errors(ours, theirs)
    print(f"[peer] {label}: max abs error {absolute:.3g}, relative {relative:.3g}")
    assert relative <= rtol, f"{label}: max abs error {absolute:.3g} = {relative:.3g} of the peer's scale > {rtol:g}"
    return absolute, relative
