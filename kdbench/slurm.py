"""The SLURM executor: the only module that imports submitit, imported only when a run asks
for ``--executor slurm`` (``launch.make_executor``), so local runs need no submitit.

Teachers go as single jobs, then the students of each teacher as one job array that starts
only after it succeeded (``SlurmExecutor``); each array task (``SlurmTask``) trains
``runs_per_task`` runs at once (default 1). ``kdbench status`` asks SLURM about the runs sent
from a results directory through ``read_submissions``, ``slurm_states`` and
``store_slurm_failure``.

Under <results>/slurm/:
  logs/                submitit's folder: job scripts, pickled calls (a RunSpec as JSON, never
                       a model), results, and each task's stdout/stderr (<job id>_0_log.out|err)
  jobs/<run id>.json   where each run was sent (SlurmSubmission): what `kdbench status` asks
                       SLURM about for the runs the store has no record of yet
  snapshots/<time>/    the code the jobs of a --snapshot submission run
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
import torch

from kdbench.errors import UserError
from kdbench.grid import running_marker
from kdbench.launch import Result, options_json, student_groups, usable_cores
from kdbench.progress import ProgressDisplay
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import CorruptRecord, Store, write_atomically
from kdbench.train import TrainOptions
from kdbench.worker import failed_record, run_group_job, run_job

if TYPE_CHECKING:  # slurm_presets needs tomllib (Python 3.11): imported when SLURM is used
    from kdbench.slurm_presets import SlurmPreset

POLL_S = 2.0  # one sacct call per poll for every job in flight
# A task that SLURM reports ended but whose record and result file we cannot see yet may be on a
# shared file system that shows new files late; submitit waits as long for its result file.
RESULT_GRACE_S = 15.0
SACCT_PATIENCE_S = 600.0  # how long `run` keeps waiting through sacct errors
# sacct's words for jobs that wait (PREEMPTED: submitit requeues them, as it does REQUEUED) and
# for jobs that run; any other state means the job has ended.
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                 "SUSPENDED", "PREEMPTED", "RESIZING", "UNKNOWN"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"}


class SlurmTask(submitit.helpers.Checkpointable):
    """One SLURM job or array task: ``worker.run_job`` on a group of RunSpecs given as JSON.

    A group of one (a spec dict, as every job queued by kdbench before ``runs_per_task``) runs
    in this process. A training group (``{"group": [spec dicts]}``: the runs of one setting
    and seed, kdbench.train.group_key) trains together in this process, one teacher forward
    per batch for all (``_train_together``). A group of several (a list of spec dicts: what
    ``runs_per_task`` packs of the runs left alone) runs as that many processes at once
    (``_run_group``), each on its own spec with its own seed and data order.

    Checkpointable: when SLURM warns of the time limit or a preemption (USR2), submitit calls
    ``checkpoint`` and requeues the job. The training state is not in this object but in each
    run's epoch checkpoint under results/checkpoints/, written atomically after every epoch,
    so resubmitting the very same call is all it takes: the requeued task skips the runs of
    its group that are stored and resumes the others from their last finished epoch. A job
    requeued without warning (``scontrol requeue``, a node failure with --requeue) restarts
    the same call and resumes the same way."""

    def __call__(self, specs: dict[str, Any] | list[dict[str, Any]], results: str,
                 options: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(specs, dict) and RUN_ACROSS in specs:
            return _train_across(specs[RUN_ACROSS], results, options)
        together = isinstance(specs, dict) and TRAINING_GROUP in specs
        group = (list(specs[TRAINING_GROUP]) if together
                 else [specs] if isinstance(specs, dict) else list(specs))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
        job_id = (f"{job_id}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job_id
                  else os.environ.get("SLURM_JOB_ID", "?"))
        # One line per run and attempt in the task's log, so a requeue is visible there, and
        # which copy of the code runs (a --snapshot's or the checkout's).
        for index, spec_json in enumerate(group):
            spec = RunSpec.from_json(spec_json)
            shared = (f", run {index + 1} of the {len(group)} trained together in this task"
                      if together else f", run {index + 1} of {len(group)} in this task"
                      if len(group) > 1 else "")
            print(f"kdbench: {spec.label()} ({spec.id}): SLURM job {job_id}, attempt {restarts + 1}"
                  f"{shared}, code from {Path(__file__).resolve().parent}", flush=True)
        if together:
            return _train_together(group, results, options, restarts)
        if len(group) > 1:
            return _run_group(group, results, options, restarts)
        outcome = run_job(group[0], results, options, on_progress=log_epoch, raise_on_failure=True)
        if not outcome.get("skipped"):
            note_restarts(Store(Path(results)), outcome["id"], restarts)
        return outcome

    def checkpoint(self, specs: dict[str, Any] | list[dict[str, Any]], results: str,
                   options: dict[str, Any]) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, specs, results, options)


# The call of a task whose runs train together in its process (kdbench.train.train_group):
# {"group": [spec dicts]}, told apart from a spec dict (which has no such field) and from a
# list (runs_per_task runs, one process each).
TRAINING_GROUP = "group"
# The call of each task of a job that trains one run across several processes (one task per
# process, kdbench/distributed.py): {"across": spec dict}.
RUN_ACROSS = "across"


def _train_across(spec_json: dict[str, Any], results: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """One task (one rank) of a run across several processes. submitit's
    TorchDistributedEnvironment exports torch.distributed's variables from SLURM's (rank = the
    task's global rank, master = the job's first node, a port drawn from the job id, so a
    requeued job meets at the same one); every task sees its node's GPUs and takes GPU
    LOCAL_RANK. Rank 0 goes through run_job (claim, checkpoints, record; it raises on failure,
    so SLURM marks the job FAILED); the others train the same run and write nothing. A rank
    lost on SLURM fails the job's attempt: its record is stored failed, and the next `kdbench
    run` resumes it from its checkpoint (the local launcher restarts by itself, ranks.py)."""
    from kdbench import distributed
    from kdbench.ranks import device_type_of
    from kdbench.train import train
    from kdbench.worker import train_options

    environment = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    os.environ[distributed.ATTEMPT_VARIABLE] = str(restarts + 1)
    spec = RunSpec.from_json(spec_json)
    print(f"kdbench: {spec.label()} ({spec.id}): rank {environment.rank} of {environment.world_size}, "
          f"master {environment.master_addr}:{environment.master_port}", flush=True)
    with distributed.process_group(device_type_of(options)) as ranks:
        if not ranks.is_writer:
            train(spec, Store(Path(results)), train_options(options))
            return None
        outcome = run_job(spec_json, results, options, on_progress=log_epoch, raise_on_failure=True)
    if not outcome.get("skipped"):
        note_restarts(Store(Path(results)), outcome["id"], restarts)
    return outcome


class GroupRunsFailed(RuntimeError):
    """Raised by a SLURM task of several runs after all of them ended, when any failed, so
    that SLURM marks the task FAILED. Each failed run has its own failed record already."""


def member_devices(runs: int, device: str | None, gpus: int) -> list[str | None]:
    """The device of each run of a task: the one asked for (--device), else the task's GPUs in
    turn (a task with gpus_per_task = 2 and 4 runs puts 2 on each), else the default."""
    if device is not None or gpus < 2:
        return [device] * runs
    return [f"cuda:{index % gpus}" for index in range(runs)]


def _run_group(group: list[dict[str, Any]], results: str, options: dict[str, Any],
               restarts: int) -> list[dict[str, Any]]:
    """The runs of one task at once, one process each (spawn, as LocalExecutor: no run shares
    a global with another), with the task's CPU threads split between them. A run that fails
    is stored as failed by ``run_job`` and stops no other; when all have ended, raise if any
    failed."""
    threads = max(1, (options.get("threads") or usable_cores()) // len(group))
    devices = member_devices(len(group), options.get("device"), torch.cuda.device_count())
    context = multiprocessing.get_context("spawn")
    members = []
    try:
        for spec_json, device in zip(group, devices):
            member_options = {**options, "threads": threads, "device": device}
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_group_member, name=f"kdbench-{spec_json.get('seed')}",
                                      args=(spec_json, results, member_options, restarts, sender))
            process.start()
            sender.close()  # the child holds the other copy: EOF on it means the child ended
            members.append((spec_json, process, receiver))
        outcomes = []
        for spec_json, process, receiver in members:
            spec = RunSpec.from_json(spec_json)
            try:
                outcome = receiver.recv()
            except EOFError:  # ended without an answer: killed, out of memory, segfault
                process.join()
                outcome = {"id": spec.id, "status": "failed",
                           "error": f"worker process died (exit code {process.exitcode})"}
            process.join()
            outcomes.append(outcome)
    finally:
        # Reached early only when this process is leaving: submitit's USR2 handler requeued the
        # task and exits, or an error. The members ignore SIGTERM (below), so kill them; their
        # epoch checkpoints are what the requeued task resumes from.
        for _, process, _ in members:
            if process.is_alive():
                process.kill()
                process.join()
    failed = [(RunSpec.from_json(spec_json), outcome) for spec_json, outcome in zip(group, outcomes)
              if outcome["status"] != "done"]
    if failed:
        raise GroupRunsFailed(f"{len(failed)} of the {len(group)} runs of this task failed: " + "; ".join(
            f"{spec.label()} ({spec.id}): {outcome['error']}" for spec, outcome in failed))
    return outcomes


def _train_together(group: list[dict[str, Any]], results: str, options: dict[str, Any],
                    restarts: int) -> list[dict[str, Any]]:
    """The runs of one training group in this process, one teacher forward per batch for all
    (kdbench.worker.run_group_job: each run stored as it ends). When all have ended, raise if
    any failed, so that SLURM marks the task FAILED."""
    labels = {RunSpec.from_json(spec_json).id: RunSpec.from_json(spec_json).label() for spec_json in group}
    store = Store(Path(results))

    def noted(outcome: dict[str, Any]) -> None:
        if outcome["status"] == "done" and not outcome.get("skipped"):
            note_restarts(store, outcome["id"], restarts)

    outcomes = run_group_job(group, results, options,
                             lambda run_id, event: log_epoch(event, labels[run_id]), noted)
    failed = [outcome for outcome in outcomes if outcome["status"] != "done"]
    if failed:
        raise GroupRunsFailed(f"{len(failed)} of the {len(group)} runs of this task failed: " + "; ".join(
            f"{labels[outcome['id']]} ({outcome['id']}): {outcome['error']}" for outcome in failed))
    return outcomes


def _group_member(spec_json: dict[str, Any], results: str, options: dict[str, Any], restarts: int,
                  answer) -> None:
    """One run of a task of several, in its own process; sends run_job's outcome back."""
    import signal

    # As submitit does for the task's own process: SIGTERM (scancel, `scontrol requeue`) is
    # left to SLURM's KillWait, and USR2 (time limit, preemption) is the task process's to
    # handle: it checkpoints the call and requeues the task, then kills its members.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    label = RunSpec.from_json(spec_json).label()
    print(f"kdbench: {label}: process {os.getpid()}", flush=True)
    outcome = run_job(spec_json, results, options, on_progress=lambda event: log_epoch(event, label))
    if outcome["status"] == "done" and not outcome.get("skipped"):
        note_restarts(Store(Path(results)), outcome["id"], restarts)
    answer.send(outcome)
    answer.close()


def log_epoch(event: dict[str, Any], label: str | None = None) -> None:
    """One line per finished epoch in the task's log: progress to `tail -f`, and after a
    requeue the proof that training went on from the checkpoint instead of from epoch 1. In a
    task of several runs each line starts with its run's label."""
    if event.get("event") != "epoch":
        return
    run = f"{label}: " if label else ""
    stage = "" if event.get("stage") in (None, "main") else f"[{event['stage']}] "
    accuracy = f" test top-1 {event['top1']:.2f}%" if "top1" in event else ""
    print(f"kdbench: {run}{stage}epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.4f}{accuracy}",
          flush=True)


def note_restarts(store: Store, run_id: str, restarts: int) -> None:
    """Add how often SLURM restarted the job to the record's provenance (0: never)."""
    record = store.read(run_id)
    if record is not None:
        record.setdefault("provenance", {})["slurm_restart_count"] = restarts
        store.write(record)


def slurm_dir(results: Path) -> Path:
    return results / "slurm"


@dataclass(frozen=True)
class SlurmSubmission:
    """Where one run was sent: ``<results>/slurm/jobs/<run id>.json``."""

    run_id: str
    label: str
    job_id: str  # "123" (a single job) or "124_3" (task 3 of array 124)
    folder: str  # submitit's folder of the job (scripts, logs)
    spec: dict[str, Any]
    after: str | None  # the teacher job this task waits for (sbatch --dependency=afterok:...)
    submitted_at: str

    def log_paths(self) -> dict[str, str]:
        paths = submitit.core.utils.JobPaths(self.folder, job_id=self.job_id, task_id=0)
        return {"stdout": str(paths.stdout), "stderr": str(paths.stderr)}

    def result_file(self) -> Path:
        return submitit.core.utils.JobPaths(self.folder, job_id=self.job_id, task_id=0).result_pickle


def write_submission(results: Path, submission: SlurmSubmission) -> None:
    path = slurm_dir(results) / "jobs" / f"{submission.run_id}.json"
    write_atomically(path, json.dumps(asdict(submission), indent=1, sort_keys=True).encode())


def read_submissions(results: Path) -> dict[str, SlurmSubmission]:
    """The latest submission of every run sent to SLURM from this results directory."""
    found = {}
    for path in sorted((slurm_dir(results) / "jobs").glob("*.json")):
        try:
            submission = SlurmSubmission(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # half-copied or foreign file: that run just shows as not submitted
        found[submission.run_id] = submission
    return found


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM's state word (PENDING, RUNNING, COMPLETED, TIMEOUT, ...) per job id, from one
    sacct call; UNKNOWN for a job sacct does not know (yet). None when sacct cannot be asked."""
    if not job_ids:
        return {}
    if shutil.which("sacct") is None:
        return None
    main_ids = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        answer = subprocess.run(["sacct", "--parsable2", "-o", "JobID,State", "-j", ",".join(main_ids)],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answer.returncode != 0:
        return None
    # submitit's parser knows sacct's array notation (124_[2-3%4] for tasks not started yet).
    info = submitit.slurm.slurm.SlurmInfoWatcher().read_info(answer.stdout)
    states = {job_id: ((info.get(job_id, {}).get("State") or "UNKNOWN").split() or ["UNKNOWN"])[0]
              for job_id in job_ids}
    unknown = [job_id for job_id in job_ids if states[job_id] == "UNKNOWN"]
    if unknown:
        # Not in accounting: just submitted (slurmdbd lags behind the controller), or an array
        # task cancelled before it started, which SLURM drops without a trace (seen with 22.05).
        # The controller knows the first kind at once.
        queued = queue_states()
        if queued is not None:
            for job_id in unknown:
                states[job_id] = queued.get(job_id, GONE)
    return states


GONE = "GONE"  # neither the queue nor accounting knows the job: it ended, no one knows how


def queue_states() -> dict[str, str] | None:
    """State per job id of this user's jobs the controller holds (array tasks one by one)."""
    try:
        answer = subprocess.run(["squeue", "--me", "-h", "-r", "--states=all", "-o", "%i|%T"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answer.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in answer.stdout.split() if "|" in line)


def phase_of(state: str) -> str:
    """"pending", "running" or "ended" for a sacct state word."""
    if state in QUEUED_STATES:
        return "pending"
    if state in RUNNING_STATES:
        return "running"
    return "ended"


class SlurmJobDied(RuntimeError):
    """A SLURM job that ended without storing a record: time limit, scancel, out of memory,
    node failure. Stored as the run's error, like any exception a run raises."""


def log_tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def store_slurm_failure(store: Store, submission: SlurmSubmission, state: str) -> str:
    """Keep what SLURM and submitit know about a failed task in the run's record and return
    its one-line error.

    A task whose Python code raised has a failed record already (with the traceback): it gets
    the job id, state and log paths added. A task that died without writing one gets a failed
    record with submitit's error text (or the end of its stderr) and the log paths. A done
    record is never touched."""
    logs = submission.log_paths()
    if submission.result_file().exists():
        job = submitit.SlurmJob(folder=submission.folder, job_id=submission.job_id)
        error = job.exception()  # the result file is there: no waiting
        details = str(error) if error is not None else (
            "the job completed but stored no record (was the results directory moved?)")
    else:
        tail = log_tail(logs["stderr"])
        details = (f"SLURM job {submission.job_id} {ended(state)} without a result"
                   + (f"; end of its stderr:\n{tail}" if tail else ""))
    slurm = {"job_id": submission.job_id, "state": state, **logs, "submitit_error": details[-4000:]}
    try:
        record = store.read(submission.run_id)
    except CorruptRecord:
        record = None
    if record is not None and record.get("status") == "done":
        return ""
    if record is not None and stale(record, submission):
        record = None  # the failure of an earlier attempt: this one's replaces it
    if record is None:
        spec = RunSpec.from_json(submission.spec)
        died = SlurmJobDied(f"the SLURM job {ended(state)} without storing a result "
                            "(time limit, scancel, out of memory or node failure?)")
        record = failed_record(spec, died, extra={"slurm": slurm})
        store.write(record)
        # The worker could not remove its marker; on another host it would read as running.
        running_marker(store, submission.run_id).unlink(missing_ok=True)
    elif "slurm" not in (record.get("error") or {}):
        record.setdefault("error", {})["slurm"] = slurm
        store.write(record)
    error = record.get("error") or {}
    # The same line `kdbench status` shows (status.error_line).
    return (f"{error.get('type', 'error')}: {error.get('message', '')} "
            f"[SLURM job {submission.job_id} {state}; log {logs['stderr']}]")


def ended(state: str) -> str:
    if state == GONE:
        return "is gone from SLURM's queue and accounting (cancelled before it started?)"
    return f"ended {state}"


def stale(record: dict[str, Any], submission: SlurmSubmission) -> bool:
    """A failed record written before this submission (by an earlier, retried attempt)."""
    finished = (record.get("provenance") or {}).get("finished_at") or ""
    return finished < submission.submitted_at  # both ISO 8601 UTC, to the second


class SlurmExecutor:
    """Teachers as single jobs, then the students of each teacher as ONE job array that SLURM
    starts only after that teacher's job succeeded (--dependency=afterok, and
    --kill-on-invalid-dep so a failed teacher cancels its students instead of leaving them
    queued forever). Every task runs ``SlurmTask``: on one training group (the runs of one
    setting and seed, trained together; unless ``group`` is off, ``--no-group``), or on up to
    the preset's ``runs_per_task`` RunSpecs as JSON for the runs left alone (a teacher is
    always a task of its own); each run keeps its own
    SlurmSubmission, with the job id of the task it shares, so following, status and failure
    records stay per run.

    Runs that a previous submission still has queued or running in SLURM are followed, not
    submitted twice. With ``wait`` (the default) it polls sacct and the store until every run
    has ended, showing done/running/pending/failed; without, it returns at once with every
    run "submitted", and ``kdbench status`` follows up."""

    def __init__(self, preset: SlurmPreset, display: ProgressDisplay | None = None,
                 wait: bool = True, snapshot: bool = False, group: bool = True,
                 group_size: int | None = None) -> None:
        self.preset = preset
        self.display = display
        self.wait = wait
        self.snapshot = snapshot
        self.group = group
        self.group_size = group_size

    # ---- submission --------------------------------------------------------------------------

    def _executor(self, folder: Path, name: str, after: str | None,
                  processes: int = 1) -> submitit.AutoExecutor:
        """The executor of a grid's jobs: one task each, or for a run across ``processes``,
        that many tasks (one per process), ``processes_per_node`` of them per node."""
        preset = self.preset
        per_node = min(processes, preset.processes_per_node or processes)
        nodes = -(-processes // per_node)
        # cluster="slurm" always: with cluster=None submitit picks SLURM whenever srun is on
        # PATH, and picks something else when it is not.
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=preset.max_requeues,
                                         slurm_python=preset.python)
        sbatch: dict[str, Any] = dict(preset.sbatch)
        if after is not None:
            sbatch["kill-on-invalid-dep"] = "yes"
        parameters: dict[str, Any] = {
            "name": name, "timeout_min": preset.time_min, "cpus_per_task": preset.cpus_per_task,
            "mem_gb": preset.mem_gb, "tasks_per_node": per_node, "nodes": nodes,
            "slurm_partition": preset.partition, "slurm_account": preset.account,
            "slurm_qos": preset.qos, "slurm_constraint": preset.constraint,
            "slurm_array_parallelism": preset.array_parallelism,
            "slurm_signal_delay_s": preset.signal_delay_s,
            "slurm_dependency": f"afterok:{after}" if after else None,
            "slurm_setup": list(preset.setup) or None,
            "slurm_additional_parameters": sbatch or None,
        }
        # One task is one run on one node; --gpus-per-node rather than --gpus-per-task, which
        # some SLURM versions refuse without --ntasks.
        if preset.gpus_per_task:
            parameters["gpus_per_node"] = preset.gpus_per_task * per_node
        executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
        return executor

    def _job_options(self, options: TrainOptions) -> dict[str, Any]:
        from kdbench.data import default_data_dir

        # Jobs start in another working directory (a snapshot's, or a node's): paths absolute.
        data_dir = (options.data_dir or default_data_dir()).resolve()
        threads = options.threads or self.preset.cpus_per_task
        return options_json(TrainOptions(**{**asdict(options), "data_dir": data_dir, "threads": threads}))

    def _snapshot(self, results: Path) -> contextlib.AbstractContextManager:
        if not self.snapshot:
            return contextlib.nullcontext()
        # Jobs start in the snapshot (the job's working directory is the one sbatch was called
        # from) and `python -m` puts it first on sys.path: kdbench and the built-in methods are
        # imported from the copy, even with an editable install.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = slurm_dir(results) / "snapshots" / stamp
        root = source_root()
        print(f"kdbench: code snapshot for these jobs: {target}", flush=True)
        # RsyncSnapshot copies the tracked files as they are in the working tree; add the new
        # files git does not ignore, so the snapshot is the code as `git status` shows it.
        listing = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root,
                                 capture_output=True, text=True)
        if listing.returncode != 0:
            raise UserError(f"--snapshot: git cannot list the files of {root}: {listing.stderr.strip()}")
        untracked = [path for path in listing.stdout.split("\n") if path]
        return submitit.helpers.RsyncSnapshot(snapshot_dir=target, root_dir=root, include=untracked)

    def _submit(self, specs: list[RunSpec], folder: Path, results: Path, options: dict[str, Any],
                name: str, after: str | None, runs_per_task: int = 1,
                group: bool = False) -> list[SlurmSubmission]:
        """Submit the specs, one job (or array task) per task: with ``group``, each training
        group of two or more runs (kdbench.train.group_key) is one task that trains them
        together, and the runs left alone go ``runs_per_task`` to a task, as without it (one
        process each); one SlurmSubmission per run, with its task's job id."""
        task = SlurmTask()
        across = [spec for spec in specs if spec.processes > 1]
        specs = [spec for spec in specs if spec.processes == 1]
        submissions: list[SlurmSubmission] = []
        for processes in sorted({spec.processes for spec in across}):
            # Runs across several processes: one job of that many tasks each (an array of them).
            members = [spec for spec in across if spec.processes == processes]
            executor = self._executor(folder, name, after, processes)
            submissions += self._send(executor, task, [[spec] for spec in members],
                                      [{RUN_ACROSS: spec.to_json()} for spec in members],
                                      folder, results, options, after)
        if not specs:
            return submissions
        executor = self._executor(folder, name, after)
        trained_together = [members for members in student_groups(specs, group, self.group_size) if len(members) > 1]
        together_ids = {spec.id for members in trained_together for spec in members}
        rest = [spec for spec in specs if spec.id not in together_ids]
        groups = trained_together + [rest[start:start + runs_per_task]
                                     for start in range(0, len(rest), runs_per_task)]
        # A group of one is sent as a spec dict, as by kdbench versions before runs_per_task.
        calls = [{TRAINING_GROUP: [spec.to_json() for spec in members]} if index < len(trained_together)
                 else members[0].to_json() if len(members) == 1 else [spec.to_json() for spec in members]
                 for index, members in enumerate(groups)]
        try:
            return submissions + self._send(executor, task, groups, calls, folder, results, options, after)
        except BaseException:
            cancel([submission.job_id for submission in submissions])  # all or nothing
            raise

    def _send(self, executor: submitit.AutoExecutor, task: "SlurmTask", groups: list[list[RunSpec]],
              calls: list[Any], folder: Path, results: Path, options: dict[str, Any],
              after: str | None) -> list[SlurmSubmission]:
        """Submit one job (or array task) per call; one SlurmSubmission per run of its group."""
        try:
            # submitit also prints sbatch's complaint to stderr; it is in our one-line error.
            with contextlib.redirect_stderr(io.StringIO()):
                if len(calls) == 1:
                    jobs = [executor.submit(task, calls[0], str(results), options)]
                else:
                    jobs = executor.map_array(task, calls, [str(results)] * len(calls),
                                              [options] * len(calls))
        except submitit.core.utils.FailedJobError as error:  # sbatch said no
            reason = " ".join(str(error).split())[:500]
            raise UserError(f"sbatch refused the job ({self.preset.source}): {reason}") from None
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        submissions = [SlurmSubmission(spec.id, spec.label(), job.job_id, str(folder), spec.to_json(),
                                       after, now) for group, job in zip(groups, jobs) for spec in group]
        for submission in submissions:
            write_submission(results, submission)
        return submissions

    def _in_flight(self, specs: list[RunSpec], results: Path) -> dict[str, SlurmSubmission]:
        """Runs of this grid that an earlier submission has queued or running in SLURM."""
        earlier = read_submissions(results)
        candidates = [earlier[spec.id] for spec in specs if spec.id in earlier]
        states = slurm_states([submission.job_id for submission in candidates]) or {}
        in_flight = {}
        for submission in candidates:
            # GONE (or UNKNOWN when squeue cannot be asked either): SLURM has no such job (it
            # was cancelled while queued, or came from another cluster): submit it again.
            state = states.get(submission.job_id, "UNKNOWN")
            if state != "UNKNOWN" and phase_of(state) != "ended":
                in_flight[submission.run_id] = submission
        return in_flight

    def run(self, teachers: list[RunSpec], students: list[RunSpec], results: Path,
            options: TrainOptions) -> list[Result]:
        results = Path(results).resolve()
        folder = slurm_dir(results) / "logs"
        job_options = self._job_options(options)
        in_flight = self._in_flight(teachers + students, results)
        submitted: list[SlurmSubmission] = []
        followed = list(in_flight.values())
        teacher_jobs: dict[str, str] = {spec.id: in_flight[spec.id].job_id
                                        for spec in teachers if spec.id in in_flight}
        try:
            with self._snapshot(results):
                for spec in teachers:
                    if spec.id not in in_flight:
                        [submission] = self._submit([spec], folder, results, job_options,
                                                    "kdbench-teacher", None)
                        submitted.append(submission)
                        teacher_jobs[spec.id] = submission.job_id
                groups: dict[str | None, list[RunSpec]] = {}
                for spec in students:
                    if spec.id not in in_flight:
                        groups.setdefault(teacher_jobs.get(spec.teacher_spec().id), []).append(spec)
                for after, group in groups.items():
                    submitted += self._submit(group, folder, results, job_options, "kdbench", after,
                                              self.preset.runs_per_task, self.group)
        except subprocess.CalledProcessError as error:  # git clone / rsync of --snapshot
            cancel([submission.job_id for submission in submitted])
            command = error.cmd if isinstance(error.cmd, str) else " ".join(map(str, error.cmd))
            raise UserError(f"--snapshot failed: `{command}` exited with {error.returncode} "
                            "(its own message is above)") from None
        except BaseException:
            # All or nothing: do not leave half a grid queued behind an error.
            cancel([submission.job_id for submission in submitted])
            raise
        self._report_submission(submitted, followed, folder)
        by_id = {submission.run_id: submission for submission in submitted + followed}
        if not self.wait:
            return [Result(spec, "submitted") for spec in teachers + students]
        try:
            outcomes = self._follow(list(by_id.values()), Store(results))
        except KeyboardInterrupt:
            print("\nkdbench: stopped waiting; the SLURM jobs go on. `kdbench status` shows them, and "
                  "the same command waits for them again (it submits nothing twice)", file=sys.stderr)
            raise
        return [outcomes[spec.id] for spec in teachers + students]

    def _report_submission(self, submitted: list[SlurmSubmission], followed: list[SlurmSubmission],
                           folder: Path) -> None:
        arrays: dict[str, list[SlurmSubmission]] = {}
        for submission in submitted:
            arrays.setdefault(submission.job_id.split("_")[0], []).append(submission)
        for job_id, members in arrays.items():
            after = f", starts after job {members[0].after} succeeds" if members[0].after else ""
            tasks = len({member.job_id for member in members})
            if len(members) == 1 and "_" not in members[0].job_id:
                what = members[0].label
            elif "_" not in members[0].job_id:
                what = f"{len(members)} runs in one task"
            elif tasks == len(members):
                what = f"array of {len(members)} runs"
            else:
                what = f"array of {tasks} tasks for {len(members)} runs"
            print(f"kdbench: SLURM job {job_id}: {what}{after}", flush=True)
        if followed:
            print(f"kdbench: {len(followed)} run{'s' if len(followed) > 1 else ''} already queued or "
                  f"running in SLURM (not submitted again): "
                  + ", ".join(f"{s.label} [{s.job_id}]" for s in followed), flush=True)
        print(f"kdbench: {self.preset.describe()} ({self.preset.source}); logs in {folder}/", flush=True)

    # ---- following the jobs ----------------------------------------------------------------

    def _follow(self, submissions: list[SlurmSubmission], store: Store) -> dict[str, Result]:
        open_runs = {submission.run_id: submission for submission in submissions}
        outcomes: dict[str, Result] = {}
        ended_at: dict[str, float] = {}

        def finish(submission: SlurmSubmission, status: str, error: str | None = None) -> None:
            del open_runs[submission.run_id]
            spec = RunSpec.from_json(submission.spec)
            outcomes[spec.id] = Result(spec, status, error)
            if self.display:
                self.display.finish(spec.label(), status, error or "")

        silent_since: float | None = None
        while open_runs:
            states = slurm_states([s.job_id for s in open_runs.values()])
            if states is None:
                # slurmdbd restarts and the like: keep asking for a while.
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since > SACCT_PATIENCE_S:
                    raise UserError(f"sacct has not answered for {SACCT_PATIENCE_S / 60:.0f} min: stopped "
                                    "following the SLURM jobs (they go on: `kdbench status` shows them)")
                time.sleep(POLL_S)
                continue
            silent_since = None
            running: dict[str, str] = {}
            pending = 0
            for submission in list(open_runs.values()):
                if submission.run_id not in open_runs:  # finished above as a failed teacher's student
                    continue
                state = states.get(submission.job_id, "UNKNOWN")
                if store.is_done(submission.run_id):
                    finish(submission, "done")
                    continue
                phase = phase_of(state)
                if phase == "pending":
                    pending += 1
                    continue
                if phase == "running":
                    running[submission.label] = f"running (SLURM job {submission.job_id})"
                    continue
                first_seen = ended_at.setdefault(submission.run_id, time.monotonic())
                if not submission.result_file().exists() and time.monotonic() - first_seen < RESULT_GRACE_S:
                    continue
                error = store_slurm_failure(store, submission, state)
                if store.is_done(submission.run_id):
                    finish(submission, "done")
                    continue
                finish(submission, "failed", error)
                if RunSpec.from_json(submission.spec).role == TEACHER:
                    students = [s for s in open_runs.values() if s.after == submission.job_id]
                    cancel(sorted({s.job_id for s in students}))  # they can never start
                    for student in students:
                        finish(student, "failed", f"its teacher failed: {error}")
            if self.display:
                self.display.queue(running, pending)
            if open_runs:
                time.sleep(POLL_S)
        return outcomes


def cancel(job_ids: list[str]) -> None:
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def source_root() -> Path:
    """The git checkout kdbench runs from (what --snapshot copies)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        raise UserError(f"--snapshot copies the git checkout kdbench runs from, but {root} is not "
                        "one (kdbench installed from a wheel runs the installed copy anyway)")
    return root


def make_slurm_executor(preset: str = "default", preset_overrides: list[str] | None = None,
                        display: ProgressDisplay | None = None, wait: bool = True,
                        snapshot: bool = False, group: bool = True,
                        group_size: int | None = None) -> SlurmExecutor:
    """A SlurmExecutor, after checking everything a user can get wrong, before anything is
    submitted."""
    from kdbench.slurm_presets import resolve_preset

    slurm_preset = resolve_preset(preset, preset_overrides)
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError("--executor slurm: no SLURM here (sbatch/srun not on PATH); "
                        "run on the cluster's login node")
    if snapshot:
        if not submitit.helpers.RsyncSnapshot.available():
            raise UserError("--snapshot needs rsync (e.g. apt-get install rsync)")
        source_root()
    return SlurmExecutor(slurm_preset, display, wait, snapshot, group, group_size)
