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
import dataclasses
import itertools
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import submitit

from pipeline import buckets, config, demo, metrics, model, report, sbatch, scaling, shards, status
from pipeline.dsconfig import load_ds_config
from pipeline.job import TrainJob
from pipeline.manifest import load_manifest

DEMO_IMAGES = Path("data/fashion-mnist")


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags of a job on the cluster (config, resources, Slurm), shared by submit and tune_buckets."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help=f"config preset: {', '.join(config.PRESETS)} (default demo)")
    parser.add_argument("--nodes", type=int, help="nodes (default: the preset's)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs = ranks per node; on CPU, processes (default: the preset's)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per rank, also its torch threads (default: the preset's)")
    parser.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                        help="auto: Slurm when srun is on PATH, else this machine; debug: in this process, 1 rank")
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
    slurm.add_argument("--signal-delay", type=int, default=90, metavar="SECONDS",
                       help="SIGUSR2 this long before the time limit: the ranks checkpoint and the job requeues (default 90)")
    slurm.add_argument("--max-requeues", type=int, default=3,
                       help="time-limit requeues before the job gives up (default 3; preemptions are not counted by submitit)")
    slurm.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="one run per value (per combination when repeated), submitted as one job array; "
                            "each run gets a folder inside --run-dir")
    slurm.add_argument("--array-parallelism", type=int, default=256, help="sweep runs running at once (default 256)")
    slurm.add_argument("--assume-shared", action="store_true",
                       help="multi-node jobs: skip the check that the run folder and shards are on a network "
                            "filesystem (for nodes that all mount the same local disk, e.g. one host)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. schedule.epochs=2")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser("python -m pipeline.submit", __doc__)
    parser.add_argument("--run-dir", type=Path, help="run folder (default runs/<preset>-<date>-<time>); "
                                                     "an existing one is resumed if its config is the same")
    parser.add_argument("--emit-sbatch", type=Path, metavar="FILE",
                        help="prepare the run folder and write an sbatch script for it (slurm/train.sbatch) instead of submitting")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan, submit nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--hardware", default=scaling.PAPER.name,
                        help="with --dry-run: predict step time, images/s, time to train and scaling efficiency "
                             f"on this hardware: a preset ({', '.join(scaling.PRESETS)}, the paper's cluster) or "
                             "the hardware.json python -m pipeline.tune_buckets measured on yours")
    parser.add_argument("--wait", action="store_true", help="on Slurm, follow the job until it ends (local runs always do)")
    parser.add_argument("--report", type=Path, metavar="RUN_DIR", help="print and rewrite the report of a run, submit nothing")
    parser.add_argument("--status", type=Path, metavar="RUN_DIR",
                        help="print the job state, last metrics and ETA of a run (or of every run of a sweep)")
    parser.add_argument("--list-keys", action="store_true", help="print every override key with its preset value")
    return parser.parse_args(argv)


def resolve_job(args: argparse.Namespace, overrides: list[str]) -> tuple[config.Config, config.Plan, dict]:
    """The config (preset, then the cluster flags, then key=value overrides), its plan and the reconciled
    DeepSpeed JSON; raises on anything that cannot run."""
    cfg = config.preset(args.preset)
    cluster = {k: v for k, v in (("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node),
                                 ("cpus_per_task", args.cpus_per_task)) if v is not None}
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))
    cfg = config.apply_overrides(cfg, overrides)
    # The ranks may start elsewhere: make the shard folder absolute once, here.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(Path(cfg.data.shards).resolve())))
    plan = config.resolve(cfg)
    model.check_arch(cfg.model.arch)
    return cfg, plan, load_ds_config(cfg, plan)


