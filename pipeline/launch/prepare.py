"""Preparing a job: the run (config, plan, DeepSpeed JSON) resolved from the flags, the checks of its
shards and paths, its run folder, and the submitit executor that will run it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import submitit

from pipeline import config
from pipeline.data.manifest import load_index, load_manifest
from pipeline.dsconfig import BATCH_KEYS, LOGGING_KEYS, ds_config_path, load_ds_config
from pipeline.launch.options import requeue_limit
from pipeline.shards import demo
from pipeline.shards.convert import convert
from pipeline.train import metrics, model, tags
from pipeline.train.preempt import ATTEMPT

DEMO_IMAGES = Path("data/fashion-mnist")
# The demo's training images split in two for choosing hyper-parameters (pipeline.reproduce --holdout)
HOLDOUT_IMAGES = Path("data/fashion-mnist-holdout")
HOLDOUT_SHARDS = Path("shards/fashion-mnist-holdout")
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "wekafs", "panfs", "pvfs2", "orangefs",
                       "9p", "virtiofs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "afs", "quobyte"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run as the launcher prepares it: its folder and what goes into it."""

    run_dir: Path
    cfg: config.Config
    plan: config.Plan
    ds_config: dict  # the DeepSpeed JSON, reconciled with cfg (pipeline.dsconfig)


def job_config(args: argparse.Namespace, overrides: list[str], saved: config.Config | None = None) -> config.Config:
    """The config of the flags: the preset (or, for a run folder that trained and no --preset given, the
    config saved in it), then the cluster flags, then key=value overrides; the shard folder made absolute
    (the ranks may start elsewhere)."""
    cfg = saved if saved is not None and args.preset is None else config.preset(args.preset or args.default_preset)
    cluster = {k: v for k, v in (("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node),
                                 ("cpus_per_task", args.cpus_per_task)) if v is not None}
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))
    cfg = config.apply_overrides(cfg, overrides)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(Path(cfg.data.shards).resolve())))


def resolve_run(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> Run:
    """The run of the flags' config (job_config) in run_dir, with its plan and reconciled DeepSpeed JSON;
    raises on anything that cannot run."""
    saved = None
    if (run_dir / "config.json").is_file() and not never_trained(run_dir):  # a run to resume, not to replace
        saved = config.load_run_config(run_dir)[0]
    cfg = job_config(args, overrides, saved)
    if saved is not None:
        cfg = config.keep_global_batch(saved, cfg, any(o.startswith("train.grad_accum=") for o in overrides))
    plan = config.resolve(cfg)
    model.check_arch(cfg.model)
    run = Run(run_dir, cfg, plan, load_ds_config(cfg, plan))
    if saved is not None:
        check_resume(run, saved)
    return run


def never_trained(run_dir: Path) -> bool:
    """A run folder whose job never took a step (it failed before, or never started): no checkpoint and no
    progress record, so a corrected command may replace its config."""
    return tags.latest_tag(run_dir) is None and \
        not any(r["_type"] == "train_iter" for r in metrics.read(run_dir / "metrics.jsonl"))


def check_resume(run: Run, saved: config.Config) -> None:
    """A run folder may be resumed with the same config, or on another cluster shape with the same global
    batch under indexed access, and with the same DeepSpeed JSON but for its batch and logging keys;
    anything else that would change the optimisation is refused, naming the keys. (A folder that never
    trained is not checked: it takes the corrected command's config.)"""
    path = run.run_dir / "config.json"
    changed = config.differences(config.to_dict(saved), config.to_dict(run.cfg), ignore=config.RESUME_KEYS)
    if changed:
        raise ValueError(f"{path} holds another config ({'; '.join(changed)}); pass a new --run-dir to start a new "
                         "run, or the same settings to resume this one")
    kn = config.global_batch(saved)
    if run.plan.global_batch != kn:
        raise ValueError(f"{path}: the run's global batch is {kn}, and this command's would be {run.plan.global_batch} "
                         "(ranks x train.micro_batch x train.grad_accum); drop train.grad_accum to keep it, or pass a "
                         "new --run-dir")
    reshaped = config.differences(config.to_dict(saved), config.to_dict(run.cfg),
                                  ignore=config.RESUME_KEYS - config.SHAPE_KEYS)
    if reshaped and config.loader_mode(run.cfg.data) == "stream":
        raise ValueError(f"{path}: with data.access=stream the batches depend on the cluster's shape "
                         f"({'; '.join(reshaped)}); resume with the shape it ran on, or use indexed access")
    old = json.loads((run.run_dir / "ds_config.json").read_text())
    keys = sorted(key for key in set(old) | set(run.ds_config)
                  if key not in BATCH_KEYS + LOGGING_KEYS and old.get(key) != run.ds_config.get(key))
    if keys:
        raise ValueError(f"{ds_config_path(run.cfg)} differs from the "
                         f"{run.run_dir / 'ds_config.json'} this run was started with in {', '.join(keys)}; restore "
                         "it to resume, or pass a new --run-dir")


def makes_demo_data(cfg: config.Config) -> bool:
    """Whether the run reads the demo's own shard folder (the demo's and the study's presets do) or its
    held-out split (HOLDOUT_SHARDS), which are made when missing."""
    return cfg.data.shards in (str(Path(config.preset("demo").data.shards).resolve()), str(HOLDOUT_SHARDS.resolve()))


def make_demo_data(cfg: config.Config) -> None:
    """A run that reads the demo's shard folder or its held-out split makes its data (Fashion-MNIST as JPEGs,
    then shards); any other shards must exist already. A rerun reuses what is there."""
    if makes_demo_data(cfg):
        demo.write_image_tree(DEMO_IMAGES)
        images = DEMO_IMAGES
        if cfg.data.shards == str(HOLDOUT_SHARDS.resolve()):
            demo.write_holdout_tree(HOLDOUT_IMAGES, DEMO_IMAGES)
            images = HOLDOUT_IMAGES
        convert(images, Path(cfg.data.shards))


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


def prepare_run_dir(run: Run) -> None:
    """Create the run folder with config.json and ds_config.json; for a run resumed on another cluster shape,
    or a folder that never trained (resolve_run checked which), write them anew and print a line that says
    so."""
    run_dir, cfg = run.run_dir, run.cfg
    note = None
    if (run_dir / "config.json").is_file():
        saved, saved_plan = config.load_run_config(run_dir)
        changed = config.differences(config.to_dict(saved), config.to_dict(cfg))
        old_ds = json.loads((run_dir / "ds_config.json").read_text())
        if not changed and old_ds == run.ds_config:
            return
        if never_trained(run_dir):
            note = (f"replacing the config of {run_dir}, whose job never took a step ("
                    f"{'; '.join(changed) or 'its DeepSpeed JSON'})")
        elif not changed and all(old_ds.get(k) == run.ds_config.get(k) for k in set(old_ds) | set(run.ds_config)
                                 if k not in LOGGING_KEYS):
            note = f"{run_dir / 'ds_config.json'}: its logging keys ({', '.join(LOGGING_KEYS)}) follow the new JSON"
        else:
            note = (f"resuming on {run.plan.world_size} ranks with train.grad_accum={cfg.train.grad_accum} (it ran on "
                    f"{saved_plan.world_size} with {saved.train.grad_accum}): the same global batch "
                    f"{run.plan.global_batch}, the same micro-batches in the same steps")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save_run_config(run_dir, cfg, run.plan)
    (run_dir / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2) + "\n")
    if note:
        print(note, flush=True)


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


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT ignored while the block starts processes, which inherit that: a Ctrl-C in the terminal then
    reaches the launcher alone, which stops the job cleanly (stop_local_job), instead of reaching submitit's
    local controller (which dies printing a traceback, and kills the ranks a second later) and the ranks
    (which die mid-step, so that the steps since their last checkpoint are lost and trained again)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_local_job(job: submitit.Job) -> None:
    """Ask a job of submitit's local executor to stop: SIGTERM to its controller (the job id is its pid),
    which forwards it to the ranks; they stop after the same step and checkpoint (pipeline.train.preempt).
    submitit's own cancel() sends SIGINT, which these processes ignore (_interrupts_ignored)."""
    try:
        os.kill(int(job.job_id), signal.SIGTERM)
    except ProcessLookupError:  # it has just ended
        pass


