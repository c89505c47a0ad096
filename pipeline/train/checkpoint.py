"""DeepSpeed checkpoints in the run folder, and resuming from the newest one that loads.

A tag holds DeepSpeed's states (with the config and the loader position as client state) and one file per
rank with its RNG states and buffers (BN statistics differ per rank; DeepSpeed saves rank 0's only). Once
every rank's files are written, they are synced to disk, MANIFEST.json records each file's size and sha256,
and then COMPLETE and `latest` are written, each atomically: a job killed mid-save resumes from the checkpoint
before. Resuming checks the newest complete tag against its manifest and loads it; a tag that does not match
or does not load is moved aside (<tag>.damaged, never deleted, never counted among the kept checkpoints) and
the next older one is tried. `latest` is only a hint for other tools: the tags' COMPLETE files are the truth
(docs/preemption.md).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import RESUME_KEYS, differences
from pipeline.train.distributed import is_primary
from pipeline.train.tags import (COMPLETE, DAMAGED, MANIFEST, check, complete_tags, directory, fsync, manifest,
                                 prune, set_aside, write_durably)


class Clock:
    """When the next periodic checkpoint is due (train.checkpoint_every_min, so that a crash without a warning
    loses at most that much). Each rank's own clock goes into the stop flags' allreduce
    (pipeline.train.preempt.StopRequest.poll, one step late like the signals), so that every rank saves after
    the same step: `due` is what the ranks agreed."""

    def __init__(self, every_s: float):
        self.every_s = every_s  # 0: no periodic checkpoints
        self.due = False
        self._last = time.monotonic()

    def due_here(self) -> bool:
        """This rank's clock says a checkpoint is due."""
        return bool(self.every_s) and time.monotonic() - self._last >= self.every_s

    def saved(self) -> None:
        """A checkpoint was just written: the next periodic one is due every_s from now."""
        self._last, self.due = time.monotonic(), False


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank:05d}_state.pt"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota): every rank stops, the newest complete
    checkpoint is untouched, and the job is not requeued into the same disk."""


class NoCheckpointLoads(RuntimeError):
    """Every complete checkpoint of a run is damaged: its message says what is wrong with each and what to do."""


class _Writes:
    """DeepSpeed's checkpoint engine with its writes' OSErrors kept instead of raised, so that a rank whose
    write fails still walks through the collectives of DeepSpeed's save (its barriers) beside the others,
    and all agree afterwards that the save failed: raised mid-save, the others would wait for it in a barrier
    for cluster.collective_timeout_s. The first error is kept; the writes after it are skipped."""

    def __init__(self, engine):
        self.engine, self.inner, self.error = engine, engine.checkpoint_engine, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _guarded(self, method, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            return method(*args, **kwargs)
        except OSError as err:
            self.error = err
            return None

    def save(self, *args, **kwargs):
        return self._guarded(self.inner.save, *args, **kwargs)

    def makedirs(self, *args, **kwargs):
        return self._guarded(self.inner.makedirs, *args, **kwargs)

    def __enter__(self):
        self.engine.checkpoint_engine = self
        return self

    def __exit__(self, *exc):
        self.engine.checkpoint_engine = self.inner


def _any_rank(failed: bool, device: torch.device) -> bool:
    """Whether `failed` holds on any rank (a collective: every rank calls it)."""
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
    dist.all_reduce(flag)  # all_reduce: each rank's failure -> how many failed
    return bool(flag.item())


def _tag_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _save_failed(ckpt: Path, tag: str, error: BaseException | None) -> SaveFailed:
    """The message of a save that failed: the path, the free space and the size a checkpoint takes."""
    complete = complete_tags(ckpt)
    need = _tag_bytes(ckpt / complete[0][0]) if complete else None
    free = shutil.disk_usage(ckpt).free if ckpt.exists() else 0
    return SaveFailed(
        f"checkpoint {ckpt / tag} could not be written ({error or 'a write failed on another rank'}); "
        f"{free / 2**30:.2f} GiB free on that filesystem"
        + (f", a checkpoint takes {need / 2**30:.2f} GiB" if need is not None else "")
        + (f"; the newest complete checkpoint, {complete[0][0]}, is untouched" if complete else "")
        + ". Free space there (or set train.keep_checkpoints lower), then resume the run: the job is not requeued "
          "into the same disk")


def save(engine, run_dir: Path, tag: str, position: dict, config: dict, keep: int) -> str:
    """Checkpoint under `tag` (collective: every rank calls it). `position` is where training goes on:
    {"epoch", "step_in_epoch"}, the next batch the loader hands out. Once every rank's files are written, they
    are synced and listed with their sizes and checksums in MANIFEST.json, the tag gets its COMPLETE file (its
    global step) and becomes `latest`; then prune() keeps the newest `keep` complete tags (0: all). A write
    that fails on any rank (ENOSPC) raises SaveFailed on every rank, the partial tag removed."""
    ckpt = directory(run_dir)
    client = {"position": position, "config": config}
    with _Writes(engine) as writes:
        engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, save_latest=False)
    error = writes.error
    if error is None:
        try:
            buffers = {name: buffer.cpu() for name, buffer in engine.module.named_buffers()}
            path = _rank_file(ckpt / tag, dist.get_rank())
            torch.save({"rng": _rng_state(), "buffers": buffers}, path)
            fsync(path)
        except OSError as err:
            error = err
    # Every rank's files are written (or one failed): only now may the tag become complete
    if not _any_rank(error is not None, engine.device):
        try:
            if is_primary():
                write_durably(ckpt / tag / MANIFEST, json.dumps(manifest(ckpt / tag), indent=1))
                write_durably(ckpt / tag / COMPLETE, f"{engine.global_steps}\n")
                write_durably(ckpt / "latest", tag)
        except OSError as err:
            error = err
        if not _any_rank(error is not None, engine.device):
            if is_primary():
                prune(ckpt, keep)
            return tag
    if is_primary():
        shutil.rmtree(ckpt / tag, ignore_errors=True)  # the partial tag; the complete ones stay as they are
    raise _save_failed(ckpt, tag, error)


def resume(engine, run_dir: Path, config: dict) -> tuple[str, dict, int, list[dict]] | None:
    """Load the newest complete checkpoint that loads into the engine: (its tag, its position, the number of
    ranks that wrote it, the newer tags skipped as damaged), or None without any complete checkpoint.

    Newest first, each tag is checked against its manifest (rank 0 reads it) and loaded on every rank; where
    the check or any rank's load fails, the ranks agree, rank 0 moves the tag aside (<tag>.damaged) and the next
    older one is tried. With none left: NoCheckpointLoads, saying what is wrong with each.

    Model, optimizer (momentum buffers), lr scheduler and global step come back through DeepSpeed, this
    rank's RNG states and buffers (BN statistics) from its own file. A checkpoint written with another
    config is refused, naming the keys that differ, but for the cluster's shape and the collective timeout
    (config.RESUME_KEYS; the launcher allows a new shape only where the batches do not depend on it). Resumed
    on another number of ranks, every rank takes the mean of the old ranks' floating-point buffers (BN running
    statistics: what evaluation uses anyway) and the RNG states of old rank (rank mod old ranks); nothing the
    training draws depends on those (each micro-batch seeds its own crops and flips).
    """
    ckpt = directory(run_dir)
    tags = complete_tags(ckpt)
    if not tags:
        return None
    skipped = []
    for tag, step in tags:
        problem = check(ckpt / tag) if is_primary() else None
        loaded = None
        if not _any_rank(problem is not None, engine.device):
            try:
                loaded = _load(engine, ckpt, tag)
            except (OSError, RuntimeError, EOFError, ValueError, KeyError, AssertionError,
                    pickle.UnpicklingError) as err:
                problem = f"it does not load on rank {dist.get_rank()} ({type(err).__name__}: " \
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})"
            if not _any_rank(problem is not None, engine.device):
                break
        problem = problem or "it does not load on another rank"
        skipped.append({"tag": tag, "step": step, "why": problem,
                        "kept_as": set_aside(ckpt, tag) if is_primary() else None})
    else:
        raise NoCheckpointLoads(
            f"no checkpoint of {run_dir} loads: "
            + "; ".join(f"{s['tag']} (step {s['step']}): {s['why']}" for s in skipped)
            + f". Each is kept aside in {ckpt} as <tag>{DAMAGED}. Restore a good copy of one of them (rename it back) "
              "to resume from it, or start the run again in a new run folder (--run-dir); nothing was deleted")
    client, rank_files = loaded
    changed = differences(client["config"], config, ignore=RESUME_KEYS)
    if changed:
        raise ValueError(f"{ckpt / tag} was written with another config than {Path(run_dir) / 'config.json'} "
                         f"({'; '.join(changed)}); start a new run folder instead of resuming this one")
    return tag, client["position"], rank_files, skipped


def _load(engine, ckpt: Path, tag: str) -> tuple[dict, int]:
    """Load one tag into the engine and this rank's own state; (DeepSpeed's client state, ranks that wrote it).
    Raises where a file does not load."""
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError("DeepSpeed found no model file in it")
    rank_files = sorted((ckpt / tag).glob("rank*_state.pt"))
    if "position" not in client or not rank_files:
        raise ValueError(f"{ckpt / tag} lacks the loader position or the ranks' state files: it was written by an "
                         "older version of this pipeline, which cannot resume it exactly; start a new run folder")
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(rank_files) == world:
        own = torch.load(_rank_file(ckpt / tag, rank), weights_only=False)
        buffers = own["buffers"]
    else:
        states = [torch.load(f, weights_only=False) for f in rank_files]
        own = states[rank % len(states)]
        buffers = {name: torch.stack([s["buffers"][name] for s in states]).mean(0) if value.is_floating_point()
                   else value for name, value in own["buffers"].items()}
    _set_rng_state(own["rng"])
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            buffer.copy_(buffers[name])
    return client, len(rank_files)
