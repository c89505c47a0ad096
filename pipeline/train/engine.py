"""The DeepSpeed engine for pure data parallelism: our optimizer (SGD or LARS) and per-iteration schedule."""

from __future__ import annotations

import deepspeed
import torch

from pipeline.config import Config, OptimConfig, Plan
from pipeline.train import buckets, noise, schedule


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Parameters split by weight decay: conv/FC weights decay; BN gamma/beta and biases only if configured."""
    decay, no_decay = [], []
    for module in model.modules():
        is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for name, param in module.named_parameters(recurse=False):
            if is_bn:
                wanted = optim.weight_decay_bn
            elif name == "bias":
                wanted = optim.weight_decay_bias
            else:
                wanted = True
            (decay if wanted else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: Config, plan: Plan) -> torch.optim.Optimizer:
    """SGD with momentum (optim.kind=sgd, the paper) or LARS (optim.kind=lars); the lr it holds is the peak,
    scaled per step by the schedule.

    torch keeps the lr outside the momentum buffer: g' = g + wd w; u <- m u + g'; then w <- w - lr u
    (plain) or w <- w - lr (g' + m u) (Nesterov). The paper's form keeps the lr inside the buffer
    (v <- m v + lr g; w <- w - v) and so needs momentum correction (remark 2) whenever lr changes; torch's
    form is that corrected update, so no correction is applied here. Weight decay is added to the gradient
    after DeepSpeed's allreduce, once (eq. 8), never scaled with the loss.

    LARS is timm's Lars (a maintained implementation; torch has none): in the same lr-outside form, each
    decayed tensor's g' is multiplied by its trust ratio eta ||w|| / (||g|| + wd ||w|| + 1e-8) (1 where a norm
    is 0) before it enters the buffer. The tensors without weight decay (BN gamma and beta, biases, unless
    optim.weight_decay_bn or _bias) are neither adapted nor decayed, as in You et al. 2017 and the MLPerf
    reference; the decayed ones are adapted even at optim.weight_decay=0 (timm would then adapt none).
    """
    groups = param_groups(model, cfg.optim)
    if cfg.optim.kind == "sgd":
        return torch.optim.SGD(groups, lr=plan.peak_lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    # Imported here: timm imports its whole model zoo and huggingface_hub (3 s a rank), which SGD runs never need
    from timm.optim.lars import Lars

    decay, no_decay = groups
    return Lars([{**decay, "always_adapt": True}, {**no_decay, "always_adapt": False}], lr=plan.peak_lr,
                momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov, trust_coeff=cfg.optim.trust_coefficient)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, plan: Plan) -> torch.optim.lr_scheduler.LambdaLR:
    """schedule.lr_at as a torch scheduler; DeepSpeed steps it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.lr_at(step, cfg.optim.base_lr, plan, cfg.schedule) / plan.peak_lr
    )


def build_engine(model: torch.nn.Module, cfg: Config, plan: Plan, ds_config: dict, channels_last: bool = False):
    """deepspeed.initialize with our SGD and schedule, and with our overlapped bucketed gradient allreduce
    when the JSON asks for it (pipeline.train.buckets), which also measures the gradient noise scale;
    torch.distributed must already be initialised.

    channels_last (on GPU) is applied after DeepSpeed's start: its broadcast of the initial weights views
    every parameter as bytes, which a channels_last conv weight (last stride != 1) refuses. The conversion
    keeps the Parameter objects, so the optimizer still holds them.
    """
    optimizer = build_optimizer(model, cfg, plan)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, cfg, plan),
                                           config=ds_config, dist_init_required=False)
    if channels_last:
        engine.module.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        engine.compile()  # the module compiled in place: the same parameters, so the buckets' hooks still fire
    reducer = buckets.attach(engine, ds_config)
    if reducer is not None:  # the gradient noise scale, from the gradients in the buckets (pipeline.train.noise)
        reducer.measure_noise(noise.pairing(plan.world_size, cfg.train.micro_batch, cfg.train.grad_accum))
    return engine
