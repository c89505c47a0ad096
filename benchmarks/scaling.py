"""Scaling-model calibration: predicted against measured step times on 1, 2 and 3 local ranks.

    python benchmarks/scaling.py [--image 64] [--micro-batch 8] [--out FILE]

Runs python -m pipeline.tune_buckets (the real launcher, submitit's local executor, gloo) for ResNet-50
at a small input on 1, 2 and 3 processes, one torch thread each. The 1-rank run gives the compute
times (forward, backward, update); the 2- and 3-rank runs give the allreduce times, to which one
latency and one bandwidth are fitted (pipeline.scaling.model.fit_link). The model then predicts the 2- and
3-rank step times, overlapped buckets and overlap off, and the table shows how far that is from what the
same runs measured; a second column predicts with each run's own compute times instead of the 1-rank
ones, which separates the cost of ranks sharing cores from the error of the communication model. On a
machine with fewer cores than ranks x threads the ranks share cores, which the model does not know about.
Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import write_result  # noqa: E402
from pipeline.scaling import model as scaling  # noqa: E402


def tune(ranks: int, args: argparse.Namespace, run_dir: Path) -> dict:
    """One local tune_buckets job; its tune.json."""
    subprocess.run([sys.executable, "-m", "pipeline.tune_buckets", "--cluster", "local", "--gpus-per-node", str(ranks),
                    "--cpus-per-task", "1", "--run-dir", str(run_dir), "--sizes", str(args.bucket),
                    "--steps", str(args.steps), "--rounds", str(args.rounds), "model.arch=resnet50",
                    "model.num_classes=1000", f"data.image_size={args.image}", f"data.eval_resize={args.image}",
                    f"train.micro_batch={args.micro_batch}"],
                   check=True)
    return json.loads((run_dir / "tune.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--micro-batch", type=int, default=8, help="images per rank (default 8)")
    parser.add_argument("--bucket", type=int, default=6_553_600, help="bucket elements (default 6553600)")
    parser.add_argument("--steps", type=int, default=3, help="steps per candidate per round (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/scaling.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {ranks: tune(ranks, args, Path(tmp) / f"ranks{ranks}") for ranks in (1, 2, 3)}
    compute = runs[1]["compute_s"]
    link = scaling.fit_link([tuple(s) for ranks in (2, 3) for s in runs[ranks]["links"]["intra"]["samples"]])
    hw = scaling.Hardware(name="this-machine", source="benchmarks/scaling.py", gpus_per_node=1, intra=link,
                          inter=link, arch="resnet50", micro_batch=args.micro_batch, forward_s=compute["forward"],
                          backward_s=compute["backward"], update_s=compute["update"])
    rows = []
    for ranks in (1, 2, 3):
        own = runs[ranks]["compute_s"]  # this run's compute: slower where ranks share cores
        hw_own = dataclasses.replace(hw, forward_s=own["forward"], backward_s=own["backward"], update_s=own["update"])
        for name, bucket in (("buckets", args.bucket), ("off", None)):
            # One machine, every rank its own "node": the allreduce is the fitted link over `ranks` peers.
            predicted, with_own = (scaling.predict(h, runs[ranks]["grad_elements"], ranks, 1, args.micro_batch, bucket,
                                                   algorithm="ring").step_s for h in (hw, hw_own))
            measured = runs[ranks]["median_step_s"][str(args.bucket) if bucket else "off"]
            rows.append({"ranks": ranks, "mode": name, "measured_s": measured, "predicted_s": predicted,
                         "error": predicted / measured - 1, "predicted_own_compute_s": with_own,
                         "error_own_compute": with_own / measured - 1})
    print(f"ResNet-50 {args.image}x{args.image}, {args.micro_batch}/rank, 1 thread per rank; fitted link: latency "
          f"{link.latency_s * 1e6:.0f} us, bandwidth {link.bandwidth_Bps / 1e9:.2f} GB/s; compute (1 rank) forward "
          f"{compute['forward'] * 1e3:.0f} ms, backward {compute['backward'] * 1e3:.0f} ms, update "
          f"{compute['update'] * 1e3:.0f} ms")
    print(f"{'ranks':>5} {'mode':>8} {'measured ms':>12} {'predicted ms':>13} {'error':>7} "
          f"{'with its own compute':>21} {'error':>7}")
    for row in rows:
        print(f"{row['ranks']:>5} {row['mode']:>8} {row['measured_s'] * 1e3:>12.1f} {row['predicted_s'] * 1e3:>13.1f} "
              f"{row['error']:>+7.1%} {row['predicted_own_compute_s'] * 1e3:>21.1f} {row['error_own_compute']:>+7.1%}")
    write_result(args.out, {"image": args.image, "micro_batch": args.micro_batch, "bucket_elements": args.bucket,
                            "link": {"latency_s": link.latency_s, "bandwidth_Bps": link.bandwidth_Bps},
                            "compute_s": compute, "rows": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
