"""The results store: one JSON file per run, written atomically.

Layout under the results directory (default ``results/``)::

    runs/<run id>.json          one record per run (students and teachers alike)
    runs/<run id>.csv           its per-epoch metrics, rebuilt from the history (kdbench.logs)
    runs/stale/<id>.<sha>.json  records set aside by ``run --retrain-stale`` (made by other
                                code; <sha>: the first 12 digits of their method's hash)
    checkpoints/<run id>.pt     the last epoch's checkpoint of a run in progress
    teachers/<run id>.pt        trained teacher weights (kept: every student reuses them)
    students/<run id>.pt        a finished run's final student; .best.pt with --keep best
                                (kdbench.students)
    tensorboard/<run id>/       TensorBoard events, with --tensorboard (kdbench.logs)
    locks/                      file locks that keep two launches from training one teacher

A record is plain JSON so that tables can be rebuilt anywhere from records copied off a
cluster (``aggregate``/``tables`` import no torch). Its fields::

    id            the RunSpec's stable id (hash of its canonical JSON)
    status        "done" | "failed"
    spec          the RunSpec as a dict: setting, method, seed, role ("teacher"|"student"),
                  config (the method's full config), overrides (epochs, batch_size, lr, ...),
                  teacher_seed
    setting       the resolved setting: name, dataset, teacher, student, num_classes,
                  recipe (epochs, batch_size, lr, momentum, nesterov, weight_decay, ...)
    metrics       top1_last, top1_best, top5_last, top5_best, best_epoch (percent, 1-based epoch)
    history       [{stage, epoch, loss, terms{name: value}, train_top1, top1, top5, lr (the
                  epoch's), lr_next, seconds}, ...]
    student_weights  {last: {path, sha256, epoch}, best: {...} with --keep best}
    error         null, or {type, message, traceback, step}
    wall_seconds, images_per_second, extra_parameters
    method_display_name  the row title ("KD", "KD + LS"; "Teacher" for a teacher's run)
    provenance    kdbench_version, git_commit, torch_version, device, precision,
                  method_source_sha256 (one hash over method_source_files: label → sha256,
                  kdbench/sources.py), fidelity, fidelity_note, method_distribution,
                  method_distribution_version, training_version (kdbench/train.py),
                  hostname, slurm_job_id, finished_at
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path) -> str:
    """Checksum of a file (teacher weights, method sources), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CorruptRecord(Exception):
    """A file in runs/ that is not a record to count: unreadable (a truncated write, a foreign
    file), of the wrong schema, or the record of another run (copied under another name)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a half file.

    The file gets the permissions any new file would (0666 less the umask): mkstemp makes
    its file 0600, which would hide results from the rest of a group sharing them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Store:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str root would fail far from here

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def teachers_dir(self) -> Path:
        return self.root / "teachers"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def record_path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoints_dir / f"{run_id}.pt"

    def teacher_path(self, run_id: str) -> Path:
        return self.teachers_dir / f"{run_id}.pt"

    def write(self, record: dict[str, Any]) -> Path:
        path = self.record_path(record["id"])
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=True)
        write_atomically(path, text.encode())
        return path

    def read(self, run_id: str) -> dict[str, Any] | None:
        """The record of ``run_id``; None when there is none. Raises CorruptRecord."""
        path = self.record_path(run_id)
        if not path.exists():
            return None
        return read_record(path)

    @property
    def stale_dir(self) -> Path:
        return self.runs_dir / "stale"

    def set_aside(self, run_id: str) -> Path:
        """Move the record of ``run_id`` to ``runs/stale/`` (kept, out of every table and of
        what counts as stored); returns its new path. Never overwrites an earlier one."""
        source = self.record_path(run_id)
        record = read_record(source)
        sha = ((record.get("provenance") or {}).get("method_source_sha256") or "unknown")[:12]
        self.stale_dir.mkdir(parents=True, exist_ok=True)
        target = self.stale_dir / f"{run_id}.{sha}.json"
        copy = 1
        while target.exists():
            target = self.stale_dir / f"{run_id}.{sha}.{copy}.json"
            copy += 1
        os.replace(source, target)
        return target

    def is_done(self, run_id: str) -> bool:
        try:
            record = self.read(run_id)
        except CorruptRecord:
            return False  # redone: the run's result is unreadable
        return record is not None and record.get("status") == "done"

    def records(self) -> Iterator[dict[str, Any]]:
        """Every readable record; unreadable files are skipped (see ``corrupt_files``)."""
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                yield read_record(path)
            except CorruptRecord:
                continue

    def corrupt_files(self) -> list[Path]:
        return [path for path, _ in self.corrupt_records()]

    def corrupt_records(self) -> list[tuple[Path, str]]:
        """Every file in runs/ that is not counted, with why (CorruptRecord's message)."""
        bad = []
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                read_record(path)
            except CorruptRecord as error:
                bad.append((path, str(error)))
        return bad


# Types of the fields a reader relies on; None is allowed where a failed record has nothing.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "status": (str,), "spec": (dict,), "setting": (dict, str, type(None)),
    "metrics": (dict, type(None)), "history": (list,), "error": (dict, type(None)),
    "provenance": (dict,), "teacher_weights": (dict,),
}
STATUSES = ("done", "failed")


def read_record(path: Path) -> dict[str, Any]:
    """The record in ``path``. Raises CorruptRecord (naming the file and the problem) for a
    file that does not parse, a record of the wrong schema, or one whose id is not the file's
    name: a record copied under another name would count its run twice."""
    from kdbench.spec import RunSpec

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptRecord(f"{path}: not a readable kdbench record ({error})") from None
    if not isinstance(record, dict) or not {"id", "status", "spec"} <= record.keys():
        raise CorruptRecord(f"{path}: not a kdbench record (missing id/status/spec)")
    for key, types in RECORD_FIELDS.items():
        if key in record and not isinstance(record[key], types):
            raise CorruptRecord(f"{path}: not a kdbench record ({key} is a "
                                f"{type(record[key]).__name__})")
    if record["status"] not in STATUSES:
        raise CorruptRecord(f"{path}: not a kdbench record (status {record['status']!r})")
    try:
        spec = RunSpec.from_json(record["spec"])
    except (TypeError, ValueError) as error:
        raise CorruptRecord(f"{path}: not a kdbench record (its spec: {error})") from None
    if not (isinstance(spec.setting, str) and isinstance(spec.method, str)
            and isinstance(spec.seed, int) and spec.role in ("student", "teacher")
            and isinstance(spec.config, dict) and isinstance(spec.overrides, dict)):
        raise CorruptRecord(f"{path}: not a kdbench record (its spec has fields of the wrong type)")
    if record["id"] != path.stem:
        raise CorruptRecord(f"{path}: holds the record of run {record['id']}, not of {path.stem} "
                            "(copied under another name?); not counted")
    return record


def load_records(root: Path | str) -> list[dict[str, Any]]:
    """All readable records under a results directory (no torch needed)."""
    return list(Store(Path(root)).records())
