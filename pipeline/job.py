"""The submitit job object: small, picklable, and light to import.

The launcher pickles it on a login node; importing the training code there would pull in DeepSpeed and
CUDA for nothing (and DeepSpeed prints to stdout on import), so the import happens on the rank.
"""

from __future__ import annotations

from pathlib import Path

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """Runs pipeline.train.run(run_dir) on every rank. On preemption or timeout, Checkpointable's
    checkpoint() requeues this same object, and run() resumes from the newest per-epoch checkpoint."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __call__(self) -> dict:
        from pipeline import train

        return train.run(self.run_dir)

