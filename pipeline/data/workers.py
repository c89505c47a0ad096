"""DataLoader worker processes for a rank's streams: forkserver-started, deaf to Slurm's stop signals,
killed at exit and when their rank dies (whatever killed it), and timed out instead of hanging."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker

import torch

from pipeline.config import DataConfig
from pipeline.signals import die_with_parent, signals_blocked


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a forkserver, not from the rank.

    The rank runs gloo/NCCL, DeepSpeed and queue-feeder threads; a worker forked from it inherits any lock
    one of them held at that instant and can hang forever (seen: a worker stuck right after fork at the
    second evaluation). The forkserver is a fresh single-threaded process with the streams module
    preloaded, so starting workers stays cheap. It starts with Slurm's stop signals blocked, and so does
    every worker it forks: Slurm signals all processes of a job step, and a worker killed by SIGUSR2 or
    SIGTERM would fail its rank before the rank checkpoints (pipeline.train.preempt).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.data.helper_process", "pipeline.data.streams"])
    # The resource tracker first, on its own: starting it unblocks SIGTERM again in this thread.
    with signals_blocked():
        multiprocessing.resource_tracker.ensure_running()
    with signals_blocked():
        multiprocessing.forkserver.ensure_running()
    atexit.unregister(_kill_leftover_workers)  # registered once, after multiprocessing's handler
    atexit.register(_kill_leftover_workers)
    return context


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL the loader workers still alive (a stuck one, or those of an iterator left behind).

    They block SIGTERM, so the terminate() that torch and multiprocessing fall back on would not end
    them, and multiprocessing's exit handler, which joins them after terminate(), would wait forever.
    Registered after that handler, this one runs before it.
    """
    for process in multiprocessing.active_children():
        process.kill()


def _worker_dies_with_the_forkserver(worker_id: int) -> None:
    die_with_parent()  # its parent is the forkserver, which dies with the rank


def loader(stream: torch.utils.data.IterableDataset, cfg: DataConfig, pin_memory: bool,
           persistent: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader with cfg.workers processes over a stream that already yields batches.

    Build it once and iterate it once per pass (after stream.set_epoch for training): persistent workers
    live for the whole run; the evaluation loader, used once an epoch, starts its workers for each pass
    instead of keeping a second set alive. A worker that hands over nothing for cfg.timeout_s seconds
    fails the rank instead of hanging it (and with it every other rank in the next allreduce).
    """
    workers = cfg.workers
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=cfg.prefetch if workers else None,
                                       persistent_workers=persistent and workers > 0,
                                       timeout=cfg.timeout_s if workers else 0,
                                       in_order=True,  # strict turns: step s comes from worker part s % W
                                       worker_init_fn=_worker_dies_with_the_forkserver if workers else None,
                                       multiprocessing_context=_worker_context() if workers else None)
