"""A rank's training and evaluation batches: samples read from the tars in the order pipeline.data.order
gives, decoded by pipeline.data.decode, with the error policy of each split (docs/data.md).

From webdataset we use tar reading (any URL it opens: local paths, http(s), `pipe:` commands). We step
around three of its parts: split_by_node/split_by_worker split the shard list before any shuffle, so a
rank would see the same shards every epoch and uneven shard counts would give ranks different step
counts (which hangs the allreduce); its reservoir `shuffle` depends on every sample read before, so a
resumed worker would have to re-read its whole part; and its decoders would unpickle `.pyd` members.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing.sharedctypes
import sys
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from pipeline.config import DataConfig, loader_mode
from pipeline.data.decode import DECODE_ERRORS, Encoded, decode_eval, decode_train, encode_train, encoded_batch, stack
from pipeline.data.manifest import Manifest, load_index
from pipeline.data.order import (batches_before, block_shuffle, epoch_order, epoch_permutation, micro_batch_index,
                                 micro_batch_samples, stream_segments, worker_batches)
from pipeline.data.samples import SampleReader, read_segments

class Batch(NamedTuple):
    """What the loader yields: uint8 images [n, 3, S, S] (channels_last; under data.decode=gpu a training
    batch's are still encoded, for the rank to decode on its device), int64 labels [n], the shard keys of the
    samples, and how many corrupt samples were replaced by another sample of the batch."""

    images: torch.Tensor | Encoded
    labels: torch.Tensor
    keys: list[str]
    corrupt: int


def _describe(sample: dict, err: Exception) -> str:
    return f"{sample['__url__']}: sample {sample['__key__']!r} is not a decodable image ({err})"


def raise_corrupt(sample: dict, err: Exception) -> None:
    """Error policy of evaluation: a corrupt sample is an error."""
    raise ValueError(_describe(sample, err) + "; check the shards with python -m pipeline.shards verify") from err


def warn_corrupt(sample: dict, err: Exception) -> None:
    """Error policy of training: name the sample on stderr; the batch replaces it and counts it."""
    print(f"warning: {_describe(sample, err)}; replaced by another sample of its batch", file=sys.stderr, flush=True)


def make_batch(samples: list[dict], decode: Callable[[dict], object],
               on_corrupt: Callable[[dict, Exception], None], combine: Callable[[list], object] = stack) -> Batch:
    """Decode a batch (combine makes one batch of the decoded images); a corrupt sample (reported through
    on_corrupt) is replaced by a fresh decode of another sample of the same batch, so every batch keeps
    exactly n images."""
    decoded: list[tuple[object, dict]] = []
    corrupt = 0
    for sample in samples:
        try:
            decoded.append((decode(sample), sample))
        except DECODE_ERRORS as err:
            on_corrupt(sample, err)
            corrupt += 1
    for attempt in range(len(samples)):  # a replacement draws a new crop, which could fail to decode too
        if not decoded or len(decoded) == len(samples):
            break
        sample = decoded[attempt % len(decoded)][1]
        try:
            decoded.append((decode(sample), sample))
        except DECODE_ERRORS as err:
            on_corrupt(sample, err)
    if len(decoded) < len(samples):
        raise ValueError(f"{corrupt} of the {len(samples)} samples of a batch do not decode and too few others do "
                         f"to replace them (the batch starts at {samples[0]['__url__']}: {samples[0]['__key__']!r}); "
                         "the shard is damaged: check it with python -m pipeline.shards verify")
    return Batch(combine([image for image, _ in decoded]), torch.tensor([int(s["cls"]) for _, s in decoded]),
                 [s["__key__"] for _, s in decoded], corrupt)


def train_batch(samples: list[dict], cfg: DataConfig, seed: list[int]) -> Batch:
    """A training batch whose crops and flips draw from a generator of its own seeded by `seed` alone; torch's
    and numpy's global generators are not touched (with workers=0 the loader runs inside the training process). Under
    data.decode=gpu the images stay encoded with the crops and flips drawn: the same ones (pipeline.data.decode).
    A sample whose header PIL cannot read (where the sample index gives no size) is corrupt here; one whose body
    does not decode, on the device."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    if cfg.decode == "gpu":
        return make_batch(samples, lambda s: encode_train(s["jpg"], cfg, rng, s.get("size")), warn_corrupt,
                          encoded_batch)
    return make_batch(samples, lambda s: decode_train(s["jpg"], cfg, rng, s.get("size")), warn_corrupt)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shared_position():
    """[epoch, start_step] in shared memory: persistent workers read what the rank set for this pass.
    A raw array (no lock) needs no multiprocessing context, so making a stream starts no process."""
    return multiprocessing.sharedctypes.RawArray("q", 2)


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training batches with streaming access (data.access=stream), one epoch per pass: whole
    shards in a permuted order, read through, shuffled in blocks (pipeline.data.order); set_epoch() picks
    the epoch and the first step."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, batch_size: int, num_batches: int,
                 rank: int, world_size: int, seed: int):
        super().__init__()
        self.per_rank = manifest.num_samples // world_size
        if num_batches * batch_size > self.per_rank:
            raise ValueError(f"{num_batches} batches of {batch_size} exceed the {self.per_rank} samples of a rank")
        self.manifest, self.cfg = manifest, cfg
        self.urls = manifest.urls(cfg.shard_url)
        self.batch_size, self.num_batches = batch_size, num_batches
        self.rank, self.seed = rank, seed
        self.position = _shared_position()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass yields steps [start_step, num_batches) of `epoch`."""
        if not 0 <= start_step <= self.num_batches:
            raise ValueError(f"start_step={start_step} outside the epoch's {self.num_batches} steps")
        self.position[0], self.position[1] = epoch, start_step

    def sample_batches(self, worker: int, num_workers: int) -> Iterator[tuple[int, list[dict]]]:
        """(rank step, undecoded samples) of one worker's batches, from the set start step on.

        The one implementation behind both training and `inspect`.
        """
        epoch, start_step = self.position[0], self.position[1]
        n = self.batch_size
        first, count = worker_batches(self.num_batches, num_workers, worker)
        done = batches_before(start_step, num_workers, worker)
        if done == count:
            return
        buffer = self.cfg.shuffle_buffer
        first_block = done * n // buffer
        begin = self.per_rank * self.rank + first * n  # the worker's first sample in the epoch's stream
        counts = [s["num_samples"] for s in self.manifest.shards]
        segments = stream_segments(counts, self.urls, epoch_order(len(counts), self.seed, epoch),
                                   begin + first_block * buffer, begin + count * n)
        samples = block_shuffle(read_segments(segments), buffer, first_block,
                                [self.seed, epoch, self.rank, worker])
        for _ in range(done * n - first_block * buffer):
            next(samples)
        for j in range(done, count):
            yield j * num_workers + worker, [next(samples) for _ in range(n)]

    def __iter__(self) -> Iterator[Batch]:
        epoch, start_step = self.position[0], self.position[1]
        worker, num_workers = _worker()
        # The DataLoader asks worker 0 first on every pass; step start_step belongs to worker
        # start_step % W, so a resumed pass rotates which part each worker process makes.
        part = (worker + start_step) % num_workers
        for step, samples in self.sample_batches(part, num_workers):
            yield train_batch(samples, self.cfg, [self.seed, epoch, self.rank, step])


class IndexedTrainStream(torch.utils.data.IterableDataset):
    """One rank's training micro-batches with indexed access (data.access=indexed), one epoch per pass:
    the epoch's permutation of every sample, cut into global batches and micro-batches that do not depend
    on the cluster's shape (pipeline.data.order says how); set_epoch() picks the epoch and the first
    micro-batch."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, batch_size: int, num_batches: int, rank: int,
                 world_size: int, grad_accum: int, seed: int):
        super().__init__()
        if num_batches % grad_accum or num_batches * batch_size * world_size > manifest.num_samples:
            raise ValueError(f"{num_batches} micro-batches of {batch_size} on each of {world_size} ranks (grad_accum "
                             f"{grad_accum}) are not whole steps within the {manifest.num_samples} samples")
        self.manifest, self.cfg = manifest, cfg
        self.batch_size, self.num_batches = batch_size, num_batches
        self.rank, self.world_size, self.grad_accum, self.seed = rank, world_size, grad_accum, seed
        self.position = _shared_position()
        self._index = self._reader = self._permutation = None  # made in the process that reads

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass yields micro-batches [start_step, num_batches) of `epoch`."""
        if not 0 <= start_step <= self.num_batches:
            raise ValueError(f"start_step={start_step} outside the epoch's {self.num_batches} micro-batches")
        self.position[0], self.position[1] = epoch, start_step

    def __getstate__(self) -> dict:  # workers get the description, not the open files or the mapped index
        return {**self.__dict__, "_index": None, "_reader": None, "_permutation": None}

    def sample_batches(self, worker: int, num_workers: int) -> Iterator[tuple[int, list[dict]]]:
        """(micro-batch m of the rank, undecoded samples) of one worker's micro-batches, from the set start on:
        m = start + worker, start + worker + num_workers, ... The one implementation behind both training and
        `inspect`."""
        epoch, start = self.position[0], self.position[1]
        if self._index is None:
            self._index = load_index(self.manifest, check=False)  # the rank checked its hash once
            self._reader = SampleReader(self.manifest.urls())
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, epoch_permutation(self.manifest.num_samples, self.seed, epoch))
        permutation = self._permutation[1]
        for m in range(start + worker, self.num_batches, num_workers):
            ids = micro_batch_samples(permutation, m, self.rank, self.world_size, self.grad_accum, self.batch_size)
            rows = self._index[ids]
            yield m, [self._reader.read(row) for row in rows]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.position[0]
        for m, samples in self.sample_batches(*_worker()):
            # seeded by the micro-batch's place in the epoch, the same on any cluster shape
            yield train_batch(samples, self.cfg, [self.seed, epoch,
                                                  micro_batch_index(m, self.rank, self.world_size, self.grad_accum)])


def train_stream(manifest: Manifest, cfg: DataConfig, batch_size: int, num_batches: int, rank: int,
                 world_size: int, grad_accum: int, seed: int) -> TrainStream | IndexedTrainStream:
    """A rank's training stream in the access mode the config asks for (config.loader_mode: decided here
    only). Indexed: the sample index's hash is checked here, once, and the workers map it unchecked."""
    if loader_mode(cfg) == "indexed":
        load_index(manifest)
        return IndexedTrainStream(manifest, cfg, batch_size, num_batches, rank, world_size, grad_accum, seed)
    return TrainStream(manifest, cfg, batch_size, num_batches, rank, world_size, seed)


