"""Submitting training runs: the dry run, an sbatch script instead of a submission, one run, or a sweep
as one job array; then following the job to its end."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from pipeline import config
from pipeline.dsconfig import bucket_elements
from pipeline.launch import sbatch, status
from pipeline.launch.checks import check_paths, check_shards
from pipeline.launch.executor import failed, job_error, make_executor, stop_local_job, submit_jobs
from pipeline.launch.jobs import TrainJob
from pipeline.launch.local_task import how_it_ended
from pipeline.launch.options import preset_name, requeue_limit, sweep_overrides
from pipeline.launch.run import Run, make_demo_data, makes_demo_data, prepare_run_dir, resolve_run
from pipeline.scaling import model as scaling
from pipeline.train import metrics, model, preempt, report, tags


def resolve_runs(args: argparse.Namespace) -> tuple[Path, list[Run], bool]:
    """(the run folder, its runs, whether it is a sweep): one run, or one per combination of --sweep values
    in folders inside the run folder."""
    run_dir = (args.run_dir or Path("runs") / f"{preset_name(args)}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    sweep = sweep_overrides(args.sweep, args.overrides)
    if sweep and args.emit_sbatch:
        raise ValueError("--sweep submits a job array through submitit; --emit-sbatch renders one run")
    runs = [resolve_run(args, overrides, run_dir / folder if folder else run_dir)
            for folder, overrides in sweep or [(None, args.overrides)]]
    return run_dir, runs, bool(sweep)


def dry_run(args: argparse.Namespace, run_dir: Path, runs: list[Run], sweep: bool) -> int:
    """Print the plan of every run (as JSON with --json), its predicted speed and the verdict of the shard
    checks a submission would make; write nothing."""
    hardware = scaling.load_hardware(args.hardware)
    shards = {run.run_dir: shard_verdict(run) for run in runs}
    if args.json:
        plans = [{"run_dir": str(r.run_dir), "config": config.to_dict(r.cfg), "plan": dataclasses.asdict(r.plan),
                  "ds_config": r.ds_config, "shards": shards[r.run_dir]} for r in runs]
        print(json.dumps(plans if sweep else plans[0], indent=2))
        return 0
    print_plans(runs, sweep)
    for run in runs:
        print(prediction(hardware, run))
        print(f"shards: {shards[run.run_dir]}")
    print(f"run folder {run_dir} (dry run: nothing written, nothing submitted)")
    return 0


def shard_verdict(run: Run) -> str:
    """"ready", or what a submission would refuse about the run's shards (the demo makes its own)."""
    if makes_demo_data(run.cfg) and not Path(run.cfg.data.shards).exists():
        return "made by the demo when it runs"
    try:
        check_shards(run.cfg)
    except (ValueError, FileNotFoundError) as err:
        return f"NOT READY: {err}"
    return "ready"


def print_plans(runs: list[Run], sweep: bool) -> None:
    """The plan of every run in one line each."""
    for r in runs:
        print(f"{r.run_dir.name}: {r.plan.summary(r.cfg)}" if sweep else r.plan.summary(r.cfg), flush=True)


def check_data(args: argparse.Namespace, run_dir: Path, runs: list[Run]) -> None:
    """The demo's data made if needed; every run's shards and the run folder checked (once for the runs of
    a sweep or a study that read the same shards)."""
    for run in {run.cfg.data.shards: run for run in runs}.values():
        make_demo_data(run.cfg)
        check_shards(run.cfg)
        check_paths(run.cfg, run_dir, args.assume_shared)


def emit_sbatch(args: argparse.Namespace, run: Run, options: dict) -> int:
    """Prepare the run folder and write slurm/train.sbatch for it to args.emit_sbatch, instead of submitting."""
    script = sbatch.render(run.cfg, run.run_dir, args.time, options, Path.cwd(), signal_delay=args.signal_delay,
                           max_requeues=requeue_limit(args, "slurm"))
    prepare_run_dir(run)
    (run.run_dir / "slurm").mkdir(exist_ok=True)
    args.emit_sbatch.write_text(script)
    print(f"wrote {args.emit_sbatch}; submit it with: sbatch {shlex.quote(str(args.emit_sbatch))}")
    return 0


def submit_run(args: argparse.Namespace, run: Run, options: dict) -> int:
    """Submit one run; on this machine (or with --wait) follow it and print its report. A local job that
    failed mid-run starts again from its newest checkpoint, at most --max-requeues times (Slurm's are
    requeued by pipeline.requeue, under the same rules)."""
    run_dir = run.run_dir
    executor = make_executor(args, run.cfg, run_dir / "submitit", run_dir.name, options)
    prepare_run_dir(run)
    for restarts in itertools.count():
        earlier = len(metrics.read(run_dir / "metrics.jsonl"))  # a resumed run's old records are not news
        (job,) = submit_jobs(executor, [TrainJob(run_dir)])
        status.record_submission(run_dir, job.job_id, executor.cluster)
        print(f"submitted job {job.job_id} ({executor.cluster}); run folder {run_dir}; rank logs in "
              f"{run_dir / 'submitit'}", flush=True)
        if executor.cluster == "slurm" and not args.wait:
            print(f"follow it with: python -m pipeline.submit --status {shlex.quote(str(run_dir))}")
            return 0
        interrupted = follow(job, run_dir, earlier, local=executor.cluster == "local")
        error = job_error(job)
        if error:
            if interrupted:  # the stop record's line said where it stopped
                print(f"rerun the same command with --run-dir {shlex.quote(str(run_dir))} to resume", file=sys.stderr)
                return 130
            dead = dead_ranks(job, run.cfg) if executor.cluster == "local" else []
            if executor.cluster == "local" and restart_local(job, run_dir, earlier, dead, restarts,
                                                             requeue_limit(args, "local")):
                continue
            print(failed("the job", "".join(f"{rank}; " for rank in dead) + ("then " if dead else "") + error,
                         run_dir / "submitit")
                  + (f"\nresume it with: python -m pipeline.submit --run-dir {shlex.quote(str(run_dir))}"
                     if tags.latest_tag(run_dir) else ""), file=sys.stderr)
            return 1
        print(report.read(run_dir))
        return 0


