"""python -m pipeline.data inspect: what every rank and DataLoader worker would read, as JSON lines.

    python -m pipeline.data inspect --shards DIR --world-size 8 --workers 4 --batch-size 32 --epoch 0 --steps 3
    python -m pipeline.data inspect --shards DIR --world-size 4 --grad-accum 2 --steps 4   # same global batches
                                                                                            # as 8 ranks

One line per micro-batch: {"rank", "step" (optimizer step), "accum" (accumulation step), "micro_batch"
(its place j in the step's global batch, rank * grad_accum + accum), "worker", "keys"}. With indexed
access, two cluster shapes with the same global batch print the same keys for every (step, micro_batch).
The same code the training runs (pipeline.data.streams), without a model or torch.distributed.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import DataConfig, loader_mode, micro_batches_per_rank
from pipeline.data.manifest import load_index, load_manifest
from pipeline.data.streams import EvalStream, rank_plan, train_stream


def main(argv: list[str] | None = None) -> None:
    """python -m pipeline.data inspect: what each rank and worker would read, as JSON lines."""
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "inspect", help="print what every rank and DataLoader worker reads, one JSON line per batch",
        description="Print {rank, step, accum, micro_batch, worker, keys} for every micro-batch of an epoch, as the "
                    "training loader would read it (same code, no model, no torch.distributed). It reads the "
                    "samples it lists, so limit it with --steps on a large dataset.")
    p.add_argument("--shards", required=True, help="folder holding train.json / val.json and the tars")
    p.add_argument("--split", choices=("train", "val"), default="train", help="the split to show (default: train)")
    p.add_argument("--world-size", type=int, default=1, help="ranks k (default: 1)")
    p.add_argument("--rank", type=int, help="show only this rank (default: all)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (0 counts as 1)")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch n per rank (default: 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--epoch", type=int, default=0, help="the epoch to show, from 0 (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the run (default: 0)")
    p.add_argument("--start-step", type=int, default=0,
                   help="resume point: the rank's first micro-batch of the epoch to show (default: 0)")
    p.add_argument("--steps", type=int, help="show at most this many micro-batches per rank")
    p.add_argument("--access", choices=("auto", "indexed", "stream"), default=defaults.access,
                   help="data.access of the run (default: auto, indexed unless --shard-url is given)")
    p.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer,
                   help=f"data.shuffle_buffer of the run, for --access stream (default: {defaults.shuffle_buffer})")
    p.add_argument("--shard-url", default="", help="data.shard_url of the run, e.g. 'pipe:cat /data/{name}'")
    args = parser.parse_args(argv)
    for name in ("world_size", "workers", "batch_size", "grad_accum", "shuffle_buffer"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    if args.epoch < 0 or args.start_step < 0 or (args.steps is not None and args.steps < 1):
        parser.error(f"--epoch={args.epoch}, --start-step={args.start_step} and --steps={args.steps} must be 0 or "
                     "more (--steps at least 1)")
    if args.rank is not None and not 0 <= args.rank < args.world_size:
        parser.error(f"--rank={args.rank} outside 0..{args.world_size - 1}")
    if args.access == "indexed" and args.shard_url:
        parser.error("--access indexed reads the tar files next to the manifest; --shard-url needs --access stream")
    cfg = DataConfig(shards=args.shards, shuffle_buffer=args.shuffle_buffer, shard_url=args.shard_url,
                     access=args.access)
    try:
        manifest = load_manifest(args.shards, args.split)
        if args.split == "train" and loader_mode(cfg) == "indexed":
            load_index(manifest)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    workers = max(args.workers, 1)
    accum = args.grad_accum if args.split == "train" else 1
    num_batches = micro_batches_per_rank(manifest.num_samples, args.world_size, args.batch_size, accum)
    if args.split == "train" and args.start_step > num_batches:
        parser.error(f"--start-step={args.start_step} is past the epoch's {num_batches} micro-batches per rank")
    for rank in range(args.world_size) if args.rank is None else [args.rank]:
        if args.split == "train":
            stream = train_stream(manifest, cfg, args.batch_size, num_batches, rank, args.world_size, accum, args.seed)
            stream.set_epoch(args.epoch, args.start_step)
        else:
            stream = EvalStream(manifest, cfg, args.batch_size, rank, args.world_size)
        for _, row in zip(range(args.steps or sys.maxsize), rank_plan(stream, workers)):
            step, accum_step = divmod(row["micro"], accum)
            print(json.dumps({"rank": rank, "step": step, "accum": accum_step, "micro_batch": rank * accum + accum_step,
                              "worker": row["worker"], "keys": row["keys"]}), flush=True)


if __name__ == "__main__":
    main()
