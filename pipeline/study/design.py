"""What the study runs: the paper's Table 1 rows as multiples of a reference minibatch, with the paper's
numbers beside them, and the run (folder and overrides) of every row and seed.

A row's kn is `multiple` x the reference kn (optim.reference_batch: 256 in the paper, 32 in the local
`study` preset); on a fixed set of ranks the larger kn accumulate micro-batches (train.grad_accum), so BN
keeps its n images per micro-batch, as the paper's own emulation of large minibatches. Paper numbers: top-1
error %, ResNet-50 on ImageNet, mean +- std over 5 runs (Table 1, Table 2b, section 5.3).
"""

from __future__ import annotations

import dataclasses
import re

from pipeline import config

# The reported error of a run: the median of the top-1 error of its last epochs (the paper: of its last 5
# of 90, all at the final lr). The local study's last 2 of 6 epochs are the two after its first decay.
REPORTED_EPOCHS = 2


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: kn as a multiple of the reference, and what else differs from the recipe."""

    name: str
    multiple: int  # kn / reference kn
    paper_kn: str  # the paper's kn at this multiple of its 256
    paper_err: float | None  # the paper's top-1 error %, None where the paper has no such run
    paper_std: float | None
    overrides: tuple[str, ...] = ()  # what the row changes in the recipe

    @property
    def slug(self) -> str:
        """The row's part of a run folder's name: "kn32x", "kn32x-no-warmup"."""
        return "kn" + re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


# Past the paper: LARS with label smoothing 0.1 where the paper's recipe climbs, at the LARS rate per image of
# the lars_r50_bs32k preset (the MLPerf ResNet-50 reference's 32 at 32768: 0.25 per 256). Only the optimizer,
# its rate and the loss change: the same gradual warmup (from 0.25 per 256) and step decay.
LARS = ("optim.kind=lars", "train.label_smoothing=0.1", "optim.base_lr=0.25", "optim.reference_batch=256")
# The paper's rows: linear scaling with gradual warmup from 1x (its 256) to 128x (32k), then the ablations at
# 32x (its 8k), each changing one thing.
ROWS = (
    Row("1x", 1, "256", 23.60, 0.12),
    Row("4x", 4, "1k", 23.53, 0.08),
    Row("16x", 16, "4k", 23.56, 0.12),
    Row("32x", 32, "8k", 23.74, 0.09),
    Row("64x", 64, "16k", 24.79, 0.27),
    Row("128x", 128, "32k", 27.55, 0.28),
    Row("32x no warmup", 32, "8k", 24.84, 0.37, ("schedule.warmup_epochs=0",)),
    Row("32x constant warmup", 32, "8k", 25.88, None, ("schedule.warmup=constant",)),
    Row("32x sqrt scaling", 32, "8k", 26.22, None, ("optim.scaling=sqrt",)),
    *(Row(f"{multiple}x LARS", multiple, kn, None, None, LARS) for multiple, kn in ((64, "16k"), (128, "32k"))),
)
# Table 2b: the same recipe without zero-gamma (every BN gamma starts at 1); --zero-gamma adds it.
ZERO_GAMMA_ROW = Row("32x no zero-gamma", 32, "8k", 24.11, None, ("model.zero_init_residual=false",))
# --quick: three short runs, for a first look and for the tests.
QUICK_ROWS = (ROWS[0], ROWS[1], Row("4x no warmup", 4, "1k", None, None, ("schedule.warmup_epochs=0",)))
QUICK_OVERRIDES = ("schedule.epochs=1",)


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One training run of the study: a row, a seed, its folder name and its overrides."""

    row: Row
    seed: int
    folder: str
    overrides: tuple[str, ...]


def runs(rows: tuple[Row, ...], seeds: int, cfg: config.Config, overrides: list[str]) -> list[StudyRun]:
    """Every (row, seed) run over the base config cfg (preset, cluster flags and the user's overrides, which
    `overrides` repeats): train.grad_accum makes the row's kn on cfg's ranks, train.log_every gives about 10
    progress records an epoch (Fig. 2's curves), train.seed the seed. Raises naming the rows that the ranks
    cannot make."""
    ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    per_step = ranks * cfg.train.micro_batch
    out, errors = [], []
    for row in rows:
        kn = row.multiple * cfg.optim.reference_batch
        if kn % per_step:
            errors.append(f"{row.name} (kn={kn})")
            continue
        accum = kn // per_step
        steps = config.micro_batches_per_rank(cfg.data.train_samples, ranks, cfg.train.micro_batch, accum) // accum
        extra = (f"train.grad_accum={accum}", f"train.log_every={max(1, steps // 10)}")
        for seed in range(seeds):
            out.append(StudyRun(row, seed, f"{row.slug}-seed{seed}",
                                (*overrides, *row.overrides, *extra, f"train.seed={seed}")))
    if errors:
        raise ValueError(f"{', '.join(errors)}: kn must be a multiple of ranks x train.micro_batch = {ranks} x "
                         f"{cfg.train.micro_batch} = {per_step}; use fewer ranks (--nodes, --gpus-per-node) or a "
                         f"larger optim.reference_batch (now {cfg.optim.reference_batch})")
    return out
