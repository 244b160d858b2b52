"""One run in one process: train it (teachers under a lock), store its record, done or failed.

This is the function every executor runs — in this process, in a local subprocess, or as a
SLURM array task. It takes and returns plain JSON, never models or classes. A run that raises
(or whose loss becomes non-finite) is stored as failed with its error and traceback, so the
rest of the grid goes on and a re-run retries exactly the failed runs.
"""

from __future__ import annotations


import socket
import traceback
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from kdbench.grid import running_marker
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import Store, write_atomically
from kdbench.train import ProgressCallback, TrainOptions, train


def failed_record(spec: RunSpec, error: BaseException, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": spec.id,
        "status": "failed",
        "spec": spec.to_json(),
        "error": {"type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(error)), **(extra or {})},
        "provenance": {"hostname": socket.gethostname(),
                       "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def run_job(spec_json: dict[str, Any], results: str, options_json: dict[str, Any] | None = None,
            on_progress: ProgressCallback | None = None, raise_on_failure: bool = False) -> dict[str, Any]:
    """Run one spec unless its result is stored. Returns {id, status, error}."""
    import os

    from kdbench.teachers import file_lock, record_for_checkpoint, teacher_ready

    spec = RunSpec.from_json(spec_json)
    store = Store(Path(results))
    given = options_json or {}
    # Only the fields this version has: a job queued by an older one may carry others
    # (precision, now part of its spec).
    known = {field.name for field in fields(TrainOptions)}
    options = TrainOptions(**{**{key: value for key, value in given.items() if key in known},
                              "data_dir": Path(given["data_dir"]) if given.get("data_dir") else None})
    marker = running_marker(store, spec.id)
    write_atomically(marker, f"{socket.gethostname()} {os.getpid()}\n".encode())
    try:
        if spec.role == TEACHER:
            # One trainer per teacher across processes and machines; the others wait here and
            # then find it trained.
            with file_lock(store.locks_dir / f"{spec.id}.lock"):
                if teacher_ready(spec, store):
                    return {"id": spec.id, "status": "done", "error": None, "skipped": True}
                if spec.teacher_checkpoint:
                    record = record_for_checkpoint(spec, store, options)
                else:
                    record = train(spec, store, options, on_progress)
                store.write(record)
        else:
            if store.is_done(spec.id):
                return {"id": spec.id, "status": "done", "error": None, "skipped": True}
            record = train(spec, store, options, on_progress)
            store.write(record)
        store.checkpoint_path(spec.id).unlink(missing_ok=True)  # the record is the result now
        return {"id": spec.id, "status": "done", "error": None}
    except Exception as error:
        store.write(failed_record(spec, error))
        if raise_on_failure:
            raise
        return {"id": spec.id, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    finally:
        marker.unlink(missing_ok=True)
