"""The one typed, frozen configuration tree, its presets, command-line overrides, and the resolved plan.

Every default lives here. Paper references are to Goyal et al. 2017 (arXiv 1706.02677v2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how images become tensors."""

    shards: str = "shards/imagenet"  # folder with train.json / val.json manifests and their tar shards
    train_samples: int = 1_281_167  # images in the train manifest (ImageNet-1k); checked before submit
    val_samples: int = 50_000  # images in the val manifest; every one is evaluated once per epoch
    image_size: int = 224  # px, side of the train crop and the eval centre crop (paper 5.1)
    eval_resize: int = 256  # px, eval resizes the shorter side to this before the centre crop (convention)
    crop_scale_min: float = 0.08  # smallest crop area fraction of the random-resized crop (paper 5.1)
    mean: tuple[float, ...] = IMAGENET_MEAN  # per-channel normalisation of RGB in [0, 1]
    std: tuple[float, ...] = IMAGENET_STD
    workers: int = 8  # DataLoader worker processes per rank (0: decode in the rank itself)
    prefetch: int = 4  # batches each worker keeps ready
    shuffle_buffer: int = 2000  # data.access=stream only: samples each worker permutes at a time
    shard_url: str = ""  # where the tars are read from, "{name}" = a shard's file name; "" = next to the manifest
    # How training reads the shards (docs/data.md). "indexed": one permutation of every sample per epoch,
    # each sample one positioned read (the shards are files: shard_url empty); "stream": the shards in a
    # permuted order, read through, shuffled in blocks (any URL); "auto": indexed unless shard_url is set.
    access: str = "auto"
    timeout_s: int = 600  # a DataLoader worker silent this long fails the rank instead of hanging every rank
    # Where training images are decoded. "cpu": in the DataLoader workers (libjpeg-turbo, reduced-size where the
    # crop allows). "gpu": the workers only read the bytes and draw the crops; the rank decodes each batch on its
    # GPU (torchcodec's batched nvJPEG) and crops, resizes and flips it there, with the same crops (docs/data.md).
    # Evaluation decodes on the CPU either way.
    decode: str = "cpu"


@dataclass(frozen=True)
class ModelConfig:
    """Which torchvision ResNet and how it is initialised."""

    arch: str = "resnet50"  # torchvision ResNet name (paper: ResNet-50, stride on the 3x3 conv)
    num_classes: int = 1000  # must equal the number of classes in the manifests
    width: int = 64  # channels of the first stage, doubled at each of the next three (64: torchvision's ResNet)
    zero_init_residual: bool = True  # gamma=0 on the last BN of every residual block (paper 5.1, table 2b)
    fc_init_std: float = 0.01  # FC weights ~ N(0, std) (paper 5.1)


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and the linear scaling rule."""

    # "sgd": torch's SGD with momentum (the paper); "lars": layer-wise adaptive rate scaling (You et al. 2017,
    # timm's Lars) for kn past the paper's 8k, where its recipe's error climbs (docs/large-batch.md)
    kind: str = "sgd"
    base_lr: float = 0.1  # lr at reference_batch images per step (paper 2.1: 0.1 per 256)
    reference_batch: int = 256  # images per step at which base_lr holds; peak lr = base_lr * kn / this
    # "linear": peak lr = base_lr * kn / reference_batch (paper 2.1); "sqrt": base_lr * sqrt(kn / reference_batch),
    # the rule the paper compares against (26.22% error at 8k against linear's 23.74%)
    scaling: str = "linear"
    momentum: float = 0.9  # paper 5.1
    nesterov: bool = True  # paper 5.1 (plain momentum "equally effective")
    weight_decay: float = 1e-4  # on conv and FC weights (paper 5.1)
    weight_decay_bn: bool = False  # decay BN gamma/beta too (paper 5.1: no)
    weight_decay_bias: bool = False  # decay biases (the FC bias) too
    # optim.kind=lars: the trust coefficient eta of each layer's rate, lr x eta ||w|| / (||g|| + wd ||w||)
    # (You et al. 2017 and the MLPerf ResNet-50 reference: 0.001)
    trust_coefficient: float = 0.001


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule, in epochs; applied every iteration."""

    epochs: int = 90  # paper 5.1: 90 epochs at every batch size
    warmup_epochs: float = 5.0  # paper 2.2: ramp base_lr -> peak lr, linearly per iteration (only when kn > ref)
    milestones: tuple[float, ...] = (30.0, 60.0, 80.0)  # epochs where the lr is multiplied by gamma (paper 5.1)
    gamma: float = 0.1
    # "step": x gamma at each milestone (paper 5.1); "cosine": half-cosine from the peak to 0 after the warmup;
    # "poly": peak x (1 - progress)^2 after the warmup, to 0 at the last step (the LARS recipes' decay)
    kind: str = "step"
    # "gradual": base_lr -> peak lr, a constant amount every iteration (paper 2.2); "constant": base_lr for the
    # warmup epochs, then the peak (the paper's ablation: 25.88% error at 8k, worse than no warmup's 24.84%)
    warmup: str = "gradual"


