"""Command line of the shard converter: python -m pipeline.shards convert --src ROOT --out DIR."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.shards import __doc__ as DESCRIPTION
from pipeline.shards import DEFAULT_SHARD_SAMPLES, convert


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
    conv.add_argument("--force", action="store_true", help="rewrite splits whose shards are already complete")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, args.shard_samples, args.seed, args.force)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
