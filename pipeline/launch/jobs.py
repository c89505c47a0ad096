"""The submitit job object: small, picklable, and light to import.

The launcher pickles it on a login node; importing the training code there would pull in DeepSpeed and
CUDA for nothing (and DeepSpeed prints to stdout on import), so the import happens on the rank.
"""

from __future__ import annotations

from pathlib import Path

import submitit

from pipeline.train import preempt


class TrainJob(submitit.helpers.Checkpointable):
    """Runs pipeline.train.loop.run(run_dir) on every rank.

    On SIGUSR2 or SIGTERM every rank checkpoints after the same step, then rank 0 hands the signal to
    submitit, whose Checkpointable.checkpoint() requeues this same object; the requeued job resumes from
    that checkpoint (pipeline.train.preempt).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __call__(self) -> dict:
        stop = preempt.StopRequest().install()  # before the slow imports: no signal is missed
        from pipeline.train import loop

        return loop.run(self.run_dir, stop)


class TuneJob:
    """Runs pipeline.train.tune.measure on every rank; rank 0's result carries the table."""

    def __init__(self, run_dir: Path, sizes: list[int], steps: int, rounds: int, write: Path | None):
        self.run_dir, self.sizes, self.steps, self.rounds, self.write = Path(run_dir), sizes, steps, rounds, write

    def __call__(self) -> dict:
        from pipeline.train import tune

        return tune.measure(self.run_dir, self.sizes, self.steps, self.rounds, self.write)
