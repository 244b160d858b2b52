"""Per-epoch logs of a run: runs/<id>.csv beside its record, and TensorBoard with --tensorboard.

The run's history (in its checkpoint while it trains, in its record once done) is the source
of truth; both logs are views of it, rebuilt from it:

- ``runs/<id>.csv``: one row per epoch — epoch (of its stage), stage, loss, one ``loss_<term>``
  column per named loss term (mdistiller's loss_ce/loss_kd naming), train_top1, top1, top5
  (empty on epochs without a test evaluation), lr (the learning rate the epoch trained
  with), seconds. It is rewritten whole and atomically after every epoch's checkpoint, so a
  killed run's CSV holds its checkpoint's epochs, and a resumed run first rewrites it from the
  checkpoint's history (which also drops an epoch logged by an attempt killed before its
  checkpoint was written).
- ``tensorboard/<id>/`` (``--tensorboard``, ``pip install 'kdbench[tensorboard]'``): the same
  numbers as scalars tagged ``<stage>/<column>``, at global step = the epoch's position in the
  run's history (1-based, across stages), through ``torch.utils.tensorboard``. A resumed run
  opens the log with ``purge_step=1`` and writes its history again, so TensorBoard, which
  discards the events at and after a purge step, shows each epoch once, as the checkpoint has it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from kdbench.errors import UserError
from kdbench.store import Store, write_atomically

LEADING_COLUMNS = ("epoch", "stage", "loss")
TRAILING_COLUMNS = ("train_top1", "top1", "top5", "lr", "seconds")
TERM_PREFIX = "loss_"
TENSORBOARD_HINT = "pip install 'kdbench[tensorboard]'"


def csv_path(store: Store, run_id: str) -> Path:
    return store.runs_dir / f"{run_id}.csv"


def tensorboard_dir(store: Store, run_id: str) -> Path:
    return store.root / "tensorboard" / run_id


def columns_of(history: Sequence[dict[str, Any]]) -> list[str]:
    """The CSV's columns: the fixed ones around every term that any epoch has, in the order
    the terms first appear (a pre-training stage's terms come before the main stage's)."""
    terms: dict[str, None] = {}
    for entry in history:
        for name in entry.get("terms", {}):
            terms.setdefault(TERM_PREFIX + name, None)
    return [*LEADING_COLUMNS, *terms, *TRAILING_COLUMNS]


def row_of(entry: dict[str, Any]) -> dict[str, Any]:
    """One history entry as a CSV row (columns it lacks are left out, written empty)."""
    row = {key: entry[key] for key in (*LEADING_COLUMNS, *TRAILING_COLUMNS) if key in entry}
    row.update({TERM_PREFIX + name: value for name, value in entry.get("terms", {}).items()})
    return row


def render_csv(history: Sequence[dict[str, Any]]) -> str:
    """The CSV of a history; floats as Python's shortest exact repr, so they read back equal."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns_of(history), lineterminator="\n")
    writer.writeheader()
    for entry in history:
        writer.writerow(row_of(entry))
    return text.getvalue()


def require_tensorboard() -> None:
    """Fail before training, in one line, when --tensorboard cannot write."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
    except ImportError as error:
        raise UserError(f"--tensorboard needs the tensorboard package, which does not import here "
                        f"({error}); {TENSORBOARD_HINT}") from None


class EpochLog:
    """A run's logs: ``start`` once the history is known (empty, or a checkpoint's), ``epoch``
    after each epoch's checkpoint, ``close`` at the end."""

    def __init__(self, store: Store, run_id: str, tensorboard: bool = False) -> None:
        self.store = store
        self.run_id = run_id
        self.tensorboard = tensorboard
        self.writer = None

    def start(self, history: Sequence[dict[str, Any]]) -> None:
        self._write_csv(history)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step=1: whatever an earlier attempt logged is superseded by the history.
            self.writer = SummaryWriter(str(tensorboard_dir(self.store, self.run_id)), purge_step=1)
            for step, entry in enumerate(history, start=1):
                self._add_scalars(entry, step)
            self.writer.flush()

    def epoch(self, history: Sequence[dict[str, Any]]) -> None:
        self._write_csv(history)
        if self.writer is not None:
            self._add_scalars(history[-1], len(history))
            self.writer.flush()  # a killed run's events are on disk up to its checkpoint

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _write_csv(self, history: Sequence[dict[str, Any]]) -> None:
        write_atomically(csv_path(self.store, self.run_id), render_csv(history).encode())

    def _add_scalars(self, entry: dict[str, Any], step: int) -> None:
        stage = entry["stage"]
        for column, value in row_of(entry).items():
            if column not in ("epoch", "stage") and value is not None:
                self.writer.add_scalar(f"{stage}/{column}", value, step)