@dataclass(frozen=True)
class TrainConfig:
    """Per-GPU batch, precision, bookkeeping."""

    micro_batch: int = 32  # n: images per GPU per step, and the BatchNorm batch (paper 2.3: 32)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (emulates a larger kn)
    # "fp32" (the paper): full fp32 matmuls and convolutions (TF32 off); "tf32": fp32 weights and activations, the
    # GPU's matmuls and convolutions on TF32 (inputs rounded to 10 bits of mantissa); "bf16": autocast to bf16 on
    # fp32 weights (TF32 for what stays fp32). Set explicitly on every GPU rank, never left to torch's defaults.
    # Picks ds_configs/<precision>.json (tf32 takes fp32.json: DeepSpeed sees fp32)
    precision: str = "fp32"
    ds_config: str = ""  # DeepSpeed JSON; empty means ds_configs/<precision>.json of this project
    # the cross-entropy's target puts 1 - s on the label and s spread over all classes (0: none, the paper;
    # 0.1 in the LARS recipes past 8k)
    label_smoothing: float = 0.0
    seed: int = 0  # seeds the model init and the per-epoch data permutation
    log_every: int = 50  # optimizer steps between train_iter records
    keep_checkpoints: int = 3  # newest complete checkpoints kept on disk, by global step; 0 keeps all
    # minutes between periodic checkpoints within an epoch (besides every epoch's end and every stop), so that
    # a crash without a warning loses at most this much; 0: none
    checkpoint_every_min: float = 30.0
    # torch.compile of the model through DeepSpeed's engine.compile (inductor): faster steps on GPUs after a
    # compile of a minute or two at the start of every attempt; off by default (docs/gpu.md)
    compile: bool = False
    precise_bn_batches: int = 0  # 0: evaluate on BN's running averages (paper); N: recompute them on N train batches per rank first


@dataclass(frozen=True)
class ClusterConfig:
    """Where the job runs; filled from the command line of pipeline.submit."""

    nodes: int = 1
    gpus_per_node: int = 1  # = tasks per node; on CPU, processes per node
    backend: str = "auto"  # torch.distributed backend: auto = nccl with CUDA, gloo without
    cpus_per_task: int = 1  # also OMP_NUM_THREADS of every rank
    # seconds a rank waits in a collective (an allreduce, a barrier) before it fails instead of hanging: a rank
    # that stopped answering ends the job, which is then requeued (docs/preemption.md). Longer than the
    # slowest checkpoint save, which the other ranks wait for at a barrier.
    collective_timeout_s: int = 1800


def loader_mode(data: DataConfig) -> str:
    """"indexed" or "stream": how training reads the shards under data.access (docs/data.md)."""
    if data.access == "auto":
        return "stream" if data.shard_url else "indexed"
    return data.access


def wants_gpus(cluster: ClusterConfig) -> bool:
    """A job on the gloo backend is a CPU job: it asks the scheduler for no GPUs."""
    return cluster.backend != "gloo"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _goyal_r50_bs256() -> Config:
    """The paper's baseline: 8 GPUs x 32 = 256, lr 0.1, no warmup needed."""
    return Config(cluster=ClusterConfig(nodes=1, gpus_per_node=8, cpus_per_task=10))


def _goyal_r50_bs8k() -> Config:
    """The paper's headline run: 32 nodes x 8 GPUs x 32 = 8192, lr 3.2 after 5 epochs of warmup."""
    return Config(cluster=ClusterConfig(nodes=32, gpus_per_node=8, cpus_per_task=10))


