"""Plan, check and launch a training run on Slurm (or on this machine) through submitit.

    python -m pipeline.submit --preset demo                         # Fashion-MNIST on 2 local processes
    python -m pipeline.submit --preset goyal_r50_bs8k --nodes 32 --gpus-per-node 8 --partition gpu
    python -m pipeline.submit --preset goyal_r50_bs256 --dry-run --json optim.base_lr=0.1

Everything is checked before anything is submitted: the config and its overrides, the DeepSpeed JSON,
the shard manifests against the config, the run folder. The resolved plan is printed first.
Overrides are `section.key=value`; `--list-keys` prints them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import submitit

from pipeline import config, demo, metrics, model, report, sbatch, shards
from pipeline.dsconfig import load_ds_config
from pipeline.job import TrainJob
from pipeline.manifest import load_manifest

DEMO_IMAGES = Path("data/fashion-mnist")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help=f"config preset: {', '.join(config.PRESETS)} (default demo)")
    parser.add_argument("--nodes", type=int, help="nodes (default: the preset's)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs = ranks per node; on CPU, processes (default: the preset's)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per rank, also its torch threads (default: the preset's)")
    parser.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                        help="auto: Slurm when srun is on PATH, else this machine; debug: in this process, 1 rank")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", type=int, default=72 * 60, help="time limit in minutes (default 4320)")
    parser.add_argument("--run-dir", type=Path, help="run folder (default runs/<preset>-<date>-<time>); "
                                                     "an existing one is resumed if its config is the same")
    parser.add_argument("--emit-sbatch", type=Path, metavar="FILE",
                        help="prepare the run folder and write an sbatch script for it (slurm/train.sbatch) instead of submitting")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan, submit nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--wait", action="store_true", help="on Slurm, follow the job until it ends (local runs always do)")
    parser.add_argument("--report", type=Path, metavar="RUN_DIR", help="print and rewrite the report of a run, submit nothing")
    parser.add_argument("--list-keys", action="store_true", help="print every override key with its preset value")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. schedule.epochs=2")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> config.Config:
    """Preset, then the cluster flags, then key=value overrides."""
    cfg = config.preset(args.preset)
    cluster = {k: v for k, v in (("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node),
                                 ("cpus_per_task", args.cpus_per_task)) if v is not None}
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))
    cfg = config.apply_overrides(cfg, args.overrides)
    # The ranks may start elsewhere: make the shard folder absolute once, here.
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(Path(cfg.data.shards).resolve())))


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


def prepare_run_dir(run_dir: Path, cfg: config.Config, plan: config.Plan, ds_config: dict) -> None:
    """Create the run folder with config.json and ds_config.json, or check an existing one matches."""
    if (run_dir / "config.json").is_file():
        saved, _ = config.load_run_config(run_dir)
        if saved != cfg:
            raise ValueError(f"{run_dir / 'config.json'} holds a different config; pass a new --run-dir to start "
                             "a new run, or the same settings to resume this one")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save_run_config(run_dir, cfg, plan)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def make_executor(args: argparse.Namespace, cfg: config.Config, run_dir: Path) -> submitit.Executor:
    """submitit executor with one task per GPU (per process on CPU)."""
    cluster = None if args.cluster == "auto" else args.cluster
    executor = submitit.AutoExecutor(folder=run_dir / "submitit", cluster=cluster)
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if executor.cluster == "debug" and world != 1:
        raise ValueError(f"--cluster debug runs one rank in this process, but the plan has world_size={world}; "
                         "use --cluster local, or --nodes 1 --gpus-per-node 1")
    if executor.cluster != "slurm" and cfg.cluster.nodes != 1:
        raise ValueError(f"--nodes {cfg.cluster.nodes} needs Slurm; this machine runs one node (--cluster {executor.cluster})")
    # Without GPUs asked for, submitit's local executor hides every GPU (CUDA_VISIBLE_DEVICES="").
    gpus = cfg.cluster.gpus_per_node if config.wants_gpus(cfg.cluster) and executor.cluster != "debug" else 0
    executor.update_parameters(nodes=cfg.cluster.nodes, tasks_per_node=cfg.cluster.gpus_per_node, gpus_per_node=gpus,
                               cpus_per_task=cfg.cluster.cpus_per_task, timeout_min=args.time, name=run_dir.name)
    if executor.cluster == "slurm":
        # One failed rank ends the whole step at once instead of leaving the others blocked in a collective.
        executor.update_parameters(slurm_signal_delay_s=90, slurm_srun_args=["--kill-on-bad-exit=1"],
                                   **({"slurm_partition": args.partition} if args.partition else {}))
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
    if args.list_keys:
        flat = config.to_dict(config.preset(args.preset))
        for key in config.valid_keys():
            section, name = key.split(".")
            print(f"{key}={flat[section][name]}")
        return 0
    if args.json and not args.dry_run:
        raise ValueError("--json only applies to --dry-run")
    cfg = build_config(args)
    plan = config.resolve(cfg)
    model.check_arch(cfg.model.arch)
    ds_config = load_ds_config(cfg, plan)
    run_dir = (args.run_dir or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if args.dry_run:
        if args.json:
            print(json.dumps({"run_dir": str(run_dir), "config": config.to_dict(cfg),
                              "plan": dataclasses.asdict(plan), "ds_config": ds_config}, indent=2))
        else:
            print(plan.summary(cfg))
            print(f"run folder {run_dir} (dry run: nothing written, nothing submitted)")
        return 0
    print(plan.summary(cfg), flush=True)
    if args.preset == "demo" and cfg.data.shards == str(Path(config.preset("demo").data.shards).resolve()):
        demo.write_image_tree(DEMO_IMAGES)  # the demo makes its own data; any other shards must exist
        shards.convert(DEMO_IMAGES, Path(cfg.data.shards))
    check_shards(cfg)
    if args.emit_sbatch:
        script = sbatch.render(cfg, run_dir, args.time, args.partition, Path.cwd())
        prepare_run_dir(run_dir, cfg, plan, ds_config)
        (run_dir / "slurm").mkdir(exist_ok=True)
        args.emit_sbatch.write_text(script)
        print(f"wrote {args.emit_sbatch}; submit it with: sbatch {shlex.quote(str(args.emit_sbatch))}")
        return 0
    executor = make_executor(args, cfg, run_dir)
    prepare_run_dir(run_dir, cfg, plan, ds_config)
    earlier = len(metrics.read(run_dir / "metrics.jsonl"))  # a resumed run's old records are not news
    job = executor.submit(TrainJob(run_dir))
    print(f"submitted job {job.job_id} ({executor.cluster}); run folder {run_dir}; rank logs in {run_dir / 'submitit'}",
          flush=True)
    if executor.cluster == "slurm" and not args.wait:
        print(f"follow it with: tail -f {shlex.quote(str(run_dir / 'metrics.jsonl'))}")
        return 0
    follow(job, run_dir, earlier)
    try:
        job.results()
    except submitit.core.utils.FailedJobError as err:
        print(f"error: the job failed; rank logs in {run_dir / 'submitit'}\n{err}", file=sys.stderr)
        return 1
    print(report.read(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
