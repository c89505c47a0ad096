"""The bucket-size tuning measurement every rank of a tuning job runs (python -m pipeline.tune_buckets
submits it): our overlapped buckets of several sizes against DeepSpeed's own allreduce on the real model
and engine, then compute and allreduce times for the scaling model (docs/buckets.md)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import config
from pipeline.dsconfig import BATCH_KEYS
from pipeline.scaling import model as scaling
from pipeline.train import buckets, model
from pipeline.train.distributed import init_distributed, is_primary
from pipeline.train.engine import build_engine
from pipeline.train.loop import model_input


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run_dir: Path, sizes: list[int], steps: int, rounds: int, write: Path | None) -> dict:
    """What every rank of the tuning job runs; rank 0 writes the results into run_dir (the tuned
    DeepSpeed JSON to `write` if given) and returns them with their table."""
    cfg, plan = config.load_run_config(run_dir)
    device = init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model.build(cfg.model).to(device)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    plain = copy.deepcopy(ds_config)
    plain["zero_optimization"]["overlap_comm"] = False
    engine = build_engine(net, cfg, plan, plain, channels_last=device.type == "cuda")  # ours attached per candidate
    gen = torch.Generator().manual_seed(rank)
    side = cfg.data.image_size
    images = torch.randint(0, 256, (cfg.train.micro_batch, side, side, 3), dtype=torch.uint8, generator=gen)
    x = model_input(images.permute(0, 3, 1, 2), cfg, device)
    y = torch.randint(0, cfg.model.num_classes, (cfg.train.micro_batch,), generator=gen).to(device)
    phases = {"forward": 0.0, "backward": 0.0, "update": 0.0}

    def optimizer_steps(count: int, timed_phases: bool = False) -> None:
        for _ in range(count * cfg.train.grad_accum):
            marks = [time.perf_counter()]
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            if timed_phases:
                _sync(device)
            marks.append(time.perf_counter())
            engine.backward(loss)
            if timed_phases:
                _sync(device)
            marks.append(time.perf_counter())
            engine.step()
            _sync(device)
            marks.append(time.perf_counter())
            if timed_phases:
                for name, start, end in zip(phases, marks, marks[1:]):
                    phases[name] += end - start

    candidates = {"off": None, **{str(size): size for size in sizes}}
    reducer = None

    def use(size):
        nonlocal reducer
        if reducer:
            reducer.remove()
        reducer = buckets.BucketedAllreduce(engine, size) if size else None

    seconds = {name: [] for name in candidates}
    for rnd in range(rounds + 1):  # round 0 warms up: allocator, connections, the first steps
        for name, size in candidates.items():
            use(size)
            dist.barrier()  # everyone starts together; the round ends when the slowest rank is done
            start = time.perf_counter()
            optimizer_steps(steps)
            dist.barrier()
            if rnd:
                seconds[name].append((time.perf_counter() - start) / steps)
        if is_primary() and rnd:
            print(f"round {rnd}/{rounds}: " + ", ".join(f"{n} {s[-1] * 1e3:.0f} ms" for n, s in seconds.items()),
                  flush=True)
    use(None)
    engine.enable_backward_allreduce = False  # compute alone: no communication at all
    optimizer_steps(1)
    optimizer_steps(steps, timed_phases=True)
    micro_steps = steps * cfg.train.grad_accum
    compute = {"forward": phases["forward"] / micro_steps, "backward": phases["backward"] / micro_steps,
               "update": phases["update"] / steps}  # the optimizer steps once per accumulation window
    grad_elements = sum(p.numel() for p in net.parameters() if p.requires_grad)
    links = _measure_links(cfg, device, grad_elements)
    if not is_primary():
        return {}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    best = min(median, key=median.get)
    result = {"candidates_s": seconds, "median_step_s": median, "best": best, "compute_s": compute,
              "links": links, "world_size": world, "grad_elements": grad_elements}
    result["table"] = _write(run_dir, cfg, ds_config, result, write or run_dir / "ds_config_tuned.json")
    print(result["table"], flush=True)
    return result


def _measure_links(cfg, device, grad_elements: int) -> dict:
    """alpha and beta fitted to allreduces of 64 KiB .. the gradient size, inside a node (its g ranks)
    and between nodes (one rank per node), with the samples; None where there is only one rank to talk
    to. The fit counts ring steps, 2 (members - 1): which algorithm the backend picks is not known here;
    for 2 members the ring and halving/doubling take the same 2 steps."""
    g, nodes = cfg.cluster.gpus_per_node, cfg.cluster.nodes
    rank = dist.get_rank()
    # new_group is collective: every rank creates every group, in the same order.
    node_groups = [dist.new_group(list(range(n * g, (n + 1) * g))) for n in range(nodes)]
    leaders = dist.new_group(list(range(0, nodes * g, g)))
    counts = sorted({min(grad_elements, 4**k * 16384) for k in range(8)})
    links = {}
    for kind, members, group in (("intra", g, node_groups[rank // g]), ("inter", nodes, leaders)):
        if members < 2:
            links[kind] = None
            continue
        samples = []
        inside = kind == "intra" or rank % g == 0
        for count in counts:
            buffer = torch.ones(count, device=device)
            times = []
            for _ in range(4):
                dist.barrier()
                start = time.perf_counter()
                if inside:
                    dist.all_reduce(buffer, group=group)  # all_reduce: a timing probe, values unused
                    _sync(device)
                times.append(time.perf_counter() - start)
            nbytes = count * buffer.element_size()
            steps = 2 * (members - 1)
            samples.append((steps, 2 * (members - 1) / members * nbytes, statistics.median(times[1:])))
        try:
            links[kind] = {**dataclasses.asdict(scaling.fit_link(samples)), "samples": samples}
        except ValueError as err:  # noise swamped the sizes: keep the samples, predict nothing from them
            links[kind] = {"error": str(err), "samples": samples}
    return links


def _write(run_dir: Path, cfg, ds_config: dict, result: dict, target: Path) -> str:
    """tune.json, the tuned DeepSpeed JSON at target, hardware.json and tune.png; returns the table."""
    median, best = result["median_step_s"], result["best"]
    (run_dir / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    tuned = copy.deepcopy(ds_config)
    zero = tuned["zero_optimization"]
    zero["overlap_comm"] = best != "off"
    if best != "off":
        zero["reduce_bucket_size"] = int(best)
    for key in BATCH_KEYS:
        tuned.pop(key, None)  # filled from the config at submission, like the shipped JSONs
    target.write_text(json.dumps(tuned, indent=2) + "\n")
    links = result["links"]
    link = {kind: (scaling.Link(value["latency_s"], value["bandwidth_Bps"]) if value and "latency_s" in value else None)
            for kind, value in links.items()}
    hardware = scaling.Hardware(
        name=f"measured-{run_dir.name}", source=f"python -m pipeline.tune_buckets, {run_dir}",
        gpus_per_node=cfg.cluster.gpus_per_node, intra=link["intra"], inter=link["inter"], arch=cfg.model.arch,
        micro_batch=cfg.train.micro_batch, forward_s=result["compute_s"]["forward"],
        backward_s=result["compute_s"]["backward"], update_s=result["compute_s"]["update"])
    (run_dir / "hardware.json").write_text(json.dumps(dataclasses.asdict(hardware), indent=1) + "\n")
    baseline = median["off"]
    lines = [f"{'bucket elements':>16} {'step ms':>9} {'vs off':>7}"]
    for name, value in median.items():
        label = "off (DeepSpeed)" if name == "off" else f"{int(name):,}"
        lines.append(f"{label:>16} {value * 1e3:>9.1f} {value / baseline:>7.3f}{'  <- best' if name == best else ''}")
    compute = result["compute_s"]
    lines.append(f"compute without communication: forward {compute['forward'] * 1e3:.1f} ms, backward "
                 f"{compute['backward'] * 1e3:.1f} ms, update {compute['update'] * 1e3:.1f} ms")
    for kind, value in links.items():
        if value and "error" in value:
            lines.append(f"allreduce {kind}-node: no fit ({value['error']}); hardware.json leaves it out")
        elif value:
            lines.append(f"allreduce {kind}-node: latency {value['latency_s'] * 1e6:.0f} us, "
                         f"bandwidth {value['bandwidth_Bps'] / 1e9:.2f} GB/s")
    _plot(run_dir / "tune.png", median, cfg)
    lines.append(f"wrote {target}: train with train.ds_config={shlex.quote(str(target))}")
    lines.append(f"wrote {run_dir / 'hardware.json'}: predict with python -m pipeline.submit --dry-run "
                 f"--hardware {shlex.quote(str(run_dir / 'hardware.json'))}")
    lines.append(f"wrote {run_dir / 'tune.png'}")
    return "\n".join(lines)


def _plot(path: Path, median: dict, cfg) -> None:
    import matplotlib  # only rank 0 draws, once

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [(int(name), value) for name, value in median.items() if name != "off"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in sizes], [v * 1e3 for _, v in sizes], "o-", label="overlapped buckets")
    ax.axhline(median["off"] * 1e3, color="grey", linestyle="--", label="overlap off (DeepSpeed stage 0)")
    ax.set_xscale("log")
    ax.set_xlabel("zero_optimization.reduce_bucket_size (elements)")
    ax.set_ylabel("step time (ms, median)")
    ax.set_title(f"{cfg.model.arch}, {cfg.train.micro_batch}/GPU, {cfg.cluster.nodes} x {cfg.cluster.gpus_per_node}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
