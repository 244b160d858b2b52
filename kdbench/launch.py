"""Executors: where runs happen.

- ``inprocess``: one after the other in this process (tests; no start-up cost);
- ``local`` (the default): subprocesses on this machine, ``jobs`` at a time, CPU threads split
  between them, supervised (a dead worker fails its own run only; Ctrl-C and SIGTERM stop them
  all);
- ``slurm``: one job per teacher, then the students as one job array per teacher
  (``kdbench.slurm``, imported only when chosen: submitit is needed for SLURM alone).

Every executor runs teachers first and a student only after its teacher succeeded, calls the
same ``worker.run_job`` with plain-JSON RunSpecs, and returns one result per spec.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kdbench.errors import UserError
from kdbench.progress import ProgressDisplay
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions
from kdbench.worker import run_group_job, run_job


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
    """Runs every spec in this process, in order. For tests and debugging; not a run across
    several processes (kdbench.plan says so before anything runs)."""

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
                self.display.finish(label, outcome["status"], finish_detail(outcome), outcome.get("top1"))
            outcomes.append(Result(spec, outcome["status"], outcome.get("error")))
        return outcomes


def threads_per_run(jobs: int, cores: int | None = None) -> int:
    """CPU threads of each run of a local grid: the cores shared by the runs the command lets go
    at once (``--jobs``). Decided by the command alone, never by how many runs remain to train:
    on the CPU a run's numbers depend on its thread count (the order of its floating-point sums),
    so a run retried alone must get the threads it had among the others. A resumed run keeps
    the count of its checkpoint (kdbench.train)."""
    return max(1, (cores or usable_cores()) // max(1, jobs))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, say
        return f"signal {number}"


def death_cause(exitcode: int | None) -> str:
    """What a worker's exit code says about a death without a result."""
    if exitcode is not None and exitcode < 0:
        why = (" (what the out-of-memory killer sends: see `dmesg`, or give the run more memory)"
               if -exitcode == signal.SIGKILL else "")
        return f"worker process killed by {signal_name(-exitcode)}{why}"
    if exitcode is not None and 128 < exitcode < 128 + signal.NSIG:
        # A worker stopped by SIGTERM from elsewhere exits 128 + 15 (kdbench.interrupt).
        return f"worker process stopped by {signal_name(exitcode - 128)}"
    return f"worker process exited with code {exitcode} without a result"


def _worker_main(spec_jsons: list[dict], results: str, options: dict, sender, launcher_pid: int) -> None:
    """A worker process: one group of runs (kdbench.worker.run_group_job; a teacher, or a run
    with --no-group, is a group of one), each run's progress and outcome sent back through
    ``sender`` as ("event", run id, event) and ("outcome", outcome)."""
    from kdbench.console import ascii_where_needed
    from kdbench.interrupt import Interrupted, become_worker

    try:
        become_worker(launcher_pid)
        ascii_where_needed()
        run_group_job(spec_jsons, results, options,
                      lambda run_id, event: sender.send(("event", run_id, event)),
                      lambda outcome: sender.send(("outcome", outcome)))
    except Interrupted as interrupt:  # stopped by the launcher, or the launcher died
        sys.exit(interrupt.exit_code)


def student_groups(students: list[RunSpec], group: bool = True,
                   group_size: int | None = None) -> list[list[RunSpec]]:
    """The students as the groups that train together (kdbench.train.group_key: one setting,
    seed, precision, recipe and teacher), in the order their first runs come; with
    ``group=False`` one run per group (``--no-group``). ``group_size`` (``--group-size``) caps
    a group: the runs of a larger one go in consecutive chunks of at most that many. Runs of a
    group finish together (lockstep), so smaller groups store their records sooner, which is
    what a machine lent for a few hours at a time needs; each run's record is the same. The
    chunks go chunk by chunk across the seeds (the first methods at every seed, then the next
    ones): a grid stopped part-way leaves whole table rows (every seed of its first methods),
    not one seed of every method."""
    from kdbench.train import group_key

    if not group:
        return [[spec] for spec in students]
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in students:
        # A run across several processes trains alone (kdbench/ranks.py).
        key = group_key(spec) if spec.processes == 1 else ("alone", spec.id)
        groups.setdefault(key, []).append(spec)
    size = group_size or max((len(members) for members in groups.values()), default=1)
    longest = max((len(members) for members in groups.values()), default=0)
    return [members[start:start + size] for start in range(0, longest, size)
            for members in groups.values() if start < len(members)]


