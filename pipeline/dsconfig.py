"""The DeepSpeed JSON, reconciled with the config before anything is submitted.

DeepSpeed itself is not imported here: the launcher on a login node needs only this."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from pipeline.config import Config, Plan

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Keys of DeepSpeed's JSON that belong to our config instead: DeepSpeed's optimizers and schedulers would
# silently replace the paper's SGD and its per-iteration warmup.
FORBIDDEN_KEYS = ("optimizer", "scheduler")
DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default, in elements
# Filled from the config (or checked against it): they follow the cluster's shape.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# What DeepSpeed reports and times, not how it trains: a run may resume with other values.
LOGGING_KEYS = ("timers", "steps_per_print", "wall_clock_breakdown")


def ds_config_path(cfg: Config) -> Path:
    """The DeepSpeed JSON to use: train.ds_config, else ds_configs/<precision>.json of this project (fp32.json
    for tf32: to DeepSpeed, a TF32 run is an fp32 one)."""
    if cfg.train.ds_config:
        return Path(cfg.train.ds_config)
    return PROJECT_ROOT / "ds_configs" / f"{'fp32' if cfg.train.precision == 'tf32' else cfg.train.precision}.json"


def reconcile_ds_config(raw: dict, source: str, cfg: Config, plan: Plan) -> dict:
    """DeepSpeed's JSON checked against the config and completed with the batch keys.

    Every disagreement is an error naming the file, both values and the fix; nothing is silently changed.
    """
    ds = copy.deepcopy(raw)
    errors = []
    for key in FORBIDDEN_KEYS:
        if key in ds:
            errors.append(f'"{key}" must not be set: the optimizer and lr schedule come from the config '
                          "(optim.*, schedule.*); remove the key")
    expected = dict(zip(BATCH_KEYS, (cfg.train.micro_batch, cfg.train.grad_accum, plan.global_batch)))
    for key, want in expected.items():
        if key in ds and ds[key] != want:
            errors.append(f"{key}={ds[key]} but the config gives {want}; remove the key or make them agree")
        ds[key] = want
    # DeepSpeed clips gradients at 1.0 when the key is absent; the paper clips nothing.
    if ds.setdefault("gradient_clipping", 0.0) != 0:
        errors.append(f"gradient_clipping={ds['gradient_clipping']}; the recipe clips nothing, set it to 0")
    # DeepSpeed's throughput timer synchronises the device twice a step unless it is off, and it is on where
    # the key is absent: the host would wait for every step instead of queueing the next.
    timer = ds.setdefault("timers", {}).setdefault("throughput", {"enabled": False})
    if timer.get("enabled", True) and timer.get("synchronized", True):
        errors.append(f"timers.throughput={timer} synchronises the device twice a step; set "
                      '{"enabled": false} (or "synchronized": false)')
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 0)
    if stage != 0:
        errors.append(f"zero_optimization.stage={stage}; pure data parallelism needs stage 0")
    # At stage 0 these two drive our overlapped bucketed allreduce (pipeline.train.buckets), not DeepSpeed's.
    overlap = zero.get("overlap_comm", False)
    if not isinstance(overlap, bool):
        errors.append(f"zero_optimization.overlap_comm={overlap!r}; use true (gradient allreduce in buckets during "
                      "backward) or false (DeepSpeed's single allreduce after backward)")
    size = zero.get("reduce_bucket_size", 1)
    if (isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size < 1
            or size != int(size)):
        errors.append(f"zero_optimization.reduce_bucket_size={size!r}; give the bucket size in gradient elements, "
                      "a whole number of at least 1 (python -m pipeline.tune_buckets measures the best)")
    if ds.get("fp16", {}).get("enabled", False):
        errors.append("fp16.enabled=true; fp16 loss scaling skips steps and shifts the schedule, use bf16")
    # bf16.enabled casts every parameter, BatchNorm's included, to bf16 while DeepSpeed keeps BN's running
    # statistics in fp32, and BatchNorm then refuses the mix. torch_autocast keeps fp32 weights (and BN in
    # fp32) and runs convolutions and the FC in bf16: the usual mixed precision for ResNets.
    if ds.get("bf16", {}).get("enabled", False):
        errors.append('bf16.enabled=true casts BatchNorm to bf16 and fails; use "torch_autocast": '
                      '{"enabled": true, "dtype": "bfloat16"} as in ds_configs/bf16.json')
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled", False) and autocast.get("dtype", "bfloat16") not in ("bfloat16", "bf16"):
        errors.append(f"torch_autocast.dtype={autocast.get('dtype')!r}; fp16 autocast brings a loss scaler that "
                      'skips steps, use "bfloat16"')
    autocast_bf16 = bool(autocast.get("enabled", False)) and autocast.get("dtype", "bfloat16") in ("bfloat16", "bf16")
    if autocast_bf16 != (cfg.train.precision == "bf16"):
        errors.append(f"torch_autocast={autocast} but train.precision={cfg.train.precision!r}; make them agree")
    if errors:
        raise ValueError(f"{source}: " + "; ".join(errors))
    return ds


def load_ds_config(cfg: Config, plan: Plan) -> dict:
    """Read and reconcile the DeepSpeed JSON the config points at."""
    path = ds_config_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"train.ds_config: no file {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return reconcile_ds_config(raw, str(path), cfg, plan)


def bucket_elements(ds: dict) -> int | None:
    """The gradient bucket size of our overlapped allreduce (pipeline.train.buckets), in elements; None
    when zero_optimization.overlap_comm is off (DeepSpeed's stage-0 default: its own allreduce after
    backward)."""
    zero = ds.get("zero_optimization", {})
    return int(zero.get("reduce_bucket_size", DEEPSPEED_BUCKET)) if zero.get("overlap_comm", False) else None
