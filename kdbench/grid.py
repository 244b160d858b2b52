"""A grid: settings × methods × variants × seeds expanded into RunSpecs, and what the store has
of it. A method's variants are the cartesian product of its swept fields (kdbench/sweep.py);
without a sweep each method has one."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from kdbench.spec import FP32, STUDENT, TEACHER, RunSpec, record_precision
from kdbench.staleness import (CodeVersion, distilled_from_other_teacher, is_stale,
                                other_teacher_summary, short, stale_summary, teacher_weights_of)
from kdbench.store import CorruptRecord, Store, sha256_file
from kdbench.sweep import Sweep

BASELINE = "vanilla"  # the "Student" row every table needs


@dataclass(frozen=True)
class Grid:
    settings: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    sweep: Sweep = field(default_factory=Sweep)  # the config and recipe fields the user set
    teacher_seed: int = 0
    teacher_checkpoint: str | None = None  # sha256 of a registered user checkpoint
    precision: str = FP32
    held_out: float | None = None  # the students' validation split (kdbench/validation.py)
    # Per setting name, what its specs hold besides the name (kdbench.settings.Setting.spec_fields:
    # its content hash, and a user's setting's content); none for an unchanged built-in.
    setting_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The processes each student run trains across (--gpus-per-run; kdbench/distributed.py)
    # and whether their BatchNorms are synchronised (--sync-bn).
    processes: int = 1
    sync_bn: bool = False

    def students(self) -> list[RunSpec]:
        return [
            RunSpec(setting, method, seed, STUDENT, dict(variant.config), dict(variant.overrides),
                    self.teacher_seed, self.teacher_checkpoint, self.precision, self.held_out,
                    **self.setting_fields.get(setting, {}), processes=self.processes,
                    sync_bn=self.sync_bn)
            for setting in self.settings for method in self.methods
            for variant in self.sweep.variants(method) for seed in self.seeds
        ]

    def variant_count(self) -> int:
        """Variants of all methods together (= len(methods) without a sweep)."""
        return sum(self.sweep.count(method) for method in self.methods)

    def teachers(self) -> list[RunSpec]:
        return list({spec.id: spec for spec in map(RunSpec.teacher_spec, self.students())}.values())


def with_baseline(methods: list[str]) -> list[str]:
    """Every table compares against the student alone: run it too, first."""
    return [BASELINE] + [method for method in methods if method != BASELINE]


@dataclass
class RunState:
    spec: RunSpec
    state: str  # "done" | "failed" | "running" | "missing"
    error: str | None = None
    record: dict[str, Any] | None = None


def running_marker(store: Store, run_id: str):
    return store.root / "running" / f"{run_id}.json"


def is_running(store: Store, run_id: str) -> bool:
    """Whether a worker trains the run now: its claim is held (kdbench.claims; on this host,
    and on other nodes where the shared file system carries flock), or a marker written by a
    worker on another host says so (a SLURM node: trusted, as its process cannot be seen from
    here). A marker of this host whose claim is free was left by a killed worker."""
    from kdbench.claims import held_elsewhere

    if held_elsewhere(store, run_id):
        return True
    path = running_marker(store, run_id)
    try:
        host = path.read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return False
    return host != socket.gethostname()


def teacher_weights_problem(record: dict[str, Any], store: Store) -> str | None:
    """Why the weights of a finished teacher record cannot be used, or None when they can:
    the file it names must exist and match the checksum it stored."""
    weights = record.get("teacher_weights")
    if not isinstance(weights, dict) or not {"path", "sha256"} <= weights.keys():
        return "its record names no weights file"
    path = store.root / weights["path"]
    if not path.is_file():
        return f"its weights file {path} is missing"
    if sha256_file(path) != weights["sha256"]:
        return f"its weights file {path} does not match the checksum in its record (changed or damaged)"
    return None


def state_of(spec: RunSpec, store: Store) -> RunState:
    try:
        record = store.read(spec.id)
    except CorruptRecord as error:
        return RunState(spec, "missing", str(error))
    if record is not None and record_precision(record) != spec.precision:
        # A bf16 run made on CUDA before precision entered the spec has this fp32 spec's id:
        # it is another experiment, so this one is still to run (and replaces that record).
        return RunState(spec, "missing", f"the stored record was made at {record_precision(record)}")
    if record is not None and record["status"] == "done":
        problem = teacher_weights_problem(record, store) if spec.role == TEACHER else None
        if problem is None:
            return RunState(spec, "done", record=record)
        if is_running(store, spec.id):
            return RunState(spec, "running")
        # Every student of this teacher would fail loading it: train it again (or register and
        # evaluate the user's checkpoint again), as if its record were not there.
        again = ("its checkpoint is registered and evaluated again" if spec.teacher_checkpoint
                 else "it is retrained")
        return RunState(spec, "missing", f"{problem}; {again}")
    if is_running(store, spec.id):
        return RunState(spec, "running")
    if record is not None:
        error = record.get("error") or {}
        return RunState(spec, "failed", f"{error.get('type', '')}: {error.get('message', '')}", record)
    return RunState(spec, "missing")


@dataclass(frozen=True)
class InstalledCode:
    """The code a run of ``method`` would be made by now."""

    version: CodeVersion
    files: dict[str, str]  # label → sha256 (kdbench/sources.py)


def installed_code(method: str) -> InstalledCode:
    from kdbench import registry, sources
    from kdbench.train import TRAINING_VERSION

    files = sources.file_hashes(registry.get(method))
    return InstalledCode(CodeVersion(sources.combined_sha256(files), TRAINING_VERSION), files)


class StoredTeachers:
    """The checksum of each student's stored teacher weights, read once per teacher."""

    def __init__(self, store: Store | None):
        self.store = store
        self.checksums: dict[str, str | None] = {}

    def weights(self, spec: RunSpec) -> str | None:
        """The sha256 of the weights stored for ``spec``'s teacher; None where none is stored
        (not trained yet, failed, unreadable) or there is no store to look in."""
        if self.store is None or spec.role != STUDENT:
            return None
        teacher_id = spec.teacher_spec().id
        if teacher_id not in self.checksums:
            try:
                record = self.store.read(teacher_id)
            except CorruptRecord:
                record = None
            weights = record.get("teacher_weights") if record and record.get("status") == "done" else None
            self.checksums[teacher_id] = weights.get("sha256") if isinstance(weights, dict) else None
        return self.checksums[teacher_id]

    def other(self, state: RunState) -> bool:
        """Whether the done student ``state`` was distilled from other teacher weights than
        its teacher's stored ones (a teacher retrained or replaced after it)."""
        return state.record is not None and distilled_from_other_teacher(state.record, self.weights(state.spec))