@dataclass
class Worker:
    specs: list[RunSpec]  # the runs of its group
    process: Any  # multiprocessing's SpawnProcess
    receiver: Any  # multiprocessing.connection.Connection
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)  # by run id

    @property
    def label(self) -> str:
        first = self.specs[0].label()
        return first if len(self.specs) == 1 else f"{first} and {len(self.specs) - 1} more"


class LocalExecutor:
    """Subprocesses on this machine, ``jobs`` at a time, supervised from here.

    A fresh process per group of runs (spawn; kdbench.train.train_group: the runs of one
    setting and seed train in lockstep with one teacher forward per batch; ``group=False``,
    ``--no-group``: one run per process): a crash, a leak or a changed global (threads, cuDNN
    flags) in one process cannot touch another, as on a cluster. Each worker sends its runs'
    progress and outcomes through its own pipe; nothing else is shared (no Manager, no pool), so:

    - a worker that dies without a result (SIGKILL from the out-of-memory killer, a segfault)
      fails its own runs that had not ended, stored with the cause, and the others go on;
    - Ctrl-C or SIGTERM stops every worker within seconds (SIGTERM; SIGKILL after STOP_GRACE_S),
      starts nothing more, and leaves the finished epochs' checkpoints to resume from; a
      worker whose launcher dies, even by SIGKILL, is stopped by the kernel (kdbench.interrupt);
    - a run that another launch trains now (its claim is held, kdbench.claims) is started last,
      and its worker waits for that launch and then finds it stored.
    """

    STOP_GRACE_S = 10.0

    def __init__(self, jobs: int = 1, display: ProgressDisplay | None = None, group: bool = True,
                 group_size: int | None = None) -> None:
        self.jobs = max(1, jobs)
        self.display = display
        self.group = group
        self.group_size = group_size

    def run(self, teachers: list[RunSpec], students: list[RunSpec], results: Path,
            options: TrainOptions) -> list[Result]:
        store = Store(Path(results))
        payload = options_json(self._with_threads(options))
        context = multiprocessing.get_context("spawn")
        queue = [[spec] for spec in teachers] + student_groups(list(students), self.group, self.group_size)
        teacher_ids = {spec.id for spec in teachers}
        teacher_outcomes: dict[str, dict[str, Any]] = {}
        outcomes: list[Result] = []
        workers: list[Worker] = []
        try:
            while queue or workers:
                while len(workers) < self.jobs:
                    group = self._next(queue, teacher_ids, teacher_outcomes, store, outcomes)
                    if group is None:
                        break
                    workers.append(self._start(context, group, results, payload))
                if not workers:
                    if queue:
                        raise RuntimeError("runs that can never start: "
                                           f"{[spec.label() for group in queue for spec in group]}")
                    break
                ready = multiprocessing.connection.wait([worker.receiver for worker in workers], timeout=1.0)
                for worker in [worker for worker in workers if worker.receiver in ready]:
                    if not self._read(worker):
                        continue
                    workers.remove(worker)
                    for spec, outcome in zip(worker.specs, self._end(worker, store)):
                        if spec.id in teacher_ids:
                            teacher_outcomes[spec.id] = outcome
                        outcomes.append(Result(spec, outcome["status"], outcome.get("error")))
        except BaseException:  # Ctrl-C, SIGTERM (kdbench.interrupt), or a bug here
            self._stop(workers)
            raise
        return outcomes

    def _with_threads(self, options: TrainOptions) -> TrainOptions:
        """On the CPU, give each of the runs in flight an equal share of the cores: small
        networks scale poorly across threads, so N runs × (cores / N) threads keep every core
        busy with less synchronisation than one run on all of them."""
        if options.threads is not None or options.device not in (None, "cpu"):
            return options
        import torch

        if torch.cuda.is_available() and options.device is None:
            return options
        return TrainOptions(**{**asdict(options), "threads": threads_per_run(self.jobs)})

    def _next(self, queue: list[list[RunSpec]], teacher_ids: set[str],
              teacher_outcomes: dict[str, dict], store: Store,
              outcomes: list[Result]) -> list[RunSpec] | None:
        """Take the next group to start off the queue, or None when none can start now. The
        runs of a student group share one teacher: they start after it succeeded; when it
        failed, they fail without starting. Groups with a run that another launch trains now
        come last."""
        from kdbench.claims import held_elsewhere

        startable = []
        for group in list(queue):
            teacher_id = group[0].teacher_spec().id
            if group[0].id not in teacher_ids and teacher_id in teacher_ids:
                teacher = teacher_outcomes.get(teacher_id)
                if teacher is None:
                    continue  # its teacher is still queued or training
                if teacher["status"] != "done":
                    queue.remove(group)
                    for spec in group:
                        blocked = Result(spec, "failed", f"its teacher failed: {teacher['error']}")
                        outcomes.append(blocked)
                        if self.display:
                            self.display.finish(spec.label(), "failed", blocked.error)
                    continue
            startable.append(group)
        if not startable:
            return None
        chosen = next((group for group in startable
                       if not any(held_elsewhere(store, spec.id) for spec in group)), startable[0])
        queue.remove(chosen)
        return chosen

    def _start(self, context, group: list[RunSpec], results: Path, payload: dict[str, Any]) -> Worker:
        from kdbench.interrupt import sigint_blocked
        from kdbench.ranks import supervisor_main

        receiver, sender = context.Pipe(duplex=False)
        worker = Worker(group, None, receiver)
        # A run across several processes: a supervisor that starts its ranks (kdbench/ranks.py).
        target = supervisor_main if group[0].processes > 1 else _worker_main
        process = context.Process(target=target, name=f"kdbench {worker.label}",
                                  args=([spec.to_json() for spec in group], str(results), payload,
                                        sender, os.getpid()))
        with sigint_blocked():
            process.start()
        sender.close()  # the worker holds the other copy: EOF on the pipe means it ended
        worker.process = process
        if self.display:
            for spec in group:
                self.display.start(spec.label())
        return worker

    def _read(self, worker: Worker) -> bool:
        """Take in what the worker sent; True once it has ended (its pipe is closed)."""
        labels = {spec.id: spec.label() for spec in worker.specs}
        try:
            while worker.receiver.poll():
                kind, *payload = worker.receiver.recv()
                if kind == "outcome":
                    [outcome] = payload
                    worker.outcomes[outcome["id"]] = outcome
                    if self.display:  # a run of a group is finished as soon as it ends
                        self.display.finish(labels[outcome["id"]], outcome["status"],
                                            finish_detail(outcome), outcome.get("top1"))
                elif self.display:
                    run_id, event = payload
                    self.display.event(labels[run_id], event)
        except (EOFError, OSError):
            return True
        except Exception:  # a message cut off by the worker's death
            return True
        return False

    def _end(self, worker: Worker, store: Store) -> list[dict[str, Any]]:
        """One outcome per run of the worker's group: what it sent, or its death (stored)."""
        from kdbench.worker import record_death

        worker.process.join()
        worker.receiver.close()
        outcomes = []
        for spec in worker.specs:
            outcome = worker.outcomes.get(spec.id)
            if outcome is None:
                outcome = record_death(spec, store, death_cause(worker.process.exitcode))
                if self.display:
                    self.display.finish(spec.label(), outcome["status"], finish_detail(outcome))
            outcomes.append(outcome)
        return outcomes

    def _stop(self, workers: list[Worker]) -> None:
        """SIGTERM to every worker, then SIGKILL to any still there after STOP_GRACE_S; ignoring
        another Ctrl-C meanwhile, which would leave them half-stopped."""
        from kdbench.interrupt import signals_ignored

        with signals_ignored():
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.terminate()
            deadline = time.monotonic() + self.STOP_GRACE_S
            for worker in workers:
                worker.process.join(max(0.0, deadline - time.monotonic()))
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                worker.receiver.close()


EXECUTORS = ("local", "inprocess", "slurm")


def make_executor(name: str, jobs: int = 1, display: ProgressDisplay | None = None,
                  preset: str = "default", preset_overrides: list[str] | None = None,
                  wait: bool = True, snapshot: bool = False, group: bool = True,
                  group_size: int | None = None) -> Executor:
    if name == "inprocess":
        return InProcessExecutor(display)
    if name == "local":
        return LocalExecutor(jobs, display, group, group_size)
    if name == "slurm":
        try:
            from kdbench.slurm import make_slurm_executor
        except ModuleNotFoundError as error:
            if error.name != "submitit":
                raise
            raise UserError("--executor slurm needs submitit, which is not installed here "
                            "(pip install submitit)") from None
        return make_slurm_executor(preset, preset_overrides, display, wait, snapshot, group, group_size)
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
