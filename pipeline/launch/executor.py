"""The submitit executor of a job on Slurm or on this machine, submitting to it, and stopping a local job."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

import submitit

from pipeline import config
from pipeline.launch.options import requeue_limit
from pipeline.train.preempt import ATTEMPT


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT ignored while the block starts processes, which inherit that: a Ctrl-C in the terminal then
    reaches the launcher alone, which stops the job cleanly (stop_local_job), instead of reaching submitit's
    local controller (which dies printing a traceback, and kills the ranks a second later) and the ranks
    (which die mid-step, so that the steps since their last checkpoint are lost and trained again)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_local_job(job: submitit.Job) -> None:
    """Ask a job of submitit's local executor to stop: SIGTERM to its controller (the job id is its pid),
    which forwards it to the ranks; they stop after the same step and checkpoint (pipeline.train.preempt).
    submitit's own cancel() sends SIGINT, which these processes ignore (_interrupts_ignored)."""
    try:
        os.kill(int(job.job_id), signal.SIGTERM)
    except ProcessLookupError:  # it has just ended
        pass


def submit_jobs(executor: submitit.Executor, jobs: list) -> list[submitit.Job]:
    """executor.submit of every job (one job array when several); a refusal by sbatch becomes one error
    with Slurm's own words and the way out. Local jobs start with SIGINT ignored (_interrupts_ignored)."""
    try:
        with _interrupts_ignored() if executor.cluster == "local" else contextlib.nullcontext():
            if len(jobs) == 1:
                return [executor.submit(jobs[0])]
            with executor.batch():
                submitted = [executor.submit(job) for job in jobs]
        return submitted
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        words = " ".join(str(err).split())
        raise ValueError(f"Slurm refused the job: {words}; fix what it says, or run on this machine with "
                         "--cluster local") from None


def make_executor(args: argparse.Namespace, cfg: config.Config, folder: Path, name: str,
                  options: dict) -> submitit.Executor:
    """submitit executor with one task per GPU (per process on CPU); args.cluster is a chosen one."""
    requeues = requeue_limit(args, args.cluster)
    # Each local rank runs under pipeline.launch.local_task, which writes down how it ended
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=requeues,
                                     local_python=f"{shlex.quote(sys.executable)} -m pipeline.launch.local_task")
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if executor.cluster == "debug" and world != 1:
        raise ValueError(f"--cluster debug runs one rank in this process, but the plan has world_size={world}; "
                         "use --cluster local, or --nodes 1 --gpus-per-node 1")
    if executor.cluster != "slurm" and cfg.cluster.nodes != 1:
        raise ValueError(f"--nodes {cfg.cluster.nodes} needs Slurm; this machine runs one node (--cluster {executor.cluster})")
    # Without GPUs asked for, submitit's local executor hides every GPU (CUDA_VISIBLE_DEVICES="").
    gpus = cfg.cluster.gpus_per_node if config.wants_gpus(cfg.cluster) and executor.cluster != "debug" else 0
    executor.update_parameters(nodes=cfg.cluster.nodes, tasks_per_node=cfg.cluster.gpus_per_node, gpus_per_node=gpus,
                               cpus_per_task=cfg.cluster.cpus_per_task, timeout_min=args.time, name=name)
    if executor.cluster == "slurm":
        # One failed rank ends the whole step at once instead of leaving the others blocked in a collective;
        # then pipeline.requeue, with srun's exit status, requeues a job that failed mid-run (submitit requeues
        # on time limits and preemption only). The line before srun marks the attempt in srun's log.
        requeue = [shlex.quote(sys.executable), "-m", "pipeline.requeue", "--submitit", shlex.quote(str(folder)),
                   "--exit-code", "$?", "--max-requeues", str(requeues)]
        executor.update_parameters(slurm_signal_delay_s=args.signal_delay, slurm_srun_args=["--kill-on-bad-exit=1"],
                                   slurm_additional_parameters=options, slurm_array_parallelism=args.array_parallelism,
                                   slurm_setup=[f'echo "{ATTEMPT} ${{SLURM_RESTART_COUNT:-0}}" >&2'],
                                   slurm_teardown=[" ".join(requeue)])
    return executor


def job_error(job: submitit.Job) -> str | None:
    """None when every rank of the job returned; else the exception it ended with, in one line
    ("NoCheckpointLoads: no checkpoint of ... loads: ..."), from the trace submitit wraps between two dashed
    lines (else its error's last line). The one tail of every job the launcher waits for."""
    try:
        job.results()
    except submitit.core.utils.UncompletedJobError as err:  # FailedJobError too; this one where rank 0 left nothing
        parts = str(err).split("----------------------\n")
        lines = (parts[1] if len(parts) >= 3 else str(err)).strip().splitlines()
        return lines[-1].strip() if lines else type(err).__name__
    return None


def failed(what: str, error: str, logs: Path) -> str:
    """The launcher's last word on a failed job: what failed, why, and where the tracebacks are."""
    return f"error: {what} failed: {error}\nthe ranks' logs, tracebacks included, are in {logs}"
