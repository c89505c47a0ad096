"""DeepSpeed checkpoints in the run folder, and resuming from the newest complete one.

A tag holds DeepSpeed's states (with the config and the loader position as client state) and one file per
rank with its RNG states and buffers (BN statistics differ per rank; DeepSpeed saves rank 0's only).
`latest` is written by us, atomically, after every rank's files: a job killed mid-save resumes from the
checkpoint before (docs/preemption.md).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import RESUME_KEYS, differences
from pipeline.train.distributed import is_primary


def directory(run_dir: Path) -> Path:
    """Where the checkpoint tags and the `latest` file live."""
    return Path(run_dir) / "checkpoints"


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


def _write_durably(path: Path, text: str) -> None:
    """path holds text, on disk, or path is untouched (written beside it, synced, then renamed)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def save(engine, run_dir: Path, tag: str, position: dict, config: dict, keep: int) -> str:
    """Checkpoint under `tag` (collective: every rank calls it). `position` is where training goes on:
    {"epoch", "step_in_epoch"}, the next batch the loader hands out. Once every rank's files are written,
    the tag gets its COMPLETE file (its global step) and becomes `latest`; then prune() keeps the newest
    `keep` complete tags (0: all)."""
    ckpt = directory(run_dir)
    client = {"position": position, "config": config}
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, save_latest=False)
    buffers = {name: buffer.cpu() for name, buffer in engine.module.named_buffers()}
    torch.save({"rng": _rng_state(), "buffers": buffers}, _rank_file(ckpt / tag, dist.get_rank()))
    dist.barrier()  # every rank's files are written: only now is the tag complete
    if is_primary():
        _write_durably(ckpt / tag / COMPLETE, f"{engine.global_steps}\n")
        _write_durably(ckpt / "latest", tag)
        prune(ckpt, keep)
    return tag


COMPLETE = "COMPLETE"  # in a tag folder once every rank's files are in it; holds the tag's global step


def prune(ckpt: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags by global step (0: all), and remove the folders of saves that
    never completed (a job killed mid-save) but the one `latest` names; folder times play no part."""
    latest = (ckpt / "latest").read_text().strip()
    complete, broken = {}, []
    for folder in (d for d in ckpt.iterdir() if d.is_dir()):
        if (folder / COMPLETE).is_file():
            complete[folder] = int((folder / COMPLETE).read_text())
        elif folder.name != latest:
            broken.append(folder)
    stale = sorted(complete, key=complete.get)[:-keep] if keep else []
    for folder in broken + [d for d in stale if d.name != latest]:
        shutil.rmtree(folder)


def latest_tag(run_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None before the first."""
    latest = directory(run_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def resume(engine, run_dir: Path, config: dict) -> tuple[str, dict, int] | None:
    """Load the newest complete checkpoint into the engine: (its tag, its position, the number of ranks that
    wrote it), or None without one.

    Model, optimizer (momentum buffers), lr scheduler and global step come back through DeepSpeed, this
    rank's RNG states and buffers (BN statistics) from its own file. A checkpoint written with another
    config is refused, naming the keys that differ, but for the cluster's shape and the collective timeout
    (config.RESUME_KEYS; the launcher allows a new shape only where the batches do not depend on it). Resumed
    on another number of ranks, every rank takes the mean of the old ranks' floating-point buffers (BN running
    statistics: what evaluation uses anyway) and the RNG states of old rank (rank mod old ranks); nothing the
    training draws depends on those (each micro-batch seeds its own crops and flips).
    """
    ckpt = directory(run_dir)
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt / 'latest'} names {tag!r}, which DeepSpeed could not load; "
                           f"remove {ckpt / tag} and point 'latest' at an older tag, or start a new run folder")
    rank_files = sorted((ckpt / tag).glob("rank*_state.pt"))
    if "position" not in client or not rank_files:
        raise ValueError(f"{ckpt / tag} lacks the loader position or the ranks' state files: it was written by an "
                         "older version of this pipeline, which cannot resume it exactly; start a new run folder")
    changed = differences(client["config"], config, ignore=RESUME_KEYS)
    if changed:
        raise ValueError(f"{ckpt / tag} was written with another config than {Path(run_dir) / 'config.json'} "
                         f"({'; '.join(changed)}); start a new run folder instead of resuming this one")
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
    return tag, client["position"], len(rank_files)
