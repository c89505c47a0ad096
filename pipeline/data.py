"""Streaming loader over the tar shards with the paper's epoch semantics (remark 4).

Per epoch e, the shard list is permuted with a generator seeded by (seed, e), the same on every rank, and
laid end to end as one global stream of N samples (the manifest gives each shard's count). Rank r of k
owns samples [r*M, (r+1)*M) of that stream, M = N // k, and yields B = M // n batches of n from the front
of it (B rounded down to whole gradient-accumulation windows), so every rank takes exactly B steps. The
N - k*M samples at the end of the stream are dropped that epoch; the next permutation drops others. A
rank may start or end mid-shard.

A rank's B batches are split the same way across its W DataLoader workers: worker w gets a contiguous run
of whole batches, the first B % W workers one more than the rest. The DataLoader (in_order) asks its
workers in strict turn, so the rank's step s comes from worker part s % W: that is what makes
`start_step` exact (each part skips the batches it would already have handed over, and the parts rotate
over the worker processes so that the first one asked holds step start_step) and what `inspect` prints.

Inside a worker the samples pass a bounded shuffle: they are cut into blocks of `shuffle_buffer` samples
and each block is permuted by a generator seeded by (seed, epoch, rank, worker, block). Random crops and
flips draw from a generator seeded by (seed, epoch, rank, step). So the same (seed, epoch, k, W) gives the
same samples in the same order with the same augmentation, and resuming at a step reopens only the block
that holds it.

From webdataset we use tar reading (any URL it opens: local paths, http(s), `pipe:` commands). We step
around three of its parts: split_by_node/split_by_worker split the shard list before any shuffle, so a
rank would see the same shards every epoch and uneven shard counts would give ranks different step
counts (which hangs the allreduce); its reservoir `shuffle` depends on every sample read before, so a
resumed worker would have to re-read its whole part; and its decoders would unpickle `.pyd` members.

Images are decoded by torchvision (libjpeg-turbo), or by PIL at 1/2, 1/4 or 1/8 size where the crop
allows (`Image.draft` scales inside the DCT), then cropped as a view and resized by torch's uint8
path. They stay uint8 until `normalize` on the device.
"""

from __future__ import annotations

import argparse
import atexit
import heapq
import io
import json
import math
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from pipeline import preempt
from pipeline.config import DataConfig, micro_batches_per_rank
from pipeline.manifest import Manifest, load_manifest

# Only these members of a shard are ever read: a shard carrying a pickle never reaches pickle.loads.
SAMPLE_EXTENSIONS = (".jpg", ".cls")
# What PIL raises on a truncated, empty or non-image file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
ASPECT_RATIOS = (3 / 4, 4 / 3)  # of the random-resized crop (paper 5.1, Szegedy et al.)
# torchvision 0.29 deprecates its decoder in favour of torchcodec (not a dependency); it still works, and is
# the fastest full-size decoder we have. Said once here instead of once per worker.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated")


class Batch(NamedTuple):
    """What the loader yields: uint8 images [n, 3, S, S] (channels_last), int64 labels [n], the shard keys
    of the samples, and how many corrupt samples were replaced by another sample of the batch."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    corrupt: int


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


def read_segments(segments: list[Segment]) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "jpg", "cls"} of each segment in turn (a skip reads through the tar)."""
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


def _pixels(jpeg: bytes, image: Image.Image, shrink: float) -> tuple[torch.Tensor, float, float]:
    """uint8 [3, H, W] (a channels_last view) and its (x, y) scale against the full image.

    When the crop lets the image be `shrink` >= 2 times smaller, PIL's draft decodes it at 1/2, 1/4 or
    1/8 size inside the DCT (4-64x fewer pixels); otherwise torchvision's decoder, the fastest full-size
    one here (libjpeg-turbo, straight into a tensor). A file torchvision refuses gets PIL's full decode,
    so a sample is corrupt only when PIL cannot read it either (the converter checked it with PIL).
    """
    width, height = image.size
    if shrink >= 2:
        image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    else:
        try:
            pixels = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return pixels, 1.0, 1.0
        except RuntimeError:
            pass
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return pixels, pixels.shape[2] / width, pixels.shape[1] / height


def _resized_crop(pixels: torch.Tensor, sx: float, sy: float, top: float, left: float, h: float, w: float,
                  size: int) -> torch.Tensor:
    """The box (top, left, h, w) of the full image, resized to size x size (bilinear, antialiased).

    On a uint8 channels_last image torch takes its vectorised uint8 path, about 3x faster than PIL's resize.
    """
    t, l = round(top * sy), round(left * sx)
    crop = pixels[:, t: t + max(1, round(h * sy)), l: l + max(1, round(w * sx))]
    return F.resize(crop, [size, size], antialias=True)


