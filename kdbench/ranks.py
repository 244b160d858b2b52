"""The local launcher of one run across several processes: start its W ranks, supervise them.

``supervise`` is what the local executor's worker process runs for a run with
``RunSpec.processes`` = W > 1 (kdbench/launch.py). It picks a free port on this machine and
starts W processes, each with torch.distributed's environment variables set (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK; kdbench/distributed.py joins the group from them): rank r trains on ``cuda:r``
on GPUs, and on the CPU with gloo. Rank 0 goes through ``worker.run_job`` (the run's claim,
its checkpoint, record and failure record); the other ranks train the same run and write
nothing (``_rank_main``).

When a rank dies without rank 0 having stored an outcome (SIGKILL, the out-of-memory killer,
an error in one rank), the others would wait in their next collective until its timeout: the
supervisor kills them all and starts the whole group again, which resumes from rank 0's last
epoch checkpoint, at most MAX_RESTARTS times; then the run's failure is stored with the cause
(``worker.record_death``). Each epoch of the history says which attempt trained it.

The ranks are forked from the supervisor (itself a fresh spawned process that has imported
kdbench and torch but run nothing: no CUDA context, no threads), so that starting and
restarting a group costs no imports (seconds per process on a busy machine); where fork is
not available they are spawned.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from kdbench import distributed
from kdbench.spec import RunSpec
from kdbench.store import Store

MAX_RESTARTS = 3  # restarts of the whole group after a lost rank; then the run has failed
# After rank 0 has sent its outcome, how long the other ranks get to leave on their own (a rank
# 0 that found the run stored, or failed it, leaves the others waiting in a collective).
FINISH_GRACE_S = 10.0
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port free on this machine now, for the group's rendezvous (MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int, attempt: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
            distributed.ATTEMPT_VARIABLE: str(attempt)}


def rank_context():
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        import kdbench.train  # noqa: F401  (imported once here, inherited by every rank)
        import kdbench.worker  # noqa: F401

        return mp.get_context("fork")
    return mp.get_context("spawn")


def device_type_of(options: dict[str, Any]) -> str:
    import torch

    device = options.get("device")
    if device:
        return torch.device(device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rank_main(spec_json: dict[str, Any], results: str, options: dict[str, Any], sender,
               launcher_pid: int) -> None:
    """One rank of a run, in its own process (its environment set by ``supervise``)."""
    from kdbench.console import ascii_where_needed
    from kdbench.interrupt import Interrupted, become_worker
    from kdbench.worker import run_job, train_options

    try:
        become_worker(launcher_pid)  # stopped when the supervisor goes, even by SIGKILL
        ascii_where_needed()
        with distributed.process_group(device_type_of(options)) as ranks:
            if ranks.is_writer:
                run_id = RunSpec.from_json(spec_json).id
                outcome = run_job(spec_json, results, options,
                                  lambda event: sender.send(("event", run_id, event)))
                sender.send(("outcome", outcome))
            else:
                from kdbench.train import train

                # The same run, reading rank 0's checkpoint; writes nothing (train.py).
                train(RunSpec.from_json(spec_json), Store(Path(results)), train_options(options))
    except Interrupted as interrupt:
        raise SystemExit(interrupt.exit_code)


def supervise(spec_json: dict[str, Any], results: str, options: dict[str, Any],
              send: Callable[[tuple], None]) -> dict[str, Any]:
    """Train the run on its W ranks, restarting the group after a lost rank; returns rank 0's
    outcome (as ``worker.run_job``'s), or the stored failure once MAX_RESTARTS are spent.
    ``send`` gets rank 0's ("event", run id, event) messages as they come."""
    from kdbench.worker import record_death

    spec = RunSpec.from_json(spec_json)
    world_size = spec.processes
    # The CPU threads of the run, shared by its ranks (each a process of its own).
    threads = options.get("threads")
    rank_options = {**options, "threads": max(1, threads // world_size) if threads else None}
    context = rank_context()
    cause = ""
    for attempt in range(1, MAX_RESTARTS + 2):
        port = free_port()
        receiver, sender = context.Pipe(duplex=False)
        processes = []
        try:
            for rank in range(world_size):
                process = context.Process(
                    target=_rank_main, name=f"kdbench rank {rank} of {spec.label()}",
                    args=(spec_json, results, rank_options, sender if rank == 0 else None, os.getpid()))
                # The child starts with this process's environment: set it around start().
                saved = dict(os.environ)
                os.environ.update(rank_environment(rank, world_size, port, attempt))
                try:
                    process.start()
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                processes.append(process)
            sender.close()  # rank 0 holds the other copy
            outcome, cause = _follow(receiver, processes, send)
        finally:
            _stop(processes)
            receiver.close()
        if outcome is not None:
            return outcome
        print(f"kdbench: {spec.label()}: {cause}; attempt {attempt} of {MAX_RESTARTS + 1}"
              + ("; restarting every rank from the last checkpoint" if attempt <= MAX_RESTARTS else ""),
              flush=True)
    return record_death(spec, Store(Path(results)), f"{cause} (after {MAX_RESTARTS} restarts of its ranks)")


def _follow(receiver, processes: list, send: Callable[[tuple], None]) -> tuple[dict | None, str]:
    """Pass rank 0's messages on until its outcome is final (returned) or the group lost a
    rank (None, and how).

    A rank killed by a signal loses the attempt, whatever rank 0 says: when a peer is gone,
    rank 0's collective may raise (gloo notices the closed connection) and run_job store that
    as the run's failure, which the restarted group then replaces. Rank 0's outcome is final
    otherwise: a non-finite loss, say, fails every rank alike (train.sum_over_ranks), and
    training it again would fail again."""
    from kdbench.launch import death_cause

    def killed() -> str | None:
        for rank, process in enumerate(processes):
            if process.exitcode is not None and process.exitcode < 0:
                return f"rank {rank}: {death_cause(process.exitcode)}"
        return None

    pipe_open = True
    others_ended_at = None
    while True:
        waiting = [process.sentinel for process in processes] + ([receiver] if pipe_open else [])
        ready = multiprocessing.connection.wait(waiting, timeout=1.0)
        lost = killed()
        if lost:
            return None, lost
        if receiver in ready:
            try:
                message = receiver.recv()
            except (EOFError, OSError):
                pipe_open = False
            else:
                if message[0] != "outcome":
                    send(message)
                    continue
                outcome = message[1]
                for process in processes[1:]:  # the others leave once rank 0 is done
                    process.join(FINISH_GRACE_S)
                lost = killed()
                return (None, lost) if lost and outcome["status"] != "done" else (outcome, "")
        if processes[0].exitcode is not None:
            # Ended without an outcome read yet: it may be in the pipe (EOF does not tell, as
            # forked ranks hold copies of its end).
            while pipe_open and receiver.poll():
                try:
                    message = receiver.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "outcome":
                    return message[1], ""
                send(message)
            return None, f"rank 0: {death_cause(processes[0].exitcode)}"
        ended = [rank for rank, process in enumerate(processes[1:], start=1)
                 if process.exitcode not in (None, 0)]
        if ended:
            # A rank that raised: rank 0 notices in its next collective and fails the run; if
            # it does not (a backend that only times out), the attempt is lost.
            others_ended_at = others_ended_at or time.monotonic()
            if time.monotonic() - others_ended_at > FINISH_GRACE_S:
                return None, f"rank {ended[0]}: {death_cause(processes[ended[0]].exitcode)}"


def _stop(processes: list) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(STOP_GRACE_S)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def supervisor_main(spec_jsons: list[dict], results: str, options: dict, sender, launcher_pid: int) -> None:
    """The local executor's worker process for a run across several processes: as
    launch._worker_main, with the run's messages coming from its rank 0."""
    import sys

    from kdbench.interrupt import Interrupted, become_worker

    [spec_json] = spec_jsons  # such a run trains alone
    try:
        become_worker(launcher_pid)
        outcome = supervise(spec_json, results, options, sender.send)
        sender.send(("outcome", outcome))
    except Interrupted as interrupt:  # stopped by the launcher (its ranks are stopped with it)
        sys.exit(interrupt.exit_code)


def check_request(processes: int, sync_bn: bool, executor: str | None, device: str | None) -> None:
    """--gpus-per-run and --sync-bn against where the runs go (UserError before anything runs).
    On SLURM the GPUs are on the nodes: only what this machine cannot judge is left out."""
    from kdbench.errors import UserError

    if sync_bn and processes == 1:
        raise UserError("--sync-bn synchronises BatchNorm across the processes of a run: it needs "
                        "--gpus-per-run 2 or more")
    if processes == 1:
        return
    if executor == "inprocess":
        raise UserError(f"--gpus-per-run {processes}: the inprocess executor trains in this one "
                        "process; use --executor local or slurm")
    import torch

    device_type = torch.device(device).type if device else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if executor != "slurm" and device_type == "cuda":
        if device and torch.device(device).index is not None:
            raise UserError(f"--gpus-per-run {processes} puts rank r on cuda:r; give --device cuda, "
                            f"not {device}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < processes:
            raise UserError(f"--gpus-per-run {processes}: this machine has {count} CUDA "
                            f"device{'' if count == 1 else 's'} (one process per GPU)")
    if sync_bn and device_type != "cuda" and executor != "slurm":
        raise UserError("--sync-bn: torch's SyncBatchNorm runs on CUDA only, and these runs use "
                        "the CPU")
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"--gpus-per-run: runs across processes train on CUDA (NCCL) or the CPU "
                        f"(gloo), not {device_type}")
