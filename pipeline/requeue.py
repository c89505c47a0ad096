"""After a training job step has ended on Slurm: requeue the job when it failed mid-run.

    python -m pipeline.requeue RUN_DIR --exit-code CODE --max-requeues N --log SRUN_LOG   # slurm/train.sbatch
    python -m pipeline.requeue --submitit FOLDER --exit-code CODE --max-requeues N        # submitit's jobs

Both job scripts run it right after `srun` with srun's exit status. A rank that dies without a warning (a
SIGKILL, a lost node, a crash) ends the whole step (`srun --kill-on-bad-exit`), or the others fail when a
collective outlives cluster.collective_timeout_s; neither the signal path of pipeline.train.preempt nor
submitit (which requeues on time limits and preemption only) requeues then. This does, at most N times (Slurm
counts every requeue in SLURM_RESTART_COUNT), and the requeued job resumes from the newest complete
checkpoint. Not requeued: a job that ended well, one already requeued by a stop signal, a finished or
diverged run, a run whose checkpoint could not be written (a full disk), and an attempt that failed before its
first step (it would fail the same way again). After a
failed step, requeued or not, it appends a `failed` record to the run's metrics.jsonl naming the exit
status, srun's words on the tasks that died, and why it was or was not requeued.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from submitit.core.utils import DelayedSubmission, JobPaths

from pipeline.launch.jobs import TrainJob
from pipeline.train import metrics, preempt
from pipeline.train.preempt import ATTEMPT


def submitit_job(folder: Path, job_id: str) -> tuple[Path | None, Path]:
    """The run folder of submitit's job `job_id` (an array task's as "123_4"), from the job it pickled (None for
    a job that is not a training run: bucket tuning), and the job's stderr, which holds srun's own messages."""
    paths = JobPaths(folder, job_id=job_id, task_id=0)
    job = DelayedSubmission.load(paths.submitted_pickle).function
    return (job.run_dir if isinstance(job, TrainJob) else None), paths.stderr


def submitit_job_id() -> str:
    """submitit's name of this Slurm job: "ARRAY_TASK" for a task of a job array, else the job id."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeued_already(job: str) -> bool:
    """Whether Slurm has requeued the job since this attempt started (a stop signal's requeue)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    found = re.search(r"\bRestarts=(\d+)", shown.stdout)
    return bool(found) and int(found.group(1)) > int(os.environ.get("SLURM_RESTART_COUNT", 0))


def dead_tasks(log: Path | None) -> list[str]:
    """srun's lines on the tasks of this attempt that ended badly ("task 1: Killed"), from the log that holds
    srun's own messages (the job scripts mark each attempt's start in it: ATTEMPT)."""
    if log is None or not log.is_file():
        return []
    text = log.read_text(errors="replace").rsplit(ATTEMPT, 1)[-1]
    return list(dict.fromkeys(re.findall(r"srun: error: \S+: (tasks? [\d,-]+: .+)", text)))


def decide(run_dir: Path, max_requeues: int) -> tuple[bool, str]:
    """(requeued, why) for a job step of run_dir that failed: requeues it when that may help."""
    records = metrics.read(run_dir / "metrics.jsonl")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    starts = [i for i, r in enumerate(records) if r["_type"] == "start" and r.get("job_id") == os.environ["SLURM_JOB_ID"]
              and r.get("restarts") == restarts]
    refused = preempt.requeue_refused(run_dir, records[starts[-1]:] if starts else [])
    return (False, refused) if refused else preempt.requeue_job(max_requeues)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.requeue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("run_dir", nargs="?", type=Path, help="the run folder (slurm/train.sbatch)")
    where.add_argument("--submitit", type=Path, metavar="FOLDER", help="submitit's folder of the job (its own jobs)")
    parser.add_argument("--exit-code", type=int, required=True, help="srun's exit status")
    parser.add_argument("--max-requeues", type=int, required=True, help="requeue at most this many times in all")
    parser.add_argument("--log", type=Path, help="with RUN_DIR: the file that holds srun's own messages")
    args = parser.parse_args(argv)
    if args.exit_code == 0:
        return 0
    # A requeue makes Slurm signal the whole job, this process included: the record still gets written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.submitit:
        run_dir, log = submitit_job(args.submitit, submitit_job_id())
        if run_dir is None:
            return args.exit_code
    else:
        run_dir, log = args.run_dir, args.log
    if requeued_already(os.environ["SLURM_JOB_ID"]):
        return args.exit_code
    requeued, why = decide(run_dir, args.max_requeues)
    record = metrics.MetricsLog(run_dir / "metrics.jsonl", enabled=True).write(
        "failed", job_id=os.environ["SLURM_JOB_ID"], exit_code=args.exit_code, tasks=dead_tasks(log), requeued=requeued,
        reason=why)
    print(metrics.progress_line(record), file=sys.stderr, flush=True)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
