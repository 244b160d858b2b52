"""Progress on the terminal: an overall bar and one line per run in flight (epoch, loss,
accuracy). On a terminal the block is redrawn in place; in a log (CI, SLURM) each finished
epoch and run is one plain line, so logs stay readable.

Executors that see runs only from outside (SLURM: no epoch events come back from the nodes)
report with ``queue`` which runs are running and how many wait; the bar then counts done,
running, pending and failed runs, and a log gets one line whenever those counts change."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressDisplay:
    def __init__(self, total: int, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total = total
        self.finished = 0
        self.failed = 0
        self.active: dict[str, str] = {}
        self.started = time.time()
        self._drawn = 0
        self.pending: int | None = None  # runs waiting in a queue; None: not queue-based
        self._last_counts: tuple[int, ...] = ()

    def event(self, run: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        stage = "" if event.get("stage") in (None, "main") else f"[{event['stage']}] "
        if kind == "step":
            self.active[run] = (f"{stage}epoch {event['epoch']}/{event['epochs']} "
                                f"step {event['step']}/{event['steps']}")
        elif kind == "waiting":  # kdbench.worker: the run's claim is held by another launch
            self.active[run] = "waiting: another launch is training it"
            if not self.live:
                self._print(f"  {run}: waiting: another launch is training it")
        elif kind == "epoch":
            accuracy = f" test top-1 {event['top1']:.2f}%" if "top1" in event else ""
            line = f"{stage}epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.4f}{accuracy}"
            self.active[run] = line
            if not self.live:
                self._print(f"  {run}: {line}")
        self._redraw()

    def start(self, run: str) -> None:
        self.active[run] = "starting"
        self._redraw()

    def finish(self, run: str, status: str, detail: str = "") -> None:
        self.active.pop(run, None)
        self.finished += 1
        if status != "done":
            self.failed += 1
        self._print(f"[{self.finished}/{self.total}] {run}: {status}{(' - ' + detail) if detail else ''}")

    def queue(self, running: dict[str, str], pending: int) -> None:
        """The runs running now (label -> what to show) and how many wait in the queue."""
        self.active = dict(running)
        self.pending = pending
        counts = (self.finished, self.failed, len(running), pending)
        if not self.live and counts != self._last_counts:
            self._print(f"  {self._counts()}")
        self._last_counts = counts
        self._redraw()

    def _counts(self) -> str:
        return (f"{self.finished - self.failed} done, {len(self.active)} running, "
                f"{self.pending} pending, {self.failed} failed")

    def _bar(self) -> str:
        width = 30
        filled = int(width * self.finished / max(self.total, 1))
        elapsed = time.time() - self.started
        if self.pending is not None:
            return (f"[{'#' * filled}{'.' * (width - filled)}] {self.finished}/{self.total} runs "
                    f"ended: {self._counts()}, {elapsed / 60:.1f} min")
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.finished}/{self.total} runs"
                f"{failed}, {elapsed / 60:.1f} min")

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _print(self, line: str) -> None:
        self._clear()
        self.stream.write(line + "\n")
        self.stream.flush()
        self._redraw()

    def _redraw(self) -> None:
        if not self.live:
            return
        self._clear()
        lines = [self._bar()] + [f"  {run}: {state}" for run, state in self.active.items()]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self._clear()
        if self.finished or self.active or self.pending is not None:  # else nothing to sum up
            self.stream.write(self._bar() + "\n")
        self.stream.flush()
