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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSpec":
        return cls(**data)

    @property
    def id(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def teacher_spec(self) -> "RunSpec":
        """The teacher run this student run distils from."""
        return RunSpec(self.setting, TEACHER_METHOD, self.teacher_seed, role=TEACHER,
                       teacher_checkpoint=self.teacher_checkpoint)

    def label(self) -> str:
        if self.role == TEACHER:
            return f"{self.setting} teacher seed {self.seed}"
        return f"{self.setting} {self.method} seed {self.seed}"
