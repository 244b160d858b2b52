"""Ctrl-C and SIGTERM as one exception, and the signal set-up of a worker process.

A launcher turns SIGINT (Ctrl-C) and SIGTERM (``kill``, systemd, a container runtime) into
``Interrupted``: the executor stops its workers, the CLI prints one line saying how to resume
and exits 128 + the signal's number (130, 143), as a shell reports a process killed by it.

A worker leaves both signals to its launcher: it ignores SIGINT (a terminal sends Ctrl-C to
the whole process group; the launcher decides), turns SIGTERM — the launcher stopping it —
into ``Interrupted`` so that it leaves through its ``finally`` blocks (running marker, run
claim) without a traceback, and asks the kernel for SIGTERM when its launcher dies, even by
SIGKILL, so that no worker trains on unsupervised.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from typing import Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Interrupted(KeyboardInterrupt):
    """A signal asked this process to stop. A KeyboardInterrupt, so code that already handles
    Ctrl-C handles SIGTERM alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """130 for a plain Ctrl-C (KeyboardInterrupt), 128 + the signal for an Interrupted."""
    return interrupt.exit_code if isinstance(interrupt, Interrupted) else 128 + signal.SIGINT


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, these signals raise Interrupted in the main thread. Elsewhere than
    the main thread (signal handlers cannot be set there) the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Hold back SIGINT while a worker is started: the blocked mask is inherited through
    fork and exec, so a Ctrl-C during the child's start-up (seconds of importing torch) cannot
    reach it before it ignores SIGINT itself; in this process it is delivered on unblocking."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while the launcher stops its workers: a second Ctrl-C must not
    abandon them half-stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def become_worker(launcher_pid: int) -> None:
    """Signal set-up of a worker process started by ``launcher_pid`` (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # see sigint_blocked
    signal.signal(signal.SIGTERM, _raise_interrupted)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    else:  # no PR_SET_PDEATHSIG: notice being orphaned (re-parented) within a second
        def watch() -> None:
            while os.getppid() == launcher_pid:
                threading.Event().wait(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="kdbench-launcher-watch", daemon=True).start()
    # The launcher may have died before the line above: then nobody would send the signal.
    if os.getppid() != launcher_pid:
        raise Interrupted(signal.SIGTERM)