def _lars_r50_bs32k() -> Config:
    """kn = 32768 on 128 nodes x 8 GPUs x 32, past the paper's 8k, with the MLPerf ResNet-50 reference's LARS
    recipe for that batch: tensorflow/models, official/r1/resnet/resnet_run_loop.py (poly_rate_fn and
    resnet_model_fn with --enable_lars, the reference of MLPerf Training v0.5-v0.6), at batch >= 32768:

    - LARS (tf.contrib.opt.LARSOptimizer: trust coefficient 0.001, momentum 0.9, not Nesterov), BN
      parameters and biases skipped (neither adapted nor decayed), weight decay 1e-4;
    - peak lr 32 reached by a linear warmup over 14 epochs, then a polynomial decay of power 2 over the rest of
      90 epochs;
    - label smoothing 0.1 (its --label_smoothing flag, as MLPerf's ResNet-50 submissions set it).

    Here the warmup starts at base_lr = 32 / 128 = 0.25 (ours starts at the reference rate, theirs at 0) and
    the decay ends at 0 (theirs at 1e-4). Everything else is the paper's recipe: n = 32 per GPU for BN,
    zero-gamma, FC init, the data.
    """
    return Config(
        optim=OptimConfig(kind="lars", base_lr=0.25, nesterov=False, trust_coefficient=0.001),
        schedule=ScheduleConfig(kind="poly", warmup_epochs=14.0),
        train=TrainConfig(label_smoothing=0.1),
        cluster=ClusterConfig(nodes=128, gpus_per_node=8, cpus_per_task=10),
    )


def _demo() -> Config:
    """Fashion-MNIST (28 px product photos) on 2 CPU processes: the recipe scaled down to ~4 minutes.

    Kept from the paper: linear scaling (kn=64 is 2x the reference 32, so peak lr 0.1) with gradual
    per-iteration warmup, n=32 per worker for BN, zero-gamma, FC init, Nesterov SGD, weight decay off
    BN, step decays. Changed: 2 epochs, and no scale augmentation. Measured over 700 steps: random crops
    down to 60% area gave 17.3% error; full-image training gave 23.1% with the 256/224-style eval zoom
    and 12.8% without it, so train and eval both see the whole 28 px image.
    """
    return Config(
        data=DataConfig(
            shards="shards/fashion-mnist",
            train_samples=60_000,
            val_samples=10_000,
            image_size=28,
            eval_resize=28,  # no eval zoom: it must match the train scale (see above)
            crop_scale_min=1.0,  # whole image + horizontal flip
            mean=(0.286, 0.286, 0.286),
            std=(0.353, 0.353, 0.353),
            workers=1,
            shuffle_buffer=1000,
        ),
        model=ModelConfig(arch="resnet10", num_classes=10),
        optim=OptimConfig(base_lr=0.05, reference_batch=32),  # kn=64 is 2x the reference: peak 0.1
        schedule=ScheduleConfig(epochs=2, warmup_epochs=0.3, milestones=(1.4, 1.8)),
        train=TrainConfig(micro_batch=32, log_every=100),
        cluster=ClusterConfig(nodes=1, gpus_per_node=2, backend="gloo", cpus_per_task=1),
    )


def _study() -> Config:
    """The reference run (1x) of the reproduction study (python -m pipeline.reproduce, docs/reproduce.md):
    kn = 32 on one process; the study's larger kn accumulate micro-batches of 32 (BN per 32 images, as the
    paper's own emulation of large minibatches), so that 22 runs (11 rows x 2 seeds) fit in about 1.5 hours on
    2 cores, two runs at a time.

    - Model: the demo's ResNet-10 at width 16 (16-128 channels), ~2,400 images/s per core forward and
      backward against ~270 at width 64; data: the demo's (Fashion-MNIST, 28 px, whole image + flip).
    - Schedule: 6 epochs, each of the paper's epochs scaled by 6/90: warmup 1/3 epoch (its 5), x0.1 at 2, 4
      and 5.33 (its 30, 60, 80); a run's reported error is the median of its last 2 epochs (its last 5).
    - base_lr 0.025 at kn=32 (0.2 per 256, twice the paper's rate per image). Measured after one epoch at
      kn=32: 13.75% error at 0.025, 14.32% at 0.05, 15.07% at 0.1; and at 0.1 the 32x runs (lr 3.2) stayed
      at chance (90%) with and without warmup, while at 0.025 (lr 0.8) they train.
    """
    demo = _demo()
    return Config(
        data=dataclasses.replace(demo.data, workers=1),
        model=ModelConfig(arch="resnet10", num_classes=10, width=16),
        optim=OptimConfig(base_lr=0.025, reference_batch=32),
        schedule=ScheduleConfig(epochs=6, warmup_epochs=1 / 3, milestones=(2.0, 4.0, 16 / 3)),
        train=TrainConfig(micro_batch=32, log_every=50),
        cluster=ClusterConfig(nodes=1, gpus_per_node=1, backend="gloo", cpus_per_task=1),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "goyal_r50_bs256": _goyal_r50_bs256,
    "goyal_r50_bs8k": _goyal_r50_bs8k,
    "lars_r50_bs32k": _lars_r50_bs32k,
    "demo": _demo,
    "study": _study,
}


