import pytest
from pipeline import config
from pipeline.train import schedule

from helpers import GOLDEN_8K


@pytest.mark.parametrize("epoch, lr", GOLDEN_8K)
def test_golden_table_8k(epoch, lr):
    cfg = config.preset("goyal_r50_bs8k")
    plan = config.resolve(cfg)
    step = round(epoch * plan.steps_per_epoch)
    assert schedule.lr_at(step, cfg.optim.base_lr, plan, cfg.schedule) == pytest.approx(lr)


def test_warmup_changes_every_iteration_by_a_constant():
    cfg = config.preset("goyal_r50_bs8k")
    plan = config.resolve(cfg)
    lrs = [schedule.lr_at(s, cfg.optim.base_lr, plan, cfg.schedule) for s in range(plan.warmup_steps + 1)]
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx((3.2 - 0.1) / plan.warmup_steps) for d in steps)


def test_no_warmup_at_the_reference_batch():
    cfg = config.preset("goyal_r50_bs256")
    plan = config.resolve(cfg)
    assert schedule.lr_at(0, cfg.optim.base_lr, plan, cfg.schedule) == pytest.approx(0.1)


def test_cosine_option_keeps_the_warmup_then_falls_from_peak_to_zero():
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), ["schedule.kind=cosine"])
    plan = config.resolve(cfg)
    lr = [schedule.lr_at(s, cfg.optim.base_lr, plan, cfg.schedule) for s in range(plan.total_steps + 1)]
    step_cfg = config.preset("goyal_r50_bs8k")
    assert lr[: plan.warmup_steps] == [schedule.lr_at(s, 0.1, plan, step_cfg.schedule) for s in range(plan.warmup_steps)]
    assert lr[plan.warmup_steps] == pytest.approx(3.2)
    assert lr[(plan.warmup_steps + plan.total_steps) // 2] == pytest.approx(1.6)
    assert lr[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in zip(lr[plan.warmup_steps:], lr[plan.warmup_steps + 1:]))


def test_unknown_schedule_kind_is_refused():
    with pytest.raises(ValueError, match="schedule.kind='linear'; valid: step, cosine"):
        config.resolve(config.apply_overrides(config.preset("demo"), ["schedule.kind=linear"]))