def decode_train(jpeg: bytes, cfg: DataConfig) -> torch.Tensor:
    """Random-resized crop (scale crop_scale_min..1, ratio 3/4..4/3) to image_size, then a random
    horizontal flip (paper 5.1), drawing from torch's global generator; uint8 [3, S, S]."""
    image = Image.open(io.BytesIO(jpeg))  # reads the header only: the size, for the crop
    top, left, h, w = RandomResizedCrop.get_params(image, scale=(cfg.crop_scale_min, 1.0), ratio=ASPECT_RATIOS)
    out = _resized_crop(*_pixels(jpeg, image, min(w, h) / cfg.image_size), top, left, h, w, cfg.image_size)
    return out.flip(-1) if torch.rand(()) < 0.5 else out


def decode_eval(jpeg: bytes, cfg: DataConfig) -> torch.Tensor:
    """Shorter side to eval_resize, centre image_size crop (single-crop convention), as one resized crop;
    uint8 [3, S, S]."""
    image = Image.open(io.BytesIO(jpeg))
    width, height = image.size
    zoom = cfg.eval_resize / min(width, height)
    side = cfg.image_size / zoom  # the centre crop's side in full-image pixels
    return _resized_crop(*_pixels(jpeg, image, 1 / zoom), (height - side) / 2, (width - side) / 2, side, side,
                         cfg.image_size)


def _describe(sample: dict, err: Exception) -> str:
    return f"{sample['__url__']}: sample {sample['__key__']!r} is not a decodable image ({err})"


def raise_corrupt(sample: dict, err: Exception) -> None:
    """Error policy of evaluation: a corrupt sample is an error."""
    raise ValueError(_describe(sample, err) + "; check the shards with python -m pipeline.shards verify") from err


def warn_corrupt(sample: dict, err: Exception) -> None:
    """Error policy of training: name the sample on stderr; the batch replaces it and counts it."""
    print(f"warning: {_describe(sample, err)}; replaced by another sample of its batch", file=sys.stderr, flush=True)


def make_batch(samples: list[dict], decode: Callable[[bytes], torch.Tensor],
               on_corrupt: Callable[[dict, Exception], None]) -> Batch:
    """Decode a batch; a corrupt sample (reported through on_corrupt) is replaced by a fresh decode of
    another sample of the same batch, so every batch keeps exactly n images."""
    decoded: list[tuple[torch.Tensor, dict]] = []
    corrupt = 0
    for sample in samples:
        try:
            decoded.append((decode(sample["jpg"]), sample))
        except DECODE_ERRORS as err:
            on_corrupt(sample, err)
            corrupt += 1
    for attempt in range(len(samples)):  # a replacement draws a new crop, which could fail to decode too
        if not decoded or len(decoded) == len(samples):
            break
        sample = decoded[attempt % len(decoded)][1]
        try:
            decoded.append((decode(sample["jpg"]), sample))
        except DECODE_ERRORS as err:
            on_corrupt(sample, err)
    if len(decoded) < len(samples):
        raise ValueError(f"{corrupt} of the {len(samples)} samples of a batch do not decode and too few others do "
                         f"to replace them (the batch starts at {samples[0]['__url__']}: {samples[0]['__key__']!r}); "
                         "the shard is damaged: check it with python -m pipeline.shards verify")
    return Batch(torch.stack([image for image, _ in decoded]), torch.tensor([int(s["cls"]) for _, s in decoded]),
                 [s["__key__"] for _, s in decoded], corrupt)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shared_position() -> multiprocessing.Array:
    """[epoch, start_step] in shared memory: persistent workers read what the rank set for this pass."""
    return _worker_context().Array("q", 2, lock=False)


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training batches, one epoch per pass; set_epoch() picks the epoch and the first step."""

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
        decode = lambda jpeg: decode_train(jpeg, self.cfg)  # noqa: E731
        for step, samples in self.sample_batches(part, num_workers):
            # The crops and flips of a step draw from a seed of their own; the caller's generator is left as
            # it was (with workers=0 the loader runs inside the training process).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(
                    int(np.random.SeedSequence([self.seed, epoch, self.rank, step]).generate_state(1)[0]))
                batch = make_batch(samples, decode, warn_corrupt)
            yield batch


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
        decode = lambda jpeg: decode_eval(jpeg, self.cfg)  # noqa: E731
        for _, samples in self.sample_batches(*_worker()):
            yield make_batch(samples, decode, raise_corrupt)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a forkserver, not from the rank.

    The rank runs gloo/NCCL, DeepSpeed and queue-feeder threads; a worker forked from it inherits any lock
    one of them held at that instant and can hang forever (seen here: a worker stuck right after fork at
    the second evaluation). The forkserver is a fresh single-threaded process with this module preloaded,
    so starting workers stays cheap. It starts with Slurm's stop signals blocked, and so does every worker
    it forks: Slurm signals all processes of a job step, and a worker killed by SIGUSR2 or SIGTERM would
    fail its rank before the rank checkpoints (pipeline.preempt).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.data"])
    # The resource tracker first, on its own: starting it unblocks SIGTERM again in this thread.
    with preempt.signals_blocked():
        multiprocessing.resource_tracker.ensure_running()
    with preempt.signals_blocked():
        multiprocessing.forkserver.ensure_running()
    atexit.unregister(_kill_leftover_workers)  # registered once, after multiprocessing's handler
    atexit.register(_kill_leftover_workers)
    return context


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL the loader workers still alive (a stuck one, or those of an iterator left behind).

    They block SIGTERM, so the terminate() that torch and multiprocessing fall back on would not end
    them, and multiprocessing's exit handler, which joins them after terminate(), would wait forever.
    Registered after that handler, this one runs before it.
    """
    for process in multiprocessing.active_children():
        process.kill()


