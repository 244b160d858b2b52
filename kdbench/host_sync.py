"""Finding the operations that make the host wait for the GPU, on a machine without one.

A training step that reads a value back from the GPU (``.item()``, a boolean mask, a data-
dependent shape, a LAPACK error check) stalls the host until every queued kernel has run, so
the next step's kernels cannot be queued behind it: on a GPU such a step pays its launch
overhead in series with its arithmetic. ``torch.cuda.set_sync_debug_mode`` finds these only on a
GPU. ``HostSyncs`` finds them anywhere, the CPU included: it watches the ATen operations a block
of code issues (a ``TorchDispatchMode``) and the Tensor methods that copy to host memory, and
records every one that synchronises when its tensors are on CUDA, with the line of code that
issued it. The contract test (kdbench.testing) and the loop's tests use it, so a method that
synchronises every step fails on the CPU, in CI, before it reaches a GPU.

The list is of operations that synchronise in PyTorch's CUDA kernels, each with the reason; an
operation that is not listed is assumed asynchronous. Every tensor is treated as if it lived on
the GPU, so host-side work on tensors that are on the CPU on purpose (a dataset generated at
setup, an epoch's random draws) is reported too: the loop's test therefore compares counts
between runs of different step counts rather than asking for none.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VALUE_TO_HOST = "reads a tensor's value on the host (.item(), bool(), int(), float(), a Python `if`)"
DATA_DEPENDENT_SHAPE = "its output's size depends on the values, which the host must read first"
BOOLEAN_INDEX = "indexing with a boolean mask is a nonzero(): its size depends on the values"
ERROR_CHECK = "checks the solver's error code on the host"
TO_HOST = "copies the tensor to host memory"
FROM_HOST = "copies Python data to the device, a blocking copy from pageable memory"

# ATen operator name (the overload packet) → why it synchronises on CUDA.
SYNCING_OPS: dict[str, str] = {
    "aten._local_scalar_dense": VALUE_TO_HOST,
    "aten.is_nonzero": VALUE_TO_HOST,
    "aten.equal": VALUE_TO_HOST,
    "aten.allclose": VALUE_TO_HOST,
    "aten.nonzero": DATA_DEPENDENT_SHAPE,
    "aten.masked_select": DATA_DEPENDENT_SHAPE,
    "aten._unique": DATA_DEPENDENT_SHAPE,
    "aten._unique2": DATA_DEPENDENT_SHAPE,
    "aten.unique_dim": DATA_DEPENDENT_SHAPE,
    "aten.unique_consecutive": DATA_DEPENDENT_SHAPE,
    "aten.bincount": "sizes its output by the largest value, read on the host",
    "aten._linalg_check_errors": ERROR_CHECK,
    "aten._linalg_eigh": ERROR_CHECK + " (torch.linalg.eigh has no _ex variant without it)",
    "aten._linalg_svd": ERROR_CHECK,
    "aten.linalg_pinv": ERROR_CHECK + " (of the SVD inside it)",
    "aten.linalg_eig": ERROR_CHECK,
    "aten.linalg_lstsq": ERROR_CHECK,
    "aten.histc": "reads the values' range on the host when min = max (the default)",
}
# Operators that synchronise only with some arguments: a boolean index, no output_size.
INDEXING_OPS = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
REPEAT_INTERLEAVE = "aten.repeat_interleave"
# Tensor methods that copy to host memory (on a CPU tensor they issue no ATen operation).
HOST_COPY_METHODS = ("tolist", "numpy", "cpu")

_THIS_FILE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


@dataclass(frozen=True)
class HostSync:
    """One synchronising operation: the operator, why it synchronises, and the line of code
    outside torch that issued it."""

    op: str
    why: str
    where: str

    def __str__(self) -> str:
        return f"{self.where}: {self.op} ({self.why})"


def _caller() -> str:
    """file:line (function) of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith("<"):
            continue
        path = str(Path(frame.filename).resolve())
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR + os.sep):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


def _has_boolean_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
               for index in (indices or ()))