def restart_local(job: submitit.Job, run_dir: Path, earlier: int, dead: list[str], restarts: int,
                  limit: int) -> bool:
    """After a local job failed: whether it starts again (the rules of pipeline.train.preempt.requeue_refused,
    at most `limit` times), with a `failed` record saying why or why not, as pipeline.requeue writes on Slurm
    (with how the `dead` ranks ended in place of srun's words)."""
    refused = preempt.requeue_refused(run_dir, metrics.read(run_dir / "metrics.jsonl")[earlier:])
    if refused is None and restarts >= limit:
        refused = f"not restarted: {restarts} restarts already (--max-requeues {limit})"
    record = metrics.MetricsLog(run_dir / "metrics.jsonl", enabled=True).write(
        "failed", job_id=job.job_id, exit_code=None, tasks=dead,
        requeued=refused is None, reason=refused or f"restarted from the newest checkpoint ({restarts + 1} of at "
                                                    f"most {limit} restarts)")
    if refused is None:
        print(metrics.progress_line(record), file=sys.stderr, flush=True)
    return refused is None


def dead_ranks(job: submitit.Job, cfg) -> list[str]:
    """How each rank of a failed local job that left no result (not even an exception) ended: "rank 1 was
    killed by SIGKILL (...)"."""
    ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    return [f"rank {rank} {how_it_ended(job.paths.folder, job.job_id, rank)}" for rank in range(ranks)
            if not JobPaths(job.paths.folder, job_id=job.job_id, task_id=rank).result_pickle.exists()]


def submit_sweep(args: argparse.Namespace, runs: list[Run], run_dir: Path, options: dict) -> int:
    """Every run of a sweep as one job array (all runs share the cluster settings); sweep.json lists them."""
    executor = make_executor(args, runs[0].cfg, run_dir / "submitit", run_dir.name, options)
    for run in runs:
        prepare_run_dir(run)
    jobs = submit_jobs(executor, [TrainJob(run.run_dir) for run in runs])
    listing = [{"folder": run.run_dir.name, "job_id": job.job_id} for run, job in zip(runs, jobs)]
    (run_dir / status.SWEEP).write_text(json.dumps({"runs": listing}, indent=2) + "\n")
    for run, job in zip(runs, jobs):
        status.record_submission(run.run_dir, job.job_id, executor.cluster)
        print(f"submitted job {job.job_id} ({executor.cluster}): {run.run_dir}", flush=True)
    if executor.cluster == "slurm" and not args.wait:
        print(f"follow them with: python -m pipeline.submit --status {shlex.quote(str(run_dir))}")
        return 0
    errors = 0
    for run, job in zip(runs, jobs):
        error = job_error(job)
        if error:
            print(failed(run.run_dir.name, error, run_dir / "submitit"), file=sys.stderr)
            errors += 1
        else:
            print(f"{run.run_dir.name}: {report.read(run.run_dir)}")
    return 1 if errors else 0


def prediction(hw: scaling.Hardware, run: Run) -> str:
    """The scaling model's step time, images/s, time to train and efficiency of the job, in one line."""
    cfg, plan = run.cfg, run.plan
    if hw.arch != cfg.model.arch:
        return (f"no prediction: hardware {hw.name} has compute times for {hw.arch}, not {cfg.model.arch}; measure "
                "yours with python -m pipeline.tune_buckets and pass --hardware RUN_DIR/hardware.json")
    bucket = bucket_elements(run.ds_config)
    wire = 2 if str(run.ds_config.get("communication_data_type", "fp32")) in ("bf16", "fp16") else 4
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


def follow(job: submitit.Job, run_dir: Path, shown: int, local: bool) -> bool:
    """Print progress lines of the records after the first `shown` of metrics.jsonl until the job ends;
    returns whether Ctrl-C stopped it. Ctrl-C on a local job asks its ranks to stop after the same step and
    checkpoint, and follows it to that end (the stop record's line says where; a second Ctrl-C leaves them
    to it); on a Slurm job it cancels the job."""
    interrupted = False
    while True:
        try:
            done = job.done()
            records = metrics.read(run_dir / "metrics.jsonl")
            for record in records[shown:]:
                line = metrics.progress_line(record)
                if line:
                    print(line, flush=True)
            shown = len(records)
            if done:
                return interrupted
            time.sleep(2)
        except KeyboardInterrupt:
            if not local:
                job.cancel()
                print(f"\ncancelled job {job.job_id}; rerun the same command with --run-dir {run_dir} to resume",
                      file=sys.stderr)
                raise SystemExit(130) from None
            if interrupted:
                print(f"\nleft the ranks of job {job.job_id} to finish their checkpoint; rerun the same command with "
                      f"--run-dir {run_dir} to resume", file=sys.stderr)
                raise SystemExit(130) from None
            interrupted = True
            stop_local_job(job)
            print("\nCtrl-C: every rank stops after its current step and writes a checkpoint (Ctrl-C again to leave "
                  "them to it)", file=sys.stderr, flush=True)
