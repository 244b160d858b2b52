"""One run in one process: train it (under the run's claim), store its record, done or failed.

This is the function every executor runs — in this process, in a local subprocess, or as a
SLURM array task. It takes and returns plain JSON, never models or classes. A run that raises
(or whose loss becomes non-finite) is stored as failed with its error and traceback, so the
rest of the grid goes on and a re-run retries exactly the failed runs. A worker that dies
without a word (SIGKILL from the out-of-memory killer, a segfault) cannot store its failure:
its executor does, with ``record_death``.
"""

from __future__ import annotations


import socket
import traceback
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from kdbench.grid import running_marker
from kdbench.claims import try_claim
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import Store, write_atomically
from kdbench.students import student_path
from kdbench.train import ProgressCallback, TrainOptions, group_key, train, train_group


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


class WorkerDied(RuntimeError):
    """A worker process ended without a result: killed by a signal, or exited early."""


def record_death(spec: RunSpec, store: Store, cause: str) -> dict[str, Any]:
    """Store the failure of a run whose worker died (``cause`` says how), unless the worker
    stored its record before it died, or another process has taken the run up meanwhile.
    Returns the outcome run_job would have returned."""
    from kdbench.claims import try_claim

    with try_claim(store, spec.id) as free:
        if free and stored_already(spec, store):
            # Killed between its record and its clean-up (run_job): finish that here, as no
            # later launch takes up a stored run to do it.
            store.checkpoint_path(spec.id).unlink(missing_ok=True)
            running_marker(store, spec.id).unlink(missing_ok=True)
            return {"id": spec.id, "status": "done", "error": None}
        if free:
            store.write(failed_record(spec, WorkerDied(cause)))
            running_marker(store, spec.id).unlink(missing_ok=True)
    return {"id": spec.id, "status": "failed", "error": f"{WorkerDied.__name__}: {cause}"}


def remove_leftovers(store: Store, run_id: str) -> None:
    """The temporary files of writes that a kill interrupted (write_atomically's mkstemp names
    them ``.<file name>.<random>.tmp``). Only the holder of the run's claim writes its files, so
    under the claim every such file of this run is a leftover. Every file of a run is named
    ``<run id>.<suffix>`` (record, per-epoch CSV, checkpoint, teacher weights, kept students
    and their .best, running marker), so one pattern per folder finds them all."""
    for folder in (store.checkpoints_dir, store.runs_dir, store.teachers_dir,
                   student_path(store, run_id).parent, running_marker(store, run_id).parent):
        for leftover in folder.glob(f".{run_id}.*.tmp"):
            leftover.unlink(missing_ok=True)


def stored_already(spec: RunSpec, store: Store) -> bool:
    from kdbench.teachers import teacher_ready

    return teacher_ready(spec, store) if spec.role == TEACHER else store.is_done(spec.id)


def train_options(given: dict[str, Any] | None) -> TrainOptions:
    """TrainOptions from their JSON. Only the fields this version has: a job queued by an older
    one may carry others (precision, now part of its spec)."""
    given = given or {}
    known = {field.name for field in fields(TrainOptions)}
    return TrainOptions(**{**{key: value for key, value in given.items() if key in known},
                           "data_dir": Path(given["data_dir"]) if given.get("data_dir") else None})


def run_job(spec_json: dict[str, Any], results: str, options_json: dict[str, Any] | None = None,
            on_progress: ProgressCallback | None = None, raise_on_failure: bool = False) -> dict[str, Any]:
    """Run one spec unless its result is stored. Returns {id, status, error}.

    The run's claim (kdbench.claims) is held throughout: a run in progress in another process
    is waited for (an event ``{"event": "waiting"}`` says so), then found stored or, when that
    process was killed, resumed from its checkpoint here."""
    import os

    import torch

    from kdbench.claims import claim
    from kdbench.teachers import record_for_checkpoint

    spec = RunSpec.from_json(spec_json)
    store = Store(Path(results))
    options = train_options(options_json)
    report = on_progress or (lambda event: None)
    with claim(store, spec.id, on_wait=lambda: report({"event": "waiting"})):
        remove_leftovers(store, spec.id)
        if stored_already(spec, store):
            store.checkpoint_path(spec.id).unlink(missing_ok=True)  # a kill came after the record
            return {"id": spec.id, "status": "done", "error": None, "skipped": True}
        marker = running_marker(store, spec.id)
        write_atomically(marker, f"{socket.gethostname()} {os.getpid()}\n".encode())
        threads = torch.get_num_threads()  # train() sets the run's; the next run in this process has its own
        try:
            if spec.role == TEACHER and spec.teacher_checkpoint:
                record = record_for_checkpoint(spec, store, options)
            else:
                record = train(spec, store, options, on_progress)
            store.write(record)
            store.checkpoint_path(spec.id).unlink(missing_ok=True)  # the record is the result now
            return {"id": spec.id, "status": "done", "error": None,
                    "top1": (record.get("metrics") or {}).get("top1_last")}  # for the progress display
        except Exception as error:
            store.write(failed_record(spec, error))
            if raise_on_failure:
                raise
            return {"id": spec.id, "status": "failed", "error": f"{type(error).__name__}: {error}"}
        finally:
            torch.set_num_threads(threads)
            marker.unlink(missing_ok=True)


