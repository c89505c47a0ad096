"""One rank under a plain `srun` (slurm/train.sbatch): python -m pipeline.rank RUN_DIR.

The run folder must have been prepared by `python -m pipeline.submit --emit-sbatch`; rank, world size
and master address come from Slurm's environment, as they do for submitit's jobs. On SIGUSR2 or SIGTERM
every rank checkpoints after the same step and rank 0 runs `scontrol requeue` (pipeline.train.preempt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.train import preempt


def main(argv: list[str] | None = None) -> int:
    stop = preempt.StopRequest().install()  # first: a signal during the slow imports is not missed
    parser = argparse.ArgumentParser(prog="python -m pipeline.rank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run folder holding config.json and ds_config.json")
    parser.add_argument("--max-requeues", type=int, default=3,
                        help="on SIGUSR2/SIGTERM, checkpoint and requeue the job at most this many times (default 3)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.json").is_file():
        parser.error(f"{args.run_dir / 'config.json'} does not exist; prepare the run with "
                     "python -m pipeline.submit --emit-sbatch FILE")
    from pipeline.train import loop

    loop.run(args.run_dir, stop, args.max_requeues)
    return 0


if __name__ == "__main__":
    sys.exit(main())