def stale_runs(states: list[RunState], store: Store | None = None) -> dict[str, list[RunState]]:
    """The done student runs whose records were made by other code than the installed one,
    by method (in the order the methods first appear), and, given the ``store`` their
    teachers are in, those distilled from other teacher weights than the stored teacher's.
    Teachers themselves are inputs, identified by their weights' checksum, and are not judged
    here."""
    installed: dict[str, InstalledCode] = {}
    teachers = StoredTeachers(store)
    stale: dict[str, list[RunState]] = {}
    for state in states:
        if state.state != "done" or state.spec.role != STUDENT or state.record is None:
            continue
        method = state.spec.method
        if method not in installed:
            installed[method] = installed_code(method)
        if is_stale(state.record, installed[method].version) or teachers.other(state):
            stale.setdefault(method, []).append(state)
    return stale


def stale_lines(stale: dict[str, list[RunState]], store: Store | None = None) -> list[str]:
    """One line per method and reason: ``stale_summary``'s for other code, and
    ``other_teacher_summary``'s per stored teacher for other teacher weights."""
    teachers = StoredTeachers(store)
    lines = []
    for method, states in stale.items():
        code = installed_code(method)
        by_code = [state.record for state in states if is_stale(state.record, code.version)]
        if by_code:
            lines.append(stale_summary(method, by_code, code.version, code.files))
        by_teacher: dict[str, list[dict[str, Any]]] = {}
        for state in states:
            if teachers.other(state):
                by_teacher.setdefault(teachers.weights(state.spec), []).append(state.record)
        lines += [other_teacher_summary(method, records, stored) for stored, records in by_teacher.items()]
    return lines


def retrained_teacher_notes(teacher_states: list[RunState], student_states: list[RunState],
                            store: Store) -> list[str]:
    """A teacher trained again although its record is stored (its weights file went missing or
    changed) may end in other weights than its stored students distilled: one line per such
    teacher with students, saying how many and what happens next. Their comparison is made
    only once the new weights exist, by the next `run` (stale) and by `table` (refused)."""
    again = {state.spec.id: state for state in teacher_states if state.state == "missing" and state.error}
    teachers = StoredTeachers(store)
    students: dict[str, list[RunState]] = {}
    for state in student_states:
        if state.state == "done" and state.record is not None and teacher_weights_of(state.record):
            teacher_id = state.spec.teacher_spec().id
            if teacher_id in again:
                students.setdefault(teacher_id, []).append(state)
    lines = []
    for teacher_id, of_teacher in students.items():
        count = len(of_teacher)
        lines.append(f"{again[teacher_id].spec.label()} is trained again; {count} stored student"
                     f"{'s' if count != 1 else ''} distilled its earlier weights (sha256 "
                     f"{short(teachers.weights(of_teacher[0].spec))}): if the new weights differ, "
                     "the next `kdbench run` counts them as stale and `kdbench table` refuses "
                     "their column")
    return lines
