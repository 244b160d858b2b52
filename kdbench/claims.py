"""One process trains a run at a time: a claim per run, an flock on ``locks/<run id>.lock``.

A worker holds its run's claim for the whole run (teacher or student), so a second launch on the
same results directory — another `kdbench run`, a SLURM task, a restarted launcher whose old
workers are still stopping — waits for it and then finds the result stored, instead of training
the run again at the same time. flock is released by the kernel when its holder dies, however
it dies, so a claim can never outlive its worker. ``kdbench status`` reads a held claim as
"running" (``held_elsewhere`` takes it for an instant and lets go, writing nothing).

On a shared file system flock reaches other nodes where the file system supports it (NFSv4,
Lustre, GPFS); the running marker of ``kdbench.grid`` is what ``status`` trusts elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator

from kdbench.store import Store


def claim_path(store: Store, run_id: str) -> Path:
    # The teacher's lock of earlier versions had this name: an old launch and a new one still
    # exclude each other on a teacher.
    return store.locks_dir / f"{run_id}.lock"


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive flock on ``path``, waited for; ``on_wait`` is called once first if another
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(store: Store, run_id: str, on_wait: Callable[[], None] | None = None):
    """Hold the claim of ``run_id`` for the block, waiting while another process holds it."""
    return file_lock(claim_path(store, run_id), on_wait)


@contextlib.contextmanager
def try_claim(store: Store, run_id: str) -> Iterator[bool]:
    """The claim of ``run_id`` if it is free now (True), else nothing (False): no waiting."""
    path = claim_path(store, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_elsewhere(store: Store, run_id: str) -> bool:
    """Whether some process holds the claim of ``run_id`` now. Creates nothing."""
    try:
        fd = os.open(claim_path(store, run_id), os.O_RDONLY)
    except OSError:
        return False  # no lock file: never claimed (or an older version's run)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False
