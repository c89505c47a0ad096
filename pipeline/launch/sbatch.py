"""Renders slurm/train.sbatch for a prepared run folder."""

from __future__ import annotations

import re
import shlex
import string
import sys
from pathlib import Path

from pipeline.config import Config, wants_gpus

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
# #SBATCH lines are read by sbatch, not by a shell: nothing can be quoted there, so values must be plain.
PLAIN = re.compile(r"^[A-Za-z0-9_.,:=+@%/-]+$")


def directive(flag: str, value) -> str:
    """One `#SBATCH --flag=value` line (`--flag` for True); a value sbatch could misread is an error."""
    if value is True:
        return f"#SBATCH --{flag}"
    text = str(value)
    if not PLAIN.match(text):
        raise ValueError(f"--{flag}={text!r} cannot go on an #SBATCH line; use letters, digits and _.,:=+@%/- only")
    return f"#SBATCH --{flag}={text}"


def render(cfg: Config, run_dir: Path, time_min: int, options: dict, workdir: Path, signal_delay: int = 90,
           max_requeues: int = 3, python: str = sys.executable) -> str:
    """The sbatch script that trains the run in run_dir, every body value shell-quoted; `options` are
    the launcher's optional sbatch flags (name -> value, True for a bare flag)."""
    extra = []
    if wants_gpus(cfg.cluster):
        extra.append(directive("gpus-per-node", cfg.cluster.gpus_per_node))
    extra += [directive(key, value) for key, value in options.items()]
    values = {
        "job_name": re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name),
        "nodes": cfg.cluster.nodes,
        "tasks_per_node": cfg.cluster.gpus_per_node,
        "cpus_per_task": cfg.cluster.cpus_per_task,
        "time_min": time_min,
        "signal_delay": int(signal_delay),
        "max_requeues": int(max_requeues),
        "extra_directives": "\n".join(extra),
        "workdir": shlex.quote(str(workdir)),
        "log_pattern": shlex.quote(str(run_dir / "slurm" / "%j_%t.log")),
        "srun_log": shlex.quote(str(run_dir / "slurm" / "srun.out")),  # srun's own messages ("task 1: Killed")
        "python": shlex.quote(python),
        "run_dir": shlex.quote(str(run_dir)),
    }
    return string.Template(TEMPLATE.read_text()).substitute(values)
