"""Kept students: every finished run keeps its final student's weights, and a run trained with
``--keep best`` also those of its best epoch, so a run's student can be evaluated or exported
later (``kdbench.api.load_student``) instead of being thrown away with the checkpoint.

Layout under the results directory::

    students/<run id>.pt        the last epoch's student state_dict (every finished run)
    students/<run id>.best.pt   the best epoch's (runs trained with --keep best)

A teacher's run keeps its final weights once, in teachers/<run id>.pt (kdbench.teachers): its
record names that file as its "last" student instead of writing a second copy.

The record says what was kept, with checksums::

    student_weights  {"last": {"path", "sha256", "epoch"}, "best": {"path", "sha256", "epoch"}}

(paths relative to the results directory; "best" only with --keep best). The best epoch is the
record's own (``metrics.best_epoch``: the first epoch of the highest test top-1). What is kept
is an option of the command, not part of the run's identity: it changes what is stored, never
what is computed, so it is in TrainOptions, not in the RunSpec.

While the run trains, the best epoch's weights so far are a device copy made when an epoch
beats every earlier one (at the end of that epoch, outside the hot loop), and they travel in
the run's checkpoint: a run killed after its best epoch and resumed still keeps that epoch's
weights, exactly.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdbench.store import Store, write_atomically

KEEP_LAST = "last"  # the final student only (the default)
KEEP_BEST = "best"  # the final student and the best epoch's
KEEP_CHOICES = (KEEP_LAST, KEEP_BEST)
WEIGHTS_FIELD = "student_weights"  # the record's field
CHECKPOINT_FIELD = "kept_best"  # the checkpoint's field: {"epoch", "top1", "student"}


def student_path(store: Store, run_id: str, which: str = KEEP_LAST) -> Path:
    """Where a run's kept student lives (``which``: "last" or "best")."""
    if which not in KEEP_CHOICES:
        raise ValueError(f"which must be one of {KEEP_CHOICES}, got {which!r}")
    suffix = ".pt" if which == KEEP_LAST else ".best.pt"
    return store.root / "students" / f"{run_id}{suffix}"


def write_state_dict(state: dict[str, Tensor], path: Path, store: Store) -> dict[str, str]:
    """Write a state_dict atomically as plain CPU tensors; returns its path (relative to the
    results directory) and the sha256 of exactly the bytes written."""
    buffer = io.BytesIO()
    # Contiguous CPU tensors: a CUDA run's channels_last weights load anywhere as they are.
    torch.save({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, buffer)
    data = buffer.getvalue()
    write_atomically(path, data)
    return {"path": str(path.relative_to(store.root)), "sha256": hashlib.sha256(data).hexdigest()}


class KeptStudents:
    """What one run keeps of its student: created at the run's start, told each epoch's
    history entry, asked for the record's ``student_weights`` at its end."""

    def __init__(self, store: Store, run_id: str, keep: str = KEEP_LAST) -> None:
        if keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
        self.store = store
        self.run_id = run_id
        self.keep_best = keep == KEEP_BEST
        self.best_top1: float | None = None  # the best test top-1 so far, held or not
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None  # its weights, when held

    def resume(self, checkpoint: dict[str, Any] | None, history: list[dict[str, Any]]) -> None:
        """Pick up from a checkpoint: the best epoch so far is the history's; its weights are
        held when the checkpoint carries them (it does when it was made with --keep best)."""
        for entry in history:
            self._see(entry)
        kept = (checkpoint or {}).get(CHECKPOINT_FIELD)
        if self.keep_best and kept is not None and kept["epoch"] == self.best_epoch:
            self.best_state = kept["student"]

    def observe(self, entry: dict[str, Any], model: nn.Module) -> None:
        """An epoch's history entry, just appended: copy the weights when it is a new best."""
        if self._see(entry) and self.keep_best:
            # A copy on the model's device: no host transfer, and the next epoch's steps
            # cannot change it.
            self.best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def _see(self, entry: dict[str, Any]) -> bool:
        """Whether ``entry`` is a new best. Only evaluated main-stage epochs carry "top1";
        strictly greater, as the record's best is the first epoch of the highest top-1."""
        if "top1" not in entry or (self.best_top1 is not None and not entry["top1"] > self.best_top1):
            return False
        self.best_top1, self.best_epoch = entry["top1"], entry["epoch"]
        self.best_state = None
        return True

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint's share: the best weights so far, with their epoch."""
        if self.best_state is None:
            return {CHECKPOINT_FIELD: None}
        return {CHECKPOINT_FIELD: {"epoch": self.best_epoch, "top1": self.best_top1,
                                   "student": self.best_state}}

    def keep(self, model: nn.Module, last_epoch: int, best_epoch: int,
             last: dict[str, str] | None = None) -> dict[str, Any]:
        """Write what this run keeps; returns the record's ``student_weights``. ``last``: the
        file that already holds the final weights (a teacher's), instead of writing them."""
        if last is None:
            last = write_state_dict(model.state_dict(), student_path(self.store, self.run_id), self.store)
        kept: dict[str, Any] = {KEEP_LAST: {**last, "epoch": last_epoch}}
        if self.keep_best:
            if best_epoch != self.best_epoch or self.best_state is None:
                # A resumed run whose earlier epochs were trained without --keep best.
                print(f"warning: run {self.run_id}: the best epoch ({best_epoch}) was trained "
                      "without --keep best; only the last epoch's student is kept", flush=True)
            else:
                best = write_state_dict(self.best_state, student_path(self.store, self.run_id, KEEP_BEST),
                                        self.store)
                kept[KEEP_BEST] = {**best, "epoch": best_epoch}
        return kept
