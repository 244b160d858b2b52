"""RunSpec: what one run is, as plain JSON, and its stable id.

The id is a hash of the spec's canonical JSON, so re-running a command finds the results it
already has, and a changed override never collides with an old result. Jobs (local
subprocesses, SLURM array tasks) carry RunSpecs, never pickled models or classes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

STUDENT = "student"
TEACHER = "teacher"
TEACHER_METHOD = "vanilla"  # a teacher is its architecture trained alone on its recipe
FP32, BF16 = "fp32", "bf16"
PRECISIONS = (FP32, BF16)


@dataclass(frozen=True)
class RunSpec:
    setting: str
    method: str
    seed: int
    role: str = STUDENT
    config: dict[str, Any] = field(default_factory=dict)  # method config fields set by the user
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe fields set by the user
    teacher_seed: int = 0
    # sha256 of a user-given teacher state_dict (--teacher-checkpoint); None: the cached one.
    teacher_checkpoint: str | None = None
    # The networks' forward arithmetic: "bf16" runs them under bf16 autocast (the losses stay
    # fp32). Part of the run's identity, as a bf16 run is another experiment than an fp32 one:
    # they never share a record, a checkpoint or a table cell. fp32 is left out of the JSON, so
    # runs stored before this field existed (all fp32) keep their ids.
    precision: str = FP32
    # The fraction of the training set held out for validation (kdbench/validation.py,
    # ``--select-on val``): the run trains on the rest and is evaluated on both. Part of the
    # run's identity, as it trains on other images; None (no split) is left out of the JSON,
    # so runs without one keep their ids.
    held_out: float | None = None
    # The setting's content hash (kdbench.settings.Setting.sha256), part of the id: editing a
    # setting's file never mixes results. None: a built-in setting with the content it had
    # when settings became files (kdbench/settings/legacy-sha256.json), so runs made before
    # keep their ids.
    setting_sha256: str | None = None
    # The setting itself (Setting.content()) for one read from a user's file, so that the run
    # can happen where the file is not (a SLURM node, a spawned worker). Not part of the id:
    # setting_sha256 is; kdbench.settings.for_spec checks the two agree.
    setting_content: dict[str, Any] | None = None
    # The processes one run trains across (DistributedDataParallel, kdbench/distributed.py):
    # its world size. Part of the run's identity: each process computes its BatchNorm
    # statistics and its batch-relational losses on its 1/W shard of every batch, so W = 2 is
    # another experiment than W = 1. 1 is left out of the JSON, so the runs made before keep
    # their ids; so is ``sync_bn`` when False.
    processes: int = 1
    # SyncBatchNorm across the processes (--sync-bn): batch statistics over the global batch.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.held_out is not None and not (isinstance(self.held_out, float) and 0 < self.held_out < 1):
            raise ValueError(f"held_out must be a fraction in (0, 1) or None, got {self.held_out!r}")
        if not (isinstance(self.processes, int) and self.processes >= 1):
            raise ValueError(f"processes must be a whole number >= 1, got {self.processes!r}")
        if self.sync_bn and self.processes == 1:
            raise ValueError("sync_bn needs processes > 1")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["precision"] == FP32:
            del data["precision"]
        for key in ("held_out", "setting_sha256", "setting_content"):  # left out when None:
            if data[key] is None:                                       # the ids made before stay
                del data[key]
        if data["processes"] == 1:
            del data["processes"]
        if not data["sync_bn"]:
            del data["sync_bn"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSpec":
        return cls(**data)

    @property
    def id(self) -> str:
        identity = {key: value for key, value in self.to_json().items() if key != "setting_content"}
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def teacher_spec(self) -> "RunSpec":
        """The teacher run this student run distils from. Teachers are trained in fp32 at
        every precision: one teacher serves a bf16 and an fp32 grid, so the two differ only in
        the students' arithmetic. Teachers train in one process at every world size too: one
        teacher serves the students of any ``processes``."""
        return RunSpec(self.setting, TEACHER_METHOD, self.teacher_seed, role=TEACHER,
                       teacher_checkpoint=self.teacher_checkpoint,
                       setting_sha256=self.setting_sha256, setting_content=self.setting_content)

    def label(self) -> str:
        what = "teacher" if self.role == TEACHER else self.method
        # The fields that tell a sweep's variants apart, as the user set them.
        fields = [f"{key}={value}" for key, value in {**self.config, **self.overrides}.items()]
        if self.held_out is not None:
            fields.append(f"held-out {self.held_out:.0%}")
        variant = f" [{', '.join(fields)}]" if fields else ""
        arithmetic = "" if self.precision == FP32 else f" ({self.precision})"
        processes = "" if self.processes == 1 else (
            f" ×{self.processes} processes" + (", SyncBN" if self.sync_bn else ""))
        return f"{self.setting} {what} seed {self.seed}{variant}{arithmetic}{processes}"


def record_precision(record: dict[str, Any]) -> str:
    """The precision a record's run was made at: its spec's (kdbench.spec leaves fp32 out of
    the JSON), else what its provenance says — a run made on CUDA before precision entered the
    spec was bf16 with an fp32-looking spec."""
    spec = record.get("spec") or {}
    return spec.get("precision") or (record.get("provenance") or {}).get("precision") or "fp32"
