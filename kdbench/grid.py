"""A grid: settings × methods × seeds expanded into RunSpecs, and what the store has of it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from kdbench.spec import FP32, STUDENT, RunSpec, record_precision
from kdbench.staleness import CodeVersion, is_stale, stale_summary
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


def stale_runs(states: list[RunState]) -> dict[str, list[RunState]]:
    """The done student runs whose records were made by other code than the installed one,
    by method (in the order the methods first appear). Teachers are inputs, identified by
    their weights' checksum, and are not judged here."""
    installed: dict[str, InstalledCode] = {}
    stale: dict[str, list[RunState]] = {}
    for state in states:
        if state.state != "done" or state.spec.role != STUDENT or state.record is None:
            continue
        method = state.spec.method
        if method not in installed:
            installed[method] = installed_code(method)
        if is_stale(state.record, installed[method].version):
            stale.setdefault(method, []).append(state)
    return stale


def stale_lines(stale: dict[str, list[RunState]]) -> list[str]:
    """One line per method, as ``stale_summary`` words it."""
    lines = []
    for method, states in stale.items():
        code = installed_code(method)
        lines.append(stale_summary(method, [state.record for state in states], code.version, code.files))
    return lines
