"""The submitit job object: small, picklable, and light to import.

The launcher pickles it on a login node; importing the training code there would pull in DeepSpeed and
CUDA for nothing (and DeepSpeed prints to stdout on import), so the import happens on the rank.
"""

from __future__ import annotations

from pathlib import Path

import submitit

from pipeline import preempt


class TrainJob(submitit.helpers.Checkpointable):
    """Runs pipeline.train.run(run_dir) on every rank.

    On SIGUSR2 or SIGTERM every rank checkpoints after the same step, then rank 0 hands the signal to
    submitit, whose Checkpointable.checkpoint() requeues this same object; the requeued job resumes from
    that checkpoint (pipeline.preempt).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __call__(self) -> dict:
        stop = preempt.StopRequest().install()  # before the slow imports: no signal is missed
        from pipeline import train

        return train.run(self.run_dir, stop)


class TuneJob:
    """Runs pipeline.tune_buckets.measure on every rank; rank 0's result carries the table."""

    def __init__(self, run_dir: Path, sizes: list[int], steps: int, rounds: int, write: Path | None):
        self.run_dir, self.sizes, self.steps, self.rounds, self.write = Path(run_dir), sizes, steps, rounds, write

    def __call__(self) -> dict:
        from pipeline import tune_buckets

        return tune_buckets.measure(self.run_dir, self.sizes, self.steps, self.rounds, self.write)
