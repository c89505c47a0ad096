"""One rank of a local job, run as a child whose exit status is written down: submitit's local controller
keeps none (it polls its tasks and drops their codes), so a launcher could not say which rank was killed by
which signal. The controller starts `python -m pipeline.launch.local_task ARGS` (the executor's `python`)
in place of `python ARGS`; this process forwards every signal the controller sends to the rank, waits for it,
writes `<job>_<rank>_exit.json` beside submitit's result files, and ends as the rank did (of the same signal,
or with the same status). The rank dies with it, and it with the controller (pipeline.signals.die_with_parent),
whatever kills either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from submitit.core.utils import JobPaths

from pipeline.signals import STOP_SIGNALS, die_with_parent

FORWARDED = (*STOP_SIGNALS, signal.SIGINT, signal.SIGCONT)  # what the controller sends: stop, timeout, kill
CAUSES = {"SIGKILL": "by hand, or by the kernel's out-of-memory killer: `dmesg` says which",
          **{name: "a crash in native code" for name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE")}}


def exit_file(folder: Path, job_id: str, rank: int) -> Path:
    """Where the wrapper of `rank` writes its exit status (a negative status: the signal that killed it)."""
    paths = JobPaths(folder, job_id=job_id, task_id=rank)
    return paths.result_pickle.with_name(f"{job_id}_{rank}_exit.json")


def how_it_ended(folder: Path, job_id: str, rank: int) -> str:
    """How a rank that left no result ended, from its exit file: "was killed by SIGKILL (...)"."""
    path = exit_file(folder, job_id, rank)
    if not path.is_file():
        return "ended without a word (its wrapper was killed too)"
    code = json.loads(path.read_text())["exit_code"]
    if code >= 0:
        return f"exited with status {code} before writing its result"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name
        name = f"signal {-code}"
    return f"was killed by {name} ({CAUSES.get(name, 'sent from outside')})"


def start_rank() -> None:
    """In the rank's process before it runs: the signals this process held back reach it again, and it dies
    with this process."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    die_with_parent()


def main(argv: list[str]) -> int:
    die_with_parent()  # a controller killed outright takes this process, and so the rank, with it
    started: list[subprocess.Popen] = []
    # Held back until the rank runs and the handlers can reach it: none is lost, none kills this process.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    for sig in FORWARDED:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored SIGINT stays ignored, as the launcher asked
            signal.signal(sig, lambda signum, frame: started[0].send_signal(signum))
    started.append(subprocess.Popen([sys.executable, *argv], preexec_fn=start_rank))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    code = started[0].wait()
    folder = Path(argv[-1])  # the controller's command ends with submitit's folder
    path = exit_file(folder, os.environ["SUBMITIT_LOCAL_JOB_ID"], int(os.environ["SUBMITIT_LOCAL_GLOBALID"]))
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"exit_code": code}) + "\n")
    partial.replace(path)  # whole or absent, whatever kills this process now
    if code < 0:  # end as the rank did, of the same signal: 128 + N could read as submitit's requeue code (144)
        if -code in FORWARDED:
            signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
    return code if code >= 0 else 128 - code  # a signal whose default is to be ignored


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