class EvalStream(torch.utils.data.IterableDataset):
    """One rank's share of the validation split: every sample once across all ranks, no padding."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.manifest, self.cfg, self.batch_size = manifest, cfg, batch_size
        self.urls = manifest.urls(cfg.shard_url)
        n = manifest.num_samples
        self.start, self.stop = rank * n // world_size, (rank + 1) * n // world_size
        self.num_batches = math.ceil((self.stop - self.start) / batch_size)

    def sample_batches(self, worker: int, num_workers: int) -> Iterator[tuple[int, list[dict]]]:
        """(rank step, undecoded samples) of one worker's batches, in manifest order; the rank's last
        batch may be short."""
        first, count = worker_batches(self.num_batches, num_workers, worker)
        lo = self.start + first * self.batch_size
        hi = min(self.stop, lo + count * self.batch_size)
        counts = [s["num_samples"] for s in self.manifest.shards]
        samples = read_segments(stream_segments(counts, self.urls, list(range(len(counts))), lo, hi))
        for j in range(count):
            size = min(self.batch_size, hi - lo - j * self.batch_size)
            yield j * num_workers + worker, [next(samples) for _ in range(size)]

    def __iter__(self) -> Iterator[Batch]:
        decode = lambda sample: decode_eval(sample["jpg"], self.cfg)  # noqa: E731
        for _, samples in self.sample_batches(*_worker()):
            yield make_batch(samples, decode, raise_corrupt)


def rank_plan(stream: TrainStream | IndexedTrainStream | EvalStream, workers: int) -> Iterator[dict]:
    """{"worker", "micro", "keys"} of every micro-batch of a rank (micro: its number in the rank's epoch), in
    the order the rank trains on them."""
    def part(worker: int) -> Iterator[tuple[int, int, list[str]]]:
        for micro, samples in stream.sample_batches(worker, workers):
            yield micro, worker, [s["__key__"] for s in samples]
    for micro, worker, keys in heapq.merge(*map(part, range(workers))):
        yield {"worker": worker, "micro": micro, "keys": keys}
