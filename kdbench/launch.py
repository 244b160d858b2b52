"""Executors: where runs happen.

- ``inprocess``: one after the other in this process (tests; no start-up cost);
- ``local`` (the default): subprocesses on this machine, ``jobs`` at a time, CPU threads split
  between them;
- ``slurm``: one job per teacher, then the students as one job array per teacher
  (``kdbench.slurm``, imported only when chosen: submitit is needed for SLURM alone).

Every executor runs teachers first and a student only after its teacher succeeded, calls the
same ``worker.run_job`` with plain-JSON RunSpecs, and returns one result per spec.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from kdbench.errors import UserError
from kdbench.progress import ProgressDisplay
from kdbench.spec import RunSpec
from kdbench.train import TrainOptions
from kdbench.worker import run_job


@dataclass
class Result:
    spec: RunSpec
    status: str  # "done" | "failed" | "submitted" (SLURM without waiting)
    error: str | None = None


def options_json(options: TrainOptions) -> dict[str, Any]:
    data = asdict(options)
    data["data_dir"] = str(options.data_dir) if options.data_dir else None
    return data


def teacher_failed(spec: RunSpec, failed_teachers: dict[str, str]) -> Result | None:
    teacher_id = spec.teacher_spec().id
    if teacher_id in failed_teachers:
        return Result(spec, "failed", f"its teacher failed: {failed_teachers[teacher_id]}")
    return None


def usable_cores() -> int:
    """CPU cores this process may use (the affinity mask, e.g. a SLURM allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def finish_detail(outcome: dict[str, Any]) -> str:
    if outcome.get("skipped"):
        return "found stored (trained by another launch)"
    return outcome.get("error") or ""


class Executor(Protocol):
    def run(self, teachers: list[RunSpec], students: list[RunSpec], results: Path,
            options: TrainOptions) -> list[Result]: ...


class InProcessExecutor:
    """Runs every spec in this process, in order. For tests and debugging."""

    def __init__(self, display: ProgressDisplay | None = None) -> None:
        self.display = display

    def run(self, teachers: list[RunSpec], students: list[RunSpec], results: Path,
            options: TrainOptions) -> list[Result]:
        outcomes: list[Result] = []
        failed_teachers: dict[str, str] = {}
        for spec in teachers + students:
            blocked = teacher_failed(spec, failed_teachers)
            if blocked:
                outcomes.append(blocked)
                continue
            label = spec.label()
            if self.display:
                self.display.start(label)
            on_progress = (lambda event, label=label: self.display.event(label, event)) if self.display else None
            outcome = run_job(spec.to_json(), str(results), options_json(options), on_progress)
            if outcome["status"] != "done" and spec in teachers:
                failed_teachers[spec.id] = outcome["error"]
            if self.display:
                self.display.finish(label, outcome["status"], finish_detail(outcome))
            outcomes.append(Result(spec, outcome["status"], outcome.get("error")))
        return outcomes


def _subprocess_job(spec_json: dict, results: str, options: dict, events) -> dict:
    label = RunSpec.from_json(spec_json).label()
    return run_job(spec_json, results, options, lambda event: events.put((label, event)))


class LocalExecutor:
    """Subprocesses on this machine, ``jobs`` runs at a time.

    A fresh process per run (spawn, one task per child): a crash, a leak or a changed global
    (threads, cuDNN flags) in one run cannot touch another, as on a cluster."""

    def __init__(self, jobs: int = 1, display: ProgressDisplay | None = None) -> None:
        self.jobs = max(1, jobs)
        self.display = display

    def run(self, teachers: list[RunSpec], students: list[RunSpec], results: Path,
            options: TrainOptions) -> list[Result]:
        context = multiprocessing.get_context("spawn")
        manager = context.Manager()
        events = manager.Queue()
        outcomes: list[Result] = []
        failed_teachers: dict[str, str] = {}
        try:
            with ProcessPoolExecutor(self.jobs, mp_context=context, max_tasks_per_child=1) as pool:
                for phase in (teachers, students):
                    pending: dict[Future, RunSpec] = {}
                    phase_options = self._split_threads(options, len(phase))
                    for spec in phase:
                        blocked = teacher_failed(spec, failed_teachers)
                        if blocked:
                            outcomes.append(blocked)
                            continue
                        pending[pool.submit(_subprocess_job, spec.to_json(), str(results),
                                            options_json(phase_options), events)] = spec
                    outcomes += self._collect(pending, events, failed_teachers, phase is teachers)
        finally:
            manager.shutdown()
        return outcomes

    def _split_threads(self, options: TrainOptions, runs: int) -> TrainOptions:
        """On the CPU, give each of the runs in flight an equal share of the cores: small
        networks scale poorly across threads, so N runs × (cores / N) threads keep every core
        busy with less synchronisation than one run on all of them."""
        if options.threads is not None or options.device not in (None, "cpu"):
            return options
        import torch

        if torch.cuda.is_available() and options.device is None:
            return options
        in_flight = max(1, min(self.jobs, runs))
        return TrainOptions(**{**asdict(options), "threads": max(1, usable_cores() // in_flight)})

    def _collect(self, pending: dict[Future, RunSpec], events, failed_teachers: dict[str, str],
                 are_teachers: bool) -> list[Result]:
        outcomes = []
        started: set[str] = set()
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            self._drain(events, started)
            for future in done:
                spec = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:  # the process died (killed, out of memory, segfault)
                    outcome = {"status": "failed", "error": f"worker process died: {type(error).__name__}: {error}"}
                if outcome["status"] != "done" and are_teachers:
                    failed_teachers[spec.id] = outcome["error"]
                if self.display:
                    self.display.finish(spec.label(), outcome["status"], finish_detail(outcome))
                outcomes.append(Result(spec, outcome["status"], outcome.get("error")))
        self._drain(events, started)
        return outcomes

    def _drain(self, events, started: set[str]) -> None:
        while True:
            try:
                label, event = events.get_nowait()
            except Exception:  # queue.Empty through the manager proxy
                return
            if self.display:
                if label not in started:
                    started.add(label)
                    self.display.start(label)
                self.display.event(label, event)


EXECUTORS = ("local", "inprocess", "slurm")


def make_executor(name: str, jobs: int = 1, display: ProgressDisplay | None = None,
                  preset: str = "default", preset_overrides: list[str] | None = None,
                  wait: bool = True, snapshot: bool = False) -> Executor:
    if name == "inprocess":
        return InProcessExecutor(display)
    if name == "local":
        return LocalExecutor(jobs, display)
    if name == "slurm":
        try:
            from kdbench.slurm import make_slurm_executor
        except ModuleNotFoundError as error:
            if error.name != "submitit":
                raise
            raise UserError("--executor slurm needs submitit, which is not installed here "
                            "(pip install submitit)") from None
        return make_slurm_executor(preset, preset_overrides, display, wait, snapshot)
    raise ValueError(name)


# What kdbench.slurm holds used to live here. Jobs queued by older versions name
# kdbench.launch.SlurmTask in their pickled call, and old code imports these names from here:
# both still find them, and submitit is imported only when one is asked for.
_MOVED_TO_SLURM = frozenset({
    "POLL_S", "RESULT_GRACE_S", "SACCT_PATIENCE_S", "QUEUED_STATES", "RUNNING_STATES", "GONE",
    "SlurmTask", "GroupRunsFailed", "log_epoch", "note_restarts", "slurm_dir", "SlurmSubmission",
    "write_submission", "read_submissions", "slurm_states", "queue_states", "phase_of",
    "SlurmJobDied", "log_tail", "store_slurm_failure", "ended", "stale", "SlurmExecutor",
    "cancel", "source_root",
})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_SLURM:
        from kdbench import slurm

        return getattr(slurm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
