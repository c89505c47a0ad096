"""Slurm's stop signals, and blocking them in helper processes (pipeline.train.preempt says what a rank
does with them)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

# SIGUSR2 some time before the time limit (`--signal=USR2@90`, submitit's signal); SIGTERM at the limit,
# on preemption and on scancel. Slurm sends them to every process of a job step.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@contextlib.contextmanager
def signals_blocked():
    """Block SIGUSR2 and SIGTERM in this thread meanwhile.

    A process started meanwhile keeps them blocked (the mask survives fork and exec): helper processes
    (the DataLoader's forkserver and every worker it forks) must outlive the signals, or a worker killed by
    SIGUSR2 fails its rank before the rank reaches the step boundary where it checkpoints. Signals that
    arrive meanwhile wait and are delivered when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies, whatever killed the parent (prctl PR_SET_PDEATHSIG; Linux).

    Helper processes (the DataLoader's forkserver, its workers) block the stop signals and are not in Slurm's
    view on a local run: a rank killed with SIGKILL left them behind as orphans that ignore SIGTERM. Where
    the C library has no prctl (not Linux), nothing changes."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
