"""`python -m pipeline.submit --status RUN_DIR`: a run's Slurm job state, last metrics and ETA.

The job id comes from `submitted.json` (written by the launcher) or from the ranks' last `start` record
(sbatch jobs); its state from squeue, then from `scontrol show job` (which remembers a finished job for
Slurm's MinJobAge), else from the run folder itself. A sweep folder shows every run in it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

from pipeline.train import metrics

SUBMITTED = "submitted.json"
# Slurm states of a job that has ended without finishing its run
STOPPED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
           "COMPLETED"}
SWEEP = "sweep.json"


def record_submission(run_dir: Path, job_id: str, cluster: str) -> None:
    """Remember which job trains this run folder (the newest submission wins)."""
    (Path(run_dir) / SUBMITTED).write_text(json.dumps({"job_id": job_id, "cluster": cluster,
                                                       "time": round(time.time(), 3)}) + "\n")


def slurm_job(run_dir: Path, records: list[dict]) -> str | None:
    """The newest Slurm job known to train this run: from its ranks' start records or the launcher's."""
    known = [(r["time"], r["job_id"]) for r in records if r["_type"] == "start" and r.get("job_id")]
    path = Path(run_dir) / SUBMITTED
    if path.is_file():
        submitted = json.loads(path.read_text())
        if submitted["cluster"] == "slurm":
            known.append((submitted["time"], submitted["job_id"]))
    return max(known)[1] if known else None


def _output(command: list[str]) -> str:
    """A Slurm command's stdout, or "" when it fails or Slurm is not reachable from here."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def slurm_state(job: str) -> str | None:
    """PENDING, RUNNING, COMPLETED, ... from squeue or scontrol; None when Slurm no longer knows the job
    (or is not reachable from here)."""
    queued = _output(["squeue", "-h", "-j", job, "-o", "%T"])
    if queued:
        return queued.splitlines()[0]
    for word in _output(["scontrol", "show", "job", job]).split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def eta_seconds(records: list[dict]) -> float | None:
    """Remaining steps at the pace of the last two progress records of the newest start."""
    starts = [i for i, r in enumerate(records) if r["_type"] == "start"]
    iters = [r for r in records[starts[-1] if starts else 0:] if r["_type"] == "train_iter"]
    if len(iters) < 2 or iters[-1]["time"] <= iters[-2]["time"]:
        return None
    pace = (iters[-1]["time"] - iters[-2]["time"]) / (iters[-1]["step"] - iters[-2]["step"])
    return pace * (iters[-1]["total_steps"] - iters[-1]["step"])


def describe_run(run_dir: Path) -> str:
    """A few lines: job and state, the last progress, eval and stop, and the ETA."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a run folder")
    records = metrics.read(run_dir / "metrics.jsonl")
    job = slurm_job(run_dir, records)
    state = slurm_state(job) if job else None
    if state is None:
        if (run_dir / "report.json").is_file():
            state = "finished (report.json written)"
        elif records:
            state = "not running (unknown to Slurm)"
        else:
            state = "not started"
    lines = [f"{run_dir}: job {job or '-'} {state}"]
    for kind in ("train_iter", "eval", "stop"):
        last = next((r for r in reversed(records) if r["_type"] == kind), None)
        if last:
            age = metrics.duration(time.time() - last["time"])
            lines.append(f"  {metrics.progress_line(last)} ({age} ago)")
    eta = eta_seconds(records)
    finished = (run_dir / "report.json").is_file()
    if eta is not None and not finished and state not in STOPPED:
        lines.append(f"  eta {metrics.duration(eta)} at the pace of the last steps")
    if records and not finished and (state.startswith("not running") or state in STOPPED):
        lines.append(f"  resume it with: python -m pipeline.submit --run-dir {shlex.quote(str(run_dir))}")
    return "\n".join(lines)


def describe(path: Path) -> str:
    """The status of a run folder, or of every run of a sweep folder."""
    path = Path(path)
    if (path / SWEEP).is_file():
        runs = json.loads((path / SWEEP).read_text())["runs"]
        return "\n".join(describe_run(path / run["folder"]) for run in runs)
    return describe_run(path)