GroupProgress = Callable[[str, dict[str, Any]], None]  # (run id, event)


def run_group_job(spec_jsons: list[dict[str, Any]], results: str,
                  options_json: dict[str, Any] | None = None,
                  on_progress: GroupProgress | None = None,
                  on_outcome: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train the runs of one group together (kdbench.train.train_group) unless stored, each
    under its own claim; one outcome per spec, in their order, as run_job returns them.

    Each run's record (or failed record) is stored as soon as it ends, and ``on_outcome`` is
    told then. A run whose claim another process holds leaves the group: after the group, it
    goes through run_job, which waits for that process and then finds the run stored, or
    resumes it. A teacher, and a registered teacher checkpoint, go through run_job too."""
    import contextlib
    import os

    import torch

    specs = [RunSpec.from_json(spec_json) for spec_json in spec_jsons]
    store = Store(Path(results))
    options = train_options(options_json)
    report = on_progress or (lambda run_id, event: None)
    told = on_outcome or (lambda outcome: None)
    outcomes: dict[str, dict[str, Any]] = {}

    def tell(spec: RunSpec, outcome: dict[str, Any]) -> None:
        outcomes[spec.id] = outcome
        told(outcome)

    if len({group_key(spec) for spec in specs}) > 1:
        raise ValueError("run_group_job: the specs are not one group (kdbench.train.group_key)")
    # Teachers are trained one per job (the launcher groups students only).
    waiting: list[RunSpec] = [spec for spec in specs if spec.role == TEACHER]
    threads = torch.get_num_threads()  # train_group sets the group's; restored for what follows
    with contextlib.ExitStack() as held:
        members: list[RunSpec] = []
        for spec in specs:
            if spec in waiting:
                continue
            if not held.enter_context(try_claim(store, spec.id)):
                waiting.append(spec)  # trained by another process now
                continue
            remove_leftovers(store, spec.id)
            if stored_already(spec, store):
                store.checkpoint_path(spec.id).unlink(missing_ok=True)  # a kill came after the record
                tell(spec, {"id": spec.id, "status": "done", "error": None, "skipped": True})
                continue
            marker = running_marker(store, spec.id)
            write_atomically(marker, f"{socket.gethostname()} {os.getpid()}\n".encode())
            held.callback(marker.unlink, missing_ok=True)
            members.append(spec)

        def finished(spec: RunSpec, outcome: dict[str, Any] | Exception) -> None:
            if isinstance(outcome, Exception):
                store.write(failed_record(spec, outcome))
                tell(spec, {"id": spec.id, "status": "failed",
                            "error": f"{type(outcome).__name__}: {outcome}"})
            else:
                store.write(outcome)
                store.checkpoint_path(spec.id).unlink(missing_ok=True)  # the record is the result now
                tell(spec, {"id": spec.id, "status": "done", "error": None,
                            "top1": (outcome.get("metrics") or {}).get("top1_last")})  # for the progress display
            running_marker(store, spec.id).unlink(missing_ok=True)

        try:
            if members:
                train_group(members, store, options,
                            lambda spec, event: report(spec.id, event), finished)
        except Exception as error:  # a bug of the group's own setup (its dataset, say)
            for spec in members:
                if spec.id not in outcomes:
                    finished(spec, error)
        finally:
            torch.set_num_threads(threads)
    for spec in waiting:
        tell(spec, run_job(spec.to_json(), results, options_json,
                           lambda event, spec=spec: report(spec.id, event)))
    return [outcomes[spec.id] for spec in specs]
