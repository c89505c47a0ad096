"""The checks of a job before anything is written or submitted: its shards against the config, its paths on
the cluster's filesystems, and where it may run (--cluster auto, this machine's capacity)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pipeline import config
from pipeline.data.manifest import load_index, load_manifest

NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "wekafs", "panfs", "pvfs2", "orangefs",
                       "9p", "virtiofs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "afs", "quobyte"}


def check_shards(cfg: config.Config) -> None:
    """The manifests exist and agree with the config; errors name the file, both values and the fix."""
    for split, expected in (("train", cfg.data.train_samples), ("val", cfg.data.val_samples)):
        manifest = load_manifest(cfg.data.shards, split)
        if manifest.num_samples != expected:
            raise ValueError(f"{manifest.path}: num_samples={manifest.num_samples} but data.{split}_samples={expected}; "
                             f"pass data.{split}_samples={manifest.num_samples} or point data.shards at the right folder")
        if len(manifest.classes) != cfg.model.num_classes:
            raise ValueError(f"{manifest.path}: {len(manifest.classes)} classes but model.num_classes="
                             f"{cfg.model.num_classes}; pass model.num_classes={len(manifest.classes)}")
        if split == "train" and config.loader_mode(cfg.data) == "indexed":
            load_index(manifest)
        if cfg.data.shard_url:  # read from elsewhere (object store, pipe:); the first read tells
            continue
        missing = [url for url in manifest.urls() if not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(f"{manifest.path} lists {len(missing)} shards that are not on disk, e.g. {missing[0]}; "
                                    "rerun python -m pipeline.shards convert")


def filesystem(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding path, from /proc/mounts: the longest mount prefix."""
    path = path.resolve()
    best = ("/", "unknown")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        mount = mount.replace("\\040", " ")
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[0]):
            best = (mount, kind)
    return best


def check_paths(cfg: config.Config, run_dir: Path, assume_shared: bool) -> None:
    """The run folder can be written; for multi-node jobs it and the shards are on a network filesystem."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"run folder {run_dir}: {existing} is not writable; pass a --run-dir you can write")
    if cfg.cluster.nodes == 1 or assume_shared:
        return
    for what, path in (("run folder", run_dir), ("shard folder (data.shards)", Path(cfg.data.shards))):
        if what.startswith("shard") and cfg.data.shard_url:
            continue
        mount, kind = filesystem(path if path.exists() else existing)
        if kind not in NETWORK_FILESYSTEMS:
            raise ValueError(f"{what} {path} is on a {kind} filesystem (mounted at {mount}), which the other "
                             f"{cfg.cluster.nodes - 1} nodes cannot read; put it on the shared filesystem, or "
                             "pass --assume-shared if every node mounts it")


def choose_cluster(requested: str) -> str:
    """--cluster auto: Slurm when srun is on PATH and a controller answers `scontrol ping`, this machine where
    Slurm is not installed. Where srun is there but no controller answers (maintenance, a network blip on a
    login node), an error with Slurm's own words: falling back to this machine would start a cluster's ranks
    on a login node. submitit's own auto choice looks at srun only, and a Slurm that is down then fails with
    sbatch's traceback after the data was prepared."""
    if requested != "auto":
        return requested
    if shutil.which("srun") is None:
        return "local"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        answer = (ping.stdout + ping.stderr).strip()
        up = ping.returncode == 0 and " is UP" in ping.stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        answer, up = str(err), False
    if not up:
        raise ValueError(f"srun is on PATH but no Slurm controller answers (scontrol ping: {answer or 'no answer'}); "
                         "nothing was written or submitted. Pass --cluster slurm once Slurm answers again (sbatch "
                         "needs its controller), or --cluster local to run on this machine anyway")
    return "slurm"


def check_local_capacity(requested: str, cluster: str, cfg: config.Config) -> None:
    """A local run that --cluster auto chose: refused where its ranks outnumber this machine's GPUs (or its
    cores, without GPUs), before anything is written; --cluster local runs it anyway."""
    if requested != "auto" or cluster != "local":
        return
    import torch

    ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    gpus = torch.cuda.device_count() if config.wants_gpus(cfg.cluster) else 0
    have, what = (gpus, "GPUs") if gpus else (os.cpu_count() or 1, "CPU cores and no GPU")
    if ranks > have:
        raise ValueError(f"this run has {ranks} ranks but this machine has {have} {what}: Slurm is not installed "
                         "here, so it would start them all on this machine. Pass --cluster local to do that anyway, "
                         "or run the command where Slurm is (srun on PATH)")
