"""Loader benchmark: train-transform images/s per CPU core, ours against the usual pipeline and bare decode.

    python benchmarks/loader.py [--src TREE | --photos DIR] [--images 2000] [--out FILE]

Every pipeline runs in this one process on one thread (images/s per core) over the same JPEGs, in
rounds, interleaved; the median round counts:

- bare decode: full-size decode of every JPEG from memory (PIL, and ours: pipeline.data.decode.decode_full,
  torchcodec's decoder), no I/O, no transform: the floor any JPEG pipeline pays without reduced-size decoding.
- ImageFolder: torchvision's ImageFolder + PIL with RandomResizedCrop(224), RandomHorizontalFlip,
  ToTensor, Normalize: what most ImageNet training scripts run.
- ours: pipeline.data.streams.TrainStream over shards of the same images (streaming access: tar reading,
  shuffle block, reduced-size decode, the same crop and flip, uint8 batches of 32; normalisation happens
  on the GPU).
- ours indexed: IndexedTrainStream over the same shards (indexed access: one positioned read per sample
  in the order of the epoch's permutation of every sample); also, for both, the mean number of distinct
  shards a batch draws from (--shard-samples per shard, 100 by default: many shards, as on ImageNet).
- ours without draft: the same with PIL's reduced-size decoding switched off, to show what it buys.
- ours through the DataLoader with one worker per core: total images/s of this machine, against bare decode
  in as many processes at once (each decoding its share: the per-core rate when every core is busy).
- paired: batch by batch over the indexed stream, ours (reading, crop, decode, resize, flip, batching) and
  then bare decode of the same 32 images, timed in turn: the ratio of ours to bare decode with the machine's
  drift cancelled (the separate rounds above move by 10% on a shared machine).

Without --src (an ImageNet-style tree with train/ and val/) the images are made from real photos by
benchmarks/photos.py: ImageNet's sizes and ImageNet's ~0.8 bytes per pixel (real photos with a grain of
noise), so that decoding costs here what it costs on ImageNet. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torchvision
from PIL import Image, JpegImagePlugin
from torchvision import transforms as T

from pipeline.config import DataConfig
from pipeline.data.decode import decode_full
from pipeline.data.manifest import load_manifest
from pipeline.data.order import Segment
from pipeline.data.samples import read_segments
from pipeline.data.streams import IndexedTrainStream, TrainStream, rank_plan, train_batch
from pipeline.data.workers import loader as make_loader
from pipeline.shards.convert import convert
import photos  # benchmarks/photos.py and timing.py, next to this script
from timing import interleaved_rounds, write_result

def bare_pil(blobs: list[bytes]) -> None:
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB")


def bare_decode_full(blobs: list[bytes]) -> None:
    for blob in blobs:
        decode_full(blob)


def _timed_share(files: list[Path]) -> float:
    """Images/s of bare decode over these files, read into memory first, on one thread."""
    torch.set_num_threads(1)
    blobs = [f.read_bytes() for f in files]
    start = time.perf_counter()
    bare_decode_full(blobs)
    return len(blobs) / (time.perf_counter() - start)


def bare_parallel(pool: multiprocessing.pool.Pool, files: list[Path], processes: int) -> float:
    """Images/s per process of bare decode with `processes` processes decoding their shares at once."""
    return statistics.mean(pool.map(_timed_share, [files[i::processes] for i in range(processes)], chunksize=1))


def paired(stream: IndexedTrainStream, jpegs: dict[str, bytes], cfg: DataConfig) -> float:
    """Seconds of bare decode / seconds of ours over the stream's epoch, timed batch by batch in turn (ours
    reads and decodes each batch, then the bare decoder decodes the same JPEGs from memory)."""
    ours_s = bare_s = 0.0
    batches = stream.sample_batches(0, 1)
    while True:
        start = time.perf_counter()
        step, samples = next(batches, (None, None))
        if samples is None:
            return bare_s / ours_s
        train_batch(samples, cfg, [0, 0, step])
        middle = time.perf_counter()
        for sample in samples:
            decode_full(jpegs[sample["__key__"]])
        ours_s, bare_s = ours_s + middle - start, bare_s + time.perf_counter() - middle


def imagefolder(dataset: torchvision.datasets.ImageFolder) -> None:
    for i in range(len(dataset)):
        dataset[i]


def ours(stream: TrainStream) -> None:
    for _ in stream:
        pass


def ours_no_draft(stream: TrainStream) -> None:
    with mock.patch.object(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None):
        ours(stream)


def distinct_shards(stream, manifest) -> float:
    """Mean number of distinct shards the batches of a stream's epoch draw from."""
    shard_of = {}
    for shard, url in enumerate(manifest.urls()):
        for sample in read_segments([Segment(url, 0, manifest.shards[shard]["num_samples"])]):
            shard_of[sample["__key__"]] = shard
    counts = [len({shard_of[key] for key in row["keys"]}) for row in rank_plan(stream, 1)]
    return sum(counts) / len(counts)


