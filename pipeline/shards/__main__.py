"""Command line of the shard converter: python -m pipeline.shards convert --src ROOT --out DIR | verify DIR |
index DIR."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.shards.convert import DEFAULT_SHARD_SAMPLES, convert
from pipeline.shards.convert import __doc__ as DESCRIPTION
from pipeline.shards.index import index
from pipeline.shards.verify import BadShard, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.shards", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="folder tree -> tar shards + manifests")
    conv.add_argument("--src", type=Path, required=True, help="folder holding train/<class>/* and val/<class>/*")
    conv.add_argument("--out", type=Path, required=True, help="folder for the shards and train.json / val.json")
    conv.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                      help=f"images per shard (default {DEFAULT_SHARD_SAMPLES}, ~110 MB on ImageNet)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the train file order (default 0)")
    conv.add_argument("--force", action="store_true",
                      help="rewrite everything, even finished shards or shards of another conversion")
    conv.add_argument("--recheck", action="store_true",
                      help="read every finished shard again and rewrite those whose sha256 changed (what verify "
                           "suggests for damaged shards)")
    conv.add_argument("--val-labels", type=Path,
                      help="labels of a flat val/ folder: the devkit's LOC_val_solution.csv or `file class` lines")
    conv.add_argument("--max-side", type=int,
                      help="re-encode every image whose longer side exceeds this many px (default: copy JPEGs as they are)")
    conv.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    conv.add_argument("--task-index", type=int, default=0,
                      help="with --num-tasks: write only this task's range of shards and no manifest (array jobs)")
    conv.add_argument("--num-tasks", type=int, default=1,
                      help="tasks sharing the conversion; afterwards run convert once without them to write "
                           "the manifests (default 1)")
    check = sub.add_parser("verify", help="recompute every shard's sha256 and sample count against the manifests",
                           description="Exit 0 when every shard of DIR matches train.json and val.json; exit 1 "
                                       "naming the first shard that does not (missing, changed bytes, wrong sample "
                                       "count, a sample without .jpg/.cls, a label out of range).")
    check.add_argument("dir", type=Path, help="folder holding train.json / val.json and their shards")
    check.add_argument("--deep", action="store_true", help="also decode every image (as slow as a pass of training)")
    add = sub.add_parser("index", help="add the sample index (random access) to shards converted without one",
                         description="Read every tar header of DIR's shards once and write DIR/train.index.npy and "
                                     "DIR/val.index.npy, recording their hashes in the manifests. convert writes "
                                     "them itself; this is for shard folders converted before it did.")
    add.add_argument("dir", type=Path, help="folder holding train.json / val.json and their shards")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.src, args.out, args.shard_samples, args.seed, args.force, args.workers,
                    (args.task_index, args.num_tasks), args.val_labels, args.max_side, args.recheck)
        elif args.command == "index":
            index(args.dir)
        else:
            verify(args.dir, args.deep)
    except BadShard as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a missing input (2); a full disk or failing file system: rerun when fixed (1)
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, FileNotFoundError) else 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
