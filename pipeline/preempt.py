"""Preemption and time limits: every rank stops at the same step boundary, checkpoints, and the job
requeues itself.

Slurm signals every process of a job step: SIGUSR2 some time before the time limit (`--signal=USR2@90`,
submitit's signal), SIGTERM at the limit, on preemption and on scancel. A signal only sets a flag here;
the ranks agree on the flags at each optimizer-step boundary (one small allreduce, read one step later so
that no rank waits on it), so all of them stop after the same step and write one consistent checkpoint.

Requeueing is one rank's job:
- under submitit, rank 0 hands the signal to submitit's own handler, which pickles the job again
  (`Checkpointable.checkpoint`), runs `scontrol requeue` and counts timeouts against `max_num_timeout`.
  submitit calls that handler on rank 0 only and at any instruction, mid-allreduce included; that is why
  our handler replaces it during training and gives it the signal once the checkpoint is written.
- under plain srun (slurm/train.sbatch), rank 0 runs `scontrol requeue` itself, at most
  `--max-requeues` times (Slurm counts them in SLURM_RESTART_COUNT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@contextlib.contextmanager
def signals_blocked():
    """Block SIGUSR2 and SIGTERM in this thread meanwhile.

    A process started meanwhile keeps them blocked (the mask survives fork and exec): helper processes
    (the DataLoader's forkserver and every worker it forks) must outlive the signals, or a worker killed by
    SIGUSR2 fails its rank before the rank reaches the step boundary where it checkpoints. Signals that
    arrive meanwhile wait and are delivered when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequest:
    """Records SIGUSR2/SIGTERM instead of dying of them; the ranks agree on a stop step with `poll`."""

    def __init__(self):
        self.received: str | None = None  # name of the first signal caught on this rank
        self.previous: dict[int, object] = {}  # the handlers ours replaced (submitit's, in its jobs)
        self._pending = None  # (work, flag) of the allreduce started by the last poll

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._catch)
        return self

    def _catch(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            os.write(2, f"caught {self.received}: stopping at the next step boundary to checkpoint\n".encode())

    def poll(self, device) -> bool:
        """Collective, at an optimizer-step boundary: True on every rank when any rank had caught a signal
        by the previous poll. The allreduce started here is read by the next poll, so no rank waits on the
        network now; stopping happens one step later than the signal would allow, on all ranks alike."""
        import torch
        import torch.distributed as dist

        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=device)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)  # any rank's signal
        return stop

    def settle(self, device) -> bool:
        """Collective, where no step follows (the end of an epoch): True on every rank when any rank has
        caught a signal, including since the last poll."""
        stop = self.poll(device)
        return self.poll(device) or stop

    def requeue(self, max_requeues: int) -> tuple[bool, str]:
        """Requeue this Slurm job (rank 0 only, once the checkpoint is complete): (requeued, what happened)."""
        submitit_handler = self.previous.get(signal.SIGUSR2)
        if callable(submitit_handler):
            try:  # submitit: pickle the job again, `scontrol requeue`, count timeouts, then sys.exit(-1)
                submitit_handler(signal.SIGUSR2, None)
            except SystemExit:
                return True, "requeued by submitit"
            except Exception as err:  # too many timeouts, or scontrol refused (a cancelled job)
                return False, f"not requeued: {err}"
            return False, "not requeued: submitit's handler returned"
        job = os.environ.get("SLURM_JOB_ID")
        if job is None:
            return False, "not requeued: not a Slurm job"
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        if restarts >= max_requeues:
            return False, f"not requeued: job {job} was requeued {restarts} times already (--max-requeues {max_requeues})"
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return False, f"not requeued: scontrol requeue {job} failed: {result.stderr.strip()}"
        return True, f"requeued job {job} ({restarts + 1} of at most {max_requeues} requeues)"
