import pytest

from pipeline import config, schedule

# Paper 2.2 / 5.1 at kn=8192: 0.1 -> 3.2 over 5 epochs, then x0.1 at epochs 30, 60, 80.
GOLDEN_8K = [(0.0, 0.1), (2.5, 1.65), (5.0, 3.2), (29.9, 3.2), (30.0, 0.32), (60.0, 0.032), (80.0, 0.0032), (89.9, 0.0032)]


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