def _is_masked_fill(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``x[mask] = scalar``: one boolean index, one host-side value, no accumulation. ATen runs
    it as masked_fill_ (canDispatchToMaskedFill), which needs no nonzero()."""
    indices = args[1] if len(args) > 1 else ()
    value = args[2] if len(args) > 2 else kwargs.get("values")
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    return (not accumulate and len(indices or ()) == 1 and isinstance(value, torch.Tensor)
            and value.dim() == 0 and value.device.type == "cpu")


def _why(op_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if op_name in SYNCING_OPS:
        return SYNCING_OPS[op_name]
    if op_name in INDEXING_OPS and _has_boolean_index(args):
        return None if op_name != "aten.index" and _is_masked_fill(args, kwargs) else BOOLEAN_INDEX
    if op_name == REPEAT_INTERLEAVE and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
            and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
        return DATA_DEPENDENT_SHAPE + " (pass output_size)"
    return None


# --- recording ----------------------------------------------------------------------------------
# The dispatch mode is per thread (as PyTorch's mode stack is). The Python-level wrappers below
# are process-wide, installed by the first block to open and removed by the last to close; they
# record only into the blocks open in the calling thread, innermost and outer alike (as nested
# dispatch modes both see an operation).

_open_blocks = threading.local()  # .stack: list of the ``found`` lists of this thread's blocks
_install_lock = threading.Lock()
_installed_blocks = 0
_originals: dict[tuple[Any, str], Callable[..., Any]] = {}


def _record(op: str, why: str) -> None:
    stack = getattr(_open_blocks, "stack", None)
    if stack:
        sync = HostSync(op, why, _caller())
        for found in stack:
            found.append(sync)


def _names_the_cpu(device: Any) -> bool:
    return (isinstance(device, str) and device.split(":")[0] == "cpu") or \
        (isinstance(device, torch.device) and device.type == "cpu")


def _tensor_method(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self, *args, **kwargs):
        if name != "to" or _names_the_cpu(kwargs.get("device", args[0] if args else None)):
            _record(f"Tensor.{name}", TO_HOST)
        return original(self, *args, **kwargs)

    return method


def _factory(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def factory(*args, **kwargs):
        # A device given as an object (x.device) is the training device, a GPU in the real run;
        # the literal string "cpu" asks for a host tensor on purpose.
        device = kwargs.get("device")
        if device is not None and device != "cpu":
            _record(f"torch.{name}", FROM_HOST)
        return original(*args, **kwargs)

    return factory


_WRAPPED: tuple[tuple[Any, str, Callable[[str, Callable[..., Any]], Callable[..., Any]]], ...] = (
    *((torch.Tensor, name, _tensor_method) for name in (*HOST_COPY_METHODS, "to")),
    (torch, "tensor", _factory),
    (torch, "as_tensor", _factory),
)


def _install() -> None:
    global _installed_blocks
    with _install_lock:
        if _installed_blocks == 0:
            for owner, name, wrap in _WRAPPED:
                original = getattr(owner, name)
                _originals[(owner, name)] = original
                setattr(owner, name, wrap(name, original))
        _installed_blocks += 1


def _uninstall() -> None:
    global _installed_blocks
    with _install_lock:
        _installed_blocks -= 1
        if _installed_blocks == 0:
            for owner, name, _ in _WRAPPED:
                original = _originals.pop((owner, name))
                if owner is torch.Tensor:
                    delattr(owner, name)  # uncovers torch._C.TensorBase's own method again
                else:
                    setattr(owner, name, original)


class _Recorder(TorchDispatchMode):
    def __init__(self, found: list[HostSync]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op_name = f"{func.namespace}.{func.overloadpacket.__name__}"
        why = _why(op_name, args, kwargs)
        if why is not None:
            self.found.append(HostSync(op_name, why, _caller()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs() -> Iterator[list[HostSync]]:
    """``with host_syncs() as found:`` — every operation of the block that would synchronise
    the host with a CUDA device, in the order issued. Works on any device; on the CPU nothing
    actually waits, which is what lets CI check for it."""
    found: list[HostSync] = []
    stack = _open_blocks.__dict__.setdefault("stack", [])
    _install()
    stack.append(found)
    try:
        with _Recorder(found):
            yield found
    finally:
        del stack[next(i for i, block in enumerate(stack) if block is found)]  # not ==: lists
        _uninstall()


def ops_of(found: list[HostSync]) -> set[str]:
    return {sync.op for sync in found}


def reported_names() -> set[str]:
    """Every operation name a ``HostSync`` can carry (what a method may declare)."""
    return {*SYNCING_OPS, *INDEXING_OPS, REPEAT_INTERLEAVE,
            *(f"Tensor.{name}" if owner is torch.Tensor else f"torch.{name}" for owner, name, _ in _WRAPPED)}

