"""Progress on the terminal, counted in epochs: the grid's (teachers and pre-training stages
included), each run's in flight, the time so far and an estimate of the time left from measured
epoch times.

Workers report small events (kdbench.train, forwarded by the launcher): ``start`` (the run's
schedule of stages and epochs, and how many its checkpoint had done: a resumed run), ``step``,
``epoch`` (its seconds, loss and test top-1) and ``waiting``; the launcher says when a run
starts and finishes (with its top-1). On a terminal the block is redrawn in place and a ticker
thread moves the clock every second; in a log (CI, SLURM, a pipe) there are no carriage
returns or cursor moves: one line per finished epoch, per finished run and per resumed run.

The time left is simulated from epoch times measured in this grid, or in the records the
results directory already holds (the start estimate uses those alone, and says when there are
none): the runs in queue order on ``jobs`` slots, each student after its teacher. Runs that
train together (kdbench.launch.student_groups) take one slot for the sum of their shares of an
epoch: a grouped run's measured epoch is the group's, so each member's share is that time
divided by the group's size (from the record's provenance, or from the grid's groups live).

Executors that see runs only from outside (SLURM: no epoch events come back from the nodes)
report with ``queue`` which runs are running and how many wait; the bar then counts done,
running, pending and failed runs, and a log gets one line whenever those counts change."""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, TextIO

from kdbench.spec import TEACHER, RunSpec

MAIN_STAGE = "main"  # kdbench.train's name of the main stage (train.py imports torch; this does not)
TICK_S = 1.0  # the clock on a terminal moves every second


def _stage_kind(stage: str) -> str:
    return MAIN_STAGE if stage == MAIN_STAGE else "pretrain"


def _time_keys(spec: RunSpec, stage: str) -> list[tuple]:
    """What an epoch's time is looked up by, most specific first: this method's stage at this
    precision, then any run of this role and stage kind, then any run of this role, then any
    run (all in the run's setting: its dataset, networks and batch size). Past the role's keys
    the time is a stand-in (a student's epoch guessed from its teacher's)."""
    role = spec.role
    method = "" if role == TEACHER else spec.method
    return [(spec.setting, role, method, spec.precision, stage),
            (spec.setting, role, spec.precision, _stage_kind(stage)),
            (spec.setting, role),
            (spec.setting,)]


EXACT_KEYS = 3  # the first keys of _time_keys that measure the run's own role


def _schedule_key(spec: RunSpec) -> tuple:
    """Runs that share a schedule of stages: everything of the spec but its seeds."""
    return (spec.setting, spec.role, spec.method, repr(sorted(spec.config.items())),
            repr(sorted(spec.overrides.items())))


