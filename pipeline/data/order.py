"""Which samples each rank and DataLoader worker reads, in which order: pure functions of the manifest's
shard sizes, the seed, the epoch and the cluster's shape (docs/data.md says how they fit together)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Samples [skip, skip + take) of one shard, in shard order."""

    url: str
    skip: int
    take: int


def stream_segments(counts: list[int], urls: list[str], order: list[int], start: int, stop: int) -> list[Segment]:
    """The pieces of shards that cover samples [start, stop) of the stream `order` lays out."""
    segments = []
    offset = 0
    for index in order:
        count = counts[index]
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            segments.append(Segment(urls[index], lo - offset, hi - lo))
        offset += count
        if offset >= stop:
            break
    return segments


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of an epoch: a pure function of (seed, epoch), identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def worker_batches(num_batches: int, workers: int, worker: int) -> tuple[int, int]:
    """(first, count): the contiguous run of a rank's batches that a worker makes; the first
    num_batches % workers workers make one more, matching the DataLoader's turn-taking."""
    q, r = divmod(num_batches, workers)
    return worker * q + min(worker, r), q + (worker < r)


def batches_before(step: int, workers: int, worker: int) -> int:
    """How many of its batches a worker has handed over when the rank is at `step`."""
    return len(range(worker, step, workers))


def block_shuffle(samples: Iterator[dict], block: int, first_block: int, seed: list[int]) -> Iterator[dict]:
    """Permute each run of `block` samples with a generator seeded by seed + [block index]."""
    index = first_block
    while True:
        buffer = [s for _, s in zip(range(block), samples)]
        if not buffer:
            return
        for i in np.random.default_rng(seed + [index]).permutation(len(buffer)):
            yield buffer[i]
        index += 1




# Indexed access (data.access=indexed): remark 4 exactly, and batches that do not depend on the cluster.
#
# Epoch e permutes all N training samples: P_e, seeded by (seed, e). Optimizer step t of the epoch uses the
# global batch P_e[t*kn : (t+1)*kn], cut into kn/n micro-batches of n; micro-batch j is
# P_e[t*kn + j*n : t*kn + (j+1)*n] and goes to rank j // a at accumulation step j % a (k ranks, a =
# grad_accum, n = micro_batch). So every shape with the same kn and n (32 nodes, or 16 with grad_accum 2)
# trains on the same micro-batches in the same steps, BatchNorm normalises over the same groups of n, and
# each micro-batch draws its crops and flips from a seed of its own: (seed, e, t*kn/n + j). A rank's m-th
# micro-batch of the epoch is step m // a, accumulation step m % a; its DataLoader workers take turns, so
# worker w makes the rank's micro-batches m = start + w, start + w + W, ... The N - steps*kn samples at the
# end of P_e are not used that epoch.


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """P_e: the epoch's order of all samples, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def micro_batch_index(m: int, rank: int, world_size: int, grad_accum: int) -> int:
    """Index in the epoch's list of micro-batches (t * kn/n + j) of a rank's m-th micro-batch of the epoch."""
    step, accum_step = divmod(m, grad_accum)
    return step * world_size * grad_accum + rank * grad_accum + accum_step


def micro_batch_samples(permutation: np.ndarray, m: int, rank: int, world_size: int, grad_accum: int,
                        n: int) -> np.ndarray:
    """Positions in the epoch's permutation (sample ids) of a rank's m-th micro-batch."""
    start = micro_batch_index(m, rank, world_size, grad_accum) * n
    return permutation[start:start + n]
