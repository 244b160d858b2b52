"""Shared by the peer checks (tests/peers/test_*.py): kdbench's methods run beside a peer
codebase's own code on identical tensors and weights.

The peer's code is imported at run time from a checkout named by an environment variable,
never copied into kdbench. Its packages are imported under an alias (``import_peer_package``)
so that their generic names (``models``, ``crd``, ``helper``) neither shadow nor are shadowed
by anything else on ``sys.path``, and two peers' checkouts can be loaded in one session.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, Sequence

import pytest
import torch
from torch import Tensor, nn

# When set, every comparison appends one JSON line {check, quantity, max_abs, max_rel} to this
# file: the numbers the RESULTS-*.md tables quote come from the test run itself.
REPORT_VARIABLE = "KDBENCH_PEER_REPORT"


def peer_checkout(variable: str, marker: str, what: str) -> Path:
    """The directory ``$variable`` names, if ``marker`` (a path inside the checkout, file or
    folder) exists there; otherwise the calling test module is skipped, at import, with a line
    that says what to set."""
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set: point it at a checkout of {what} to compare kdbench "
                    f"with it", allow_module_level=True)
    root = Path(value)
    if not (root / marker).exists():
        pytest.skip(f"{variable}={value} is not a checkout of {what} (no {marker} there)",
                    allow_module_level=True)
    return root


def import_peer_package(root: Path, package: str, alias: str) -> ModuleType:
    """``root/package`` imported as the package ``alias``: its relative imports resolve inside
    it (``alias.submodule``), and nothing named ``package`` enters ``sys.modules``."""
    if alias in sys.modules:
        return sys.modules[alias]
    directory = root / package
    spec = importlib.util.spec_from_file_location(
        alias, directory / "__init__.py", submodule_search_locations=[str(directory)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {directory} as {alias}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


def import_peer_module(root: Path, package: str, alias: str, submodule: str) -> ModuleType:
    """``package.submodule`` of the peer, its package imported as ``alias`` first."""
    import_peer_package(root, package, alias)
    return importlib.import_module(f"{alias}.{submodule}")


def copy_state(source: nn.Module, target: nn.Module, reshape: bool = False) -> list[tuple[str, str]]:
    """Copy ``source``'s state dict into ``target`` entry by entry, in registration order,
    checking that the two have equally many entries of equal shapes (``reshape``: equal sizes,
    e.g. a 1×1 conv's (O, I, 1, 1) into a linear map's (O, I)). Returns the (source name,
    target name) pairs, so gradients can be compared parameter by parameter."""
    source_state, target_state = source.state_dict(), target.state_dict()
    if len(source_state) != len(target_state):
        raise AssertionError(f"{len(source_state)} state entries ({list(source_state)}) vs "
                             f"{len(target_state)} ({list(target_state)})")
    pairs = []
    with torch.no_grad():
        for (source_name, value), (target_name, slot) in zip(source_state.items(), target_state.items()):
            fits = value.numel() == slot.numel() if reshape else value.shape == slot.shape
            if not fits:
                raise AssertionError(f"{source_name} {tuple(value.shape)} does not fit "
                                     f"{target_name} {tuple(slot.shape)}")
            slot.copy_(value.reshape(slot.shape))
            pairs.append((source_name, target_name))
    return pairs


def errors(ours: Tensor, theirs: Tensor) -> tuple[float, float]:
    """(max |ours − theirs|, that divided by max |theirs|), in float64."""
    ours, theirs = ours.detach().double(), theirs.detach().double().reshape(ours.shape)
    absolute = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    return absolute, absolute / scale if scale > 0 else absolute


def record(check: str, quantity: str, absolute: float, relative: float) -> None:
    path = os.environ.get(REPORT_VARIABLE)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"check": check, "quantity": quantity,
                                     "max_abs": absolute, "max_rel": relative}) + "\n")


def assert_close(check: str, quantity: str, ours: Tensor, theirs: Tensor, rtol: float = 1e-5) -> None:
    """ours ≈ theirs elementwise within ``rtol`` of theirs' largest magnitude (a scale-aware
    tolerance: fp32 rounding of sums grows with the largest term, not each entry)."""
    if tuple(ours.shape) != tuple(theirs.shape) and ours.numel() != theirs.numel():
        raise AssertionError(f"{check} {quantity}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    absolute, relative = errors(ours, theirs)
    record(check, quantity, absolute, relative)
    assert relative <= rtol, (f"{check} {quantity}: max abs error {absolute:.3g}, relative "
                              f"{relative:.3g} > {rtol:g}")


def assert_gradients_close(check: str, ours: Sequence[Tensor], theirs: Sequence[Tensor],
                           names: Iterable[str], rtol: float = 1e-5) -> None:
    """``.grad`` of each pair of tensors (leaves or parameters) within ``rtol``; a tensor that
    gets no gradient in either codebase must get none in the other (the same features used)."""
    for name, mine, reference in zip(names, ours, theirs, strict=True):
        if mine.grad is None and reference.grad is None:
            continue
        assert reference.grad is not None, f"{check}: kdbench's {name} got a gradient, the peer's none"
        assert mine.grad is not None, f"{check}: the peer's {name} got a gradient, kdbench's none"
        assert_close(check, f"grad {name}", mine.grad, reference.grad, rtol)


def leaf(values: Tensor) -> Tensor:
    """A detached copy that requires grad: the same numbers for each codebase's own graph."""
    return values.detach().clone().requires_grad_(True)

# --- used by test_mdistiller.py and test_dist.py -----------------------------------------------
# (one loss file loaded alone, and comparisons of several tensors at once, recorded as above and
# printed for ``pytest -s``)

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
    """``errors`` over tensors paired in order: the largest absolute error and the largest
    relative one (each relative to its own peer tensor's largest magnitude)."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} tensors against {len(theirs)}")
    for a, b in zip(ours, theirs):
        if a.shape != b.shape:
            raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    pairs = [errors(a, b) for a, b in zip(ours, theirs)]
    return max((a for a, _ in pairs), default=0.0), max((r for _, r in pairs), default=0.0)


def assert_agree(label: str, ours: Sequence[Tensor] | Tensor, theirs: Sequence[Tensor] | Tensor,
                 rtol: float) -> tuple[float, float]:
    """Fail unless every pair agrees to ``rtol`` times the peer tensor's largest magnitude; print
    the errors (``pytest -s`` shows them: the numbers in RESULTS-*.md)."""
    ours = [ours] if isinstance(ours, Tensor) else list(ours)
    theirs = [theirs] if isinstance(theirs, Tensor) else list(theirs)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{label}: non-finite values"
    absolute, relative = max_errors(ours, theirs)
    record(label, "all", absolute, relative)
    print(f"[peer] {label}: max abs error {absolute:.3g}, relative {relative:.3g}")
    assert relative <= rtol, f"{label}: max abs error {absolute:.3g} = {relative:.3g} of the peer's scale > {rtol:g}"
    return absolute, relative
