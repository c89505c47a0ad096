"""Find the gradient bucket size that trains fastest on the allocation you will train on.

    python -m pipeline.tune_buckets --preset goyal_r50_bs8k --nodes 4 --gpus-per-node 8 --partition gpu
    python -m pipeline.tune_buckets --preset demo --cluster local          # 2 processes on this machine

A job like training, through the same launcher, flags, config and DeepSpeed JSON. Every rank builds the
real model and DeepSpeed engine and steps it on one batch of the real shape (random pixels and labels:
the loader is left out, so that only compute and communication are timed). The candidates are overlap
off (DeepSpeed's own allreduce of everything after backward) and each of --sizes as
zero_optimization.reduce_bucket_size with overlap_comm on (pipeline.train.buckets). They take turns, --steps
optimizer steps each, for --rounds rounds; the median round counts. Then, without communication, the
forward, backward and update times, and the time of allreduces of several sizes inside a node and
between nodes: what python -m pipeline.scaling and `submit --dry-run --hardware` need.

Into the run folder: tune.json (every time measured), tune.png (step time against bucket size),
ds_config_tuned.json (the DeepSpeed JSON with the best setting, or --write FILE), and hardware.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.launch import options, tuning


def main(argv: list[str] | None = None) -> int:
    parser = options.job_parser("python -m pipeline.tune_buckets", __doc__, training=False)
    parser.add_argument("--sizes", default=tuning.DEFAULT_SIZES,
                        help=f"bucket sizes in elements (default {tuning.DEFAULT_SIZES})")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per candidate per round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median counts (default 5)")
    parser.add_argument("--run-dir", type=Path, help="folder for the results (default runs/tune-<preset>-<date>-<time>)")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="write the tuned DeepSpeed JSON here (default RUN_DIR/ds_config_tuned.json)")
    parser.add_argument("--wait", action="store_true", help="on Slurm, wait for the job and print its table")
    return options.run_command(tuning.launch, parser.parse_intermixed_args(argv))  # key=value overrides anywhere


if __name__ == "__main__":
    sys.exit(main())
