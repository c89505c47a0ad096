"""The rank's process: torch.distributed and its device, threads and memory, the one rank-0 gate, and
the collective that makes BatchNorm statistics the same on every rank."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os

import deepspeed
import submitit
import torch
import torch.distributed as dist

from pipeline.config import Config

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def init_distributed(cfg: Config) -> torch.device:
    """torch.distributed from the environment (submitit's, when RANK is not already set); the rank's device."""
    if "RANK" not in os.environ:  # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from Slurm's variables,
        # replacing any MASTER_ADDR/PORT a login shell may have exported for something else
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["OMP_NUM_THREADS"] = str(cfg.cluster.cpus_per_task)  # for every process the rank starts
    torch.set_num_threads(cfg.cluster.cpus_per_task)
    backend = cfg.cluster.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = rank_device(backend, local_rank, torch.cuda.device_count() if backend != "gloo" else 0,
                         os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        set_tf32(cfg.train.precision)
        # Every step has the same shapes: let cuDNN time its convolution algorithms once and keep the fastest.
        # The price: a GPU run is not bit-for-bit repeatable (nor is it with atomics in cuDNN's backward).
        torch.backends.cudnn.benchmark = True
    else:
        if torch.cuda.is_available():  # a gloo run on a GPU node stays on the CPU: so must DeepSpeed's engine
            from deepspeed.accelerator import set_accelerator
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())
        keep_freed_memory()
    deepspeed.init_distributed(dist_backend=backend, verbose=False,
                               timeout=datetime.timedelta(seconds=cfg.cluster.collective_timeout_s))
    return device


def set_tf32(precision: str) -> dict:
    """TF32 for matmuls and cuDNN convolutions, on for train.precision=tf32 and bf16 (what autocast leaves in
    fp32), off for fp32 (the paper's arithmetic); torch's own defaults differ between the two (convolutions
    on, matmuls off). Returns what is set, for the run's start record."""
    on = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return {"matmul": on, "cudnn": on}


def rank_device(backend: str, local_rank: int, visible: int, visible_env: str | None = None) -> torch.device:
    """The rank's device: the CPU on gloo (even where GPUs are present); on NCCL the GPU of its local rank
    among the `visible` ones, or the only one where the cluster binds one GPU to each task (--gpus-per-task,
    cgroup ConstrainDevices: every task sees its own as cuda:0). Raises where the ranks outnumber the GPUs."""
    if backend == "gloo":
        return torch.device("cpu")
    if visible == 0:
        raise RuntimeError(f"cluster.backend={backend} needs a GPU, but this process sees none "
                           f"(CUDA_VISIBLE_DEVICES={visible_env!r}); ask Slurm for GPUs, or run on the CPU with "
                           "cluster.backend=gloo")
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                           f"{visible_env!r}): more ranks on this node than GPUs; run one rank per GPU "
                           "(--gpus-per-node = the node's GPUs) or bind one GPU to each task")
    return torch.device("cuda", local_rank)


# How gloo's transport words a timeout and a peer that went away (torch raises them as plain RuntimeErrors)
COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


@contextlib.contextmanager
def collectives_explained(timeout_s: int):
    """A failed collective re-raised with what it means. torch reports a gloo timeout or a dead peer as a bare
    RuntimeError ("Timed out waiting 1800000ms for recv operation to complete", "Connection closed by peer"),
    and NCCL's as a DistError, neither naming the setting or what comes next."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not isinstance(err, dist.DistError) and not any(s in text for s in COLLECTIVE_FAILURES):
            raise
        raise RuntimeError(
            f"rank {dist.get_rank()}: a collective failed ({text.strip().splitlines()[0]}): another rank died, or did "
            f"not answer for cluster.collective_timeout_s={timeout_s} s. On Slurm, srun's 'task N:' line in the job's "
            "log names a rank that died, and the job is requeued (python -m pipeline.requeue) to resume from the "
            "newest complete checkpoint") from err


def keep_freed_memory() -> None:
    """On CPU: let glibc keep freed blocks of up to 32 MiB for the next step instead of giving them back
    to the kernel, which must then zero fresh pages for them again.

    glibc raises its mmap and trim thresholds to the largest block freed so far. DeepSpeed's own
    allreduce frees a flat copy of all gradients every step, which raises them far enough; our buckets
    (pipeline.train.buckets) keep their buffers, and then activations were unmapped and faulted back in every
    step: 4,600 page faults per step and a ~10% slower step on the demo model. Fixed thresholds (32 MiB
    is the most glibc allows for mmap) end that in both modes. Where the C library has no mallopt (not
    glibc), nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def average_bn_statistics(net: torch.nn.Module) -> None:
    """Make BN running statistics the mean over ranks, so every rank evaluates the same model.

    BN trains on per-rank statistics (paper 2.3) and so each rank's running averages (or precise-BN
    averages) differ; they are only used by evaluation, which then sees k times more images behind each
    estimate. One allreduce of all of them, flattened.
    """
    buffers = [buffer for module in net.modules()
               if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for buffer in (module.running_mean, module.running_var)]
    flat = torch.cat([buffer.flatten() for buffer in buffers])
    dist.all_reduce(flat)  # all_reduce: per-rank BN statistics -> sum, then mean
    flat.div_(dist.get_world_size())
    for buffer, mean in zip(buffers, flat.split([buffer.numel() for buffer in buffers])):
        buffer.copy_(mean.view_as(buffer))


def is_primary() -> bool:
    """The gate of every rank-0 side effect (metrics, report, requeue, `latest`): True on rank 0, and in a
    process without torch.distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0
