"""Running a study: its runs resolved into ordinary run folders under OUT/runs/, the unfinished ones
trained (on this machine a few at a time, on Slurm as one job array), then its table and figures written.

Nothing is kept in memory between invocations: a run folder with report.json is finished and never run
again, one with a checkpoint resumes from it, and one whose Slurm job is still queued or running is left to
it; so the same command resumes a study stopped anywhere, and builds the table once every run has ended.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from pipeline import config
from pipeline.launch import status, submission
from pipeline.launch.jobs import TrainJob
from pipeline.launch.executor import job_error, make_executor, stop_local_job, submit_jobs
from pipeline.launch.run import HOLDOUT_SHARDS, Run, job_config, makes_demo_data, prepare_run_dir, resolve_run
from pipeline.shards.demo import HOLDOUT
from pipeline.study import design, figures, table
from pipeline.train import metrics, report

IN_FLIGHT = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def parse_seeds(text: str | None, quick: bool) -> list[int]:
    """--seeds: a count N (seeds 0..N-1) or a list of seeds and ranges, "3,4" or "0-4" (a single seed s: "s,");
    default 3 (1 with --quick)."""
    if text is None:
        return [0] if quick else list(range(3))
    text = text.strip()
    try:
        if text.isdigit():
            seeds = list(range(int(text)))
        else:
            seeds = []
            for part in (p.strip() for p in text.split(",") if p.strip()):
                low, _, high = part.partition("-")
                seeds += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--seeds {text!r} is neither a count (3) nor a list of seeds (0,1,2 or 0-2 or 5,)") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r} gives {seeds}: at least one seed, none twice, none negative")
    return seeds


def holdout_overrides(args: argparse.Namespace) -> list[str]:
    """--holdout: the demo's held-out split (50,000 training images, scored on 10,000 others held out of the
    training set), for choosing hyper-parameters without the reported test images; only for the demo's data."""
    if not args.holdout:
        return []
    if not makes_demo_data(job_config(args, list(args.overrides))):
        raise ValueError("--holdout splits the demo's Fashion-MNIST training set; for other data, convert a split "
                         "held out of your training set (python -m pipeline.shards convert) and pass data.shards=DIR "
                         "data.train_samples=N data.val_samples=M")
    train = config.preset("demo").data.train_samples - HOLDOUT
    return [f"data.shards={HOLDOUT_SHARDS}", f"data.train_samples={train}", f"data.val_samples={HOLDOUT}"]


def budget_epochs(args: argparse.Namespace) -> int:
    """The study's epochs: --epochs, or the quick study's."""
    return design.QUICK_EPOCHS if args.quick else args.epochs


def budget_dir(args: argparse.Namespace) -> Path:
    """OUT/epochs<E>: the runs, table and Fig. 2 of one budget; Fig. 1 of all budgets sits in OUT."""
    return args.out.resolve() / f"epochs{budget_epochs(args)}"


def plan(args: argparse.Namespace) -> tuple[list[design.StudyRun], list[Run]]:
    """The study's runs (rows x seeds) and each one resolved in its folder OUT/epochs<E>/runs/<row>-seed<s>;
    raises on any that cannot run, before anything is written."""
    epochs = budget_epochs(args)
    if epochs < 1:
        raise ValueError(f"--epochs {epochs} must be at least 1")
    rows = design.QUICK_ROWS if args.quick else design.budget_rows(epochs)
    rows += (design.ZERO_GAMMA_ROW,) if args.zero_gamma and not args.quick else ()
    if args.rows:
        wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
        valid = rows if args.quick else design.ROWS + (design.ZERO_GAMMA_ROW,)
        unknown = [name for name in wanted if name not in {row.name for row in valid}]
        if unknown:
            raise ValueError(f"--rows {', '.join(unknown)}: no such row; valid: {', '.join(row.name for row in valid)}")
        rows = tuple(row for row in valid if row.name in wanted)
    seeded = [o for o in args.overrides if o.startswith("train.seed=")]
    if seeded:
        raise ValueError(f"{seeded[0]}: the study sets every run's seed from --seeds; pass --seeds "
                         f"{seeded[0].partition('=')[2]}, to run that seed")
    overrides = [*design.schedule_overrides(epochs), *holdout_overrides(args), *args.overrides]  # the user's win
    study = design.runs(rows, parse_seeds(args.seeds, args.quick), job_config(args, overrides), overrides)
    runs_dir = budget_dir(args) / "runs"
    return study, [resolve_run(args, list(s.overrides), runs_dir / s.folder)
                   if table.run_state(runs_dir / s.folder) == "unfinished" else
                   ended_run(args, list(s.overrides), runs_dir / s.folder) for s in study]