def loader(stream: torch.utils.data.IterableDataset, cfg: DataConfig, pin_memory: bool,
           persistent: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader with cfg.workers processes over a stream that already yields batches.

    Build it once and iterate it once per pass (after stream.set_epoch for training): persistent workers
    live for the whole run; the evaluation loader, used once an epoch, starts its workers for each pass
    instead of keeping a second set alive. A worker that hands over nothing for cfg.timeout_s seconds
    fails the rank instead of hanging it (and with it every other rank in the next allreduce).
    """
    workers = cfg.workers
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=cfg.prefetch if workers else None,
                                       persistent_workers=persistent and workers > 0,
                                       timeout=cfg.timeout_s if workers else 0,
                                       in_order=True,  # strict turns: step s comes from worker part s % W
                                       multiprocessing_context=_worker_context() if workers else None)


def normalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float normalised with the config's mean and std, on the images' device."""
    mean = torch.tensor(cfg.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def rank_plan(stream: TrainStream | EvalStream, workers: int) -> Iterator[dict]:
    """{"worker", "step", "keys"} of every batch of a rank, in the order the rank trains on them."""
    def part(worker: int) -> Iterator[tuple[int, int, list[str]]]:
        for step, samples in stream.sample_batches(worker, workers):
            yield step, worker, [s["__key__"] for s in samples]
    for step, worker, keys in heapq.merge(*map(part, range(workers))):
        yield {"worker": worker, "step": step, "keys": keys}


def main(argv: list[str] | None = None) -> None:
    """python -m pipeline.data inspect: what each rank and worker would read, as JSON lines."""
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "inspect", help="print what every rank and DataLoader worker reads, one JSON line per batch",
        description="Print {rank, worker, step, keys} for every batch of an epoch, as the training loader would "
                    "read it (same code, no model, no torch.distributed). It reads the tars it lists, so "
                    "limit it with --steps on a large dataset.")
    p.add_argument("--shards", required=True, help="folder holding train.json / val.json and the tars")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--world-size", type=int, default=1, help="ranks k (default: 1)")
    p.add_argument("--rank", type=int, help="show only this rank (default: all)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (0 counts as 1)")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch n per rank (default: 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="train.seed of the run (default: 0)")
    p.add_argument("--start-step", type=int, default=0, help="resume point: first step of the epoch to show")
    p.add_argument("--steps", type=int, help="show at most this many batches per rank")
    p.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer)
    p.add_argument("--shard-url", default="", help="data.shard_url of the run, e.g. 'pipe:cat /data/{name}'")
    args = parser.parse_args(argv)
    for name in ("world_size", "workers", "batch_size", "grad_accum", "shuffle_buffer"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    if args.rank is not None and not 0 <= args.rank < args.world_size:
        parser.error(f"--rank={args.rank} outside 0..{args.world_size - 1}")
    try:
        manifest = load_manifest(args.shards, args.split)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    cfg = DataConfig(shards=args.shards, shuffle_buffer=args.shuffle_buffer, shard_url=args.shard_url)
    workers = max(args.workers, 1)
    num_batches = micro_batches_per_rank(manifest.num_samples, args.world_size, args.batch_size, args.grad_accum)
    for rank in range(args.world_size) if args.rank is None else [args.rank]:
        if args.split == "train":
            stream = TrainStream(manifest, cfg, args.batch_size, num_batches, rank, args.world_size, args.seed)
            stream.set_epoch(args.epoch, args.start_step)
        else:
            stream = EvalStream(manifest, cfg, args.batch_size, rank, args.world_size)
        for _, row in zip(range(args.steps or sys.maxsize), rank_plan(stream, workers)):
            print(json.dumps({"rank": rank, **row}), flush=True)


if __name__ == "__main__":
    main()
