"""The learning rate as a pure function of the global optimizer step (paper 2.1, 2.2, 5.1)."""

from __future__ import annotations

import math

from pipeline.config import Plan, ScheduleConfig

# schedule.kind=poly: the power of the polynomial decay, 2 as in the LARS recipes (You et al. 2017; the MLPerf
# ResNet-50 reference's poly_rate_fn)
POLY_POWER = 2


def lr_at(step: int, base_lr: float, plan: Plan, sched: ScheduleConfig) -> float:
    """Learning rate of optimizer step `step` (0-based).

    warmup (step < W):  lr = base_lr + (peak - base_lr) * step / W     (gradual warmup, paper 2.2)
                        lr = base_lr                                   (schedule.warmup=constant, the ablation)
    after, "step":      lr = peak * gamma ** #{m in milestones : step / steps_per_epoch >= m}   (paper 5.1)
    after, "cosine":    lr = peak * (1 + cos(pi * (step - W) / (T - W))) / 2,   T = total steps
    after, "poly":      lr = peak * (1 - (step - W) / (T - W)) ** 2                (the LARS recipes' decay)

    with peak = plan.peak_lr = base_lr * kn / reference_batch (linear scaling, paper 2.1; or the square root
    of kn / reference_batch under optim.scaling=sqrt) and W =
    plan.warmup_steps, which is 0 when kn <= reference_batch. Warmup starts at base_lr, not at 0, and
    changes every iteration, not every epoch.
    """
    if step < plan.warmup_steps:
        if sched.warmup == "constant":
            return base_lr
        return base_lr + (plan.peak_lr - base_lr) * step / plan.warmup_steps
    progress = min(1.0, (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps))
    if sched.kind == "cosine":
        return plan.peak_lr * (1 + math.cos(math.pi * progress)) / 2
    if sched.kind == "poly":
        return plan.peak_lr * (1 - progress) ** POLY_POWER
    epoch = step / plan.steps_per_epoch
    return plan.peak_lr * sched.gamma ** sum(epoch >= m for m in sched.milestones)
