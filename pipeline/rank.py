"""One rank under a plain `srun` (slurm/train.sbatch): python -m pipeline.rank RUN_DIR.

The run folder must have been prepared by `python -m pipeline.submit --emit-sbatch`; rank, world size
and master address come from Slurm's environment, as they do for submitit's jobs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run folder holding config.json and ds_config.json")
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.json").is_file():
        parser.error(f"{args.run_dir / 'config.json'} does not exist; prepare the run with "
                     "python -m pipeline.submit --emit-sbatch FILE")
    train.run(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
