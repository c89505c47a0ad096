"""The plan derived from a config before anything runs (and the checks that refuse what cannot run), the
run folder's config.json, and what a resumed run may change."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.parsing import invalid_choices
from pipeline.config.schema import Config, from_dict, global_batch, loader_mode, to_dict


@dataclass(frozen=True)
class Plan:
    """Quantities derived once from a Config before anything runs; never changed afterwards."""

    world_size: int  # k: ranks (GPUs) in the job
    global_batch: int  # kn: images per optimizer step = k * n * grad_accum
    peak_lr: float  # base_lr * kn / reference_batch (paper 2.1), or base_lr * sqrt(kn / reference_batch)
    steps_per_epoch: int  # optimizer steps; each rank reads (N // k) samples, whole micro-batches only
    warmup_steps: int  # iterations of linear warmup; 0 when kn <= reference_batch (paper 2.2)
    total_steps: int  # steps_per_epoch * epochs

    def summary(self, cfg: Config) -> str:
        """The arithmetic in one line, for logs and the dry run."""
        t, c = cfg.train, cfg.cluster
        return (
            f"world_size={self.world_size} ({c.nodes} nodes x {c.gpus_per_node}/node) "
            f"global_batch={self.global_batch} ({t.micro_batch}/gpu x {self.world_size} x accum {t.grad_accum}) "
            f"peak_lr={self.peak_lr:g} ({cfg.optim.base_lr:g} x {'sqrt ' if cfg.optim.scaling == 'sqrt' else ''}"
            f"{self.global_batch}/{cfg.optim.reference_batch}) "
            f"steps/epoch={self.steps_per_epoch} ({cfg.data.train_samples} // {self.global_batch}) "
            f"warmup_steps={self.warmup_steps} total_steps={self.total_steps} data={loader_mode(cfg.data)} "
            f"optim={cfg.optim.kind} schedule={cfg.schedule.kind}"
            + (f" label_smoothing={cfg.train.label_smoothing:g}" if cfg.train.label_smoothing else "")
        )


def micro_batches_per_rank(num_samples: int, world_size: int, micro_batch: int, grad_accum: int) -> int:
    """Batches each rank reads per epoch: its N // k samples in whole micro-batches, whole accumulation
    windows only (remark 4: every rank the same number of steps)."""
    return (num_samples // world_size) // micro_batch // grad_accum * grad_accum


def resolve(cfg: Config) -> Plan:
    """Derive the plan from the config, refusing configurations that cannot run."""
    errors = []
    for key, value in (
        ("cluster.nodes", cfg.cluster.nodes),
        ("cluster.gpus_per_node", cfg.cluster.gpus_per_node),
        ("cluster.cpus_per_task", cfg.cluster.cpus_per_task),
        ("train.micro_batch", cfg.train.micro_batch),
        ("train.grad_accum", cfg.train.grad_accum),
        ("train.log_every", cfg.train.log_every),
        ("schedule.epochs", cfg.schedule.epochs),
        ("optim.reference_batch", cfg.optim.reference_batch),
        ("model.num_classes", cfg.model.num_classes),
        ("model.width", cfg.model.width),
        ("data.image_size", cfg.data.image_size),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer),
        ("data.prefetch", cfg.data.prefetch),
        ("data.timeout_s", cfg.data.timeout_s),
        ("cluster.collective_timeout_s", cfg.cluster.collective_timeout_s),
    ):
        if value < 1:
            errors.append(f"{key}={value} must be at least 1")
    for key, value, zero in (
        ("data.workers", cfg.data.workers, "load in the rank"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints, "keep all"),
        ("train.precise_bn_batches", cfg.train.precise_bn_batches, "off"),
    ):
        if value < 0:
            errors.append(f"{key}={value} must be 0 ({zero}) or more")
    o, sched = cfg.optim, cfg.schedule
    # What torch's SGD, the schedule or the model would refuse, refused here, before the queue wait.
    for key, value, ok, rule in (
        ("optim.base_lr", o.base_lr, 0 < o.base_lr < math.inf, "a finite number above 0"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, 0 <= o.weight_decay < math.inf, "finite and 0 or more"),
        ("schedule.gamma", sched.gamma, 0 < sched.gamma <= 1, "in (0, 1]: the lr is multiplied by it"),
        ("schedule.warmup_epochs", sched.warmup_epochs, 0 <= sched.warmup_epochs < math.inf, "finite and 0 or more"),
        ("train.checkpoint_every_min", cfg.train.checkpoint_every_min, 0 <= cfg.train.checkpoint_every_min < math.inf,
         "finite and 0 (none) or more"),
        ("model.fc_init_std", cfg.model.fc_init_std, 0 < cfg.model.fc_init_std < math.inf, "a finite number above 0"),
        ("optim.trust_coefficient", o.trust_coefficient, 0 < o.trust_coefficient < math.inf, "a finite number above 0"),
        ("train.label_smoothing", cfg.train.label_smoothing, 0 <= cfg.train.label_smoothing < 1, "in [0, 1)"),
    ):
        if not ok:
            errors.append(f"{key}={value} must be {rule}")
    if o.nesterov and o.momentum == 0:
        errors.append("optim.nesterov=true needs optim.momentum above 0 (torch's SGD refuses Nesterov without it); "
                      "set optim.nesterov=false or a momentum")
    if list(sched.milestones) != sorted(sched.milestones) or any(not 0 <= m < math.inf for m in sched.milestones):
        errors.append(f"schedule.milestones={sched.milestones} must be finite epochs, 0 or more, in increasing order")
    if cfg.data.eval_resize < cfg.data.image_size:
        errors.append(f"data.eval_resize={cfg.data.eval_resize} is smaller than the centre crop "
                      f"data.image_size={cfg.data.image_size}")
    if not 0 < cfg.data.crop_scale_min <= 1:
        errors.append(f"data.crop_scale_min={cfg.data.crop_scale_min} must be in (0, 1]")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        errors.append(f"data.mean={cfg.data.mean} and data.std={cfg.data.std} need 3 values each (RGB), std > 0")
    if cfg.data.shard_url and "{name}" not in cfg.data.shard_url:
        errors.append(f"data.shard_url={cfg.data.shard_url!r} lacks {{name}}, the place of each shard's file name, "
                      "e.g. 'pipe:aws s3 cp s3://bucket/imagenet/{name} -'")
    errors += invalid_choices(cfg)
    if cfg.data.access == "indexed" and cfg.data.shard_url:
        errors.append(f"data.access=indexed reads the tar files next to the manifest, but data.shard_url="
                      f"{cfg.data.shard_url!r} reads them elsewhere; use data.access=stream, or drop data.shard_url")
    if errors:
        raise ValueError("invalid configuration: " + "; ".join(errors))
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    kn = global_batch(cfg)
    accum = cfg.train.grad_accum
    steps_per_epoch = micro_batches_per_rank(cfg.data.train_samples, world, cfg.train.micro_batch, accum) // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.train_samples={cfg.data.train_samples} gives no full step at global_batch={kn}; "
            "use fewer ranks, a smaller train.micro_batch or train.grad_accum"
        )
    if cfg.train.precise_bn_batches > steps_per_epoch * accum:
        raise ValueError(f"train.precise_bn_batches={cfg.train.precise_bn_batches} exceeds the "
                         f"{steps_per_epoch * accum} micro-batches a rank reads per epoch; use fewer")
    scale = kn / cfg.optim.reference_batch
    warmup = 0
    if kn > cfg.optim.reference_batch:
        warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    return Plan(
        world_size=world,
        global_batch=kn,
        peak_lr=cfg.optim.base_lr * scale ** (0.5 if cfg.optim.scaling == "sqrt" else 1),
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup,
        total_steps=steps_per_epoch * cfg.schedule.epochs,
    )


# The cluster's shape, which a run may change when it resumes with the same global batch (with indexed access the
# micro-batches, their order and their crops do not depend on it: pipeline.data.order).
SHAPE_KEYS = frozenset({"cluster.nodes", "cluster.gpus_per_node", "cluster.cpus_per_task", "train.grad_accum",
                        "data.workers"})
# What may change when a run resumes: its shape, and what does not touch the optimisation.
RESUME_KEYS = SHAPE_KEYS | {"cluster.collective_timeout_s"}


def differences(old: dict, new: dict, ignore: typing.Collection[str] = ()) -> list[str]:
    """'section.key: old -> new' for every key whose value differs between two to_dict() configs, but the
    dotted keys in `ignore`. A key that one side lacks (saved before the key existed) counts as its default."""
    defaults = to_dict(Config())

    def value(cfg: dict, section: str, key: str):
        return cfg.get(section, {}).get(key, defaults.get(section, {}).get(key))

    return [f"{section}.{key}: {value(old, section, key)!r} -> {value(new, section, key)!r}"
            for section in sorted(set(old) | set(new))
            for key in sorted(set(old.get(section, {})) | set(new.get(section, {})))
            if value(old, section, key) != value(new, section, key) and f"{section}.{key}" not in ignore]


def keep_global_batch(saved: Config, cfg: Config, grad_accum_given: bool) -> Config:
    """cfg for resuming a run saved as `saved` on cfg's cluster shape: train.grad_accum derived so that the
    global batch kn stays (unless the overrides set it); raises naming the rank counts that keep kn."""
    ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if grad_accum_given:
        return cfg
    kn = global_batch(saved)
    n = cfg.train.micro_batch
    if kn % (ranks * n):
        fits = [k for k in range(1, kn // n + 1) if kn % (k * n) == 0]
        raise ValueError(f"the run's global batch {kn} cannot be kept on {ranks} ranks of train.micro_batch={n}: "
                         f"ranks x micro_batch x grad_accum must be {kn}; pick --nodes x --gpus-per-node among "
                         f"{', '.join(map(str, fits))} ranks, or start a new run folder")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=kn // (ranks * n)))


def save_run_config(run_dir: Path, cfg: Config, plan: Plan) -> Path:
    """Write config.json (config and its plan) into the run folder."""
    path = Path(run_dir) / "config.json"
    path.write_text(json.dumps({"config": to_dict(cfg), "plan": dataclasses.asdict(plan)}, indent=2) + "\n")
    return path


def load_run_config(run_dir: Path) -> tuple[Config, Plan]:
    """Read config.json back and check the plan still follows from the config."""
    path = Path(run_dir) / "config.json"
    raw = json.loads(path.read_text())
    cfg = from_dict(raw["config"])
    plan = resolve(cfg)
    if dataclasses.asdict(plan) != raw["plan"]:
        raise ValueError(f"{path}: saved plan {raw['plan']} does not follow from its config ({plan})")
    return cfg, plan
