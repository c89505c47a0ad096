"""Every rank stops after the same optimizer step when Slurm signals the job, and rank 0 requeues it once
the checkpoint is complete: through submitit's own handler, or `scontrol requeue` under plain srun.
docs/preemption.md tells the whole story; the code-level reasons are at each function.
"""

from __future__ import annotations

import os
import signal
import subprocess

from pipeline.signals import STOP_SIGNALS


class StopRequest:
    """Records SIGUSR2/SIGTERM instead of dying of them; the ranks agree on a stop step with `poll`."""

    def __init__(self):
        self.received: str | None = None  # name of the first signal caught on this rank
        self.previous: dict[int, object] = {}  # the handlers ours replaced (submitit's, in its jobs)
        self._pending = None  # (work, flag) of the allreduce started by the last poll

    def install(self) -> StopRequest:
        """Catch the stop signals from now on. In a submitit job this replaces submitit's handler, which
        would requeue at whatever instruction the signal lands on, mid-allreduce included; requeue()
        hands it the signal once the checkpoint is complete."""
        for sig in STOP_SIGNALS:
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
