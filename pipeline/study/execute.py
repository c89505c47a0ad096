"""Running a study: its runs resolved into ordinary run folders under OUT/runs/, the unfinished ones
trained (on this machine a few at a time, on Slurm as one job array), then its table and figures written.

Nothing is kept in memory between invocations: a run folder with report.json is finished and never run
again, one with a checkpoint resumes from it, and one whose Slurm job is still queued or running is left to
it; so the same command resumes a study stopped anywhere, and builds the table once every run has ended.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import submitit

from pipeline.launch import status, submission
from pipeline.launch.jobs import TrainJob
from pipeline.launch.prepare import (Run, job_config, make_executor, prepare_run_dir, resolve_run, stop_local_job,
                                     submit_jobs)
from pipeline.study import design, figures, table
from pipeline.train import metrics, report

IN_FLIGHT = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def plan(args: argparse.Namespace) -> tuple[list[design.StudyRun], list[Run]]:
    """The study's runs (rows x seeds) and each one resolved in its folder OUT/runs/<row>-seed<s>; raises on
    any that cannot run, before anything is written."""
    rows = design.QUICK_ROWS if args.quick else design.ROWS + ((design.ZERO_GAMMA_ROW,) if args.zero_gamma else ())
    if args.rows:
        wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in {row.name for row in rows}]
        if unknown:
            raise ValueError(f"--rows {', '.join(unknown)}: no such row; valid: {', '.join(row.name for row in rows)}")
        rows = tuple(row for row in rows if row.name in wanted)
    overrides = [*(design.QUICK_OVERRIDES if args.quick else ()), *args.overrides]  # the user's win
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} must be at least 1")
    study = design.runs(rows, seeds, job_config(args, overrides), overrides)
    runs_dir = args.out.resolve() / "runs"
    return study, [resolve_run(args, list(s.overrides), runs_dir / s.folder) for s in study]


def in_flight(run: Run) -> bool:
    """Whether a job submitted for the run is still queued or running: its Slurm job, or the process of a
    local one (an earlier study command that was killed leaves its local runs training)."""
    path = run.run_dir / status.SUBMITTED
    submitted = json.loads(path.read_text()) if path.is_file() else {}
    if submitted.get("cluster") == "local":
        try:
            os.kill(int(submitted["job_id"]), 0)  # signal 0: is the job's controller process alive?
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:  # alive, and someone else's
            return True
        return True
    job = status.slurm_job(run.run_dir, metrics.read(run.run_dir / "metrics.jsonl"))
    return job is not None and status.slurm_state(job) in IN_FLIGHT


def local_parallelism(runs: list[Run]) -> int:
    """Runs at once on this machine: one core for each rank's thread."""
    cfg = runs[0].cfg
    return max(1, (os.cpu_count() or 1) // (cfg.cluster.gpus_per_node * cfg.cluster.cpus_per_task))


def train_locally(args: argparse.Namespace, runs: list[Run], options: dict, parallel: int) -> list[str]:
    """Train the runs on this machine, `parallel` at a time, each through submitit's local executor as an
    ordinary run; a line when each ends. Returns the folders of the runs that failed. Ctrl-C, or SIGTERM,
    stops the running ones after their current step with a checkpoint: the same command resumes them."""
    queue, active, failed, started = list(runs), [], [], time.time()
    total = len(runs)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill: stop the runs, as Ctrl-C does
    try:
        while queue or active:
            while queue and len(active) < parallel:
                run = queue.pop(0)
                executor = make_executor(args, run.cfg, run.run_dir / "submitit", run.run_dir.name, options)
                (job,) = submit_jobs(executor, [TrainJob(run.run_dir)])
                status.record_submission(run.run_dir, job.job_id, executor.cluster)
                print(f"started {run.run_dir.name}: {run.plan.summary(run.cfg)}", flush=True)
                active.append((run, job))
            time.sleep(2)
            for run, job in [pair for pair in active if pair[1].done()]:
                active.remove((run, job))
                done = total - len(queue) - len(active)
                eta = (time.time() - started) / done * (total - done)
                try:
                    job.results()
                    outcome = report.read(run.run_dir)
                except submitit.core.utils.FailedJobError as err:
                    if table.run_state(run.run_dir) == "diverged":  # a result of the study, not a failure
                        outcome = "diverged (a loss that was not finite): the table counts it as such"
                    else:
                        failed.append(run.run_dir.name)
                        last = str(err).strip().splitlines()[-1]
                        outcome = f"FAILED ({last}); rank logs in {run.run_dir / 'submitit'}"
                print(f"[{done}/{total}] {run.run_dir.name}: {outcome}; study {metrics.duration(time.time() - started)}"
                      f", about {metrics.duration(eta)} to go", flush=True)
    except KeyboardInterrupt:
        for _, job in active:
            stop_local_job(job)
        print(f"\nstopping: the {len(active)} running runs stop after their current step and write a checkpoint; "
              "the same command resumes the study (finished runs are kept, the others resume from their newest "
              "checkpoint)", file=sys.stderr, flush=True)
        try:
            for _, job in active:
                job.wait()
        except KeyboardInterrupt:
            print("left the runs to finish their checkpoints", file=sys.stderr)
        raise SystemExit(130) from None
    return failed


def train(args: argparse.Namespace, runs: list[Run], options: dict) -> int:
    """Train what is not finished; returns 1 when a run failed (not counting divergence, a result), else 0."""
    todo = [r for r in runs if table.run_state(r.run_dir) == "unfinished"]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already ended (kept), {len(todo)} to train", flush=True)
    queued = [r for r in todo if in_flight(r)]
    if queued and args.cluster != "slurm":
        raise ValueError(f"{', '.join(r.run_dir.name for r in queued)} still train in processes of an earlier "
                         f"study command ({', '.join(str(r.run_dir / status.SUBMITTED) for r in queued[:1])} names "
                         "the process); wait for them to end, or stop them, then run this command again")
    if queued:
        todo = [r for r in todo if r not in queued]
        print(f"{len(queued)} runs still have a Slurm job queued or running: not submitted again", flush=True)
    if not todo:
        return 0
    submission.check_data(args, args.out.resolve(), todo)
    for run in todo:
        prepare_run_dir(run)
    if args.cluster == "slurm":
        code = submission.submit_sweep(args, todo, args.out.resolve() / "runs", options)
        if not args.wait:
            print(f"when the jobs have ended, the same command writes the table: python -m pipeline.reproduce "
                  f"{shlex.join(sys.argv[1:])}")
        return code
    failed = train_locally(args, todo, options, args.parallel or local_parallelism(todo))
    if failed:
        print(f"error: {len(failed)} runs failed ({', '.join(failed)}); the table lists the others", file=sys.stderr)
    return 1 if failed else 0


def write_results(out: Path, study: list[design.StudyRun]) -> dict:
    """table1.json, table1.md, fig2.png and error_vs_kn.png in out, from the runs' metrics; returns the table."""
    runs_dir = out / "runs"
    result = table.build(runs_dir, study)
    paths = table.write(result, out)
    if any(r["mean"] is not None for r in result["rows"]):
        figures.fig2(runs_dir, study, out / "fig2.png")
        figures.error_vs_kn(result, out / "error_vs_kn.png")
        paths += [out / "fig2.png", out / "error_vs_kn.png"]
    print(table.markdown(result))
    print(f"wrote {', '.join(str(p) for p in paths)}; every run is a TensorBoard log: tensorboard --logdir "
          f"{shlex.quote(str(runs_dir))}")
    return result