def submit_jobs(executor: submitit.Executor, jobs: list) -> list[submitit.Job]:
    """executor.submit of every job (one job array when several); a refusal by sbatch becomes one error
    with Slurm's own words and the way out. Local jobs start with SIGINT ignored (_interrupts_ignored)."""
    try:
        with _interrupts_ignored() if executor.cluster == "local" else contextlib.nullcontext():
            if len(jobs) == 1:
                return [executor.submit(jobs[0])]
            with executor.batch():
                submitted = [executor.submit(job) for job in jobs]
        return submitted
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        words = " ".join(str(err).split())
        raise ValueError(f"Slurm refused the job: {words}; fix what it says, or run on this machine with "
                         "--cluster local") from None


def make_executor(args: argparse.Namespace, cfg: config.Config, folder: Path, name: str,
                  options: dict) -> submitit.Executor:
    """submitit executor with one task per GPU (per process on CPU); args.cluster is a chosen one."""
    requeues = requeue_limit(args, args.cluster)
    # Each local rank runs under pipeline.launch.local_task, which writes down how it ended
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=requeues,
                                     local_python=f"{shlex.quote(sys.executable)} -m pipeline.launch.local_task")
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if executor.cluster == "debug" and world != 1:
        raise ValueError(f"--cluster debug runs one rank in this process, but the plan has world_size={world}; "
                         "use --cluster local, or --nodes 1 --gpus-per-node 1")
    if executor.cluster != "slurm" and cfg.cluster.nodes != 1:
        raise ValueError(f"--nodes {cfg.cluster.nodes} needs Slurm; this machine runs one node (--cluster {executor.cluster})")
    # Without GPUs asked for, submitit's local executor hides every GPU (CUDA_VISIBLE_DEVICES="").
    gpus = cfg.cluster.gpus_per_node if config.wants_gpus(cfg.cluster) and executor.cluster != "debug" else 0
    executor.update_parameters(nodes=cfg.cluster.nodes, tasks_per_node=cfg.cluster.gpus_per_node, gpus_per_node=gpus,
                               cpus_per_task=cfg.cluster.cpus_per_task, timeout_min=args.time, name=name)
    if executor.cluster == "slurm":
        # One failed rank ends the whole step at once instead of leaving the others blocked in a collective;
        # then pipeline.requeue, with srun's exit status, requeues a job that failed mid-run (submitit requeues
        # on time limits and preemption only). The line before srun marks the attempt in srun's log.
        requeue = [shlex.quote(sys.executable), "-m", "pipeline.requeue", "--submitit", shlex.quote(str(folder)),
                   "--exit-code", "$?", "--max-requeues", str(requeues)]
        executor.update_parameters(slurm_signal_delay_s=args.signal_delay, slurm_srun_args=["--kill-on-bad-exit=1"],
                                   slurm_additional_parameters=options, slurm_array_parallelism=args.array_parallelism,
                                   slurm_setup=[f'echo "{ATTEMPT} ${{SLURM_RESTART_COUNT:-0}}" >&2'],
                                   slurm_teardown=[" ".join(requeue)])
    return executor