def check_shards(cfg: config.Config) -> None:
    """The manifests exist and agree with the config; errors name the file, both values and the fix."""
    for split, expected in (("train", cfg.data.train_samples), ("val", cfg.data.val_samples)):
        manifest = load_manifest(cfg.data.shards, split)
        if manifest.num_samples != expected:
            raise ValueError(f"{manifest.path}: num_samples={manifest.num_samples} but data.{split}_samples={expected}; "
                             f"pass data.{split}_samples={manifest.num_samples} or point data.shards at the right folder")
        if len(manifest.classes) != cfg.model.num_classes:
            raise ValueError(f"{manifest.path}: {len(manifest.classes)} classes but model.num_classes="
                             f"{cfg.model.num_classes}; pass model.num_classes={len(manifest.classes)}")
        if cfg.data.shard_url:  # read from elsewhere (object store, pipe:); the first read tells
            continue
        missing = [url for url in manifest.urls() if not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(f"{manifest.path} lists {len(missing)} shards that are not on disk, e.g. {missing[0]}; "
                                    "rerun python -m pipeline.shards convert")


NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "wekafs", "panfs", "pvfs2", "orangefs",
                       "9p", "virtiofs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "afs", "quobyte"}
# Set by sbatch.py and by the launcher itself; --slurm may not change them.
OWN_SBATCH_KEYS = {"nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "time", "signal", "job-name",
                   "output", "error", "array", "requeue", "open-mode", "ntasks", "gpus"}


def filesystem(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding path, from /proc/mounts: the longest mount prefix."""
    path = path.resolve()
    best = ("/", "unknown")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        mount = mount.replace("\\040", " ")
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[0]):
            best = (mount, kind)
    return best


def check_paths(cfg: config.Config, run_dir: Path, assume_shared: bool) -> None:
    """The run folder can be written; for multi-node jobs it and the shards are on a network filesystem."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"run folder {run_dir}: {existing} is not writable; pass a --run-dir you can write")
    if cfg.cluster.nodes == 1 or assume_shared:
        return
    for what, path in (("run folder", run_dir), ("shard folder (data.shards)", Path(cfg.data.shards))):
        if what.startswith("shard") and cfg.data.shard_url:
            continue
        mount, kind = filesystem(path if path.exists() else existing)
        if kind not in NETWORK_FILESYSTEMS:
            raise ValueError(f"{what} {path} is on a {kind} filesystem (mounted at {mount}), which the other "
                             f"{cfg.cluster.nodes - 1} nodes cannot read; put it on the shared filesystem, or "
                             "pass --assume-shared if every node mounts it")


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


def check_slurm_args(args: argparse.Namespace) -> None:
    for flag, value, least in (("--time", args.time, 1), ("--signal-delay", args.signal_delay, 0),
                               ("--max-requeues", args.max_requeues, 0),
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


def prepare_run_dir(run_dir: Path, cfg: config.Config, plan: config.Plan, ds_config: dict) -> None:
    """Create the run folder with config.json and ds_config.json, or check an existing one matches."""
    if (run_dir / "config.json").is_file():
        saved, _ = config.load_run_config(run_dir)
        changed = config.differences(config.to_dict(saved), config.to_dict(cfg))
        if changed:
            raise ValueError(f"{run_dir / 'config.json'} holds another config ({'; '.join(changed)}); pass a new "
                             "--run-dir to start a new run, or the same settings to resume this one")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save_run_config(run_dir, cfg, plan)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def prediction(hw: scaling.Hardware, cfg: config.Config, plan: config.Plan, ds_config: dict) -> str:
    """The scaling model's step time, images/s, time to train and efficiency of the job, in one line."""
    if hw.arch != cfg.model.arch:
        return (f"no prediction: hardware {hw.name} has compute times for {hw.arch}, not {cfg.model.arch}; measure "
                "yours with python -m pipeline.tune_buckets and pass --hardware RUN_DIR/hardware.json")
    zero = ds_config["zero_optimization"]
    bucket = int(zero.get("reduce_bucket_size", buckets.DEEPSPEED_BUCKET)) if zero.get("overlap_comm", False) else None
    wire = 2 if str(ds_config.get("communication_data_type", "fp32")) in ("bf16", "fp16") else 4
    c = cfg.cluster
    try:
        job, one_node = (scaling.predict(hw, model.parameter_count(cfg.model), nodes, c.gpus_per_node,
                                         cfg.train.micro_batch, bucket, wire, grad_accum=cfg.train.grad_accum)
                         for nodes in (c.nodes, 1))
    except ValueError as err:
        return f"no prediction: {err}"
    hours = plan.total_steps * job.step_s / 3600
    return (f"predicted on {hw.name} ({hw.source}): step {job.step_s * 1e3:.1f} ms (allreduce "
            f"{job.communication_s * 1e3:.1f} ms, {job.exposed_s * 1e3:.1f} ms of it not hidden by backward), "
            f"{job.images_s:,.0f} images/s, {cfg.schedule.epochs} epochs in {hours:.2f} h of training steps, scaling "
            f"efficiency {scaling.efficiency(job, one_node):.1%} of one node; a lower bound: no stragglers, loader "
            "or evaluation (python -m pipeline.scaling)")


def make_executor(args: argparse.Namespace, cfg: config.Config, folder: Path, name: str,
                  options: dict) -> submitit.Executor:
    """submitit executor with one task per GPU (per process on CPU)."""
    cluster = None if args.cluster == "auto" else args.cluster
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=args.max_requeues)
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
        # One failed rank ends the whole step at once instead of leaving the others blocked in a collective.
        executor.update_parameters(slurm_signal_delay_s=args.signal_delay, slurm_srun_args=["--kill-on-bad-exit=1"],
                                   slurm_additional_parameters=options, slurm_array_parallelism=args.array_parallelism)
    return executor


def follow(job: submitit.Job, run_dir: Path, shown: int) -> None:
    """Print progress lines of the records after the first `shown` of metrics.jsonl until the job ends;
    Ctrl-C cancels the job."""
    try:
        while True:
            done = job.done()
            records = metrics.read(run_dir / "metrics.jsonl")
            for record in records[shown:]:
                line = metrics.progress_line(record)
                if line:
                    print(line, flush=True)
            shown = len(records)
            if done:
                return
            time.sleep(2)
    except KeyboardInterrupt:
        job.cancel()
        print(f"\ncancelled job {job.job_id}; rerun the same command with --run-dir {run_dir} to resume", file=sys.stderr)
        raise SystemExit(130)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return launch(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def launch(args: argparse.Namespace) -> int:
    """Everything main() does; bad input raises before anything is written or submitted."""
    if args.report:
        print(report.write(args.report))
        return 0
    if args.status:
        print(status.describe(args.status))
        return 0
    if args.list_keys:
        flat = config.to_dict(config.preset(args.preset))
        for key in config.valid_keys():
            section, name = key.split(".")
            print(f"{key}={flat[section][name]}")
        return 0
    if args.json and not args.dry_run:
        raise ValueError("--json only applies to --dry-run")
    check_slurm_args(args)
    options = sbatch_options(args)
    hardware = scaling.load_hardware(args.hardware) if args.dry_run else None
    run_dir = (args.run_dir or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    sweep = sweep_overrides(args.sweep, args.overrides)
    if sweep and args.emit_sbatch:
        raise ValueError("--sweep submits a job array through submitit; --emit-sbatch renders one run")
    runs = []  # (run folder, config, plan, DeepSpeed config)
    for folder, overrides in sweep or [(None, args.overrides)]:
        runs.append((run_dir / folder if folder else run_dir, *resolve_job(args, overrides)))
    if args.dry_run and args.json:
        plans = [{"run_dir": str(d), "config": config.to_dict(c), "plan": dataclasses.asdict(p), "ds_config": ds}
                 for d, c, p, ds in runs]
        print(json.dumps(plans if sweep else plans[0], indent=2))
        return 0
    for d, c, p, _ in runs:
        print(f"{d.name}: {p.summary(c)}" if sweep else p.summary(c), flush=True)
    if args.dry_run:
        for _, c, p, ds in runs:
            print(prediction(hardware, c, p, ds))
        print(f"run folder {run_dir} (dry run: nothing written, nothing submitted)")
        return 0
    for _, cfg, _, _ in runs:
        if args.preset == "demo" and cfg.data.shards == str(Path(config.preset("demo").data.shards).resolve()):
            demo.write_image_tree(DEMO_IMAGES)  # the demo makes its own data; any other shards must exist
            shards.convert(DEMO_IMAGES, Path(cfg.data.shards))
        check_shards(cfg)
        check_paths(cfg, run_dir, args.assume_shared)
    if args.emit_sbatch:
        _, cfg, plan, ds_config = runs[0]
        script = sbatch.render(cfg, run_dir, args.time, options, Path.cwd(), signal_delay=args.signal_delay,
                               max_requeues=args.max_requeues)
        prepare_run_dir(run_dir, cfg, plan, ds_config)
        (run_dir / "slurm").mkdir(exist_ok=True)
        args.emit_sbatch.write_text(script)
        print(f"wrote {args.emit_sbatch}; submit it with: sbatch {shlex.quote(str(args.emit_sbatch))}")
        return 0
    if sweep:
        return submit_sweep(args, runs, run_dir, options)
    _, cfg, plan, ds_config = runs[0]
    executor = make_executor(args, cfg, run_dir / "submitit", run_dir.name, options)
    prepare_run_dir(run_dir, cfg, plan, ds_config)
    earlier = len(metrics.read(run_dir / "metrics.jsonl"))  # a resumed run's old records are not news
    job = executor.submit(TrainJob(run_dir))
    status.record_submission(run_dir, job.job_id, executor.cluster)
    print(f"submitted job {job.job_id} ({executor.cluster}); run folder {run_dir}; rank logs in {run_dir / 'submitit'}",
          flush=True)
    if executor.cluster == "slurm" and not args.wait:
        print(f"follow it with: python -m pipeline.submit --status {shlex.quote(str(run_dir))}")
        return 0
    follow(job, run_dir, earlier)
    try:
        job.results()
    except submitit.core.utils.FailedJobError as err:
        print(f"error: the job failed; rank logs in {run_dir / 'submitit'}\n{err}", file=sys.stderr)
        return 1
    print(report.read(run_dir))
    return 0


def submit_sweep(args: argparse.Namespace, runs: list, run_dir: Path, options: dict) -> int:
    """Every run of a sweep as one job array (all runs share the cluster settings); sweep.json lists them."""
    executor = make_executor(args, runs[0][1], run_dir / "submitit", run_dir.name, options)
    for folder, cfg, plan, ds_config in runs:
        prepare_run_dir(folder, cfg, plan, ds_config)
    with executor.batch():
        jobs = [executor.submit(TrainJob(folder)) for folder, *_ in runs]
    listing = [{"folder": folder.name, "job_id": job.job_id} for (folder, *_), job in zip(runs, jobs)]
    (run_dir / status.SWEEP).write_text(json.dumps({"runs": listing}, indent=2) + "\n")
    for (folder, *_), job in zip(runs, jobs):
        status.record_submission(folder, job.job_id, executor.cluster)
        print(f"submitted job {job.job_id} ({executor.cluster}): {folder}", flush=True)
    if executor.cluster == "slurm" and not args.wait:
        print(f"follow them with: python -m pipeline.submit --status {shlex.quote(str(run_dir))}")
        return 0
    failed = 0
    for (folder, *_), job in zip(runs, jobs):
        try:
            job.results()
            print(f"{folder.name}: {report.read(folder)}")
        except submitit.core.utils.FailedJobError as err:
            print(f"error: {folder.name} failed; rank logs in {run_dir / 'submitit'}\n{err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