def ended_run(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> Run:
    """A finished or diverged run as it ran: kept, never run again (its checkpoints and DeepSpeed JSON may be
    gone: a committed study keeps only its records). Raises where the study's config for it changed since
    (one table must not mix two settings)."""
    saved, saved_plan = config.load_run_config(run_dir)
    saved = dataclasses.replace(saved, data=dataclasses.replace(saved.data, shards=str(Path(saved.data.shards).resolve())))
    changed = config.differences(config.to_dict(saved), config.to_dict(job_config(args, overrides)),
                                 ignore=config.RESUME_KEYS)
    if changed:
        raise ValueError(f"{run_dir / 'config.json'} ended with another config ({'; '.join(changed)}); pass another "
                         "--out for a study of the new settings, or move that run folder away to run it again")
    return Run(run_dir, saved, saved_plan, {})


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


def ranks_of(run: Run) -> int:
    """Cores a run takes on this machine: a thread for each of its ranks."""
    return run.cfg.cluster.nodes * run.cfg.cluster.gpus_per_node * run.cfg.cluster.cpus_per_task


def train_locally(args: argparse.Namespace, runs: list[Run], options: dict, cores: int) -> list[str]:
    """Train the runs on this machine, as many at a time as fit in `cores` (a run of k ranks takes k; one
    run at least), each through submitit's local executor as an ordinary run; a line when each ends. Returns
    the folders of the runs that failed. Ctrl-C, or SIGTERM, stops the running ones after their current step
    with a checkpoint: the same command resumes them."""
    queue, active, failed, started = list(runs), [], [], time.time()
    total = len(runs)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill: stop the runs, as Ctrl-C does
    try:
        while queue or active:
            while queue and (not active or sum(ranks_of(r) for r, _ in active) + ranks_of(queue[0]) <= cores):
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
                error = job_error(job)
                if error is None:
                    outcome = report.read(run.run_dir)
                elif table.run_state(run.run_dir) == "diverged":  # a result of the study, not a failure
                    outcome = "diverged (a loss that was not finite): the table counts it as such"
                else:
                    failed.append(run.run_dir.name)
                    outcome = f"FAILED ({error}); rank logs in {run.run_dir / 'submitit'}"
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
    # Every row's first seed before any row's next: a study stopped part-way has every row
    todo = sorted((r for r in runs if table.run_state(r.run_dir) == "unfinished"), key=lambda r: r.cfg.train.seed)
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
    submission.check_data(args, budget_dir(args), todo)
    for run in todo:
        prepare_run_dir(run)
    if args.cluster == "slurm":
        code = submission.submit_sweep(args, todo, budget_dir(args) / "runs", options)
        if not args.wait:
            print(f"when the jobs have ended, the same command writes the table: python -m pipeline.reproduce "
                  f"{shlex.join(sys.argv[1:])}")
        return code
    failed = train_locally(args, todo, options, args.parallel or os.cpu_count() or 1)
    if failed:
        print(f"error: {len(failed)} runs failed ({', '.join(failed)}); the table lists the others", file=sys.stderr)
    return 1 if failed else 0


def write_results(out: Path, study: list[design.StudyRun]) -> dict:
    """table1.json, table1.md and fig2.png in the budget's folder out, from the runs' metrics; then fig1.png
    beside it (every budget's table in the study folder); returns the table."""
    runs_dir = out / "runs"
    result = table.build(runs_dir, study)
    paths = table.write(result, out)
    if any(r["mean"] is not None for r in result["rows"]):
        figures.fig2(runs_dir, study, out / "fig2.png")
        paths.append(out / "fig2.png")
        tables = figures.budget_tables(out.parent)
        if tables:
            figures.fig1(tables, out.parent / "fig1.png")
            paths.append(out.parent / "fig1.png")
    print(table.markdown(result))
    print(f"wrote {', '.join(str(p) for p in paths)}; every run is a TensorBoard log: tensorboard --logdir "
          f"{shlex.quote(str(runs_dir))}")
    return result
