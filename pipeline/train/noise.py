"""The gradient noise scale of a run (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1), from gradients that data parallelism computes anyway.

G is the true gradient and Sigma the per-example covariance; the mean gradient G_B of B examples has
E|G_B|^2 = |G|^2 + tr(Sigma) / B. Squared norms at two batch sizes B_small < B_big give unbiased estimates

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and the simple noise scale B_simple = tr(Sigma) / |G|^2: batches well below it train almost perfectly
linearly (twice the batch, half the steps), batches well above it gain little per image. Each estimate is
noisy on one step (and can be negative), so both are averaged over a record's window and smoothed over
records separately, and B_simple is the ratio of the smoothed pair.

Where the two sizes come from (`pairing`), all of them the gradient of the loss only (weight decay is added
inside the optimizer step, after both are taken), summed on the device by the bucketed allreduce
(pipeline.train.buckets) and read with the train_iter record's one read:
- k > 1 ranks: each rank's gradient before the allreduce (B_small = n x accumulation, averaged over ranks)
  and the average after it (B_big = kn);
- one rank accumulating m > 1 micro-batches: each micro-batch's gradient (B_small = n) and their mean
  (B_big = n m);
- one rank, one micro-batch a step: each step's gradient (B_small = n) and its mean with the step before's
  (B_big = 2n). The two were taken one update apart, so the |G|^2 estimate is the dot product of
  consecutive gradients, and the step before's noise has moved the weights against the current gradient:
  it comes out low by about lr tr(H Sigma) / n (H the Hessian), and B_simple high, most where the gradient
  is small against its noise (late in training). Exact at lr 0; an upper estimate in training. The records
  name the pairing.
"""

from __future__ import annotations

import dataclasses

import torch

# Weight of the older value when a record's window estimate is folded into the smoothed one. About ten
# records are smoothed: in the study, about one epoch.
SMOOTHING = 0.9


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Which gradients are compared, and the batch size of each."""

    kind: str  # "ranks", "micro-batches" or "consecutive steps"
    b_small: int
    b_big: int

    def describe(self) -> str:
        return f"{self.kind} ({self.b_small} and {self.b_big} images)"


def pairing(world: int, micro_batch: int, grad_accum: int) -> Pairing:
    """The pairing of a run of `world` ranks of micro_batch images accumulating grad_accum micro-batches."""
    if world > 1:
        return Pairing("ranks", micro_batch * grad_accum, world * micro_batch * grad_accum)
    if grad_accum > 1:
        return Pairing("micro-batches", micro_batch, micro_batch * grad_accum)
    return Pairing("consecutive steps", micro_batch, 2 * micro_batch)


def estimates(small_sq: float, big_sq: float, b_small: int, b_big: int) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from the mean squared norms of gradients of b_small and of b_big examples."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return g2, trace


def ratio(trace: float, g2: float) -> float | None:
    """B_simple = tr(Sigma) / |G|^2, or None where the |G|^2 estimate is not positive (too few steps yet)."""
    return trace / g2 if g2 > 0 else None


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor|^2 in float64 on its device, accumulated in fp32 (bf16 buckets included); no host sync."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).double().square()


class NoiseMeter:
    """The device sums the buckets feed, [sum |G_small|^2, count, sum |G_big|^2, count], and the smoothed
    estimates on the host. The training loop takes the sums into its record window (one allreduce and one
    read per record, those the record already makes) and turns them into the record's fields."""

    SUMS = 4

    def __init__(self, pair: Pairing, device: torch.device):
        self.pair = pair
        self.sums = torch.zeros(self.SUMS, dtype=torch.float64, device=device)
        self.g2_ema = self.trace_ema = 0.0
        self.updates = 0  # window estimates folded in so far

    def add_small(self, sq: torch.Tensor) -> None:
        self.sums[0] += sq

    def add_big(self, sq: torch.Tensor) -> None:
        self.sums[2] += sq

    def count(self, small: int, big: int) -> None:
        """A step's numbers of small and big gradients added (in-place adds on the device: no copy)."""
        if small:
            self.sums[1] += small
        if big:
            self.sums[3] += big

    def take(self) -> torch.Tensor:
        """The sums since the last take (a copy on the device), and zero them."""
        sums = self.sums.clone()
        self.sums.zero_()
        return sums

    def restore(self, record: dict | None) -> None:
        """Continue the smoothing of a resumed run from its last record before the checkpoint."""
        if record and record.get("noise_updates"):
            self.g2_ema, self.trace_ema = record["noise_g2_ema"], record["noise_trace_ema"]
            self.updates = record["noise_updates"]

    def fields(self, sums: list[float]) -> dict:
        """A train_iter record's fields from the window's sums over ranks: the window's |G|^2 and tr(Sigma)
        estimates, their smoothed values, and the noise scale of the smoothed pair."""
        small_sq, small_n, big_sq, big_n = sums
        fields: dict = {"noise_pairing": self.pair.describe()}
        if small_n and big_n:
            g2, trace = estimates(small_sq / small_n, big_sq / big_n, self.pair.b_small, self.pair.b_big)
            self.g2_ema = SMOOTHING * self.g2_ema + (1 - SMOOTHING) * g2
            self.trace_ema = SMOOTHING * self.trace_ema + (1 - SMOOTHING) * trace
            self.updates += 1
            fields.update(noise_g2=g2, noise_trace=trace)
        fields.update(noise_g2_ema=self.g2_ema, noise_trace_ema=self.trace_ema, noise_updates=self.updates)
        # Both averages start at 0 and carry the same start-up bias (1 - SMOOTHING^updates): it cancels in the ratio
        fields["noise_scale"] = ratio(self.trace_ema, self.g2_ema) if self.updates else None
        return fields


def not_measured() -> dict:
    """The fields of a record where DeepSpeed's own allreduce runs instead of our buckets: no noise scale, and
    why (never a silent zero)."""
    return {"noise_pairing": "not measured: DeepSpeed's own allreduce runs (zero_optimization.overlap_comm=false); "
                             "the noise scale is measured in the buckets of ours", "noise_scale": None}


def over_training(iters: list[dict]) -> dict | None:
    """The noise scale early, in the middle and late in training: tr(Sigma) over |G|^2, each the mean of the
    window estimates in the first, second and last third of the records (None where not measured)."""
    measured = [r for r in iters if r.get("noise_g2") is not None]
    if len(measured) < 3:
        return None
    third = len(measured) / 3
    parts = [measured[round(i * third):round((i + 1) * third)] for i in range(3)]
    result = {}
    for name, part in zip(("early", "middle", "late"), parts):
        g2 = sum(r["noise_g2"] for r in part) / len(part)
        trace = sum(r["noise_trace"] for r in part) / len(part)
        result[name] = ratio(trace, g2)
    result["pairing"] = measured[-1]["noise_pairing"]
    return result
