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