def preset(name: str) -> Config:
    """The named preset; an unknown name is an error listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> annotated type for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_leaf_fields(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def valid_keys() -> list[str]:
    """Every key that `key=value` overrides accept."""
    return sorted(_leaf_fields(Config))


def _parse_value(key: str, kind: type, text: str):
    """Turn the text of one override into a value of the field's type, or raise naming both."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind in (int, float, str):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            (item, _) = typing.get_args(kind)
            parts = [p for p in text.strip().strip("()[]").split(",") if p.strip()]  # 1,2 or (1, 2) or [1, 2]
            return tuple(item(p) for p in parts)
    except ValueError as err:
        raise ValueError(f"override {key}={text!r}: not a valid {getattr(kind, '__name__', kind)} ({err})") from None
    raise TypeError(f"override {key}: unsupported field type {kind}")


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """A new Config with `section.field=value` overrides applied; unknown keys and bad values raise."""
    fields = _leaf_fields(Config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value; valid keys: {', '.join(sorted(fields))}")
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        section, name = key.split(".")
        value = _parse_value(key, fields[key], text)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


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
    if cfg.data.decode not in ("cpu", "gpu"):
        errors.append(f"data.decode={cfg.data.decode!r}; valid: cpu, gpu")
    if cfg.data.access not in ("auto", "indexed", "stream"):
        errors.append(f"data.access={cfg.data.access!r}; valid: auto, indexed, stream")
    elif cfg.data.access == "indexed" and cfg.data.shard_url:
        errors.append(f"data.access=indexed reads the tar files next to the manifest, but data.shard_url="
                      f"{cfg.data.shard_url!r} reads them elsewhere; use data.access=stream, or drop data.shard_url")
    if cfg.schedule.kind not in ("step", "cosine", "poly"):
        errors.append(f"schedule.kind={cfg.schedule.kind!r}; valid: step, cosine, poly")
    if o.kind not in ("sgd", "lars"):
        errors.append(f"optim.kind={o.kind!r}; valid: sgd, lars")
    if cfg.schedule.warmup not in ("gradual", "constant"):
        errors.append(f"schedule.warmup={cfg.schedule.warmup!r}; valid: gradual, constant")
    if cfg.optim.scaling not in ("linear", "sqrt"):
        errors.append(f"optim.scaling={cfg.optim.scaling!r}; valid: linear, sqrt")
    if cfg.train.precision not in ("fp32", "tf32", "bf16"):
        errors.append(f"train.precision={cfg.train.precision!r}; valid: fp32, tf32, bf16")
    if cfg.cluster.backend not in ("auto", "gloo", "nccl"):
        errors.append(f"cluster.backend={cfg.cluster.backend!r}; valid: auto, gloo, nccl")
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


def to_dict(cfg: Config) -> dict:
    """Plain JSON-able dict of a Config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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


def global_batch(cfg: Config) -> int:
    """kn, images per optimizer step: ranks x train.micro_batch x train.grad_accum."""
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node * cfg.train.micro_batch * cfg.train.grad_accum


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


def from_dict(data: dict) -> Config:
    """Rebuild a Config from to_dict's output; unknown or missing keys raise."""
    hints = typing.get_type_hints(Config)
    sections = {}
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        sub_hints = typing.get_type_hints(cls)
        raw = dict(data[f.name])
        unknown = set(raw) - {g.name for g in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config section {f.name!r} has unknown keys {sorted(unknown)}")
        for key, value in raw.items():
            if typing.get_origin(sub_hints[key]) is tuple:
                raw[key] = tuple(value)
        sections[f.name] = cls(**raw)
    return Config(**sections)


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

