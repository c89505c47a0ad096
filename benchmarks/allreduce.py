"""Gradient allreduce benchmark: training-step time of ResNet-50 on N gloo ranks, our overlapped buckets
against DeepSpeed's own stage-0 allreduce, with plain torch DDP as the reference for engine overhead.

    python benchmarks/allreduce.py [--ranks 2] [--image 64] [--micro-batch 8] [--rounds 7] [--out FILE]

Every rank holds four copies of the same ResNet-50 (fp32, 25.6 M parameters: 102 MB of gradients) and
steps them in rounds, interleaved, on the same fixed batch:

- deepspeed: our DeepSpeed engine with zero_optimization.overlap_comm=false: DeepSpeed's own allreduce
  of all gradients after backward, in one 5e8-element bucket.
- buckets: the same engine with overlap_comm=true and reduce_bucket_size=--bucket (pipeline.train.buckets).
- ddp: torch DistributedDataParallel with the same bucket size in MiB, torch SGD; no DeepSpeed.
- local: the same step with no communication at all: the compute floor; a mode's excess over it is
  the communication it leaves exposed.

Ratios are per round (same round, same drift) and the median over rounds counts. On a CPU, gloo's
communication threads compete with the compute for the same cores, so overlap buys less than on GPUs
with NICs. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import interleaved_rounds, write_result  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.train import buckets, distributed  # noqa: E402

MODES = ("deepspeed", "buckets", "ddp", "local")


def build_steps(args: argparse.Namespace, world: int) -> dict:
    """One step function per mode, each on its own copy of the model; all copies start equal."""
    import deepspeed
    import torchvision

    def resnet():
        torch.manual_seed(0)
        return torchvision.models.resnet50(num_classes=1000)

    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(args.micro_batch, 3, args.image, args.image, generator=gen)
    y = torch.randint(0, 1000, (args.micro_batch,), generator=gen)
    loss_of = torch.nn.functional.cross_entropy
    steps = {}
    for mode in ("deepspeed", "buckets"):
        net = resnet()
        zero = {"stage": 0, "overlap_comm": mode == "buckets", "reduce_bucket_size": args.bucket}
        ds_config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
                     "train_batch_size": args.micro_batch * world, "gradient_clipping": 0.0,
                     "zero_optimization": zero, "steps_per_print": 10**9}
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
        buckets.attach(engine, ds_config)

        def ds_step(engine=engine):
            engine.backward(loss_of(engine(x), y))
            engine.step()
        steps[mode] = ds_step
    for mode in ("ddp", "local"):
        net = resnet()
        if mode == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=args.bucket * 4 / 2**20)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def torch_step(net=net, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_of(net(x), y).backward()
            optimizer.step()
        steps[mode] = torch_step
    return steps


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank:
        sys.stdout = open(os.devnull, "w")
    # As a training rank on gloo: on the CPU even where GPUs are visible, glibc keeping freed memory
    cfg = config.apply_overrides(config.preset("demo"), [f"cluster.gpus_per_node={world}", "cluster.backend=gloo",
                                                         f"cluster.cpus_per_task={args.threads}"])
    distributed.init_distributed(cfg)
    steps = build_steps(args, world)

    def timed(step):
        def run():
            for _ in range(args.steps):
                step()
            dist.barrier()  # every rank ends the round together: the slowest rank's time counts
        return run

    runs = {mode: timed(steps[mode]) for mode in MODES}
    for run in runs.values():  # warm-up: allocator, gloo connections, DeepSpeed's first step
        run()
    seconds = interleaved_rounds(runs, args.rounds)
    if rank == 0:
        torch.save(seconds, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads per rank (default: half the cores)")
    parser.add_argument("--image", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--micro-batch", type=int, default=8, help="images per rank per step (default 8)")
    parser.add_argument("--bucket", type=int, default=6_553_600, help="bucket size in elements (default 25 MiB fp32)")
    parser.add_argument("--steps", type=int, default=3, help="steps per round (default 3)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/allreduce.json"))
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds.pt"
        started = time.time()
        mp.start_processes(rank_main, args=(args.ranks, port, args, out), nprocs=args.ranks, start_method="spawn")
        seconds = torch.load(out)
    step_s = {mode: statistics.median(s) / args.steps for mode, s in seconds.items()}
    ratio = {f"{a}/{b}": statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))
             for a, b in (("buckets", "deepspeed"), ("buckets", "ddp"), ("deepspeed", "ddp"))}
    exposed = {mode: step_s[mode] - step_s["local"] for mode in ("deepspeed", "buckets", "ddp")}
    print(f"ResNet-50, {args.image}x{args.image}, {args.micro_batch} images/rank, {args.ranks} gloo ranks x "
          f"{args.threads} threads, bucket {args.bucket} elements, median of {args.rounds} rounds:")
    for mode in MODES:
        extra = f"  (communication exposed: {exposed[mode] * 1e3:.0f} ms)" if mode in exposed else ""
        print(f"  {mode:<10} {step_s[mode] * 1e3:8.1f} ms/step{extra}")
    for name, value in ratio.items():
        print(f"  {name:<18} {value:.3f}")
    write_result(args.out, {"ranks": args.ranks, "threads": args.threads, "image": args.image,
                            "micro_batch": args.micro_batch, "bucket_elements": args.bucket, "steps": args.steps,
                            "rounds": args.rounds, "round_seconds": seconds, "step_s": step_s,
                            "exposed_communication_s": exposed, "median_ratio": ratio,
                            "wall_s": time.time() - started})
    return 0


if __name__ == "__main__":
    sys.exit(main())
