"""Print the scaling model's step time, images/s and efficiency against node count.

    python -m pipeline.scaling                                # the paper's setup: ResNet-50, P100s, 50 Gbit
    python -m pipeline.scaling --hardware runs/tune/hardware.json --nodes 1,4,16,64
"""

from __future__ import annotations

import argparse
import sys

from pipeline.scaling.model import ALGORITHMS, PAPER, PRESETS, load_hardware, table
from pipeline.scaling.model import __doc__ as MODEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.scaling", description=f"{__doc__}\n{MODEL}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default=PAPER.name, help=f"preset ({', '.join(PRESETS)}) or hardware.json")
    parser.add_argument("--nodes", default="1,2,4,8,16,32", help="node counts, comma-separated (default 1,...,32)")
    parser.add_argument("--gpus-per-node", type=int, help="default: the hardware's")
    parser.add_argument("--micro-batch", type=int, help="images per GPU (default: the hardware's)")
    parser.add_argument("--grad-elements", type=int, default=25_557_032,
                        help="gradient elements (default ResNet-50's 25,557,032: 102 MB in fp32)")
    parser.add_argument("--bucket", type=int, default=6_553_600, help="bucket elements; 0: no overlap (default 6553600)")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="halving_doubling")
    args = parser.parse_args(argv)
    try:
        hw = load_hardware(args.hardware)
        try:
            nodes = [int(n) for n in args.nodes.split(",")]
        except ValueError:
            raise ValueError(f"--nodes {args.nodes!r}: give node counts, e.g. 1,2,4") from None
        gpus_per_node = hw.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
        micro_batch = hw.micro_batch if args.micro_batch is None else args.micro_batch
        for flag, value in (("--nodes", min(nodes)), ("--gpus-per-node", gpus_per_node),
                            ("--micro-batch", micro_batch), ("--grad-elements", args.grad_elements)):
            if value < 1:
                raise ValueError(f"{flag}: {value} is not a whole number of at least 1")
        if args.bucket < 0:
            raise ValueError(f"--bucket {args.bucket}: give elements, or 0 for no overlap")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{hw.name} ({hw.source}): {hw.arch}, {micro_batch} images/GPU, {args.grad_elements:,} gradient "
          f"elements, {args.algorithm}, " + (f"buckets of {args.bucket:,}" if args.bucket else "no overlap"))
    print(table(hw, args.grad_elements, nodes, gpus_per_node, micro_batch, args.bucket or None, args.algorithm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
