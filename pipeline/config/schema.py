"""The configuration's schema: one frozen dataclass per section, every default, the choices of every
enumerated field as a `Literal` (pipeline.config.parsing checks them all, generically), and the conversions
to and from the JSON saved in a run folder.

Paper references are to Goyal et al. 2017 (arXiv 1706.02677v2).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Literal

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
    access: Literal["auto", "indexed", "stream"] = "auto"
    timeout_s: int = 600  # a DataLoader worker silent this long fails the rank instead of hanging every rank
    # Where training images are decoded. "cpu": in the DataLoader workers (libjpeg-turbo, reduced-size where the
    # crop allows). "gpu": the workers only read the bytes and draw the crops; the rank decodes each batch on its
    # GPU (torchcodec's batched nvJPEG) and crops, resizes and flips it there, with the same crops (docs/data.md).
    # Evaluation decodes on the CPU either way.
    decode: Literal["cpu", "gpu"] = "cpu"


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
    kind: Literal["sgd", "lars"] = "sgd"
    base_lr: float = 0.1  # lr at reference_batch images per step (paper 2.1: 0.1 per 256)
    reference_batch: int = 256  # images per step at which base_lr holds; peak lr = base_lr * kn / this
    # "linear": peak lr = base_lr * kn / reference_batch (paper 2.1); "sqrt": base_lr * sqrt(kn / reference_batch),
    # the rule the paper compares against (26.22% error at 8k against linear's 23.74%)
    scaling: Literal["linear", "sqrt"] = "linear"
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
    kind: Literal["step", "cosine", "poly"] = "step"
    # "gradual": base_lr -> peak lr, a constant amount every iteration (paper 2.2); "constant": base_lr for the
    # warmup epochs, then the peak (the paper's ablation: 25.88% error at 8k, worse than no warmup's 24.84%)
    warmup: Literal["gradual", "constant"] = "gradual"


@dataclass(frozen=True)
class TrainConfig:
    """Per-GPU batch, precision, bookkeeping."""

    micro_batch: int = 32  # n: images per GPU per step, and the BatchNorm batch (paper 2.3: 32)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (emulates a larger kn)
    # "fp32" (the paper): full fp32 matmuls and convolutions (TF32 off); "tf32": fp32 weights and activations, the
    # GPU's matmuls and convolutions on TF32 (inputs rounded to 10 bits of mantissa); "bf16": autocast to bf16 on
    # fp32 weights (TF32 for what stays fp32). Set explicitly on every GPU rank, never left to torch's defaults.
    # Picks ds_configs/<precision>.json (tf32 takes fp32.json: DeepSpeed sees fp32)
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
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
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # torch.distributed backend: auto = nccl with CUDA, gloo without
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


def global_batch(cfg: Config) -> int:
    """kn, images per optimizer step: ranks x train.micro_batch x train.grad_accum."""
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node * cfg.train.micro_batch * cfg.train.grad_accum


def to_dict(cfg: Config) -> dict:
    """Plain JSON-able dict of a Config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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


def leaf_fields(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> annotated type for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(leaf_fields(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out
