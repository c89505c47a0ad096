"""The command-line flags of a job on the cluster (config, resources, Slurm), shared by submit and
tune_buckets, and their checks: everything here is refused before anything is written or submitted."""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import typing

from pipeline import config
from pipeline.launch import sbatch

# Set by sbatch.py and by the launcher itself; --slurm may not change them.
OWN_SBATCH_KEYS = {"nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "time", "signal", "job-name",
                   "output", "error", "array", "requeue", "open-mode", "ntasks", "gpus"}


def job_parser(prog: str, description: str, training: bool = True, preset: str = "demo",
               sweeps: bool = True) -> argparse.ArgumentParser:
    """The flags of a job on the cluster (config, resources, Slurm), shared by submit, reproduce and
    tune_buckets; the flags of training alone (stop signals, requeues, sweeps) only with `training`, --sweep
    only with `sweeps` too (a study makes its own runs)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"config preset: {', '.join(config.PRESETS)} (default {preset}; for an existing "
                                         "run folder, the config saved in it)")
    parser.set_defaults(default_preset=preset)
    parser.add_argument("--nodes", type=int, help="nodes (default: the preset's)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs = ranks per node; on CPU, processes (default: the preset's)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per rank, also its torch threads (default: the preset's)")
    parser.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                        help="auto: Slurm when srun is on PATH (an error where its controller does not answer "
                             "scontrol ping), else this machine (an error where the ranks outnumber its GPUs or "
                             "cores); local: this machine, whatever it has; debug: in this process, 1 rank")
    if training:
        parser.add_argument("--max-requeues", type=int, metavar="N",
                            help="times a job that failed mid-run (or, on Slurm, reached its time limit) starts "
                                 "again from its newest checkpoint (default 3 on Slurm, where submitit does not count "
                                 "preemptions; 0 on this machine). Never for a run that diverged, could not write its "
                                 "checkpoint, or failed before its first step")
    slurm = parser.add_argument_group("Slurm (ignored by --cluster local and debug)")
    slurm.add_argument("--partition", help="partition to run in")
    slurm.add_argument("--account", help="account to charge")
    slurm.add_argument("--qos", help="quality of service")
    slurm.add_argument("--constraint", help="node features, e.g. 'a100&ib'")
    slurm.add_argument("--mem", help="memory per node, e.g. 400G (default: the partition's)")
    slurm.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job")
    slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm reservation=big --slurm mail-type=END (repeatable)")
    slurm.add_argument("--time", type=int, default=72 * 60, help="time limit in minutes (default 4320)")
    if training:
        slurm.add_argument("--signal-delay", type=int, default=90, metavar="SECONDS",
                           help="SIGUSR2 this long before the time limit: the ranks checkpoint and the job requeues "
                                "(default 90)")
        if sweeps:
            slurm.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                               help="one run per value (per combination when repeated), submitted as one job array; "
                                    "each run gets a folder inside --run-dir")
        slurm.add_argument("--array-parallelism", type=int, default=256,
                           help="runs of a job array running at once (default 256)")
    else:  # a measurement: no checkpoint to stop for, nothing to requeue, one job
        parser.set_defaults(signal_delay=90, max_requeues=0, sweep=[], array_parallelism=1)
    slurm.add_argument("--assume-shared", action="store_true",
                       help="multi-node jobs: skip the check that the run folder and shards are on a network "
                            "filesystem (for nodes that all mount the same local disk, e.g. one host)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. schedule.epochs=2")
    return parser


def preset_name(args: argparse.Namespace) -> str:
    """The preset the command names, else the command's default."""
    return args.preset or args.default_preset


def requeue_limit(args: argparse.Namespace, cluster: str) -> int:
    """--max-requeues, else its default on the cluster that runs the job: 3 on Slurm, 0 on this machine."""
    if args.max_requeues is not None:
        return args.max_requeues
    return 3 if cluster == "slurm" else 0


def sbatch_options(args: argparse.Namespace) -> dict[str, str | bool]:
    """The optional sbatch flags of the job (name without dashes -> value; True for a bare flag), the same
    for submitit and for slurm/train.sbatch. --slurm values are checked here, before anything runs."""
    options: dict[str, str | bool] = {"requeue": True}  # scontrol requeue needs it where JobRequeue=0
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    if args.exclusive:
        options["exclusive"] = True
    for item in args.slurm:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not sep or not key:
            raise ValueError(f"--slurm {item!r} is not KEY=VALUE (e.g. --slurm reservation=big)")
        if key in OWN_SBATCH_KEYS:
            raise ValueError(f"--slurm {item!r}: {key} is set by the launcher; use --nodes, --gpus-per-node, "
                             "--cpus-per-task, --time or --signal-delay instead")
        options[key] = value
    for key, value in options.items():
        sbatch.directive(key, value)  # raises on a value an #SBATCH line cannot hold
    return options


def run_command(body: typing.Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """body(args), the whole of a command line's work; bad input (raised before anything is written or
    submitted) ends it with one `error: ...` line and exit status 2, not a traceback."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def checked_sbatch_options(args: argparse.Namespace) -> dict[str, str | bool]:
    """The Slurm flags checked (check_slurm_args), then the job's sbatch options (sbatch_options)."""
    check_slurm_args(args)
    return sbatch_options(args)


def check_slurm_args(args: argparse.Namespace) -> None:
    """Time, signal delay, requeue and array limits that Slurm can honour."""
    for flag, value, least in (("--time", args.time, 1), ("--signal-delay", args.signal_delay, 0),
                               ("--max-requeues", args.max_requeues or 0, 0),
                               ("--array-parallelism", args.array_parallelism, 1)):
        if value < least:
            raise ValueError(f"{flag} {value} must be at least {least}")
    if args.signal_delay >= args.time * 60:
        raise ValueError(f"--signal-delay {args.signal_delay} s is not shorter than --time {args.time} min: the job "
                         "would be told to stop as it starts; use a shorter delay or a longer time")


def sweep_overrides(items: list[str], base: list[str]) -> list[tuple[str, list[str]]]:
    """(folder name, overrides) of every run of a sweep: the cartesian product of --sweep values, each
    applied after the plain overrides; [] without --sweep."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not parts:
            raise ValueError(f"--sweep {item!r} is not KEY=V1,V2,... (e.g. --sweep train.micro_batch=16,32)")
        if key.startswith("cluster."):
            raise ValueError(f"--sweep {key}: every run of a job array gets the same resources; "
                             "submit runs with other cluster settings separately")
        axes.append([f"{key}={v}" for v in parts])
    runs = []
    for i, combo in enumerate(itertools.product(*axes) if axes else []):
        name = f"{i:02d}_" + "_".join(re.sub(r"[^A-Za-z0-9_.=-]", "-", o) for o in combo)
        runs.append((name, [*base, *combo]))
    return runs
