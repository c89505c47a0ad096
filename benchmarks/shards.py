"""Shard conversion benchmark: copy-mode conversion against `tar` writing the same files, in the same run.

    python benchmarks/shards.py [--src TREE | --photos DIR] [--images 10000] [--rounds 3] [--out FILE]

Both read the same ImageNet-style tree from the page cache (a first untimed pass warms it) and write into
the same folder. `tar cf` only copies bytes; the converter also checks that every image decodes fully
(at 1/8 scale, which still reads every coefficient), names its samples and hashes every shard. Reported:
images/s and MB/s of each, conversion / tar, and the speed-up of --workers 2 over one process (which
includes starting the worker processes, ~1.2 s each to import torch through webdataset: use enough
images). Median of --rounds, interleaved. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from pipeline.shards.convert import convert
import photos  # benchmarks/photos.py and timing.py, next to this script
from timing import interleaved_rounds, write_result


def quiet(run: Callable[[], None]) -> Callable[[], None]:
    """run without the converter's progress bar and summary on stderr."""
    def wrapped() -> None:
        with contextlib.redirect_stderr(io.StringIO()):
            run()
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    photos.add_arguments(parser, images=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-samples", type=int, default=250,
                        help="images per shard (default 250: enough shards to keep 2 workers busy)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/shards.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        work = Path(tmp)
        src = photos.source_tree(args, work)
        files = [p for p in src.rglob("*") if p.is_file()]
        count, size = len(files), sum(p.stat().st_size for p in files)

        def converted(workers: int) -> None:
            shutil.rmtree(work / "out", ignore_errors=True)
            convert(src, work / "out", shard_samples=args.shard_samples, workers=workers)

        def tar() -> None:
            subprocess.run(["tar", "cf", str(work / "out.tar"), "-C", str(src), "."], check=True)

        runs = {"tar": tar, "convert_1_worker": quiet(lambda: converted(1)),
                "convert_2_workers": quiet(lambda: converted(2))}
        tar()  # warm the page cache
        seconds = interleaved_rounds(runs, args.rounds)
        median = {name: statistics.median(v) for name, v in seconds.items()}
        result = {
            "images": count,
            "mb": size / 1e6,
            "cpu_count": os.cpu_count(),
            "rounds": args.rounds,
            "seconds_runs": seconds,
            "img_s": {name: count / s for name, s in median.items()},
            "mb_s": {name: size / 1e6 / s for name, s in median.items()},
            "convert_vs_tar": median["tar"] / median["convert_1_worker"],
            "workers_2_speedup": median["convert_1_worker"] / median["convert_2_workers"],
        }
        print(f"\n{count} images, {size / 1e6:.0f} MB (median of {args.rounds} rounds):")
        for name in runs:
            print(f"  {name:20s} {result['img_s'][name]:8.0f} img/s {result['mb_s'][name]:8.1f} MB/s")
        print(f"conversion / tar = {result['convert_vs_tar']:.3f} (goal >= 0.9); "
              f"--workers 2 speed-up = {result['workers_2_speedup']:.2f}x")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
