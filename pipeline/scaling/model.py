"""Predicted step time and scaling efficiency of a data-parallel job (paper 4 and 5.5).

The model, per optimizer step of one rank (weak scaling: the per-GPU batch stays, the global batch grows):

    step = forward + backward + update + exposed communication

The gradient allreduce of b bytes has three phases (paper 4): a reduce inside each server of g GPUs, an
allreduce across the n servers, a broadcast inside each server. Each phase costs latency alpha per
message step and bytes/bandwidth beta per byte moved:

    inside a server (reduce + broadcast):  2 (g-1) alpha_i + 2 (g-1)/g b / beta_i
    across servers, ring:                  2 (n-1) alpha   + 2 (n-1)/n b / beta
    across servers, halving/doubling:      2 ceil(log2 n) alpha + 2 (n-1)/n b / beta

Both algorithms move the same bytes; halving/doubling takes fewer latency steps. Overlap: backward
produces the gradient bytes at a steady rate, so a bucket is ready when backward has produced all the
bytes up to its end (the last bucket holds what is left, maybe less); one bucket is on the wire at a time; what is exposed is the time from the end of backward to the end of the
last allreduce. Without overlap (DeepSpeed's stage 0) all bytes go in one allreduce after backward.

Left out, so the prediction is a lower bound: the wait for the slowest rank at every step (stragglers,
which grow with the number of GPUs), the loader, evaluation, and contention between communication and
compute for the same cores or memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

ALGORITHMS = ("halving_doubling", "ring")


@dataclasses.dataclass(frozen=True)
class Link:
    latency_s: float  # alpha: seconds per message step
    bandwidth_Bps: float  # beta: bytes per second one rank sends and receives at once


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One kind of node and network, with the compute time of one model at one per-GPU batch."""

    name: str
    source: str  # where the numbers come from
    gpus_per_node: int  # g: GPUs (ranks) per server
    intra: Link | None  # between the GPUs of a server; None: not measured
    inter: Link | None  # between servers; None: not measured (a one-node measurement)
    arch: str  # the model the compute times are for
    micro_batch: int  # images per GPU the compute times are for; other batches scale linearly
    forward_s: float
    backward_s: float
    update_s: float  # optimizer step and whatever else a step does besides forward and backward


# The paper's cluster: Big Basin servers of 8 P100s (NVLink inside), 50 Gbit Ethernet between them, and
# ResNet-50 at 32 images per GPU. Backward ~120 ms is the paper's (4). forward + update are set so that a
# server steps in 0.232 s: the paper's baseline trains 90 epochs on 8 GPUs in 29 hours, 1.28M * 90 /
# (29 * 3600 s) = 1103 images/s, 32 * 8 / 1103 = 0.232 s per step. The latencies (10 us over NVLink,
# 30 us over TCP) and NVLink's 20 GB/s are assumptions of the usual size for that hardware, not the paper's.
PAPER = Hardware(name="p100-50gbe", source="Goyal et al. 2017, sections 4 and 5.5", gpus_per_node=8,
                 intra=Link(10e-6, 20e9), inter=Link(30e-6, 50e9 / 8), arch="resnet50", micro_batch=32,
                 forward_s=0.094, backward_s=0.120, update_s=0.010)
PRESETS = {PAPER.name: PAPER}