class EpochTimes:
    """Measured seconds per epoch, by what determines them (``_time_keys``)."""

    def __init__(self) -> None:
        self._sums: dict[tuple, list[float]] = {}
        self.measured = 0  # epochs measured

    def add(self, spec: RunSpec, stage: str, seconds: float, group_size: int = 1) -> None:
        """An epoch of ``spec`` that took ``seconds`` in a group of ``group_size`` runs
        training together: the run's share of it is seconds / group_size."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            return
        self.measured += 1
        for key in _time_keys(spec, stage):
            total = self._sums.setdefault(key, [0.0, 0])
            total[0] += seconds / max(1, group_size)
            total[1] += 1

    def per_epoch(self, spec: RunSpec, stage: str) -> float | None:
        return self.lookup(spec, stage)[0]

    def lookup(self, spec: RunSpec, stage: str) -> tuple[float | None, bool]:
        """(seconds per epoch or None, whether measured on runs of the spec's role)."""
        for rank, key in enumerate(_time_keys(spec, stage)):
            if key in self._sums:
                seconds, count = self._sums[key]
                return seconds / count, rank < EXACT_KEYS
        return None, False


def spec_of(record: Mapping[str, Any]) -> RunSpec | None:
    try:
        return RunSpec.from_json(dict(record["spec"]))
    except (KeyError, TypeError, ValueError):
        return None


def measured_in(records: Iterable[Mapping[str, Any]], device: str | None = None
                ) -> tuple[EpochTimes, dict[tuple, list[tuple[str, int]]]]:
    """Epoch times from the histories of stored records (those made on ``device``, "cpu" or
    "cuda", when given: a GPU's epochs say nothing of a CPU's), and the schedules (pre-training
    stages and their epochs, then the main stage) of the runs they made."""
    times = EpochTimes()
    schedules: dict[tuple, list[tuple[str, int]]] = {}
    for record in records:
        spec = spec_of(record)
        if spec is None or record.get("status") != "done":
            continue
        history = [entry for entry in record.get("history") or [] if isinstance(entry, Mapping)]
        stages = [str(entry.get("stage", MAIN_STAGE)) for entry in history]
        provenance = record.get("provenance") or {}
        made_on = str(provenance.get("device", ""))
        if device is None or made_on.startswith(device):
            size = trained_with(provenance)
            for stage, entry in zip(stages, history):
                if "seconds" in entry:
                    times.add(spec, stage, entry["seconds"], size)
        if stages:
            order = list(dict.fromkeys(stages))
            schedules[_schedule_key(spec)] = [(stage, stages.count(stage)) for stage in order]
    return times, schedules


def trained_with(provenance: Mapping[str, Any]) -> int:
    """How many runs the record's run trained beside in lockstep, itself included (its
    provenance's ``group``; 1 for a run trained alone or recorded before grouping)."""
    group = provenance.get("group")
    size = group.get("size") if isinstance(group, Mapping) else None
    return size if isinstance(size, int) and size > 0 else 1


def main_epochs(spec: RunSpec) -> int:
    """The epochs of the run's main stage, from its setting's recipe and the run's overrides."""
    from kdbench import settings

    setting = settings.for_spec(spec)  # a user's setting file travels in the spec
    recipe = setting.teacher_recipe if spec.role == TEACHER else setting.recipe
    return recipe.with_overrides(spec.overrides).epochs


def planned_schedule(spec: RunSpec, schedules: Mapping[tuple, list[tuple[str, int]]]
                     ) -> tuple[list[tuple[str, int]], bool]:
    """The stages and epochs a run will train, and whether its pre-training stages are known.
    They are known from a stored run of the same method, config and setting, or once the run
    itself starts (its ``start`` event): a method declares them only when built on the networks'
    shapes. A teacher given as a checkpoint trains nothing."""
    if spec.role == TEACHER and spec.teacher_checkpoint:
        return [], True
    stored = schedules.get(_schedule_key(spec))
    if stored is not None:
        return list(stored), True
    return [(MAIN_STAGE, main_epochs(spec))], spec.role == TEACHER or not declares_stages(spec.method)


def declares_stages(method: str) -> bool:
    """Whether the method may have pre-training stages: it overrides Method.pretrain_stages
    (a composition, when one of its parts does)."""
    from kdbench import registry
    from kdbench.errors import UserError
    from kdbench.method import Method

    try:
        method_class = registry.get(method)
    except UserError:
        return True  # a broken plugin: its run fails, and says why
    return method_class.pretrain_stages is not Method.pretrain_stages


@dataclass
class RunProgress:
    """One run of the grid as the display follows it."""

    spec: RunSpec | None
    schedule: list[tuple[str, int]]
    known: bool  # the schedule includes its pre-training stages
    done: int = 0  # epochs finished, a resumed run's checkpointed ones included
    state: str = "pending"  # pending | running | finished
    epoch_started: float | None = None  # time.monotonic() when its current epoch began
    top1: float | None = None  # its last test top-1
    group: int | None = None  # the index of the group it trains in (None: alone)
    group_size: int = 1  # the runs of that group

    @property
    def planned(self) -> int:
        return sum(epochs for _, epochs in self.schedule)

    def remaining(self) -> list[tuple[str, int]]:
        """(stage, epochs left) after its ``done`` epochs."""
        left, skip = [], self.done
        for stage, epochs in self.schedule:
            taken = min(skip, epochs)
            skip -= taken
            if epochs - taken:
                left.append((stage, epochs - taken))
        return left


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def duration(seconds: float) -> str:
    """A time left, as rounded as its precision deserves."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def start_estimate(specs: Sequence[RunSpec], records: Iterable[Mapping[str, Any]], jobs: int,
                   device: str | None = None,
                   groups: Sequence[Sequence[RunSpec]] = ()) -> str | None:
    """The line printed before a grid starts: its time from epoch times measured in the
    results directory (on ``device``), or None when no stored run measured the kinds of epoch
    it trains (the caller then gives a rough estimate and says so). ``groups``: the runs that
    train together (kdbench.launch.student_groups); a run in none trains alone."""
    times, schedules = measured_in(records, device)
    runs = [RunProgress(spec, *planned_schedule(spec, schedules)) for spec in specs]
    join_groups(runs, groups)
    stand_ins: list[RunSpec] = []
    total = simulate(runs, times, jobs, time.monotonic(), stand_ins)
    if total is None or not runs:
        return None
    unknown = sum(not run.known for run in runs)
    extra = ("; students' epochs guessed from the teacher's" if stand_ins else "") + (
        f"; more if some of the {unknown} runs not measured before have pre-training stages"
        if unknown else "")
    epochs = sum(run.planned for run in runs)
    return (f"kdbench: about {duration(total)} of training for this grid ({epochs} epochs, up to {jobs} run"
            f"{'s' if jobs != 1 else ''} at a time; from {times.measured} epoch times measured in "
            f"this results directory){extra}")


def simulate(runs: Sequence[RunProgress], times: EpochTimes, jobs: int, now: float,
             stand_ins: list[RunSpec] | None = None) -> float | None:
    """Seconds until every unfinished run is done: the running groups go on, the pending ones
    start in order on the first free of ``jobs`` slots, each student's after its teacher. A
    group (runs with one ``group`` index; a run without one is a group of its own) holds its
    slot for the sum of its runs' epoch shares. None when some run's epochs have no measured
    time to go by; the runs timed by a stand-in (a student by its teacher's epochs) are added
    to ``stand_ins``."""
    def left(run: RunProgress) -> float | None:
        seconds = 0.0
        for stage, epochs in run.remaining():
            per_epoch, exact = times.lookup(run.spec, stage) if run.spec is not None else (None, False)
            if per_epoch is None:
                return None
            if not exact and stand_ins is not None:
                stand_ins.append(run.spec)
            seconds += epochs * per_epoch
        return seconds

    def under_way(members: list[RunProgress]) -> float:
        """The part of the group's current epoch already trained: since its latest epoch
        start, at most one epoch of its running runs (an epoch that runs longer than measured
        counts as just finishing)."""
        running = [run for run in members if run.state == "running" and run.epoch_started is not None
                   and run.remaining()]
        if not running:
            return 0.0
        epoch = sum(times.per_epoch(run.spec, run.remaining()[0][0]) or 0.0
                    for run in running if run.spec is not None)
        return min(now - max(run.epoch_started for run in running), epoch)

    groups: dict[Any, list[RunProgress]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(("alone", index) if run.group is None else run.group, []).append(run)
    slots: list[float] = []
    teacher_done: dict[str, float] = {}
    pending: list[tuple[list[RunProgress], float]] = []
    for members in groups.values():
        unfinished = [run for run in members if run.state != "finished"]
        if not unfinished:
            continue
        shares = [left(run) for run in unfinished]
        if any(share is None for share in shares):
            return None
        seconds = sum(shares)
        if any(run.state == "running" for run in unfinished):
            seconds = max(0.0, seconds - under_way(unfinished))
            slots.append(seconds)
            for run in unfinished:
                if run.spec is not None and run.spec.role == TEACHER:
                    teacher_done[run.spec.id] = seconds
        else:
            pending.append((unfinished, seconds))
    slots += [0.0] * max(0, jobs - len(slots))
    for members, seconds in pending:
        slot = min(range(len(slots)), key=slots.__getitem__)
        begins = slots[slot]
        for run in members:
            if run.spec is not None and run.spec.role != TEACHER:
                begins = max(begins, teacher_done.get(run.spec.teacher_spec().id, 0.0))
        slots[slot] = begins + seconds
        for run in members:
            if run.spec is not None and run.spec.role == TEACHER:
                teacher_done[run.spec.id] = slots[slot]
    return max(slots, default=0.0)


def join_groups(runs: Sequence[RunProgress], groups: Sequence[Sequence[RunSpec]]) -> None:
    """Mark each run with the group it trains in and that group's size."""
    where = {spec.id: (index, len(group)) for index, group in enumerate(groups) for spec in group}
    for run in runs:
        if run.spec is not None and run.spec.id in where:
            run.group, run.group_size = where[run.spec.id]


class ProgressDisplay:
    def __init__(self, runs: int | Sequence[RunSpec], stream: TextIO | None = None,
                 live: bool | None = None, jobs: int = 1,
                 records: Iterable[Mapping[str, Any]] = (), device: str | None = None,
                 groups: Sequence[Sequence[RunSpec]] = ()) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.jobs = max(1, jobs)
        self.times, schedules = measured_in(records, device)
        specs: list[RunSpec | None] = [None] * runs if isinstance(runs, int) else list(runs)
        self.runs = [RunProgress(spec, *planned_schedule(spec, schedules)) if spec is not None
                     else RunProgress(None, [], True) for spec in specs]
        join_groups(self.runs, groups)
        self.by_epochs = not isinstance(runs, int)
        self.total = len(self.runs)
        self.finished = 0
        self.failed = 0
        self.active: dict[str, str] = {}  # label -> its line (queue mode: what SLURM says)
        self.started = time.monotonic()
        self._drawn = 0
        self.pending: int | None = None  # runs waiting in a queue; None: not queue-based
        self._last_counts: tuple[int, ...] = ()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.live:
            self._ticker = threading.Thread(target=self._tick, name="kdbench progress clock", daemon=True)
            self._ticker.start()

    # ---- what the launcher reports ------------------------------------------------------
    def _run(self, label: str, states: tuple[str, ...]) -> RunProgress | None:
        """The first run with this label in one of ``states`` (labels repeat for variants)."""
        for run in self.runs:
            if run.spec is not None and run.spec.label() == label and run.state in states:
                return run
        return None

    def start(self, run: str) -> None:
        with self._lock:
            progress = self._run(run, ("pending",))
            if progress is not None:
                progress.state = "running"
                progress.epoch_started = time.monotonic()
            self.active[run] = "starting"
            self._redraw()

    def event(self, run: str, event: dict[str, Any]) -> None:
        with self._lock:
            self._event(run, event)
            self._redraw()

    def _event(self, label: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        run = self._run(label, ("running",))
        stage = "" if event.get("stage") in (None, MAIN_STAGE) else f"[{event['stage']}] "
        if kind == "start":  # kdbench.train: the run's real schedule, and its checkpoint's epochs
            done = int(event.get("done", 0))
            if run is not None and run.spec is not None:
                run.schedule = [(str(name), int(epochs)) for name, epochs in event.get("schedule", [])]
                run.done = done
                run.epoch_started = time.monotonic()
                for other in self.runs:  # its other seeds train the same stages
                    if other.spec is not None and _schedule_key(other.spec) == _schedule_key(run.spec):
                        if other.state == "pending" or other is run:
                            other.schedule, other.known = list(run.schedule), True
            if done:
                self.active[label] = f"resuming at epoch {done + 1} of {event.get('epochs')}"
                self._print(f"  resuming {label} from its checkpoint: epoch {done} of "
                            f"{event.get('epochs')} done")
            return
        if kind == "step":
            self.active[label] = (f"{stage}epoch {event['epoch']}/{event['epochs']} "
                                  f"step {event['step']}/{event['steps']}")
        elif kind == "waiting":  # kdbench.worker: the run's claim is held by another launch
            self.active[label] = "waiting: another launch is training it"
            if not self.live:
                self._print(f"  {label}: waiting: another launch is training it")
        elif kind == "epoch":
            if run is not None:
                run.done += 1
                run.epoch_started = time.monotonic()
                if run.spec is not None:
                    self.times.add(run.spec, str(event.get("stage", MAIN_STAGE)), event.get("seconds"),
                                   run.group_size)
                if "top1" in event:
                    run.top1 = event["top1"]
            accuracy = f" test top-1 {event['top1']:.2f}%" if "top1" in event else ""
            seconds = f" ({event['seconds']:.1f} s)" if isinstance(event.get("seconds"), (int, float)) else ""
            line = f"{stage}epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.4f}{accuracy}"
            self.active[label] = line
            if not self.live:
                self._print(f"  {label}: {line}{seconds} | {self._summary()}")

    def finish(self, run: str, status: str, detail: str = "", top1: float | None = None) -> None:
        with self._lock:
            progress = self._run(run, ("running",)) or self._run(run, ("pending",))
            if progress is not None:
                progress.state = "finished"
                # What was not trained (a failure, a run found stored) leaves the grid's epochs.
                progress.schedule = [(MAIN_STAGE, progress.done)]
                top1 = top1 if top1 is not None else progress.top1
            self.active.pop(run, None)
            self.finished += 1
            if status != "done":
                self.failed += 1
            accuracy = f", test top-1 {top1:.2f}%" if status == "done" and top1 is not None else ""
            # A queue's runs (SLURM) report no epochs here: their log lines count runs.
            summary = f" | {self._summary()}" if self.by_epochs and self.pending is None and not self.live else ""
            self._print(f"[{self.finished}/{self.total}] {run}: {status}{accuracy}"
                        f"{(' - ' + detail) if detail else ''}{summary}")

    def queue(self, running: dict[str, str], pending: int) -> None:
        """The runs running now (label -> what to show) and how many wait in the queue."""
        with self._lock:
            self.active = dict(running)
            self.pending = pending
            counts = (self.finished, self.failed, len(running), pending)
            if not self.live and counts != self._last_counts:
                self._print(f"  {self._counts()}")
            self._last_counts = counts
            self._redraw()

    # ---- what is shown ------------------------------------------------------------------
    def epochs(self) -> tuple[int, int, bool]:
        """(epochs done, epochs planned, whether every planned run's stages are known)."""
        done = sum(run.done for run in self.runs)
        planned = sum(max(run.planned, run.done) for run in self.runs)
        return done, planned, all(run.known for run in self.runs)

    def seconds_left(self, stand_ins: list[RunSpec] | None = None) -> float | None:
        return simulate(self.runs, self.times, self.jobs, time.monotonic(), stand_ins)

    def _summary(self) -> str:
        """The grid in one line: epochs, runs, time so far and left."""
        done, planned, known = self.epochs()
        elapsed = time.monotonic() - self.started
        stand_ins: list[RunSpec] = []
        left = self.seconds_left(stand_ins)
        if self.finished == self.total:
            eta = ""
        elif left is None:
            eta = ", time left: after the first epochs are measured"
        else:
            guessed = " (students' epochs guessed from the teacher's)" if stand_ins else ""
            eta = (f", {'roughly' if stand_ins else 'about'} {duration(left)} left{guessed}"
                   + ("" if known else " + pre-training stages"))
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{done}/{planned}{'' if known else '+'} epochs, {self.finished}/{self.total} runs"
                f"{failed}, {clock(elapsed)} elapsed{eta}")

    def _counts(self) -> str:
        return (f"{self.finished - self.failed} done, {len(self.active)} running, "
                f"{self.pending} pending, {self.failed} failed")

    def _bar(self) -> str:
        width = 30
        elapsed = time.monotonic() - self.started
        if self.pending is not None or not self.by_epochs:
            filled = int(width * self.finished / max(self.total, 1))
            bar = f"[{'#' * filled}{'.' * (width - filled)}]"
            if self.pending is not None:
                return f"{bar} {self.finished}/{self.total} runs ended: {self._counts()}, {clock(elapsed)}"
            failed = f", {self.failed} failed" if self.failed else ""
            return f"{bar} {self.finished}/{self.total} runs{failed}, {clock(elapsed)}"
        done, planned, _ = self.epochs()
        filled = int(width * done / max(planned, 1))
        return f"[{'#' * filled}{'.' * (width - filled)}] {self._summary()}"

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

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if self._drawn:
                    self._redraw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._clear()
            if self.finished or self.active or self.pending is not None:  # else nothing to sum up
                self.stream.write(self._bar() + "\n")
            self.stream.flush()
