"""Streaming loader over the tar shards with the paper's epoch semantics (remark 4).

Per epoch e, the shard list is permuted with a generator seeded by (seed, e), the same on every rank, and
laid end to end as one global stream of N samples (the manifest gives each shard's count). Rank r of k
reads samples [r*M, r*M + B*n) of that stream, with M = N // k and B the planned batches per rank, so
every rank takes exactly B steps. Each DataLoader worker takes a contiguous run of whole batches of its
rank's part, shuffles through a bounded buffer, and yields finished batches.

How close this is to remark 4: every sample is read exactly once per epoch and ranks get disjoint,
equal parts of one epoch-dependent order, but that order permutes whole shards, not samples, and a
worker mixes only what its shuffle buffer holds. The converter writes train files in a random order,
so each shard is already a random draw of classes; a sample-level global permutation would need
random access into the tars.

webdataset supplies tar reading (any URL it opens, `pipe:` included) and the shuffle buffer. Its
split_by_node/split_by_worker split the shard list before any shuffle, so a rank would see the same
shards every epoch, and uneven shard counts give ranks different step counts, which hangs the allreduce;
that is why the split below is ours.
"""

from __future__ import annotations

import multiprocessing
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.manifest import Manifest

# Only these members of a shard are ever read: a shard carrying a pickle never reaches pickle.loads.
SAMPLE_EXTENSIONS = (".jpg", ".cls")


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


def read_segments(segments: list[Segment]) -> Iterator[dict]:
    """Samples {"__key__", "jpg", "cls"} of each segment in turn."""
    for seg in segments:
        streams = wds.tariterators.url_opener([{"url": seg.url}])
        files = wds.tariterators.tar_file_expander(streams, select_files=lambda name: name.endswith(SAMPLE_EXTENSIONS))
        samples = wds.tariterators.group_by_keys(files)
        taken = 0
        for i, sample in enumerate(samples):
            if i < seg.skip:
                continue
            if "jpg" not in sample or "cls" not in sample:
                raise ValueError(f"{seg.url}: sample {sample['__key__']!r} lacks .jpg or .cls")
            yield sample
            taken += 1
            if taken == seg.take:
                break
        if taken != seg.take:
            raise ValueError(f"{seg.url}: expected {seg.skip + seg.take} samples, found {seg.skip + taken}; "
                             "the shard does not match its manifest, reconvert it")


def train_transform(cfg: DataConfig) -> v2.Transform:
    """Random-resized crop and horizontal flip on uint8 CHW tensors (paper 5.1); normalisation is later."""
    return v2.Compose([
        v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def eval_transform(cfg: DataConfig) -> v2.Transform:
    """Shorter side to eval_resize, then the centre image_size crop (single-crop convention)."""
    return v2.Compose([v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(cfg.image_size)])


def _decode(sample: dict, transform) -> tuple[torch.Tensor, int]:
    data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
    try:
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(f"{sample['__url__']}: sample {sample['__key__']!r} is not a decodable JPEG ({err})") from None
    return transform(image), int(sample["cls"])


def _batches(samples: Iterator[dict], transform, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = [], []
    for sample in samples:
        image, label = _decode(sample, transform)
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training batches for one epoch: uint8 images [n, 3, S, S] and int64 labels [n]."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, batch_size: int, num_batches: int,
                 rank: int, world_size: int, seed: int, epoch: int):
        super().__init__()
        per_rank = manifest.num_samples // world_size
        if num_batches * batch_size > per_rank:
            raise ValueError(f"{num_batches} batches of {batch_size} exceed the {per_rank} samples of a rank")
        self.manifest, self.cfg = manifest, cfg
        self.batch_size, self.num_batches = batch_size, num_batches
        self.rank_start = rank * per_rank
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def worker_segments(self, worker: int, num_workers: int) -> list[Segment]:
        """The shard pieces this worker reads: a contiguous run of whole batches of the rank's part."""
        first = worker * self.num_batches // num_workers
        last = (worker + 1) * self.num_batches // num_workers
        start = self.rank_start + first * self.batch_size
        stop = self.rank_start + last * self.batch_size
        counts = [s["num_samples"] for s in self.manifest.shards]
        order = epoch_order(len(counts), self.seed, self.epoch)
        return stream_segments(counts, self.manifest.urls(), order, start, stop)

    def __iter__(self):
        worker, num_workers = _worker()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")  # str seeds hash the same in every process
        samples = read_segments(self.worker_segments(worker, num_workers))
        shuffled = wds.filters.shuffle(bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)
        torch.manual_seed(rng.getrandbits(63))  # the crop and flip draws of this worker
        yield from _batches(shuffled, train_transform(self.cfg), self.batch_size)


class EvalStream(torch.utils.data.IterableDataset):
    """One rank's share of the validation split: every sample once across all ranks, no padding."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.manifest, self.cfg, self.batch_size = manifest, cfg, batch_size
        n = manifest.num_samples
        self.start, self.stop = rank * n // world_size, (rank + 1) * n // world_size

    def worker_segments(self, worker: int, num_workers: int) -> list[Segment]:
        """The shard pieces this worker reads: a contiguous share of the rank's range, in manifest order."""
        size = self.stop - self.start
        lo = self.start + worker * size // num_workers
        hi = self.start + (worker + 1) * size // num_workers
        counts = [s["num_samples"] for s in self.manifest.shards]
        return stream_segments(counts, self.manifest.urls(), list(range(len(counts))), lo, hi)

    def __iter__(self):
        segments = self.worker_segments(*_worker())
        yield from _batches(read_segments(segments), eval_transform(self.cfg), self.batch_size)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a forkserver, not from the rank.

    The rank runs gloo/NCCL, DeepSpeed and queue-feeder threads; a worker forked from it inherits any lock
    one of them held at that instant and can hang forever (seen here: a worker stuck right after fork at
    the second evaluation). The forkserver is a fresh single-threaded process with this module preloaded,
    so starting workers stays cheap.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def loader(stream: torch.utils.data.IterableDataset, cfg: DataConfig, pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader with cfg.workers processes over a stream that already yields batches."""
    workers = cfg.workers
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=cfg.prefetch if workers else None,
                                       multiprocessing_context=_worker_context() if workers else None)


def normalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float normalised with the config's mean and std, on the images' device."""
    mean = torch.tensor(cfg.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std