def load_hardware(name_or_path: str) -> Hardware:
    """A preset by name, or a JSON file of Hardware's fields (python -m pipeline.tune_buckets writes one)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--hardware {name_or_path}: neither a preset ({', '.join(PRESETS)}) nor a file; "
                                "python -m pipeline.tune_buckets writes hardware.json into its run folder")
    try:
        raw = json.loads(path.read_text())
        for kind in ("intra", "inter"):
            raw[kind] = Link(**raw[kind]) if raw[kind] else None
        hw = Hardware(**raw)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a hardware profile ({err}); expected the fields "
                         f"{', '.join(f.name for f in dataclasses.fields(Hardware))}") from None
    links_ok = all(link is None or (link.latency_s >= 0 and link.bandwidth_Bps > 0) for link in (hw.intra, hw.inter))
    if not (links_ok and hw.gpus_per_node >= 1 and hw.micro_batch >= 1 and min(hw.forward_s, hw.backward_s, hw.update_s) >= 0):
        raise ValueError(f"{path}: a latency, bandwidth, time or count out of range (bandwidths > 0, counts >= 1, "
                         "times >= 0); measure it again with python -m pipeline.tune_buckets")
    return hw


def allreduce_s(nbytes: float, nodes: int, gpus_per_node: int, hw: Hardware, algorithm: str) -> float:
    """Seconds to allreduce nbytes over nodes x gpus_per_node ranks, in three phases."""
    g, n = gpus_per_node, nodes
    for kind, needed in (("intra", g > 1), ("inter", n > 1)):
        if needed and getattr(hw, kind) is None:
            raise ValueError(f"hardware {hw.name} has no {kind}-node measurement; measure it with "
                             f"python -m pipeline.tune_buckets on {'2 or more nodes' if kind == 'inter' else '2 or more GPUs per node'}")
    seconds = 0.0
    if g > 1:
        seconds += 2 * (g - 1) * hw.intra.latency_s + 2 * (g - 1) / g * nbytes / hw.intra.bandwidth_Bps
    if n > 1:
        steps = 2 * (n - 1) if algorithm == "ring" else 2 * math.ceil(math.log2(n))
        seconds += steps * hw.inter.latency_s + 2 * (n - 1) / n * nbytes / hw.inter.bandwidth_Bps
    return seconds


def exposed_s(grad_bytes: float, bucket_bytes: float | None, backward_s: float, allreduce) -> float:
    """Communication time not hidden behind backward; bucket_bytes None: one allreduce after backward."""
    if bucket_bytes is None:
        return allreduce(grad_bytes)
    count = max(1, math.ceil(grad_bytes / bucket_bytes))
    wire_free = 0.0
    for j in range(1, count + 1):
        end = min(j * bucket_bytes, grad_bytes)
        wire_free = max(end / grad_bytes * backward_s, wire_free) + allreduce(end - (j - 1) * bucket_bytes)
    return max(0.0, wire_free - backward_s)


@dataclasses.dataclass(frozen=True)
class Prediction:
    nodes: int
    gpus: int
    step_s: float
    communication_s: float  # the whole allreduce, hidden or not
    exposed_s: float
    images_s: float


def predict(hw: Hardware, grad_elements: int, nodes: int, gpus_per_node: int, micro_batch: int,
            bucket_elements: int | None, element_bytes: int = 4, algorithm: str = "halving_doubling",
            grad_accum: int = 1) -> Prediction:
    """Step time and throughput of nodes x gpus_per_node ranks; bucket_elements None: no overlap. With
    accumulation a step runs grad_accum forwards and backwards, and only the last backward overlaps."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    scale = micro_batch / hw.micro_batch
    forward, backward, update = hw.forward_s * scale, hw.backward_s * scale, hw.update_s
    grad_bytes = grad_elements * element_bytes
    bucket = None if bucket_elements is None else bucket_elements * element_bytes

    def allreduce(nbytes):
        return allreduce_s(nbytes, nodes, gpus_per_node, hw, algorithm)

    exposed = exposed_s(grad_bytes, bucket, backward, allreduce)
    step = grad_accum * (forward + backward) + update + exposed
    gpus = nodes * gpus_per_node
    return Prediction(nodes, gpus, step, allreduce(grad_bytes), exposed, gpus * micro_batch * grad_accum / step)


def efficiency(target: Prediction, baseline: Prediction) -> float:
    """Throughput per GPU of target over baseline's (paper 5.5: 8 GPUs is the baseline)."""
    return (target.images_s / target.gpus) / (baseline.images_s / baseline.gpus)


def fit_link(samples: list[tuple[float, float, float]]) -> Link:
    """alpha and beta from measured allreduces: (latency steps, bytes moved per rank, seconds) each;
    least squares of seconds = steps * alpha + bytes / beta, both kept positive."""
    import numpy as np

    a = np.array([[s, b] for s, b, _ in samples], dtype=float)
    t = np.array([s for _, _, s in samples], dtype=float)
    (alpha, inverse_beta), *_ = np.linalg.lstsq(a, t, rcond=None)
    if inverse_beta <= 0:
        raise ValueError("the measured allreduces do not grow with their size; measure larger messages")
    if alpha < 0:  # latency below the noise: bandwidth alone
        alpha, inverse_beta = 0.0, float((a[:, 1] @ t) / (a[:, 1] @ a[:, 1]))
    return Link(float(alpha), float(1 / inverse_beta))


def table(hw: Hardware, grad_elements: int, node_counts: list[int], gpus_per_node: int, micro_batch: int,
          bucket_elements: int | None, algorithm: str) -> str:
    """Step time, images/s and efficiency against the smallest node count, one line per node count."""
    rows = [predict(hw, grad_elements, n, gpus_per_node, micro_batch, bucket_elements, algorithm=algorithm)
            for n in node_counts]
    lines = [f"{'nodes':>5} {'GPUs':>5} {'step ms':>8} {'allreduce ms':>12} {'exposed ms':>10} {'images/s':>10} "
             f"{'efficiency':>10}"]
    for row in rows:
        lines.append(f"{row.nodes:>5} {row.gpus:>5} {row.step_s * 1e3:>8.1f} {row.communication_s * 1e3:>12.1f} "
                     f"{row.exposed_s * 1e3:>10.1f} {row.images_s:>10.0f} {efficiency(row, rows[0]):>10.1%}")
    return "\n".join(lines)
