"""A grid: settings × methods × seeds expanded into RunSpecs, and what the store has of it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from kdbench.spec import FP32, STUDENT, RunSpec, record_precision
from kdbench.store import CorruptRecord, Store

BASELINE = "vanilla"  # the "Student" row every table needs


@dataclass(frozen=True)
class Grid:
    settings: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> field -> value
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher_seed: int = 0
    teacher_checkpoint: str | None = None  # sha256 of a registered user checkpoint
    precision: str = FP32

    def students(self) -> list[RunSpec]:
        return [
            RunSpec(setting, method, seed, STUDENT, dict(self.config.get(method, {})),
                    dict(self.overrides), self.teacher_seed, self.teacher_checkpoint, self.precision)
            for setting in self.settings for method in self.methods for seed in self.seeds
        ]

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
    """A marker written by a live worker. On this host, a dead PID means it was killed."""
    path = running_marker(store, run_id)
    if not path.exists():
        return False
    try:
        host, pid = path.read_text().split()[:2]
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # another machine (a SLURM node): trust the marker
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


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
        return RunState(spec, "done", record=record)
    if is_running(store, spec.id):
        return RunState(spec, "running")
    if record is not None:
        error = record.get("error") or {}
        return RunState(spec, "failed", f"{error.get('type', '')}: {error.get('message', '')}", record)
    return RunState(spec, "missing")
