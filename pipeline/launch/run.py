"""Building a run from the flags: its config (a saved run's, with the flags as changes), plan and DeepSpeed
JSON, the rules of resuming it, its folder, and the demo's data made where the run reads it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pipeline import config
from pipeline.dsconfig import BATCH_KEYS, LOGGING_KEYS, ds_config_path, load_ds_config
from pipeline.shards import demo
from pipeline.shards.convert import convert
from pipeline.train import metrics, model, tags

DEMO_IMAGES = Path("data/fashion-mnist")
# The demo's training images split in two for choosing hyper-parameters (pipeline.reproduce --holdout)
HOLDOUT_IMAGES = Path("data/fashion-mnist-holdout")
HOLDOUT_SHARDS = Path("shards/fashion-mnist-holdout")


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
