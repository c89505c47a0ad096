"""Plan, check and launch a training run on Slurm (or on this machine) through submitit.

    python -m pipeline.submit --preset demo                         # Fashion-MNIST on 2 local processes
    python -m pipeline.submit --preset goyal_r50_bs8k --nodes 32 --gpus-per-node 8 --partition gpu
    python -m pipeline.submit --preset goyal_r50_bs256 --dry-run --json optim.base_lr=0.1
    python -m pipeline.submit --preset goyal_r50_bs256 --sweep train.micro_batch=16,32,64   # one job array
    python -m pipeline.submit --status runs/goyal_r50_bs8k-20261124-101500

Everything is checked before anything is submitted: the config and its overrides, the DeepSpeed JSON,
the shard manifests against the config, the run folder. The resolved plan is printed first.
Overrides are `section.key=value`; `--list-keys` prints them all.

Preemption and time limits: Slurm sends SIGUSR2 --signal-delay seconds before the time limit (and
SIGTERM at it, or on preemption); every rank then stops after the same step, writes a checkpoint, and the
job requeues itself and resumes from it. The same command with the same --run-dir also resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import config
from pipeline.launch import options, status, submission
from pipeline.launch.checks import check_local_capacity, choose_cluster
from pipeline.scaling.model import PAPER, PRESETS
from pipeline.train import report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The launcher's flags: the job's (pipeline.launch.options) and what to do with the run."""
    parser = options.job_parser("python -m pipeline.submit", __doc__)
    parser.add_argument("--run-dir", type=Path, help="run folder (default runs/<preset>-<date>-<time>); "
                                                     "an existing one is resumed if its config is the same")
    parser.add_argument("--emit-sbatch", type=Path, metavar="FILE",
                        help="prepare the run folder and write an sbatch script for it (slurm/train.sbatch) instead of submitting")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved plan, its predicted speed and whether the shards are ready; "
                             "write and submit nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--hardware", default=PAPER.name,
                        help="with --dry-run: predict step time, images/s, time to train and scaling efficiency "
                             f"on this hardware: a preset ({', '.join(PRESETS)}, the paper's cluster) or "
                             "the hardware.json python -m pipeline.tune_buckets measured on yours")
    parser.add_argument("--wait", action="store_true", help="on Slurm, follow the job until it ends (local runs always do)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RUN_DIR",
                        help="print and rewrite the report of a run, submit nothing; of several runs, also draw "
                             "their curves in one picture, overlay.png in their common parent folder")
    parser.add_argument("--status", type=Path, metavar="RUN_DIR",
                        help="print the job state, last metrics and ETA of a run (or of every run of a sweep)")
    parser.add_argument("--list-keys", action="store_true", help="print every override key with its preset value")
    return parser.parse_intermixed_args(argv)  # key=value overrides anywhere on the line


def main(argv: list[str] | None = None) -> int:
    return options.run_command(launch, parse_args(argv))


def launch(args: argparse.Namespace) -> int:
    """Everything main() does; bad input raises before anything is written or submitted."""
    if args.report:
        for run_dir in args.report:
            print(f"{run_dir}: {report.write(run_dir)}" if len(args.report) > 1 else report.write(run_dir))
        if len(args.report) > 1:
            path = Path(os.path.commonpath([d.resolve() for d in args.report])) / "overlay.png"
            report.overlay(args.report, path)
            print(f"the {len(args.report)} runs overlaid: {path}")
        return 0
    if args.status:
        print(status.describe(args.status))
        return 0
    if args.list_keys:
        flat = config.to_dict(config.preset(options.preset_name(args)))
        for key in config.valid_keys():
            section, name = key.split(".")
            print(f"{key}={flat[section][name]}")
        return 0
    if args.json and not args.dry_run:
        raise ValueError("--json only applies to --dry-run")
    sbatch_options = options.checked_sbatch_options(args)
    run_dir, runs, sweep = submission.resolve_runs(args)
    if args.dry_run:
        return submission.dry_run(args, run_dir, runs, sweep)
    if not args.emit_sbatch:
        requested, args.cluster = args.cluster, choose_cluster(args.cluster)  # before the demo's data is made
        for run in runs:
            check_local_capacity(requested, args.cluster, run.cfg)
    submission.print_plans(runs, sweep)
    submission.check_data(args, run_dir, runs)
    if args.emit_sbatch:
        return submission.emit_sbatch(args, runs[0], sbatch_options)
    if sweep:
        return submission.submit_sweep(args, runs, run_dir, sbatch_options)
    return submission.submit_run(args, runs[0], sbatch_options)


if __name__ == "__main__":
    sys.exit(main())
