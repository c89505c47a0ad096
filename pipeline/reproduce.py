"""Reproduce the paper's Table 1 and Figures 1-2 at small scale: a study of many training runs, and its table.

    python -m pipeline.reproduce --epochs 18              # the 18-epoch study: 15 runs on Fashion-MNIST
    python -m pipeline.reproduce                          # the 6-epoch study: 42 runs
    python -m pipeline.reproduce --quick --out runs/quick # 3 short runs: a first look
    python -m pipeline.reproduce --preset goyal_r50_bs256 --partition gpu --seeds 5 \\
        data.shards=/datasets/imagenet-shards             # the paper's study on ImageNet, one job array

Rows: kn = 1x, 2x, 4x, 8x, 16x, 32x, 64x and 128x the reference (optim.reference_batch: the paper's 256 ->
32k), linear scaling with gradual warmup; at 32x no warmup, constant warmup, square-root scaling (and, with
--zero-gamma, no zero-gamma) and 32x on 4 real ranks; past the paper, at 64x and 128x LARS with label
smoothing. A budget (--epochs) is the paper's 90-epoch schedule scaled; 18 epochs runs the rows 1x, 8x, 16x,
32x and 32x no warmup. The ranks stay as given; a larger kn accumulates micro-batches (train.grad_accum), so
BatchNorm keeps its n images. Each run's error is the median of its epochs at the final lr; each row's the
mean and std over seeds, against 1x with Welch's t-test; kn* is how far linear scaling holds (docs/reproduce.md).
Every run also measures the gradient noise scale. Key=value overrides apply to every run.

Each run is an ordinary run folder in OUT/epochs<E>/runs/: the same command resumes a stopped study (finished
runs are kept, the others resume from their newest checkpoint) and, once every run has ended, writes
OUT/epochs<E>/table1.md, table1.json and fig2.png (training error against epochs), and OUT/fig1.png (error
against kn at every budget). Every run folder is also a TensorBoard log: tensorboard --logdir OUT overlays them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.launch import options
from pipeline.launch.checks import choose_cluster
from pipeline.study import execute, table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The job's flags (pipeline.launch.options) and the study's."""
    parser = options.job_parser("python -m pipeline.reproduce", __doc__, preset="study", sweeps=False)
    parser.add_argument("--out", type=Path, default=Path("runs/study"),
                        help="the study folder: runs/ inside it, the table and figures beside (default runs/study)")
    parser.add_argument("--epochs", type=int, default=6,
                        help="the budget: the paper's 90-epoch schedule scaled to this many epochs (warmup 5/90 of it, "
                             "decays at 30, 60 and 80/90); 6 (default) runs every row, 18 the rows 1x, 8x, 16x, 32x "
                             "and 32x no warmup; the runs go to OUT/epochs<E>/")
    parser.add_argument("--quick", action="store_true",
                        help="three one-epoch runs (1x, 4x with and without warmup), one seed: a first look")
    parser.add_argument("--seeds", metavar="N|LIST",
                        help="a count N (seeds 0..N-1) or a list, e.g. 3,4 or 0-4 (one seed s: 's,'); default 3, "
                             "1 with --quick (the paper 5); train.seed= is refused: the study sets it per run")
    parser.add_argument("--rows", metavar="NAME,...", help="only these rows, e.g. --rows '1x,32x,32x no warmup'")
    parser.add_argument("--zero-gamma", action="store_true", help="add the 32x row without zero-gamma (Table 2b)")
    parser.add_argument("--holdout", action="store_true",
                        help="train on 50,000 of Fashion-MNIST's training images and score on the other 10,000, "
                             "not on the test images the results report: for choosing hyper-parameters")
    parser.add_argument("--parallel", type=int,
                        help="on this machine: ranks training at once, a run of k ranks counting k (default: the "
                             "cores over each rank's threads)")
    parser.add_argument("--wait", action="store_true", help="on Slurm: follow the job array and write the table at its end")
    parser.add_argument("--dry-run", action="store_true", help="print every run's plan and state; train nothing")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    return options.run_command(reproduce, parse_args(argv))


def reproduce(args: argparse.Namespace) -> int:
    """Everything main() does; bad input raises before anything is written or run."""
    if args.parallel is not None and args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel} must be at least 1")
    sbatch_options = options.checked_sbatch_options(args)
    study, runs = execute.plan(args)
    if args.dry_run:
        for run in runs:
            print(f"{run.run_dir.name} ({table.run_state(run.run_dir)}): {run.plan.summary(run.cfg)}")
        print(f"{len(runs)} runs in {execute.budget_dir(args) / 'runs'} (dry run: nothing written, nothing trained)")
        return 0
    args.cluster = choose_cluster(args.cluster)
    if args.cluster != "slurm" and args.max_requeues:
        raise ValueError(f"--max-requeues {args.max_requeues} requeues a study's runs on Slurm; on this machine a "
                         "failed run is not restarted by itself: run the same command again, which resumes it")
    code = execute.train(args, runs, sbatch_options)
    execute.write_results(execute.budget_dir(args), study)
    return code


if __name__ == "__main__":
    sys.exit(main())
