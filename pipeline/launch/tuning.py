"""Submitting a bucket-size tuning job (python -m pipeline.tune_buckets): its flags checked, its run
folder prepared, the job submitted through the same launcher as training."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from pipeline.launch import options
from pipeline.launch.jobs import TuneJob
from pipeline.launch.checks import check_paths, choose_cluster
from pipeline.launch.executor import failed, job_error, make_executor, submit_jobs
from pipeline.launch.run import prepare_run_dir, resolve_run

DEFAULT_SIZES = "1000000,2000000,6553600,13107200,26214400,100000000"


def launch(args: argparse.Namespace) -> int:
    """Check everything, then submit the tuning job; on this machine (or with --wait) print its table."""
    try:
        values = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) and v == int(v) for v in values):
        raise ValueError(f"--sizes {args.sizes!r}: give bucket sizes in elements as whole numbers, "
                         "e.g. 1000000,6553600 or 1e6")
    sizes = sorted({int(v) for v in values})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--sizes {args.sizes!r}: give at least one bucket size of 1 element or more")
    for flag, value in (("--steps", args.steps), ("--rounds", args.rounds)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    sbatch_options = options.checked_sbatch_options(args)
    run_dir = (args.run_dir or Path("runs") / f"tune-{options.preset_name(args)}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run = resolve_run(args, args.overrides, run_dir)
    cfg = run.cfg
    write = args.write.resolve() if args.write else None
    if write and not os.access(write.parent, os.W_OK):
        raise PermissionError(f"--write {args.write}: cannot write into {write.parent}")
    check_paths(cfg, run_dir, args.assume_shared)
    if (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} already holds a run; pass a new --run-dir")
    args.cluster = choose_cluster(args.cluster)
    executor = make_executor(args, cfg, run_dir / "submitit", f"tune-{run_dir.name}", sbatch_options)
    prepare_run_dir(run)
    print(run.plan.summary(cfg))
    print(f"candidates: overlap off, buckets of {', '.join(f'{s:,}' for s in sizes)} elements; "
          f"{args.steps} steps x {args.rounds} rounds each", flush=True)
    (job,) = submit_jobs(executor, [TuneJob(run_dir, sizes, args.steps, args.rounds, write)])
    print(f"submitted job {job.job_id} ({executor.cluster}); results in {run_dir}", flush=True)
    if executor.cluster == "slurm" and not args.wait:
        print(f"when it ends, its table is in {shlex.quote(str(run_dir / 'submitit'))}/{job.job_id}_0_log.out")
        return 0
    error = job_error(job)
    if error:
        print(failed("the tuning job", error, run_dir / "submitit"), file=sys.stderr)
        return 1
    print(job.results()[0]["table"])
    return 0
