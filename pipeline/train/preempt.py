"""Every rank stops after the same optimizer step when Slurm signals the job, and rank 0 requeues it once
the checkpoint is complete: through submitit's own handler, or `scontrol requeue` under plain srun.
docs/preemption.md tells the whole story; the code-level reasons are at each function.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from pipeline.signals import STOP_SIGNALS

# What the job scripts write to srun's log before each attempt, so that pipeline.requeue reads only its own
ATTEMPT = "pipeline.requeue: attempt"


class StopRequest:
    """Records SIGUSR2/SIGTERM instead of dying of them and whether every loss was finite; the ranks agree on
    a stop step with `poll`, whose allreduce also carries the periodic checkpoints' clock (its own, in
    pipeline.train.checkpoint.Clock), so that they agree on the step of a periodic checkpoint too."""

    def __init__(self):
        self.received: str | None = None  # name of the first signal caught on this rank
        self.previous: dict[int, object] = {}  # the handlers ours replaced (submitit's, in its jobs)
        self.diverged_at: int | None = None  # a step by which some rank's loss was not finite
        self.clock = None  # the periodic checkpoints' clock (pipeline.train.checkpoint.Clock), read by poll
        self._finite = None  # on the device: every loss noted so far was finite
        self._pending = None  # (work, flag, step, its host copy on CUDA) of the allreduce started by the last poll

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

    def note_loss(self, loss) -> None:
        """Remember, on the device and without a host sync, whether this loss was finite too."""
        import torch

        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite

    def poll(self, device, step: int | None = None) -> bool:
        """Collective, at an optimizer-step boundary: True on every rank when any rank had caught a signal,
        or seen a loss that was not finite (then diverged_at is set), by the previous poll. The allreduce
        started here is read by the next poll, so no rank waits on the network now; stopping happens one
        step later than the signal would allow, on all ranks alike."""
        import torch
        import torch.distributed as dist

        stop = False
        if self._pending is not None:
            signalled, diverged, due = self._read_pending()
            stop = bool(signalled or diverged)
            if due and self.clock is not None:
                self.clock.due = True
        # Filled on the device (no copy from the host): [a signal here, a loss that was not finite here, a
        # periodic checkpoint due by this rank's clock]
        flag = torch.zeros(3, dtype=torch.int32, device=device)
        if self.received is not None:
            flag[0] = 1
        if self._finite is not None:
            flag[1] = (~self._finite).to(torch.int32)
        if self.clock is not None and self.clock.due_here():
            flag[2] = 1
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)  # all_reduce: any rank's flags
        copy = None
        if flag.device.type == "cuda":
            # The result's copy into pinned host memory, queued behind the allreduce (work.wait() makes the
            # stream wait for NCCL, not the host), and an event after it: the next poll waits for that event
            # only, not for the step queued since, which a .tolist() of the device tensor would wait for.
            work.wait()
            host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            copy = (host, torch.cuda.Event())
            copy[1].record()
        self._pending = (work, flag, step, copy)
        return stop

    def _read_pending(self) -> list[int]:
        """The flags of the previous poll's allreduce, read on the host (records diverged_at): by now it is
        done, on gloo (the wait returns at once) as on NCCL (the event of its copy has passed)."""
        work, flag, sent, copy = self._pending
        if copy is None:  # gloo: the flag is host memory once the work is done
            work.wait()
            values = flag.tolist()
        else:
            host, event = copy
            event.synchronize()
            values = host.tolist()
        if values[1] and self.diverged_at is None:
            self.diverged_at = sent
        return values

    def settle(self, device, step: int | None = None) -> bool:
        """Collective, where no step follows (the end of an epoch): True on every rank when any rank has
        caught a signal or seen a loss that was not finite, including since the last poll."""
        stop = self.poll(device, step)
        return self.poll(device, step) or stop

    def requeue(self, max_requeues: int) -> tuple[bool, str]:
        """Requeue this Slurm job (rank 0 only, once the checkpoint is complete): (requeued, what happened)."""
        job = os.environ.get("SLURM_JOB_ID")
        if job is None:  # submitit's local executor installs its handler too, but there is nothing to requeue
            return False, "not requeued (not a Slurm job)"
        submitit_handler = self.previous.get(signal.SIGUSR2)
        if callable(submitit_handler):
            try:  # submitit: pickle the job again, `scontrol requeue`, count timeouts, then sys.exit(-1)
                submitit_handler(signal.SIGUSR2, None)
            except SystemExit:
                return True, "requeued by submitit"
            except Exception as err:  # too many timeouts, or scontrol refused (a cancelled job)
                return False, f"not requeued: {err}"
            return False, "not requeued: submitit's handler returned"
        return requeue_job(max_requeues)


def requeue_refused(run_dir: Path, attempt: list[dict]) -> str | None:
    """Why a failed job of run_dir must not start again, from the records its attempt wrote (its `start`
    record on); None where starting again from the newest checkpoint may help. The same rules on Slurm
    (pipeline.requeue) and on this machine (the launcher)."""
    if (run_dir / "report.json").is_file():
        return "the run had finished"
    if any(r["_type"] == "diverged" for r in attempt):
        return "the run diverged (a loss that was not finite): a requeue would diverge again"
    if any(r["_type"] == "save_failed" for r in attempt):
        return ("a checkpoint could not be written (its record says where and how much space it needs): a requeue "
                "would fail on the same disk; free space, then resume")
    if not any(r["_type"] in ("train_iter", "checkpoint", "eval") for r in attempt):
        return "this attempt failed before its first step: a requeue would fail the same way"
    return None


def requeue_job(max_requeues: int) -> tuple[bool, str]:
    """`scontrol requeue` this Slurm job unless Slurm has requeued it max_requeues times already (it counts
    them in SLURM_RESTART_COUNT): (requeued, what happened)."""
    job = os.environ["SLURM_JOB_ID"]
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if restarts >= max_requeues:
        return False, f"not requeued: job {job} was requeued {restarts} times already (--max-requeues {max_requeues})"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return False, f"not requeued: scontrol requeue {job} failed: {result.stderr.strip()}"
    return True, f"requeued job {job} ({restarts + 1} of at most {max_requeues} requeues)"
