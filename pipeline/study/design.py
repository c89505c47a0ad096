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

# The paper's schedule: 90 epochs, warmup over the first 5, x0.1 at 30, 60 and 80 (section 5.1). A study's
# budget of E epochs scales every one of these by E / 90.
PAPER_EPOCHS, PAPER_WARMUP, PAPER_MILESTONES = 90, 5, (30, 60, 80)


def schedule_overrides(epochs: int) -> tuple[str, ...]:
    """The paper's schedule scaled to `epochs`: 6 gives warmup 1/3, decays at 2, 4 and 5.33 (the study preset)."""
    scale = epochs / PAPER_EPOCHS
    milestones = ",".join(repr(m * epochs / PAPER_EPOCHS) for m in PAPER_MILESTONES)
    return (f"schedule.epochs={epochs}", f"schedule.warmup_epochs={PAPER_WARMUP * scale!r}",
            f"schedule.milestones={milestones}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: kn as a multiple of the reference, and what else differs from the recipe."""

    name: str
    multiple: int  # kn / reference kn
    paper_kn: str  # the paper's kn at this multiple of its 256
    paper_err: float | None  # the paper's top-1 error %, None where the paper has no such run
    paper_std: float | None
    overrides: tuple[str, ...] = ()  # what the row changes in the recipe
    ranks: int | None = None  # processes of its runs; None: the study's (--nodes x --gpus-per-node)

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
    Row("2x", 2, "512", None, None),
    Row("4x", 4, "1k", 23.53, 0.08),
    Row("8x", 8, "2k", None, None),
    Row("16x", 16, "4k", 23.56, 0.12),
    Row("32x", 32, "8k", 23.74, 0.09),
    Row("64x", 64, "16k", 24.79, 0.27),
    Row("128x", 128, "32k", 27.55, 0.28),
    Row("32x no warmup", 32, "8k", 24.84, 0.37, ("schedule.warmup_epochs=0",)),
    Row("32x constant warmup", 32, "8k", 25.88, None, ("schedule.warmup=constant",)),
    Row("32x sqrt scaling", 32, "8k", 26.22, None, ("optim.scaling=sqrt",)),
    *(Row(f"{multiple}x LARS", multiple, kn, None, None, LARS) for multiple, kn in ((64, "16k"), (128, "32k"))),
    # The paper's claim is about k workers: 32x on 4 real processes (accumulating 8 micro-batches each), beside
    # its emulation on one process (the 32x row)
    Row("32x on 4 ranks", 32, "8k", 23.74, 0.09, ("cluster.nodes=1", "cluster.gpus_per_node=4"), ranks=4),
)
# The rows of each budget (--epochs): at the short one every row; at 18 epochs (the paper's 90 scaled by 1/5)
# the rows that say where linear scaling stops holding, and whether warmup matters there.
LONG_ROWS = ("1x", "8x", "16x", "32x", "32x no warmup")


def budget_rows(epochs: int) -> tuple[Row, ...]:
    """The default rows of a study of `epochs` epochs: LONG_ROWS at 18, every row otherwise."""
    return tuple(row for row in ROWS if row.name in LONG_ROWS) if epochs == 18 else ROWS
# Table 2b: the same recipe without zero-gamma (every BN gamma starts at 1); --zero-gamma adds it.
ZERO_GAMMA_ROW = Row("32x no zero-gamma", 32, "8k", 24.11, None, ("model.zero_init_residual=false",))
# --quick: three short runs, for a first look and for the tests.
QUICK_ROWS = (ROWS[0], ROWS[2], Row("4x no warmup", 4, "1k", None, None, ("schedule.warmup_epochs=0",)))
QUICK_EPOCHS = 1


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One training run of the study: a row, a seed, its folder name and its overrides."""

    row: Row
    seed: int
    folder: str
    overrides: tuple[str, ...]


def runs(rows: tuple[Row, ...], seeds: list[int], cfg: config.Config, overrides: list[str]) -> list[StudyRun]:
    """Every (row, seed) run over the base config cfg (preset, cluster flags and the user's overrides, which
    `overrides` repeats): train.grad_accum makes the row's kn on the row's ranks (cfg's unless the row names
    its own), train.log_every gives about 10 progress records an epoch (Fig. 2's curves), train.seed the seed.
    Raises naming the rows that the ranks cannot make."""
    out, errors = [], []
    for row in rows:
        ranks = row.ranks or cfg.cluster.nodes * cfg.cluster.gpus_per_node
        per_step = ranks * cfg.train.micro_batch
        kn = row.multiple * cfg.optim.reference_batch
        if kn % per_step:
            errors.append(f"{row.name} (kn={kn} on {ranks} ranks x train.micro_batch {cfg.train.micro_batch})")
            continue
        accum = kn // per_step
        steps = config.micro_batches_per_rank(cfg.data.train_samples, ranks, cfg.train.micro_batch, accum) // accum
        extra = (f"train.grad_accum={accum}", f"train.log_every={max(1, steps // 10)}")
        for seed in seeds:
            out.append(StudyRun(row, seed, f"{row.slug}-seed{seed}",
                                (*overrides, *row.overrides, *extra, f"train.seed={seed}")))
    if errors:
        raise ValueError(f"{', '.join(errors)}: kn must be a multiple of ranks x train.micro_batch; use fewer ranks "
                         f"(--nodes, --gpus-per-node), leave those rows out (--rows) or use a larger "
                         f"optim.reference_batch (now {cfg.optim.reference_batch})")
    return out
