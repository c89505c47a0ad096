"""python -m pipeline.data inspect: what every rank and DataLoader worker would read, as JSON lines.

    python -m pipeline.data inspect --shards DIR --world-size 8 --workers 4 --batch-size 32 --epoch 0 --steps 3

The same code the training runs (pipeline.data.streams), without a model or torch.distributed.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import DataConfig, micro_batches_per_rank
from pipeline.data.manifest import load_manifest
from pipeline.data.streams import EvalStream, TrainStream, rank_plan


def main(argv: list[str] | None = None) -> None:
    """python -m pipeline.data inspect: what each rank and worker would read, as JSON lines."""
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