def ours_loader(loader) -> None:
    for _ in loader:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    photos.add_arguments(parser, images=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for the last row")
    parser.add_argument("--shard-samples", type=int, default=100, help="images per shard (default 100)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/loader.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        work = Path(tmp)
        src = photos.source_tree(args, work)
        convert(src, work / "shards", shard_samples=args.shard_samples)
        manifest = load_manifest(work / "shards", "train")
        files = sorted((src / "train").rglob("*.JPEG"))
        blobs = [f.read_bytes() for f in files]
        sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
        n = manifest.num_samples

        # The streaming shuffle holds two shards, as data.shuffle_buffer's 2,000 over ImageNet's 1,000-image shards.
        cfg = DataConfig(shards=str(work / "shards"), workers=0, shuffle_buffer=2 * args.shard_samples)
        stream = TrainStream(manifest, cfg, 32, n // 32, 0, 1, seed=0)
        stream.set_epoch(0)
        indexed = IndexedTrainStream(manifest, cfg, 32, n // 32, 0, 1, 1, seed=0)
        indexed.set_epoch(0)
        loader_cfg = dataclasses.replace(cfg, workers=args.workers)
        loader_stream = TrainStream(manifest, loader_cfg, 32, n // 32, 0, 1, seed=0)
        loader_stream.set_epoch(0)
        loader = make_loader(loader_stream, loader_cfg, pin_memory=False)
        indexed_loader_stream = IndexedTrainStream(manifest, loader_cfg, 32, n // 32, 0, 1, 1, seed=0)
        indexed_loader_stream.set_epoch(0)
        indexed_loader = make_loader(indexed_loader_stream, loader_cfg, pin_memory=False)
        folder = torchvision.datasets.ImageFolder(str(src / "train"), transform=T.Compose([
            T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, 1.0)), T.RandomHorizontalFlip(),
            T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]))
        pipelines = {
            "bare_decode_pil": (lambda: bare_pil(blobs), len(blobs)),
            "bare_decode_full": (lambda: bare_decode_full(blobs), len(blobs)),
            "imagefolder_pil": (lambda: imagefolder(folder), len(folder)),
            "ours": (lambda: ours(stream), n // 32 * 32),
            "ours_no_draft": (lambda: ours_no_draft(stream), n // 32 * 32),
            f"ours_dataloader_{args.workers}_workers": (lambda: ours_loader(loader), n // 32 * 32),
            "ours_indexed": (lambda: ours(indexed), n // 32 * 32),
            f"ours_indexed_dataloader_{args.workers}_workers": (lambda: ours_loader(indexed_loader), n // 32 * 32),
        }
        # Two rows time themselves: bare decode in W processes at once (each process's own rate, summed) and
        # the paired ratio; their entries in the rounds only place them among the others.
        pool = multiprocessing.get_context("forkserver").Pool(args.workers)
        jpegs = {sample["__key__"]: sample["jpg"] for sample in read_segments(
            [Segment(url, 0, entry["num_samples"]) for url, entry in zip(manifest.urls(), manifest.shards)])}
        parallel, ratios = [], []
        timed_inside = {
            f"bare_decode_full_{args.workers}_processes": lambda: parallel.append(
                bare_parallel(pool, files, args.workers) * args.workers),
            "paired": lambda: ratios.append(paired(indexed, jpegs, cfg)),
        }
        ours_loader(loader)  # start the workers and warm the page cache before timing
        ours_loader(indexed_loader)
        seconds = interleaved_rounds({**{name: run for name, (run, _) in pipelines.items()}, **timed_inside},
                                     args.rounds)
        pool.close()
        runs = {name: [count / s for s in seconds[name]] for name, (_, count) in pipelines.items()}
        runs[f"bare_decode_full_{args.workers}_processes"] = parallel
        median = {name: statistics.median(v) for name, v in runs.items()}
        bare = max(median["bare_decode_pil"], median["bare_decode_full"])
        result = {
            "images": n,
            "mean_pixels": sum(w * h for w, h in sizes) / len(sizes),
            "mean_kb": sum(map(len, blobs)) / len(blobs) / 1e3,
            "bytes_per_pixel": sum(map(len, blobs)) / sum(w * h for w, h in sizes),  # ImageNet: ~0.8
            "cpu_count": os.cpu_count(),
            "rounds": args.rounds,
            "img_s_median": median,
            "img_s_runs": runs,
            "ours_vs_imagefolder": median["ours"] / median["imagefolder_pil"],
            "ours_vs_bare_decode": median["ours"] / bare,  # against the faster decoder
            "ours_vs_bare_decode_pil": median["ours"] / median["bare_decode_pil"],
            # batch by batch in turn: drift cancelled
            "ours_vs_bare_decode_paired": statistics.median(ratios),
            # through the DataLoader, one worker per core: against bare decode on one core, and on every core at once
            "ours_indexed_dataloader_per_worker_vs_bare_decode":
                median[f"ours_indexed_dataloader_{args.workers}_workers"] / args.workers / bare,
            "ours_indexed_dataloader_vs_bare_decode_parallel":
                median[f"ours_indexed_dataloader_{args.workers}_workers"]
                / median[f"bare_decode_full_{args.workers}_processes"],
            "draft_speedup": median["ours"] / median["ours_no_draft"],
            "indexed_vs_stream": statistics.median(i / s for i, s in zip(runs["ours_indexed"], runs["ours"])),
            "shards": len(manifest.shards),
            "distinct_shards_per_batch": {"stream": distinct_shards(stream, manifest),
                                          "indexed": distinct_shards(indexed, manifest)},
        }
        print(f"\n{n} images, mean {result['mean_pixels'] / 1e3:.0f} kpixel, {result['mean_kb']:.0f} KB "
              f"({result['bytes_per_pixel']:.2f} bytes/pixel); "
              "images/s on one core (median of rounds):")
        for name, value in median.items():
            print(f"  {name:34s} {value:8.0f}")
        print(f"ours / ImageFolder = {result['ours_vs_imagefolder']:.2f}x (goal >= 2); ours / bare decode = "
              f"{result['ours_vs_bare_decode']:.2f} of the faster decoder, {result['ours_vs_bare_decode_pil']:.2f} "
              f"of PIL's (goal >= 0.8); reduced-size decoding speed-up = {result['draft_speedup']:.2f}x")
        print(f"paired, batch by batch: ours = {result['ours_vs_bare_decode_paired']:.2f} of bare decode (goal >= 0.9)")
        print(f"through the DataLoader (indexed, {args.workers} workers): "
              f"{result['ours_indexed_dataloader_per_worker_vs_bare_decode']:.2f} of bare decode per worker, "
              f"{result['ours_indexed_dataloader_vs_bare_decode_parallel']:.2f} of bare decode in {args.workers} "
              "processes at once (goal >= 0.9)")
        print(f"indexed / streaming = {result['indexed_vs_stream']:.3f} (per-round median); distinct shards per "
              f"batch of 32 out of {result['shards']}: streaming {result['distinct_shards_per_batch']['stream']:.1f}, "
              f"indexed {result['distinct_shards_per_batch']['indexed']:.1f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
